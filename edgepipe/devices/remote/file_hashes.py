"""On the board: the sha256 of files under a folder (``None`` for a missing one).

Arguments: ``dir`` (the folder), ``files`` (relative paths with ``/``). Prints ``{"hashes": {rel: sha256 | null}}``.
"""

import hashlib
import json
import os


def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def main(a):
    out = {}
    for rel in a["files"]:
        p = os.path.join(a["dir"], *rel.split("/"))
        out[rel] = sha(p) if os.path.isfile(p) else None
    print(json.dumps({"hashes": out}))
