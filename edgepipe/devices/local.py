"""The host CPU as a device: the device entry point in a fresh Python process (so peak RSS is the model's)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from edgepipe.errors import ArtifactError, EdgepipeError


def run_entry(cmd: list[str], what: str) -> dict[str, Any]:
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        err = ArtifactError if proc.returncode == 2 else EdgepipeError
        raise err(f"{what}: {last.removeprefix('error: ')}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


class LocalRunner:
    name = "local"

    def validate(
        self, artifact: Path, *, eval_file: Path | None = None, max_tokens: int | None = None, progress=None
    ) -> dict[str, Any]:
        cmd = [sys.executable, "-m", "edgepipe.runtime", "validate", str(artifact), "--json"]
        if eval_file:
            cmd += ["--eval", str(eval_file)]
        if max_tokens:
            cmd += ["--max-tokens", str(max_tokens)]
        if progress:
            progress("validating on the host CPU")
        out = run_entry(cmd, "validation on the host")
        out["runner"] = "local"
        out["claims"] = "accuracy and speed on this host's CPU with the x86 onnxruntime kernels; not the target board's speed"
        return out
