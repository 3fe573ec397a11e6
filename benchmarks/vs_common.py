"""What the parts of ``benchmarks/vs_llamacpp.py`` share: progress lines, commands run, figures out of tools'
output, and the small C programs its yardsticks compile (``bandwidth.py``, ``isa.py``)."""

from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

Progress = Callable[[str], None]

# a number as llama.cpp's tools and /usr/bin/time print it
NUM = r"([-+]?[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)"


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def run(
    cmd: list[Any], *, log: Path | None = None, env: dict[str, str] | None = None, check: bool = True
) -> str:
    cmd = [str(c) for c in cmd]
    r = subprocess.run(cmd, capture_output=True, text=True, env=env)
    out = r.stdout + r.stderr
    if log:
        log.write_text(f"$ {' '.join(cmd)}\n{out}")
    if check and r.returncode:
        tail = "\n".join(out.strip().splitlines()[-15:])
        raise RuntimeError(f"command failed ({r.returncode}): {' '.join(cmd)}\n{tail}")
    return out


def grab(pattern: str, text: str) -> float | None:
    """The number of ``pattern``'s first group in ``text``, or None where the output lacks it."""
    m = re.search(pattern, text)
    return float(m.group(1)) if m else None


def compiled(source: str, where: Path, stem: str, flags: list[str], suffix: str = "", cc: str = "cc") -> Path:
    """``source`` compiled with ``cc flags`` into ``where/<stem>-<source hash><suffix>``, once: a program
    built from another version of the source is never reused, and a half-written one is never seen
    (built under a temporary name, then renamed). A failed compile raises RuntimeError with its output."""
    tag = hashlib.sha256(source.encode()).hexdigest()[:12]
    out = where / f"{stem}-{tag}{suffix}"
    if out.is_file():
        return out
    where.mkdir(parents=True, exist_ok=True)
    src = where / f"{stem}-{tag}.c"
    src.write_text(source)
    tmp = out.with_name(f"{out.name}.{os.getpid()}.tmp")
    run([cc, *flags, "-o", tmp, src])
    tmp.replace(out)
    return out
