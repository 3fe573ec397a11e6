"""In the qemu guest: what the aarch64 Python sees. Prints ``{"machine", "cpu_features",
"onnxruntime", "python"}``; ``cpu_features`` is ``None`` when /proc/cpuinfo has no aarch64
``Features`` line (qemu < 8 shows the host's x86 one), and a failed onnxruntime import is
reported, not raised: the caller decides what it means. No arguments."""

import json
import platform


def parse_cpu_features(cpuinfo):
    """The ``Features`` line of an aarch64 /proc/cpuinfo as a list, or ``None`` (e.g. an x86
    cpuinfo, which has ``flags`` instead)."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "Features":
            return value.split()
    return None


def main(a):
    try:
        with open("/proc/cpuinfo") as f:
            features = parse_cpu_features(f.read())
    except OSError:
        features = None
    try:
        import onnxruntime

        ort = onnxruntime.__version__
    except Exception as exc:  # reported, the caller decides
        ort = f"import failed: {exc}"
    print(json.dumps({"machine": platform.machine(), "cpu_features": features, "onnxruntime": ort,
                      "python": platform.python_version()}))  # fmt: skip
