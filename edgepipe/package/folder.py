"""The artifact folder on disk: checked before a build, assembled beside ``--out``, published atomically.

The folder is assembled under a temporary name beside ``--out`` and renamed into place only when
complete; an existing artifact at ``--out`` is swapped out atomically and removed afterwards.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from edgepipe.errors import InputError
from edgepipe.runtime.manifest import is_artifact

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
    if any(out.iterdir()) and not is_artifact(out):
        raise InputError(f"--out {out} exists and is not an edgepipe artifact; choose another --out or remove it")


def staging_dir(out: Path) -> Path:
    """A temporary folder on the same filesystem as ``out``, so the final rename is atomic."""
    out.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """Assemble an artifact in a staging folder; on any failure it is removed and ``out`` is untouched."""
    staging = staging_dir(out)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def copy_files(src: Path, dst: Path, names: tuple[str, ...] = MODEL_FILES + TOKENIZER_FILES) -> list[str]:
    """Copy those of ``names`` that exist in ``src``; return the ones copied."""
    copied = []
    for name in names:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


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
