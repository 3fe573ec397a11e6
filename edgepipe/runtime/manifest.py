"""Artifact manifest: the device checks it before it loads anything.

An artifact is a folder; ``manifest.json`` lists every file with its sha256 and size. A
file that is missing, changed, a symlink, or a path that escapes the folder is refused,
naming the file, because a field device that runs a corrupted model is expensive to recall.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path, PurePosixPath
from typing import Any

from edgepipe.errors import ArtifactError

MANIFEST_NAME = "manifest.json"
SCHEMA_VERSION = 1
KIND = "edgepipe-artifact"
_CHUNK = 1 << 20


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _safe_member(root: Path, rel: Any) -> Path:
    """Resolve a manifest path inside ``root``; refuse absolute paths, '..', and symlinks."""
    if not isinstance(rel, str) or not rel or "\\" in rel or "\x00" in rel:
        raise ArtifactError(f"manifest lists an invalid file name {rel!r}; rebuild the artifact")
    p = PurePosixPath(rel)
    if p.is_absolute() or ".." in p.parts or rel.startswith("~"):
        raise ArtifactError(f"manifest path {rel!r} escapes the artifact folder; refusing to load it")
    full = root.joinpath(*p.parts)
    # check each component, so that a symlinked sub-folder is caught too
    cur = root
    for part in p.parts:
        cur = cur / part
        if cur.is_symlink():
            raise ArtifactError(f"{rel} is a symlink; an artifact must hold real files (rebuild or copy it with -L)")
    try:
        full.resolve().relative_to(root.resolve())
    except ValueError:
        raise ArtifactError(f"manifest path {rel!r} escapes the artifact folder; refusing to load it") from None
    return full


def read_manifest(artifact: Path | str) -> dict[str, Any]:
    """Parse and structurally check ``manifest.json`` without hashing the files."""
    root = Path(artifact)
    if not root.is_dir():
        raise ArtifactError(f"{root} is not an artifact folder (it does not exist or is a file)")
    mpath = root / MANIFEST_NAME
    if mpath.is_symlink():
        raise ArtifactError(f"{mpath} is a symlink; refusing to trust it")
    if not mpath.is_file():
        raise ArtifactError(f"{root} has no {MANIFEST_NAME}: not an edgepipe artifact, or an incomplete one; rebuild it")
    try:
        data = json.loads(mpath.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(f"{mpath} is not valid JSON ({type(e).__name__}); the artifact is damaged, rebuild it") from None
    if not isinstance(data, dict):
        raise ArtifactError(f"{mpath} must hold a JSON object; the artifact is damaged, rebuild it")
    if data.get("kind") != KIND:
        raise ArtifactError(f"{mpath} is not an edgepipe manifest (kind={data.get('kind')!r})")
    version = data.get("schema_version")
    if version != SCHEMA_VERSION or isinstance(version, bool):
        raise ArtifactError(
            f"{mpath} has schema_version {version!r}; this runtime reads version {SCHEMA_VERSION}: upgrade edgepipe or rebuild"
        )
    files = data.get("files")
    if not isinstance(files, dict) or not files:
        raise ArtifactError(f"{mpath} lists no files; rebuild the artifact")
    for rel, entry in files.items():
        _safe_member(root, rel)
        if rel == MANIFEST_NAME:
            raise ArtifactError(f"{mpath} lists itself; rebuild the artifact")
        if (
            not isinstance(entry, dict)
            or not isinstance(entry.get("sha256"), str)
            or len(entry["sha256"]) != 64
            or not isinstance(entry.get("size"), int)
            or isinstance(entry.get("size"), bool)
            or entry["size"] < 0
        ):
            raise ArtifactError(f"{mpath}: entry for {rel!r} needs a 64-hex sha256 and an integer size; rebuild")
    return data


def verify_artifact(artifact: Path | str) -> dict[str, Any]:
    """Check every listed file's size and sha256; return the manifest. Raises ArtifactError."""
    root = Path(artifact)
    data = read_manifest(root)
    for rel, entry in data["files"].items():
        path = _safe_member(root, rel)
        if not path.is_file():
            raise ArtifactError(f"{rel} is missing from {root}; the artifact is incomplete, rebuild or re-copy it")
        size = path.stat().st_size
        if size != entry["size"]:
            raise ArtifactError(f"{rel} has {size} bytes, the manifest says {entry['size']}; re-copy the artifact")
        if sha256_file(path) != entry["sha256"]:
            raise ArtifactError(f"{rel} does not match its sha256 in the manifest; the file is corrupt, re-copy the artifact")
    return data


def file_entries(root: Path) -> dict[str, dict[str, Any]]:
    """sha256 and size of every regular file under ``root`` (sorted, POSIX paths), manifest excluded."""
    out: dict[str, dict[str, Any]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in sorted(filenames):
            full = Path(dirpath) / name
            rel = full.relative_to(root).as_posix()
            if rel == MANIFEST_NAME:
                continue
            if full.is_symlink():
                raise ArtifactError(f"{rel} is a symlink; artifacts hold real files only")
            out[rel] = {"sha256": sha256_file(full), "size": full.stat().st_size}
    return out
