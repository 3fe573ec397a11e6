"""Facts about this device and this process: CPU, memory, peak RSS, artifact size."""

from __future__ import annotations

import os
import platform
import resource
from pathlib import Path
from typing import Any


def artifact_bytes(model_dir: Path) -> int:
    return sum(p.stat().st_size for p in Path(model_dir).iterdir() if p.name.startswith("model.onnx"))


def mem_available_mb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def device_facts() -> dict[str, Any]:
    import onnxruntime as ort

    facts: dict[str, Any] = {
        "machine": platform.machine(),
        "system": platform.system(),
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "cpu_count": os.cpu_count(),
    }
    try:
        info = Path("/proc/cpuinfo").read_text()
        for line in info.splitlines():
            key, _, val = line.partition(":")
            key = key.strip().lower()
            if key in ("model name", "cpu part") and "cpu_model" not in facts:
                facts["cpu_model"] = val.strip()
            if key in ("flags", "features") and "cpu_features" not in facts:
                facts["cpu_features"] = val.split()
    except OSError:
        pass
    mem = mem_available_mb()
    try:
        total = int(Path("/proc/meminfo").read_text().split("\n")[0].split()[1]) / 1024
        facts["ram_total_mb"] = round(total)
    except (OSError, ValueError, IndexError):
        pass
    if mem is not None:
        facts["ram_available_mb"] = round(mem)
    return facts


def peak_rss_mb() -> float:
    """This process's peak resident set. VmHWM belongs to the process image, unlike ru_maxrss,
    which Linux carries over from the parent across fork + exec (a 2 GB build would show through)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    r = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return r / 1024 if platform.system() != "Darwin" else r / 2**20


