"""Local mode: each cell is one ``edgepipe`` build in its own process, at most ``jobs`` at a time.

Cells of the same model share its export through the stage cache: the first to need it makes it,
the others wait on the entry's lock and then find it complete (:mod:`edgepipe.cache`). A worker that
crashes fails its cell only. Ctrl-C / SIGTERM stops the workers (each cleans up its temporaries).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any


def run_local(specs: list[dict[str, Any]], jobs: int, say: Callable[[str], None]) -> Iterator[tuple[str, dict[str, Any]]]:
    """Yield ``(cell id, row)`` as cells finish."""
    pending = list(specs)
    running: dict[subprocess.Popen[bytes], tuple[dict[str, Any], Path]] = {}
    with tempfile.TemporaryDirectory(prefix="edgepipe-matrix-") as tmpdir:
        try:
            while pending or running:
                while pending and len(running) < jobs:
                    spec = pending.pop(0)
                    running[_start(spec, Path(tmpdir))] = (spec, Path(tmpdir) / f"{spec['id']}.result.json")
                    say(f"matrix: building {spec['id']}")
                done = [p for p in running if p.poll() is not None]
                for proc in done:
                    spec, result = running.pop(proc)
                    yield spec["id"], _result(proc, result)
                if not done:
                    time.sleep(0.2)
        finally:
            for proc in running:
                proc.terminate()
            for proc in running:
                proc.wait()


def _start(spec: dict[str, Any], tmpdir: Path) -> subprocess.Popen[bytes]:
    spec_file = tmpdir / f"{spec['id']}.spec.json"
    spec_file.write_text(json.dumps(spec), encoding="utf-8")
    env = {**os.environ, "EDGEPIPE_CACHE": spec["cache"]}
    cmd = [sys.executable, "-m", "edgepipe.matrix.cells", str(spec_file), str(tmpdir / f"{spec['id']}.result.json")]
    return subprocess.Popen(cmd, env=env, stdin=subprocess.DEVNULL)


def _result(proc: subprocess.Popen[bytes], result: Path) -> dict[str, Any]:
    try:
        row: dict[str, Any] = json.loads(result.read_text(encoding="utf-8"))
        return row
    except (OSError, ValueError):
        return {"error": f"the cell's build process exited with code {proc.returncode} and no result (see its output above)", "stage": "build"}
