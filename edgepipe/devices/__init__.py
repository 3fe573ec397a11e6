"""Device runners: where an artifact is validated.

Every runner runs the same torch-free device entry point,
``python -m edgepipe.runtime validate ARTIFACT --json [--eval FILE] [--max-tokens N]``,
and returns its JSON, augmented with what the runner knows about the device and what the
figures can claim (``claims``). A runner is chosen by a spec string:

- ``local``            the host CPU, in this process's Python
- ``qemu``             the aarch64 onnxruntime under qemu user-mode, CPU model from the target
- ``ssh://user@host[:port]``  a real board
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from edgepipe.errors import InputError

Progress = Callable[[str], None]


def last_json_object(stdout: str | None) -> dict[str, Any] | None:
    """The device entry's JSON object: the whole output, or its last line that parses as one
    (stray lines a device prints before it are tolerated)."""
    import json

    text = (stdout or "").strip()
    if not text:
        return None
    try:
        obj = json.loads(text)
        return obj if isinstance(obj, dict) else None
    except ValueError:
        pass
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                return obj
    return None


class Runner(Protocol):
    name: str

    def validate(
        self,
        artifact: Path,
        *,
        eval_file: Path | None = None,
        max_tokens: int | None = None,
        progress: Progress | None = None,
    ) -> dict[str, Any]: ...


def get_runner(spec: str, *, target: Any = None) -> Runner:
    """Turn a ``--device`` spec into a runner. ``target`` supplies e.g. the qemu CPU model."""
    if spec == "local":
        from edgepipe.devices.local import LocalRunner

        return LocalRunner()
    if spec == "qemu" or spec.startswith("qemu:"):
        from edgepipe.devices.qemu import QemuRunner

        cpu = spec.split(":", 1)[1] if ":" in spec else getattr(getattr(target, "cpu", None), "qemu_cpu", None)
        if not cpu:
            raise InputError("--device qemu needs a CPU model: use a target with cpu.qemu_cpu or --device qemu:cortex-a76")
        return QemuRunner(cpu=cpu)
    if spec.startswith("ssh://"):
        from edgepipe.devices.ssh import SshRunner

        return SshRunner.from_spec(spec)
    raise InputError(f"unknown device {spec!r}; use local, qemu, qemu:CPU or ssh://user@host[:port]")
