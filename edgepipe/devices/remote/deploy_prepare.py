"""On the board: get a deployment's incoming folder ready, and clean up after interrupted deploys.

Layout under ``<base>/deploy/<name>/``: ``versions/<NNNN>-<manifest sha[:12]>/`` (complete,
health-checked artifacts: a folder is renamed there only after its health check passed),
``current`` (a symlink to one of them, switched by rename), ``incoming/<manifest sha[:16]>/``
(an artifact being copied; kept when a deploy is interrupted, so the next deploy of the same
artifact resumes it).

Arguments: ``base``, ``name``, ``incoming`` (this artifact's folder name), ``files`` (``{rel:
sha256}``). Removes other incoming folders (after seeding from them) and the leftover
``current.*`` link of a switch that was killed; seeds missing files from the deployment's versions and incoming folders by sha256 (hard links,
else copies); prints the sha256 of the files already in place (``hashes``), what was ``seeded``
and ``cleaned``, and ``current``.
"""

import hashlib
import json
import os
import shutil


def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def known_files(folder):
    """``{sha256: path}`` of a complete artifact folder's files, from its manifest."""
    try:
        with open(os.path.join(folder, "manifest.json")) as f:
            files = json.load(f).get("files") or {}
    except (OSError, ValueError):
        return {}
    out = {}
    for rel, entry in files.items() if isinstance(files, dict) else []:
        p = os.path.join(folder, *str(rel).split("/"))
        if isinstance(entry, dict) and ".." not in str(rel).split("/") and os.path.isfile(p) and not os.path.islink(p):
            out[entry.get("sha256")] = p
    return out


def place(src, dst):
    tmp = dst + ".seed"
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def seed(sources, inc, want, hashes):
    have = {}
    for folder in sources:
        for digest, path in known_files(folder).items():
            have.setdefault(digest, path)
    seeded = []
    for rel, digest in sorted(want.items()):
        if hashes.get(rel) != digest and digest in have and rel != "manifest.json":
            try:
                place(have[digest], os.path.join(inc, *rel.split("/")))
            except OSError:
                continue
            hashes[rel] = digest
            seeded.append(rel)
    return seeded


def clean(root, keep):
    """Leftovers of interrupted deploys: other incoming folders and switch links."""
    cleaned = []
    incoming = os.path.join(root, "incoming")
    for entry in sorted(os.listdir(incoming)):
        if entry != keep:
            shutil.rmtree(os.path.join(incoming, entry), ignore_errors=True)
            cleaned.append("incoming/" + entry)
    for entry in sorted(os.listdir(root)):
        if entry.startswith("current."):
            os.remove(os.path.join(root, entry))
            cleaned.append(entry)
    return cleaned


def current_version(root):
    link = os.path.join(root, "current")
    return os.path.basename(os.readlink(link)) if os.path.islink(link) else None


def main(a):
    root = os.path.join(os.path.abspath(os.path.expanduser(a["base"])), "deploy", a["name"])
    inc = os.path.join(root, "incoming", a["incoming"])
    os.makedirs(os.path.join(root, "versions"), exist_ok=True)
    os.makedirs(inc, exist_ok=True)
    want = a["files"]
    hashes = {}
    for rel in sorted(want):
        p = os.path.join(inc, *rel.split("/"))
        os.makedirs(os.path.dirname(p), exist_ok=True)
        hashes[rel] = sha(p) if os.path.isfile(p) and not os.path.islink(p) else None
    versions = os.path.join(root, "versions")
    others = [os.path.join(root, "incoming", d) for d in sorted(os.listdir(os.path.join(root, "incoming")))]
    sources = [os.path.join(versions, v) for v in sorted(os.listdir(versions), reverse=True)] + others
    seeded = seed([s for s in sources if s != inc], inc, want, hashes)
    cleaned = clean(root, a["incoming"])
    print(json.dumps({"root": root, "incoming": inc, "hashes": hashes, "seeded": seeded, "cleaned": cleaned,
                      "current": current_version(root)}))  # fmt: skip
