"""Stage cache: each stage's output lives in a folder keyed by a hash of its inputs.

A folder is taken as complete only when it holds ``.complete``, written last after every file was
fsynced, and the folder is renamed into place from a temporary name: a build killed at any point
leaves at most a ``.tmp-*`` folder, which is never read and is swept on the next run.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from edgepipe.errors import StageError
from edgepipe.models import cache_root

logger = logging.getLogger(__name__)

COMPLETE = ".complete"


def key_of(parts: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:24]


def fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(dirpath, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def dir_size(root: Path) -> int:
    return sum(p.stat().st_size for p in Path(root).rglob("*") if p.is_file())


def disk_full(stage: str, where: Path, need_bytes: int | None = None) -> StageError:
    free = shutil.disk_usage(where if where.exists() else where.parent).free
    need = f"; it needs about {need_bytes / 2**20:.0f} MB" if need_bytes else ""
    return StageError(
        f"{stage}: the disk is full at {where} ({free / 2**20:.0f} MB free{need}); free some space "
        "or point EDGEPIPE_CACHE / --out elsewhere"
    )


def cached_stage(
    stage: str,
    parts: dict[str, Any],
    produce: Callable[[Path], dict[str, Any] | None],
    *,
    need_bytes: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Return the folder of ``stage`` for inputs ``parts``, producing it with ``produce(tmp)`` if absent."""
    key = key_of(parts)
    base = cache_root() / stage
    final = base / key
    marker = final / COMPLETE
    if marker.is_file():
        try:
            info = json.loads(marker.read_text())
            os.utime(final)  # for `cache prune`: least recently used goes first
            if progress:
                progress(f"{stage}: cached ({key[:12]})")
            return final, info.get("info") or {}
        except (OSError, ValueError):
            logger.warning("unreadable marker in %s; rebuilding", final)
    base.mkdir(parents=True, exist_ok=True)
    for stale in base.glob(".tmp-*"):
        # a killed build's leftovers; only sweep ones old enough not to belong to a live build
        if time.time() - stale.stat().st_mtime > 6 * 3600:
            shutil.rmtree(stale, ignore_errors=True)
    if need_bytes and shutil.disk_usage(base).free < need_bytes:
        raise disk_full(stage, base, need_bytes)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=base))
    try:
        info = produce(tmp) or {}
        (tmp / COMPLETE).write_text(json.dumps({"stage": stage, "parts": parts, "info": info}, sort_keys=True, default=str))
        fsync_tree(tmp)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except OSError as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if e.errno == errno.ENOSPC:
            raise disk_full(stage, base, need_bytes) from None
        raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final, info


def list_cache() -> list[dict[str, Any]]:
    out = []
    root = cache_root()
    if not root.is_dir():
        return out
    for stage in sorted(p for p in root.iterdir() if p.is_dir()):
        for entry in sorted(p for p in stage.iterdir() if p.is_dir()):
            out.append({
                "stage": stage.name,
                "key": entry.name,
                "complete": (entry / COMPLETE).is_file() or (entry / ".complete").is_file(),
                "bytes": dir_size(entry),
                "last_used": entry.stat().st_mtime,
                "path": str(entry),
            })
    return out


def prune_cache(max_bytes: int) -> list[dict[str, Any]]:
    """Delete least recently used entries (and all temporaries) until the cache fits ``max_bytes``."""
    entries = list_cache()
    removed = [e for e in entries if e["key"].startswith(".tmp-")]
    entries = [e for e in entries if not e["key"].startswith(".tmp-")]
    total = sum(e["bytes"] for e in entries)
    for e in sorted(entries, key=lambda e: e["last_used"]):
        if total <= max_bytes:
            break
        removed.append(e)
        total -= e["bytes"]
    for e in removed:
        shutil.rmtree(e["path"], ignore_errors=True)
    return removed
