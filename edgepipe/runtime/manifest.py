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
GENAI_CONFIG = "genai_config.json"
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
    try:
        # check each component, so that a symlinked sub-folder is caught too
        cur = root
        for part in p.parts:
            cur = cur / part
            if cur.is_symlink():
                raise ArtifactError(f"{rel} is a symlink; an artifact must hold real files (rebuild or copy it with -L)")
        full.resolve().relative_to(root.resolve())
    except ValueError:
        raise ArtifactError(f"manifest path {rel!r} escapes the artifact folder; refusing to load it") from None
    except (OSError, RuntimeError) as e:  # a name too long, a symlink loop
        raise ArtifactError(f"manifest lists an unusable file name {rel[:80]!r} ({type(e).__name__}); rebuild the artifact") from None
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
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
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
    # sections the runtime reads: wrong types must be refused here, not crash it later
    for section in ("target", "metrics", "source_model", "quantization"):
        if section in data and not isinstance(data[section], dict):
            raise ArtifactError(f"{mpath}: {section!r} must be a JSON object, got {type(data[section]).__name__}; rebuild")
    for section, sub in (("metrics", "throughput"), ("target", "runtime")):
        if sub in data.get(section, {}) and not isinstance(data[section][sub], dict):
            raise ArtifactError(f"{mpath}: '{section}.{sub}' must be a JSON object; rebuild the artifact")
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
    check_loaded_files(root, data["files"])
    return data


def _keys(obj: Any) -> Any:
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield k
            yield from _keys(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _keys(v)


def check_loaded_files(root: Path, files: dict[str, Any]) -> None:
    """What the runtime loads must be listed (so hashed) and may name no code to run.

    ``genai_config.json`` names the decoder graph: it must be a listed file inside the folder. A
    ``custom_ops_library`` (a shared library onnxruntime would dlopen) is refused: the runtime never
    loads code that an artifact names.
    """
    for name in (GENAI_CONFIG, "tokenizer.json"):
        if (root / name).exists() and name not in files:
            raise ArtifactError(f"{name} is in {root} but not in the manifest; refusing an unverified file, rebuild")
    if GENAI_CONFIG not in files:
        return
    try:
        cfg = json.loads((root / GENAI_CONFIG).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ArtifactError(f"{GENAI_CONFIG} is not valid JSON ({type(e).__name__}); rebuild the artifact") from None
    if any(k == "custom_ops_library" for k in _keys(cfg)):
        raise ArtifactError(
            f"{GENAI_CONFIG} names a custom_ops_library; edgepipe never loads code named by an artifact, refusing it"
        )
    model = cfg.get("model") if isinstance(cfg, dict) else None
    decoder = model.get("decoder") if isinstance(model, dict) else None
    filename = decoder.get("filename") if isinstance(decoder, dict) else None
    if filename is not None:
        _safe_member(root, filename)
        if PurePosixPath(filename).as_posix() not in files:
            raise ArtifactError(f"{GENAI_CONFIG} names the model file {filename!r}, which the manifest does not list; rebuild")


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
