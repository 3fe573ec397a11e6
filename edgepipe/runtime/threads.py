"""The one rule for how many threads a session uses.

A profile's ``runtime.threads`` describes the target board (4 on a Raspberry Pi 5). On a host with
fewer cores that many threads would fight over them, so a profile's count applies only where this
machine has the cores; otherwise, and for 0, onnxruntime gets one thread per core. An explicit
request (``--threads N``) always wins.
"""

from __future__ import annotations

import os


def resolve_threads(requested: int = 0, profile: int = 0) -> int:
    """Threads to give onnxruntime: ``requested`` if > 0, else ``profile`` if this host has that many
    cores, else 0 (onnxruntime's "one per core")."""
    if requested > 0:
        return requested
    if isinstance(profile, int) and not isinstance(profile, bool) and 0 < profile <= (os.cpu_count() or 1):
        return profile
    return 0


def intra_op_threads(threads: int) -> int:
    """The concrete intra-op count for a session: ``threads`` or one per core."""
    return threads if threads > 0 else (os.cpu_count() or 1)
