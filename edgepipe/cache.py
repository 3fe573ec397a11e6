"""Stage cache: each stage's output lives in a folder keyed by a hash of its inputs.

A folder is taken as complete only when it holds ``.complete``, written last after every file was
fsynced, and the folder is renamed into place from a temporary name: a build killed at any point
leaves at most a ``.tmp-*`` folder, which is never read and is swept on the next run.

Builds and ``cache prune`` coordinate with ``flock`` on the entry folders themselves: a build holds
a shared lock on every entry it produced or reused until it ends (:func:`leases`; the lock follows
the folder through its rename from ``.tmp-*``), and prune deletes only entries it can lock
exclusively without waiting. The kernel drops a killed build's locks, so nothing stays pinned.

Two processes that need the same missing entry (two cells of a matrix, two builds) do not both make
it: the producer holds an exclusive ``flock`` on ``.locks/<stage>-<key>`` while it works; the other
waits, then finds the entry complete.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from edgepipe.errors import InputError, StageError
from edgepipe.models import cache_root

logger = logging.getLogger(__name__)

COMPLETE = ".complete"
# The cache folder is marked as edgepipe's with a CACHEDIR.TAG (https://bford.info/cachedir/; backup
# tools skip such folders): `cache prune` deletes only in a marked folder, so an EDGEPIPE_CACHE that
# points at a user's folder (a typo, $HOME) never has its sub-folders taken for stale entries.
TAG_NAME = "CACHEDIR.TAG"
TAG_SIGNATURE = "Signature: 8a477f597d28d172789f06886806bc55"
_TAG = TAG_SIGNATURE + "\n# This folder is edgepipe's cache (stage outputs, converted models): `edgepipe cache prune` may delete in it.\n"
# the top-level folders of a cache made before the tag: a folder holding nothing else is edgepipe's
_LEGACY_NAMES = frozenset({
    "export", "quantize", "optimize", "validate", "allocate", "sensitivity", "npu-export", "npu-quantize", "npu-compile",
    "npu-validate", "models", "bench", "llamacpp", "wheels", "pyroot", "qemu", ".locks",
})
LOCKS = ".locks"  # one lock file per entry being made (:func:`_producing`); not a stage, never listed or pruned


_scopes: list[list[int]] = []  # open, shared-locked entry folders of the builds in progress (innermost last)


@contextlib.contextmanager
def leases() -> Iterator[None]:
    """Keep every cache entry a build uses locked against ``cache prune`` until the block ends."""
    _scopes.append([])
    try:
        yield
    finally:
        for fd in _scopes.pop():
            os.close(fd)


def lock_folder(folder: Path, how: int) -> int | None:
    """An open descriptor of ``folder`` holding ``flock(how)``; None if it vanished or is locked (LOCK_NB)."""
    try:
        fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, how)
    except OSError:
        os.close(fd)
        return None
    return fd


def _lease(fd: int | None) -> None:
    """Hold ``fd``'s lock until the enclosing :func:`leases` block ends (at once when there is none)."""
    if fd is None:
        return
    if _scopes:
        _scopes[-1].append(fd)
    else:
        os.close(fd)


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


def human_bytes(n: float) -> str:
    """``123 KB`` / ``45.6 MB`` / ``1.2 GB``: a tiny model's needs must not read as "0 MB"."""
    if n < 2**20:
        return f"{max(n, 0) / 2**10:.0f} KB"
    if n < 2**30:
        return f"{n / 2**20:.1f} MB"
    return f"{n / 2**30:.1f} GB"


def disk_full(stage: str, where: Path, need_bytes: int | None = None) -> StageError:
    probe = where
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = human_bytes(shutil.disk_usage(probe).free)
    except OSError:
        free = "unknown"
    need = f"; it needs about {human_bytes(need_bytes)}" if need_bytes else ""
    return StageError(
        f"{stage}: the disk is full at {where} ({free} free{need}); free some space "
        "or point EDGEPIPE_CACHE / --out elsewhere"
    )


def out_of_memory(stage: str, need_bytes: int | None = None) -> StageError:
    try:
        from edgepipe.runtime.facts import mem_available_mb

        avail = mem_available_mb()
    except Exception:  # noqa: BLE001 - only for the message
        avail = None
    have = f"{human_bytes(avail * 2**20)} available" if avail is not None else "available memory unknown"
    need = f", it needs about {human_bytes(need_bytes)}" if need_bytes else ""
    return StageError(
        f"{stage}: out of memory ({have}{need}); close other programs, build on a machine with more RAM "
        "or use a smaller model"
    )


