"""The device runtime stays importable with onnxruntime + numpy + tokenizers only."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ("torch", "transformers", "optimum", "onnxruntime_genai", "pydantic", "click", "yaml", "onnx")


def test_runtime_imports_no_build_toolchain():
    code = (
        "import sys, json\n"
        "import edgepipe.runtime, edgepipe.runtime.__main__, edgepipe.runtime.device, edgepipe.runtime.evaluate\n"
        "from edgepipe.runtime.__main__ import main\n"
        f"bad = sorted(m for m in sys.modules if m.split('.')[0] in {FORBIDDEN!r})\n"
        "print(json.dumps({'bad': bad, 'ort': 'onnxruntime' in sys.modules}))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    out = json.loads(p.stdout.strip().splitlines()[-1])
    assert out["bad"] == [], f"edgepipe.runtime pulls in {out['bad']}"
    assert out["ort"] is True


def test_runtime_entry_point_help_runs_without_toolchain():
    # a module-level import of a forbidden package would fail here, with the packages blocked
    code = (
        "import sys, runpy\n"
        f"for name in {FORBIDDEN!r}: sys.modules[name] = None\n"
        "sys.argv = ['edgepipe.runtime', '--help']\n"
        "runpy.run_module('edgepipe.runtime', run_name='__main__')\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert all(c in p.stdout for c in ("validate", "bench", "run", "verify"))
