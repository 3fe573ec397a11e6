"""Listing and pruning the stage cache (``edgepipe cache list / prune``): the other side of
:mod:`edgepipe.cache`, which makes and leases entries. Prune deletes only entries no build holds, and
only in a folder marked as edgepipe's cache."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from edgepipe.cache import COMPLETE, LOCKS, TAG_NAME, dir_size, is_marked, remove_unused
from edgepipe.errors import InputError
from edgepipe.models import cache_root

__all__ = ["list_cache", "prune_cache"]


def list_cache() -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    root = cache_root()
    if not root.is_dir():
        return out
    for stage in sorted(p for p in root.iterdir() if p.is_dir() and p.name != LOCKS):
        for entry in sorted(p for p in stage.iterdir() if p.is_dir()):
            out.append({
                "stage": stage.name,
                "key": entry.name,
                "complete": (entry / COMPLETE).is_file(),
                "bytes": dir_size(entry),
                "last_used": entry.stat().st_mtime,
                "path": str(entry),
            })
    return out


def prune_cache(max_bytes: int) -> list[dict[str, Any]]:
    """Delete least recently used entries (and all temporaries) until the cache fits ``max_bytes``;
    entries a running build holds (work folders included) are skipped, never deleted under it. Only
    in a folder marked as edgepipe's cache (:func:`is_marked`): anything else is refused, untouched."""
    root = cache_root()
    if root.is_dir() and not is_marked(root):
        raise InputError(
            f"{root} is not marked as edgepipe's cache (no {TAG_NAME} from edgepipe), so `cache prune` will not delete "
            "in it: check EDGEPIPE_CACHE (a build with this edgepipe marks the cache folder it creates)"
        )
    entries = list_cache()
    temporaries = [e for e in entries if e["key"].startswith(".tmp-")]
    entries = [e for e in entries if not e["key"].startswith(".tmp-")]
    removed = [e for e in temporaries if remove_unused(Path(e["path"]))]
    total = sum(e["bytes"] for e in entries)
    for e in sorted(entries, key=lambda e: e["last_used"]):
        if total <= max_bytes:
            break
        if remove_unused(Path(e["path"])):
            removed.append(e)
            total -= e["bytes"]
    return removed