def cached_stage(
    stage: str,
    parts: dict[str, Any],
    produce: Callable[[Path], dict[str, Any] | None],
    *,
    need_bytes: int | None = None,
    need_ram_bytes: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Return the folder of ``stage`` for inputs ``parts``, producing it with ``produce(tmp)`` if absent.

    Disk full (ENOSPC) or out of memory while producing becomes a :class:`StageError` naming the stage
    and what it needed; the temporary folder is removed, so the cache holds only complete entries.
    """
    key = key_of(parts)
    base = cache_root() / stage
    final = base / key
    hit = _leased_entry(final)  # waits while a prune is deleting it
    if hit is not None:
        if progress:
            progress(f"{stage}: cached ({key[:12]})")
        return final, hit
    with _producing(key, stage, progress):
        hit = _leased_entry(final)  # another process may have made it while this one waited
        if hit is not None:
            if progress:
                progress(f"{stage}: made by another build ({key[:12]})")
            return final, hit
        t0 = time.time()
        made = _produce(stage, parts, produce, base, final, need_bytes, need_ram_bytes)
        if progress:
            progress(f"{stage}: made ({key[:12]}) in {time.time() - t0:.1f} s")
        return made


def _leased_entry(final: Path) -> dict[str, Any] | None:
    """The complete entry at ``final``, leased for this build (shared-locked until it ends), or None."""
    held = lock_folder(final, fcntl.LOCK_SH)
    hit = _complete_entry(final) if held is not None else None
    if hit is not None:
        _lease(held)
    elif held is not None:
        os.close(held)
    return hit


@contextlib.contextmanager
def _producing(key: str, stage: str, progress: Callable[[str], None] | None = None) -> Iterator[None]:
    """Only one process makes an entry at a time: ``flock`` on ``<cache>/.locks/<stage>-<key>`` while it
    produces; another build of the same inputs waits and then finds the entry complete. The kernel
    drops a killed producer's lock. (Lock files stay: deleting one races with a process waiting on it.)"""
    locks = cache_root() / LOCKS
    try:
        locks.mkdir(parents=True, exist_ok=True)
        fd = os.open(locks / f"{stage}-{key}", os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise disk_full(stage, locks) from None
        raise InputError(f"cannot write in the stage cache folder {locks} ({e.strerror}); set EDGEPIPE_CACHE to a writable folder") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if progress:
                progress(f"{stage}: another build is making it ({key[:12]}); waiting for it")
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def _produce(
    stage: str, parts: dict[str, Any], produce: Callable[[Path], dict[str, Any] | None], base: Path, final: Path,
    need_bytes: int | None, need_ram_bytes: int | None,
) -> tuple[Path, dict[str, Any]]:
    tmp = _work_folder(stage, base, need_bytes)
    held = lock_folder(tmp, fcntl.LOCK_SH)  # prune leaves a work folder in use alone; the lock follows the rename
    try:
        info = produce(tmp) or {}
        _commit(tmp, final, {"stage": stage, "parts": parts, "info": info})
    except BaseException as e:
        if held is not None:
            os.close(held)
        shutil.rmtree(tmp, ignore_errors=True)
        raise _as_stage_error(e, stage, base, need_bytes, need_ram_bytes) from None
    _lease(held)
    return final, info


def is_marked(root: Path) -> bool:
    """True when ``root`` carries edgepipe's CACHEDIR.TAG."""
    try:
        with open(root / TAG_NAME, encoding="utf-8", errors="replace") as f:
            return f.read(len(TAG_SIGNATURE)) == TAG_SIGNATURE
    except OSError:
        return False


def _mark(root: Path, created: bool, stage: str) -> None:
    """Tag ``root`` as edgepipe's cache when edgepipe created it, or when it holds only what an older
    edgepipe kept there (and the folder of ``stage``, being written); a folder with anything else in
    it is someone's, and stays unmarked."""
    if is_marked(root):
        return
    known = _LEGACY_NAMES | {stage}
    try:
        ours = created or all(p.name in known or p.name.startswith(".") for p in root.iterdir())
        if ours:
            (root / TAG_NAME).write_text(_TAG, encoding="utf-8")
    except OSError:  # a read-only cache: it stays unmarked (and unpruned)
        pass


def _work_folder(stage: str, base: Path, need_bytes: int | None) -> Path:
    """A fresh ``.tmp-*`` folder in the stage's cache folder, after sweeping old ones and checking space."""
    created = not base.parent.exists()
    try:
        base.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise disk_full(stage, base, need_bytes) from None
        raise InputError(f"cannot create the stage cache folder {base} ({e.strerror}); set EDGEPIPE_CACHE to a writable folder") from None
    _mark(base.parent, created, stage)
    _sweep_stale(base)
    if need_bytes and shutil.disk_usage(base).free < need_bytes:
        raise disk_full(stage, base, need_bytes)
    try:
        return Path(tempfile.mkdtemp(prefix=".tmp-", dir=base))
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise disk_full(stage, base, need_bytes) from None
        raise InputError(f"cannot write in the stage cache folder {base} ({e.strerror}); set EDGEPIPE_CACHE to a writable folder") from None


def _complete_entry(final: Path) -> dict[str, Any] | None:
    """The recorded info of a complete, undamaged entry (its use time refreshed), else None."""
    marker = final / COMPLETE
    if not marker.is_file():
        return None
    try:
        info = json.loads(marker.read_text())
        damaged = _damaged_file(final, info.get("files"))
        if damaged:
            raise ValueError(f"{damaged} is missing or changed")
        os.utime(final)  # for `cache prune`: least recently used goes first
        return info.get("info") or {}
    except (OSError, ValueError, AttributeError) as e:
        logger.warning("damaged cache entry %s (%s); rebuilding", final, e)
        return None


def _sweep_stale(base: Path) -> None:
    """Remove a killed build's leftovers; only ones old enough not to belong to a live build."""
    for stale in base.glob(".tmp-*"):
        try:
            if time.time() - stale.stat().st_mtime > 6 * 3600:
                remove_unused(stale)
        except OSError:  # swept by a concurrent build
            pass


def remove_unused(entry: Path) -> bool:
    """Delete ``entry`` unless a build holds it (a lock taken without waiting); True when deleted."""
    fd = lock_folder(entry, fcntl.LOCK_EX | fcntl.LOCK_NB)
    if fd is None:
        return not entry.exists()
    try:
        shutil.rmtree(entry, ignore_errors=True)
    finally:
        os.close(fd)
    return True


def _commit(tmp: Path, final: Path, record: dict[str, Any]) -> None:
    """Mark ``tmp`` complete (file sizes recorded, everything fsynced) and rename it to ``final``."""
    record["files"] = {p.relative_to(tmp).as_posix(): p.stat().st_size for p in sorted(tmp.rglob("*")) if p.is_file()}
    (tmp / COMPLETE).write_text(json.dumps(record, sort_keys=True, default=str))
    fsync_tree(tmp)
    if final.exists():
        shutil.rmtree(final, ignore_errors=True)
    try:
        os.replace(tmp, final)
    except OSError as e:
        # a concurrent build of the same inputs renamed its complete copy into place first
        if e.errno not in (errno.ENOTEMPTY, errno.EEXIST) or not (final / COMPLETE).is_file():
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _as_stage_error(e: BaseException, stage: str, base: Path, need_bytes: int | None, need_ram_bytes: int | None) -> BaseException:
    """What a failed stage raises: disk full and out of memory become one-line StageErrors."""
    if isinstance(e, OSError) and e.errno == errno.ENOSPC:
        return disk_full(stage, base, need_bytes)
    if isinstance(e, StageError) and ("No space left on device" in str(e) or "Errno 28" in str(e)):  # ENOSPC in a subprocess
        return disk_full(stage, base, need_bytes)
    if isinstance(e, MemoryError):
        return out_of_memory(stage, need_ram_bytes)
    return e


def _damaged_file(entry: Path, files: Any) -> str | None:
    """The first file recorded in an entry's marker that is now missing or of another size."""
    if not isinstance(files, dict):
        return None  # an entry written before sizes were recorded
    for rel, size in files.items():
        p = entry / rel
        if not p.is_file() or p.stat().st_size != size:
            return rel
    return None
