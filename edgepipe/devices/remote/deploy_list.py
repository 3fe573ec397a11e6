"""On the board: the deployments under ``<base>/deploy/`` (or one ``name``), their versions and which is current.

Arguments: ``base``, ``name`` (or ``None`` for all). Prints ``{"deployments": [{"name", "root",
"current", "versions": [{"version", "kind", "target", "created", "verdict", "signed"}]}]}``.
"""

import json
import os


def describe(folder, version):
    info = {"version": version, "kind": None, "target": None, "created": None, "verdict": None,
            "signed": os.path.isfile(os.path.join(folder, "model.sig"))}  # fmt: skip
    try:
        with open(os.path.join(folder, "manifest.json")) as f:
            m = json.load(f)
        info.update(kind=m.get("kind"), target=(m.get("target") or {}).get("name"), created=m.get("created"), verdict=m.get("verdict"))
    except (OSError, ValueError, AttributeError):
        pass
    return info


def one(root, name):
    link = os.path.join(root, "current")
    current = os.path.basename(os.readlink(link)) if os.path.islink(link) else None
    vdir = os.path.join(root, "versions")
    versions = sorted(os.listdir(vdir)) if os.path.isdir(vdir) else []
    return {"name": name, "root": root, "current": current,
            "versions": [describe(os.path.join(vdir, v), v) for v in versions]}  # fmt: skip


def main(a):
    top = os.path.join(os.path.abspath(os.path.expanduser(a["base"])), "deploy")
    names = [a["name"]] if a.get("name") else (sorted(os.listdir(top)) if os.path.isdir(top) else [])
    out = [one(os.path.join(top, n), n) for n in names if os.path.isdir(os.path.join(top, n))]
    print(json.dumps({"deployments": out}))
