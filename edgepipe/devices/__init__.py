"""Device runners: where an artifact is validated.

Every runner runs the same torch-free device entry point,
``python -m edgepipe.runtime validate ARTIFACT --json [--eval FILE] [--max-tokens N]``,
and returns its JSON, augmented with what the runner knows about the device and what the
figures can claim (``claims``). :class:`Runner` (:mod:`.base`) does everything but reaching the
device; each transport only provisions, copies and runs. A runner is chosen by a spec string:

- ``local``            the host CPU, in this process's Python (:mod:`.local`)
- ``qemu``             the aarch64 onnxruntime under qemu user-mode, CPU model from the target (:mod:`.qemu`)
- ``ssh://user@host[:port]``  a real board (:mod:`.ssh`)
"""

from __future__ import annotations

from typing import Any

from edgepipe.devices.base import Claims, Runner
from edgepipe.errors import InputError

__all__ = ["Claims", "Runner", "get_runner"]


def get_runner(spec: str, *, target: Any = None) -> Runner[Any]:
    """Turn a ``--device`` spec into a runner. ``target`` supplies e.g. the qemu CPU model."""
    if spec == "local":
        from edgepipe.devices.local import LocalRunner

        return LocalRunner()
    if spec == "qemu" or spec.startswith("qemu:"):
        from edgepipe.devices.qemu import QemuRunner

        tcpu = getattr(target, "cpu", None)
        if ":" not in spec and tcpu is not None and tcpu.arch != "aarch64":
            raise InputError(
                f"--device qemu emulates the target's aarch64 board, and target {target.name} is {tcpu.arch}; "
                "name a CPU (--device qemu:cortex-a76) or use --device local"
            )
        cpu = spec.split(":", 1)[1] if ":" in spec else getattr(tcpu, "qemu_cpu", None)
        if not cpu:
            raise InputError("--device qemu needs a CPU model: use a target with cpu.qemu_cpu or --device qemu:cortex-a76")
        return QemuRunner(cpu=cpu)
    if spec.startswith("ssh://"):
        from edgepipe.devices.ssh import SshRunner

        return SshRunner.from_spec(spec)
    raise InputError(f"unknown device {spec!r}; use local, qemu, qemu:CPU or ssh://user@host[:port]")
