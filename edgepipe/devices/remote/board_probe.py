"""On the board: describe it, and prepare an artifact folder (one ssh round trip).

Arguments: ``base`` (the runner's folder, ``~`` allowed), ``artifact`` (the artifact folder's
name, or ``None``), ``files`` (``{rel: sha256}`` the artifact needs), ``eval`` (an eval file's
name, or ``None``). Prints the board's facts (machine, Python, libc, CPU, RAM, board model), the
venv markers under ``base``, and for the artifact the sha256 of the files already there, after
seeding missing ones from other artifact folders on the board that hold the same bytes.
Runs on any python3 >= 3.6, so that one too old for the runtime can be reported.
"""

import hashlib
import json
import os
import platform
import shutil
import sys


def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def seed(top, art, want, hashes):
    """Copy, on the board, each missing file another artifact folder holds with the same sha256
    (in its manifest): a rebuilt artifact whose manifest changed does not re-send its model."""
    missing = {want[r]: r for r in want if hashes[r] != want[r] and r != "manifest.json"}
    seeded = []
    for other in sorted(os.listdir(top)) if missing else []:
        d = os.path.join(top, other)
        if d == art or not os.path.isfile(os.path.join(d, "manifest.json")):
            continue
        try:
            if os.path.getsize(os.path.join(d, "manifest.json")) > 64 << 20:  # not one of ours
                continue
            with open(os.path.join(d, "manifest.json")) as f:
                files = json.load(f).get("files") or {}
            if not isinstance(files, dict):
                continue
        except (OSError, ValueError, RecursionError, AttributeError):
            continue
        for orel, entry in files.items():
            rel = missing.get((entry or {}).get("sha256")) if isinstance(entry, dict) else None
            src = os.path.join(d, *str(orel).split("/"))
            if not rel or ".." in str(orel).split("/") or not os.path.isfile(src) or os.path.islink(src):
                continue
            dst = os.path.join(art, *rel.split("/"))
            try:
                shutil.copyfile(src, dst + ".seed")
                if sha(dst + ".seed") == want[rel]:
                    os.replace(dst + ".seed", dst)
                    hashes[rel] = want[rel]
                    seeded.append(rel)
                    del missing[want[rel]]
                else:
                    os.remove(dst + ".seed")
            except OSError:
                pass
    return seeded


def facts():
    """The board model, CPU model and RAM, from /proc (``None`` where it says nothing)."""
    out = {"board": None, "cpu_model": None, "ram_total_mb": None}
    try:
        with open("/proc/device-tree/model", "rb") as f:
            out["board"] = f.read().rstrip(b"\0").decode("utf-8", "replace").strip() or None
    except OSError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                k = k.strip().lower()
                if k in ("model name", "cpu part") and not out["cpu_model"]:
                    out["cpu_model"] = v.strip()
                if k == "model" and not out["board"] and not v.strip().isdigit():
                    out["board"] = v.strip()
        with open("/proc/meminfo") as f:
            out["ram_total_mb"] = round(int(f.readline().split()[1]) / 1024)
    except (OSError, ValueError, IndexError):
        pass
    return out


def main(a):
    base = os.path.abspath(os.path.expanduser(a["base"]))
    art = os.path.join(base, "artifacts", a["artifact"]) if a.get("artifact") else None
    os.makedirs(art or base, exist_ok=True)
    hashes = {}
    want = a.get("files") or {}
    for rel in sorted(want):
        p = os.path.join(art, *rel.split("/"))
        os.makedirs(os.path.dirname(p), exist_ok=True)
        hashes[rel] = sha(p) if os.path.isfile(p) and not os.path.islink(p) else None
    seeded = seed(os.path.join(base, "artifacts"), art, want, hashes) if art else []
    venvs = {}
    for name in os.listdir(base) if os.path.isdir(base) else []:
        m = os.path.join(base, name, "edgepipe-venv.json")
        if name.startswith("venv-") and os.path.isfile(m):
            try:
                with open(m) as f:
                    venvs[name] = json.load(f)
            except ValueError:
                pass
    ev = None
    if a.get("eval"):
        os.makedirs(os.path.join(base, "eval"), exist_ok=True)
        p = os.path.join(base, "eval", a["eval"])
        ev = sha(p) if os.path.isfile(p) else None
    info = {
        "machine": platform.machine(), "kernel": platform.release(), "system": platform.system(),
        "python": f"{sys.version_info[0]}.{sys.version_info[1]}", "python_full": platform.python_version(),
        "implementation": sys.implementation.name, "libc": list(platform.libc_ver()),
        "executable": sys.executable, "home": os.path.expanduser("~"), "base": base, "artifact_dir": art,
        "rsync": shutil.which("rsync") is not None, "hashes": hashes, "seeded": seeded, "venvs": venvs, "eval_sha256": ev,
        "cpu_count": os.cpu_count(),
    }  # fmt: skip
    info.update(facts())
    print(json.dumps(info))
