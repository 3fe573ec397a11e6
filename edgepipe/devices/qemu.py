"""The aarch64 onnxruntime under qemu user-mode emulation: ``--device qemu`` / ``qemu:CPU``.

The transport runs the guest's ``qemu-aarch64 -cpu CPU -L ROOT ROOT/usr/bin/python3.11`` from a
cached aarch64 environment (:mod:`.qemu_env`) with this checkout's ``edgepipe`` package on its
PYTHONPATH. User-mode qemu shares the host's file system, so nothing is copied. qemu's default
``-cpu max`` (SVE/SME, slow paths, no real board has it) is never used. Emulated timings are not
throughput figures: the entry runs without its benchmark and every throughput key is nulled.
"""

from __future__ import annotations

import logging
import re
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepipe.devices import qemu_env
from edgepipe.devices.base import Claims, Job, Progress, Ran, Runner
from edgepipe.devices.qemu_env import QemuEnv, env_key, runtime_pins
from edgepipe.errors import InputError
from edgepipe.models import cache_root

logger = logging.getLogger(__name__)

CLAIMS = "accuracy on the aarch64 onnxruntime kernels under emulation; timings are emulated and are not throughput figures"
#: CPU models that are not a real board: qemu's ``max`` turns on SVE/SME and very slow paths.
REFUSED_CPUS = frozenset({"max", "host", "any"})
_CPU_NAME = re.compile(r"^[a-z0-9][a-z0-9._+-]*$", re.I)


def check_cpu(cpu: str) -> str:
    """Validate a qemu ``-cpu`` model name; refuse ``max``/``host``."""
    cpu = (cpu or "").strip()
    if not cpu or not _CPU_NAME.match(cpu):
        raise InputError(f"bad qemu CPU model {cpu!r}; use e.g. --device qemu:cortex-a76")
    if cpu.lower() in REFUSED_CPUS:
        raise InputError(
            f"qemu CPU model {cpu!r} is no real board (SVE/SME, slow paths); "
            "use e.g. --device qemu:cortex-a72 (Pi 4) or qemu:cortex-a76 (Pi 5)"
        )
    return cpu


@dataclass(frozen=True)
class Guest:
    """The environment a validation runs in and what the guest reported about itself."""

    env: QemuEnv
    facts: dict[str, Any]


class QemuRunner(Runner[Guest]):
    """Runs ``python -m edgepipe.runtime`` on the aarch64 onnxruntime under ``qemu-aarch64 -cpu CPU``."""

    name = "qemu"
    build_eval_tokens = 128  # emulated kernels run 200-1000x slower than native: a build scores a short prefix

    def __init__(
        self,
        cpu: str,
        *,
        cache_dir: Path | None = None,
        timeout: float | None = None,
        package_dir: Path | None = None,
    ):
        """``cache_dir`` defaults to :func:`cache_root`; ``timeout`` (seconds) bounds each guest
        run (default: none); ``package_dir`` is the ``edgepipe`` package folder the guest imports
        (default: the one this process imports)."""
        self.cpu = check_cpu(cpu)
        self.package_dir = Path(package_dir) if package_dir else None
        self._cache_dir = Path(cache_dir) if cache_dir else None
        self.timeout = timeout
        self.where = f"in the qemu guest ({self.cpu})"
        self.claims = Claims(CLAIMS, throughput=False, on_board=False)
        self._env: QemuEnv | None = None

    @property
    def cache_dir(self) -> Path:
        return (self._cache_dir or cache_root()) / "qemu"

    def env_dir(self) -> Path:
        return self.cache_dir / env_key(runtime_pins())

    def ensure_env(self, progress: Progress | None = None) -> QemuEnv:
        """The cached environment, built on first use (see :mod:`.qemu_env`)."""
        if self._env is None:
            self._env = qemu_env.ensure_env(self.env_dir(), progress or (lambda msg: logger.info("%s", msg)))
        return self._env

    def run_python(
        self,
        args: Sequence[str],
        *,
        progress: Progress | None = None,
        timeout: float | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run the guest Python with ``args`` (e.g. ``["-m", "edgepipe.runtime", ...]``), with
        the aarch64 wheels and this edgepipe package importable. Does not check the exit code."""
        env = self.ensure_env(progress)
        return qemu_env.run_guest(
            env, self.cpu, args, timeout=timeout or self.timeout, extra_env=extra_env, package_dir=self.package_dir
        )

    def probe(self, progress: Progress | None = None) -> dict[str, Any]:
        """``{"machine", "cpu_features", "onnxruntime", "python"}`` as the guest sees them."""
        return qemu_env.probe_guest(self.ensure_env(progress), self.cpu, timeout=600)

    # ------------------------------------------------------------------ transport steps
    def provision(self, job: Job, say: Progress) -> Guest:
        env = self.ensure_env(say)
        say(f"qemu {self.cpu}: probing the guest CPU")
        return Guest(env, qemu_env.probe_guest(env, self.cpu, timeout=600))

    def run(self, session: Guest, args: Sequence[str], say: Progress) -> subprocess.CompletedProcess[str]:
        say(f"qemu {self.cpu}: running edgepipe.runtime validate (emulated, 200-1000x slower than a board)")
        return qemu_env.run_guest(session.env, self.cpu, args, timeout=self.timeout, package_dir=self.package_dir)

    def crash_message(self, session: Guest, returncode: int, msg: str) -> str:
        return f"`python -m edgepipe.runtime validate` in the qemu guest ({self.cpu}) exited {returncode} without JSON: {msg}"

    def device_facts(self, session: Guest, reported: dict[str, Any], ran: Ran) -> dict[str, Any]:
        facts = session.facts
        return {
            **reported,
            "runner": "qemu",
            "cpu": self.cpu,
            "machine": facts.get("machine"),
            "cpu_features": facts.get("cpu_features") or [],
            "onnxruntime": facts.get("onnxruntime"),
            "python": facts.get("python"),
            "qemu": session.env.qemu_version,
            "exit_code": ran.returncode,
            "emulated_seconds": round(ran.seconds["run"], 1),
        }
