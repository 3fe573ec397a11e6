"""On the board: promote a health-checked incoming folder to a version, and/or point ``current`` at a version.

Arguments: ``base``, ``name``, ``incoming`` (a folder name under ``incoming/`` to promote, or
``None``), ``version`` (the version to switch to, when nothing is promoted). A promoted folder
becomes ``versions/<NNNN>-<sha12>`` (the next number) by one rename. ``current`` is switched by
making a new symlink beside it and renaming it over the old one, so at every instant ``current``
names a complete version: a deploy killed here leaves the old one or the new one, never neither.
Prints ``{"current", "previous"}``.
"""

import json
import os


def fsync_dir(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def promote(root, incoming, sha12):
    versions = os.path.join(root, "versions")
    numbers = [int(v.split("-", 1)[0]) for v in os.listdir(versions) if v.split("-", 1)[0].isdigit()]
    version = f"{max(numbers, default=0) + 1:04d}-{sha12}"
    os.rename(os.path.join(root, "incoming", incoming), os.path.join(versions, version))
    fsync_dir(versions)
    return version


def main(a):
    root = os.path.join(os.path.abspath(os.path.expanduser(a["base"])), "deploy", a["name"])
    link = os.path.join(root, "current")
    previous = os.path.basename(os.readlink(link)) if os.path.islink(link) else None
    version = promote(root, a["incoming"], a["sha12"]) if a.get("incoming") else a["version"]
    if not os.path.isfile(os.path.join(root, "versions", version, "manifest.json")):
        print(json.dumps({"error": f"version {version} of {a['name']} does not exist on the board"}))
        return
    tmp = os.path.join(root, f"current.{os.getpid()}")
    os.symlink(os.path.join("versions", version), tmp)
    os.replace(tmp, link)
    fsync_dir(root)
    print(json.dumps({"current": version, "previous": previous}))
