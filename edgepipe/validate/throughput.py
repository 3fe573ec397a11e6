"""Throughput on the host: the device entry point's bench in a fresh process, so the build's own
memory does not count in the peak RSS."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from edgepipe.errors import StageError


def bench_subprocess(artifact: Path, threads: int) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "edgepipe.runtime", "bench", str(artifact), "--json", "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise StageError(f"validate: the benchmark process failed: {proc.stderr.strip().splitlines()[-1:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result
