"""The device runtime stays importable with onnxruntime + numpy + tokenizers only."""

from __future__ import annotations

import json
import subprocess
import sys

FORBIDDEN = ("torch", "transformers", "optimum", "onnxruntime_genai", "pydantic", "click", "yaml", "onnx")


def test_runtime_imports_no_build_toolchain():
    code = (
        "import sys, json\n"
        "import edgepipe.runtime, edgepipe.runtime.__main__, edgepipe.runtime.artifact, edgepipe.runtime.evaluate\n"
        "import edgepipe.runtime.validate, edgepipe.runtime.bench, edgepipe.runtime.qnn, edgepipe.runtime.static_lm\n"
        "import edgepipe.runtime.encoder\n"
        "from edgepipe.runtime.kinds import REGISTRY, _resolve\n"
        "for spec in REGISTRY.values():  # every kind's loader and bench, the HTP path's included\n"
        "    _resolve(spec.loader); spec.bench and _resolve(spec.bench)\n"
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


def test_runtime_imports_nothing_of_edgepipe_outside_itself():
    """The device loads no build code: after importing every runtime module (the HTP session code
    included) the only edgepipe modules loaded are the runtime's own and ``edgepipe.errors``."""
    code = (
        "import sys, json, pkgutil, importlib\n"
        "import edgepipe.runtime\n"
        "for m in pkgutil.iter_modules(edgepipe.runtime.__path__):\n"
        "    importlib.import_module('edgepipe.runtime.' + m.name)\n"
        "mods = sorted(m for m in sys.modules if m.startswith('edgepipe'))\n"
        "print(json.dumps(mods))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    mods = json.loads(p.stdout.strip().splitlines()[-1])
    outside = [m for m in mods if m not in ("edgepipe", "edgepipe.errors") and not m.startswith("edgepipe.runtime")]
    assert outside == [], f"the runtime imports build code: {outside}"
    assert "edgepipe.runtime.qnn" in mods and "edgepipe.runtime.static_lm" in mods
