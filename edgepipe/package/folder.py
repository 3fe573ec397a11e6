"""The artifact folder on disk: checked before a build, assembled beside ``--out``, published atomically.

``--out`` is the user's folder. Before any work it must be a place we can create and write (not a
dangling link, not a special filesystem such as /proc), and a rebuild may replace only a previous
edgepipe artifact that holds nothing but the files its manifest lists, and never a folder that
holds the build's own inputs. The new artifact is assembled under a temporary name beside ``--out``
and swapped with the old one in one atomic step (``renameat2(RENAME_EXCHANGE)`` where the kernel
has it), with SIGINT / SIGTERM held back until the old one is removed; a build holds a lock on its
staging folder, so what a killed build left beside ``--out`` is swept by the next one at once.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from edgepipe.cache import fsync_tree, lock_folder
from edgepipe.errors import InputError, Interrupted
from edgepipe.runtime.manifest import is_artifact, read_manifest
from edgepipe.runtime.unlisted import unlisted_files, written_beside_manifest

MODEL_FILES = ("model.onnx", "model.onnx.data", "genai_config.json")
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# pseudo filesystems (/proc/mounts types) an artifact cannot live on
_SPECIAL_FS = {"proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "debugfs", "securityfs", "tracefs",
               "configfs", "fusectl", "pstore", "bpf", "mqueue", "hugetlbfs", "autofs", "binfmt_misc", "efivarfs"}
FRESH_SECONDS = 60  # an empty staging folder younger than this may be a starting build's, before its lock


def _fs_type(path: Path) -> str | None:
    """The filesystem type of the mount holding ``path`` (Linux /proc/mounts), or None if unknown."""
    try:
        with open("/proc/mounts", encoding="utf-8", errors="replace") as f:
            mounts = [line.split()[1:3] for line in f if len(line.split()) >= 3]
    except OSError:
        return None
    best, fstype = "", None
    target = str(path)
    for point, kind in mounts:
        point = point.replace("\\040", " ")
        if (target == point or target.startswith(point.rstrip("/") + "/")) and len(point) >= len(best):
            best, fstype = point, kind
    return fstype


def _nearest_existing(out: Path) -> Path:
    for parent in out.parents:
        if parent.exists():
            if not parent.is_dir():
                raise InputError(f"--out {out} lies under {parent}, which is a file; choose another --out")
            return parent
    return Path("/")


def _check_writable(folder: Path, out: Path) -> None:
    """Create and remove a probe folder where the staging folder will go: the only honest test."""
    fstype = _fs_type(folder.resolve())
    if fstype in _SPECIAL_FS:
        raise InputError(f"--out {out} is on a {fstype} filesystem, not a place for files; choose a folder on a disk")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".edgepipe-probe-", dir=folder))
    except OSError as e:
        raise InputError(f"--out {out}: cannot create folders in {folder} ({e.strerror}); choose a writable --out") from None


def _foreign_files(out: Path) -> list[str]:
    """Files in a previous artifact at ``out`` that edgepipe did not write (the user's own): neither in
    its manifest nor written beside it (the manifest itself, the signature). A git clone's ``.git`` is the user's."""
    try:
        listed = set(read_manifest(out).files)
    except Exception:  # noqa: BLE001 - a damaged manifest: every file counts as foreign unless it is an edgepipe name
        listed = {"report.md", "reference.npz", *MODEL_FILES, *TOKENIZER_FILES}
    return unlisted_files(out, {*listed, *written_beside_manifest()})


def check_out_dir(out: Path, inputs: Sequence[Path | None] = ()) -> None:
    """``--out`` may be absent, an empty folder, or a previous edgepipe artifact holding only its own
    files; it must be creatable and writable and must not contain the build's inputs. What killed
    builds left beside it is swept first (an artifact a killed swap hid goes back in place)."""
    if out.parent.is_dir() and not out.is_symlink():
        _sweep_leftovers(out)
    if out.is_symlink():
        what = "a dangling symbolic link" if not out.exists() else "a symbolic link"
        raise InputError(f"--out {out} is {what}; pass a real folder path")
    resolved = out.resolve()
    for given in inputs:
        if given is not None and (resolved == given.resolve() or resolved in given.resolve().parents):
            raise InputError(f"--out {out} contains the input {given}; a rebuild would replace it, choose another --out")
    if not out.exists():
        _check_writable(_nearest_existing(out), out)
        return
    if not out.is_dir():
        raise InputError(f"--out {out} is a file; choose a folder path")
    _check_writable(out.parent, out)
    if any(out.iterdir()):
        if not is_artifact(out):
            raise InputError(f"--out {out} exists and is not an edgepipe artifact; choose another --out or remove it")
        foreign = _foreign_files(out)
        if foreign:
            raise InputError(
                f"--out {out} holds {len(foreign)} file(s) edgepipe did not write (e.g. {foreign[0]}); "
                "a rebuild would delete them: move them out or choose another --out"
            )


def _sweep_leftovers(out: Path) -> None:
    """Remove the staging / old folders killed builds left beside ``out``: those no live build holds (a
    build keeps its own locked, see :func:`staged`). A killed fallback swap (no ``RENAME_EXCHANGE``) may
    have left the previous artifact only in its old folder: it goes back to ``out`` first."""
    for pattern in (f".{out.name}.old-*", f".{out.name}.tmp-*"):
        for stale in out.parent.glob(pattern):
            try:
                if not any(stale.iterdir()) and time.time() - stale.stat().st_mtime < FRESH_SECONDS:
                    continue  # a build's staging folder before it took its lock
            except OSError:
                continue  # swept by a concurrent build
            fd = lock_folder(stale, fcntl.LOCK_EX | fcntl.LOCK_NB)
            if fd is None:
                continue  # a live build's
            try:
                if not out.exists() and is_artifact(stale / "a"):
                    os.replace(stale / "a", out)
                shutil.rmtree(stale, ignore_errors=True)
            finally:
                os.close(fd)


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def staging_dir(out: Path) -> Path:
    """A temporary folder on the same filesystem as ``out``, so the final rename is atomic; with the
    permissions of a folder the user made (``mkdtemp`` makes it private, 0700)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    _sweep_leftovers(out)
    path = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    os.chmod(path, 0o777 & ~_umask())
    return path


@contextmanager
def staged(out: Path) -> Iterator[Path]:
    """Assemble an artifact in a staging folder, locked while the build runs so that no other build
    sweeps it; on any failure it is removed and ``out`` is untouched."""
    staging = staging_dir(out)
    fd = lock_folder(staging, fcntl.LOCK_SH)
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    finally:
        if fd is not None:
            os.close(fd)


def copy_files(src: Path, dst: Path, names: tuple[str, ...] = MODEL_FILES + TOKENIZER_FILES) -> list[str]:
    """Copy those of ``names`` that exist in ``src``; return the ones copied."""
    copied = []
    for name in names:
        if (src / name).is_file():
            shutil.copyfile(src / name, dst / name)
            copied.append(name)
    return copied


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False when unavailable."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        renameat2 = libc.renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):  # an old kernel or a filesystem without it
        return False
    raise OSError(err, os.strerror(err), str(b))


def publish(staging: Path, out: Path) -> None:
    """Move a complete artifact into place; the previous one at ``out`` survives any failure before it.

    SIGINT and SIGTERM are held back during the swap and the old artifact's removal, then act with
    :class:`~edgepipe.errors.Interrupted` (which says the new artifact was published): ``out`` holds
    the old artifact or the new one, whole, and nothing is left beside it. (SIGKILL cannot be held:
    the exchange itself is atomic, and the next build sweeps what is left beside ``out``.)"""
    fsync_tree(staging)
    foreign = _foreign_files(out) if out.is_dir() else []
    if foreign:  # the user put a file there while we built
        raise InputError(f"--out {out} now holds {foreign[0]}, which edgepipe did not write; move it out and build again")
    with _signals_held() as held:
        _swap(staging, out)
        _fsync_dir(out.parent)
    if held:
        _act_on(held[0], out)


def _swap(staging: Path, out: Path) -> None:
    if not out.exists():
        os.replace(staging, out)
    elif _exchange(staging, out):
        shutil.rmtree(staging, ignore_errors=True)  # now the previous artifact
    else:
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        fd = lock_folder(old, fcntl.LOCK_SH)  # not another build's to sweep (or restore) while we swap
        try:
            os.replace(out, old / "a")
            try:
                os.replace(staging, out)
            except BaseException:
                os.replace(old / "a", out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        finally:
            if fd is not None:
                os.close(fd)


@contextmanager
def _signals_held() -> Iterator[list[int]]:
    """SIGINT and SIGTERM recorded, not acted on, while the block runs (Python runs signal handlers
    on the main thread only; elsewhere nothing is held)."""
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return
    old = {s: signal.signal(s, lambda n, _f: got.append(n)) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield got
    finally:
        for s, h in old.items():
            signal.signal(s, signal.SIG_DFL if h is None else h)


def _act_on(signum: int, out: Path) -> None:
    """What a held signal would have done: the Python handler's exception (as Interrupted, naming the
    published artifact), nothing when ignored, else the default action (the process ends)."""
    handler = signal.getsignal(signum)
    if handler is signal.SIG_IGN:
        return
    if callable(handler):
        raise Interrupted(signum, str(out))
    signal.raise_signal(signum)


def _fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
