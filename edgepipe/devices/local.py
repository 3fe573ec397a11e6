"""The host CPU as a device: the device entry point in a fresh Python process (so peak RSS is the model's)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Sequence
from typing import Any

from edgepipe.devices.base import Claims, Job, Progress, Runner, entry_output

CLAIMS = Claims(
    "accuracy and speed on this host's CPU with the x86 onnxruntime kernels; not the target board's speed",
    throughput=True,
    on_board=False,
)


def run_entry(cmd: list[str], what: str) -> dict[str, Any]:
    """Run a device entry command (``python -m edgepipe.runtime bench ...``) here and return its
    JSON; a failure is a one-line ``WHAT: MESSAGE`` error (see :func:`entry_output`)."""
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return entry_output(proc, what=what, crash=lambda rc, msg: f"{what}: {msg}")


class LocalRunner(Runner[None]):
    name = "local"
    where = "on the host"
    claims = CLAIMS

    def provision(self, job: Job, say: Progress) -> None:
        return None  # this Python is the device's

    def run(self, session: None, args: Sequence[str], say: Progress) -> subprocess.CompletedProcess[str]:
        say("validating on the host CPU")
        return subprocess.run([sys.executable, *args], capture_output=True, text=True)

    def crash_message(self, session: None, returncode: int, msg: str) -> str:
        return f"validation on the host: {msg}"
