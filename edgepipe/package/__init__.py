"""Artifact folder: model + external data, tokenizer, genai_config.json, reference.npz,
manifest.json (sha256 and size of every file, provenance, metrics, verdict) and report.md.

The folder is assembled under a temporary name beside ``--out`` and renamed into place only when
complete; an existing artifact at ``--out`` is swapped out atomically and removed afterwards.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from edgepipe.errors import InputError
from edgepipe.runtime.manifest import KIND, MANIFEST_NAME, SCHEMA_VERSION, file_entries

MODEL_FILES = ("model.onnx", "model.onnx.data", "genai_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")


def check_out_dir(out: Path) -> None:
    """``--out`` may be absent, an empty folder, or a previous edgepipe artifact; nothing else."""
    if not out.exists():
        for parent in out.parents:
            if parent.exists():
                if not parent.is_dir():
                    raise InputError(f"--out {out} lies under {parent}, which is a file; choose another --out")
                break
        return
    if not out.is_dir():
        raise InputError(f"--out {out} is a file; choose a folder path")
    if not any(out.iterdir()):
        return
    mpath = out / MANIFEST_NAME
    try:
        kind = json.loads(mpath.read_text()).get("kind") if mpath.is_file() else None
    except (OSError, ValueError, AttributeError):
        kind = None
    if kind != KIND:
        raise InputError(f"--out {out} exists and is not an edgepipe artifact; choose another --out or remove it")


def staging_dir(out: Path) -> Path:
    """A temporary folder on the same filesystem as ``out``, so the final rename is atomic."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


def copy_model(src: Path, dst: Path) -> None:
    for name in MODEL_FILES + TOKENIZER_FILES:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)


def write_manifest(artifact: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    manifest = dict(manifest)
    manifest["kind"] = KIND
    manifest["schema_version"] = SCHEMA_VERSION
    manifest["files"] = file_entries(artifact)
    tmp = artifact / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, artifact / MANIFEST_NAME)
    return manifest


def publish(staging: Path, out: Path) -> None:
    """Move a complete artifact into place; the previous one at ``out`` survives any failure before it."""
    from edgepipe.cache import fsync_tree

    fsync_tree(staging)
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "a")
        try:
            os.replace(staging, out)
        except BaseException:
            os.replace(old / "a", out)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(staging, out)
