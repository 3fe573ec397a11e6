"""Writing ``manifest.json``: the one place a :class:`~edgepipe.runtime.manifest.Manifest` is made
from a finished folder (every file hashed) and stored."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from importlib import metadata
from pathlib import Path

from edgepipe.runtime.manifest import MANIFEST_NAME, FileEntry, Manifest, file_entries

_TOOLS = ("edgepipe", "onnxruntime", "onnxruntime-genai", "onnx", "transformers", "torch", "numpy", "tokenizers")


def tool_versions() -> dict[str, str]:
    """Versions of the packages that made an artifact (provenance; ``absent`` when not installed)."""
    out = {}
    for pkg in _TOOLS:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def now_utc() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def write_manifest(artifact: Path, manifest: Manifest) -> Manifest:
    """Hash every file of ``artifact`` into ``manifest`` and write it (atomically); return what was written."""
    files = {rel: FileEntry(e["sha256"], e["size"]) for rel, e in file_entries(artifact).items()}
    manifest = dataclasses.replace(manifest, files=files)
    tmp = artifact / (MANIFEST_NAME + ".tmp")
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, artifact / MANIFEST_NAME)
    return manifest
