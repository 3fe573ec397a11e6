"""``--device`` specs -> runners: local, qemu[:CPU], ssh://user@host[:port]."""

from __future__ import annotations

from typing import Any

from edgepipe.devices.base import Runner
from edgepipe.errors import InputError


def get_runner(spec: str, *, target: Any = None) -> Runner[Any]:
    """Turn a ``--device`` spec into a runner. ``target`` supplies e.g. the qemu CPU model."""
    if spec == "local":
        from edgepipe.devices.local import LocalRunner

        return LocalRunner()
    if spec == "qemu" or spec.startswith("qemu:"):
        from edgepipe.devices.qemu import QemuRunner

        tcpu = getattr(target, "cpu", None)
        arch = getattr(tcpu, "arch", "aarch64")
        if ":" not in spec and arch != "aarch64":
            raise InputError(
                f"--device qemu emulates the target's aarch64 board, and target {getattr(target, 'name', '?')} is {arch}; "
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
