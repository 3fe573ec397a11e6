"""On the board: make (or update) the runtime venv from wheels already copied there, with no network.

Arguments: ``venv``, ``wheels`` (the folder of wheels), ``pip_wheel`` (pip runs from its wheel, so
the board needs no ensurepip / python3-venv), ``edgepipe_wheel``, ``fresh`` (a new venv with every
dependency, else only the edgepipe wheel is reinstalled), ``marker`` (written to
``VENV/edgepipe-venv.json`` last: a venv without it is incomplete). Prints ``{"ok", "seconds",
"onnxruntime"}`` or ``{"error": ...}``; the wheels folder is removed after a good install.
"""

import json
import os
import shutil
import subprocess
import sys
import time


def main(a):
    t0 = time.time()
    venv, wheels = a["venv"], a["wheels"]
    py = os.path.join(venv, "bin", "python")
    marker = os.path.join(venv, "edgepipe-venv.json")
    pip = [py, os.path.join(wheels, a["pip_wheel"], "pip"), "install", "--no-index", "--find-links", wheels,
           "--no-cache-dir", "--disable-pip-version-check", "--no-input", "--quiet", "--no-compile"]  # fmt: skip
    if a["fresh"]:
        shutil.rmtree(venv, ignore_errors=True)
        r = subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], capture_output=True, text=True)
        if r.returncode != 0:
            print(json.dumps({"error": "python3 -m venv failed: " + (r.stderr.strip().splitlines() or ["?"])[-1]}))
            return
        cmd = pip + [os.path.join(wheels, a["edgepipe_wheel"])]
    else:
        cmd = pip + ["--no-deps", "--force-reinstall", os.path.join(wheels, a["edgepipe_wheel"])]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PIP_NO_INPUT="1"))
    if r.returncode != 0:
        lines = [ln for ln in (r.stderr + r.stdout).splitlines() if ln.strip()]
        print(json.dumps({"error": "pip install failed: " + (" | ".join(lines[-3:]) or "no output")}))
        return
    r = subprocess.run([py, "-I", "-c", "import edgepipe.runtime.validate, onnxruntime; print(onnxruntime.__version__)"],
                       capture_output=True, text=True)  # fmt: skip
    if r.returncode != 0:
        print(json.dumps({"error": "the new venv does not import the runtime: " + (r.stderr.strip().splitlines() or ["?"])[-1]}))
        return
    meta = dict(a["marker"], onnxruntime=r.stdout.strip(), installed_seconds=round(time.time() - t0, 1))
    with open(marker + ".tmp", "w") as f:
        json.dump(meta, f)
    os.replace(marker + ".tmp", marker)
    shutil.rmtree(wheels, ignore_errors=True)
    print(json.dumps({"ok": True, "seconds": round(time.time() - t0, 1), "onnxruntime": r.stdout.strip()}))
