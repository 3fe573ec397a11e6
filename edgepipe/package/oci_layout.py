"""An OCI image layout written directly, byte for byte reproducible.

What the OCI image spec (v1.1) asks of a layout folder: ``oci-layout``, ``index.json`` and
content-addressed ``blobs/sha256/<hex>``; layers are tar files (here gzip-compressed unless the
media type says plain tar) whose uncompressed sha256 is the config's ``diff_id``. No daemon and
no container tool is involved. Reproducible because every input to a digest is fixed: entries
sorted by path, mtime :data:`EPOCH`, owner 0:0 with no names, gzip without a file name or time,
JSON with sorted keys. The same files give the same digests on any machine with the same zlib.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import stat
import tarfile
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any, Literal, Protocol

from edgepipe.errors import InputError

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER = "application/vnd.oci.image.layer.v1.tar"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ANNOTATION_REF = "org.opencontainers.image.ref.name"
ANNOTATION_TITLE = "org.opencontainers.image.title"
#: The one timestamp of every tar entry and of the image config (1970-01-01: the content names the
#: build, not the clock).
EPOCH = 0
CREATED = "1970-01-01T00:00:00Z"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class Entry:
    """One member of a layer: ``path`` inside the image (relative, POSIX), its type and mode; a
    file's bytes come from ``source``, a symlink points at ``target``."""

    path: str
    kind: Literal["file", "dir", "symlink"]
    mode: int = 0o755
    source: Path | None = None
    target: str = ""


@dataclass(frozen=True)
class Blob:
    """A stored blob's descriptor fields; ``diff_id`` is the uncompressed digest of a layer."""

    media_type: str
    digest: str
    size: int
    diff_id: str = ""

    def descriptor(self, **extra: Any) -> dict[str, Any]:
        out: dict[str, Any] = {"mediaType": self.media_type, "digest": self.digest, "size": self.size}
        out.update({k: v for k, v in extra.items() if v})
        return out


def tree_entries(src: Path, dest: str, *, skip: Callable[[str], bool] = lambda rel: False) -> list[Entry]:
    """Every directory, regular file and symlink under ``src``, placed under ``dest`` (``""``: the
    image root); ``skip(rel)`` drops a path relative to ``src`` and all below it."""
    out: list[Entry] = []
    base = PurePosixPath(dest)
    for dirpath, dirnames, filenames in os.walk(src):
        rel_dir = Path(dirpath).relative_to(src)
        dirnames[:] = sorted(d for d in dirnames if not skip((rel_dir / d).as_posix()))
        for name in [*dirnames, *sorted(filenames)]:
            rel = (rel_dir / name).as_posix()
            if skip(rel):
                continue
            entry = _entry(Path(dirpath) / name, (base / rel).as_posix())
            if entry is not None:
                out.append(entry)
    return out


def _entry(path: Path, name: str) -> Entry | None:
    st = path.lstat()
    mode = stat.S_IMODE(st.st_mode)
    if stat.S_ISLNK(st.st_mode):
        return Entry(name, "symlink", 0o777, target=os.readlink(path))
    if stat.S_ISDIR(st.st_mode):
        return Entry(name, "dir", mode)
    if stat.S_ISREG(st.st_mode):
        return Entry(name, "file", mode, source=path)
    return None  # sockets, fifos, devices: nothing a package root or an artifact needs


def _with_parents(entries: Iterable[Entry]) -> list[Entry]:
    """``entries`` sorted by path, each missing ancestor directory added (0755), duplicates an error."""
    by_path: dict[str, Entry] = {}
    for e in entries:
        name = PurePosixPath(e.path).as_posix().lstrip("/")
        if name in by_path and by_path[name] != e:
            raise InputError(f"two different layer entries at {name!r}")
        by_path[name] = e
        for parent in PurePosixPath(name).parents:
            if str(parent) not in (".", "") and str(parent) not in by_path:
                by_path[str(parent)] = Entry(str(parent), "dir", 0o755)
    return [by_path[k] for k in sorted(by_path)]


class _Sink(Protocol):
    def write(self, data: Any, /) -> Any: ...


class _Hashing(io.RawIOBase):
    """A write-through file object that hashes and counts what passes."""

    def __init__(self, sink: _Sink):
        self.sink = sink
        self.sha = hashlib.sha256()
        self.size = 0

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        view = memoryview(data)
        self.sha.update(view)
        self.size += len(view)
        self.sink.write(view)
        return len(view)


def _tarinfo(e: Entry) -> tarfile.TarInfo:
    info = tarfile.TarInfo(e.path + ("/" if e.kind == "dir" else ""))
    info.mtime, info.uid, info.gid, info.uname, info.gname = EPOCH, 0, 0, "", ""
    info.mode = e.mode
    if e.kind == "dir":
        info.type = tarfile.DIRTYPE
    elif e.kind == "symlink":
        info.type, info.linkname = tarfile.SYMTYPE, e.target
    else:
        info.size = e.source.stat().st_size if e.source is not None else 0
    return info


def write_tar(entries: Iterable[Entry], sink: IO[bytes]) -> None:
    """A reproducible tar of ``entries`` (parents added, sorted) into ``sink``."""
    with tarfile.open(fileobj=sink, mode="w|", format=tarfile.PAX_FORMAT) as tar:
        for e in _with_parents(entries):
            info = _tarinfo(e)
            if e.kind == "file" and e.source is not None:
                with e.source.open("rb") as f:
                    tar.addfile(info, f)
            else:
                tar.addfile(info)


class BlobStore:
    """``blobs/sha256/`` of a layout folder being written."""

    def __init__(self, layout: Path):
        self.layout = layout
        self.dir = layout / "blobs" / "sha256"
        self.dir.mkdir(parents=True, exist_ok=True)

    def put_json(self, obj: Mapping[str, Any], media_type: str) -> Blob:
        data = json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()
        digest = hashlib.sha256(data).hexdigest()
        (self.dir / digest).write_bytes(data)
        return Blob(media_type, f"sha256:{digest}", len(data))

    def put_layer(self, entries: Iterable[Entry], media_type: str = MEDIA_LAYER_GZIP) -> Blob:
        """A layer of ``entries``: gzip (level 6, no name, no time) unless ``media_type`` is a plain tar."""
        fd, tmp = tempfile.mkstemp(prefix=".layer-", dir=self.dir)
        with os.fdopen(fd, "wb") as raw:
            outer = _Hashing(raw)
            if media_type.endswith("+gzip"):
                with gzip.GzipFile(filename="", mode="wb", fileobj=outer, mtime=EPOCH, compresslevel=6) as gz:
                    inner = _Hashing(gz)
                    write_tar(entries, inner)  # type: ignore[arg-type]
                diff_id = inner.sha.hexdigest()
            else:
                write_tar(entries, outer)  # type: ignore[arg-type]
                diff_id = outer.sha.hexdigest()
        digest = outer.sha.hexdigest()
        os.replace(tmp, self.dir / digest)
        return Blob(media_type, f"sha256:{digest}", outer.size, f"sha256:{diff_id}")


def write_layout_files(layout: Path, manifest: Blob, descriptor_extra: Mapping[str, Any]) -> None:
    """``oci-layout`` and an ``index.json`` naming ``manifest`` (with e.g. platform, annotations)."""
    (layout / "oci-layout").write_text(json.dumps({"imageLayoutVersion": "1.0.0"}), encoding="utf-8")
    index = {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": [manifest.descriptor(**descriptor_extra)]}
    (layout / "index.json").write_text(json.dumps(index, sort_keys=True, separators=(",", ":")), encoding="utf-8")


def publish(layout: Path, out: Path) -> None:
    """Move a finished layout folder to ``out`` (a folder), or write it as a tar archive when
    ``out`` ends in ``.tar`` (what ``skopeo``'s ``oci-archive:`` reads); atomic either way."""
    if out.suffix == ".tar":
        tmp = out.with_name(f".{out.name}.tmp")
        with tmp.open("wb") as f:
            write_tar(tree_entries(layout, ""), f)
        os.replace(tmp, out)
        shutil.rmtree(layout, ignore_errors=True)
        return
    old = None
    if out.exists():
        old = out.with_name(f".{out.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.rename(out, old)
    os.rename(layout, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def check_out(out: Path) -> None:
    """Refuse to replace anything at ``out`` but an earlier OCI layout or archive."""
    if out.is_dir() and any(out.iterdir()) and not (out / "oci-layout").is_file():
        raise InputError(f"{out} exists and is no OCI layout; name a new folder (or a .tar file) for --oci")
    if out.exists() and not out.is_dir() and out.suffix != ".tar":
        raise InputError(f"{out} is a file; --oci takes a folder, or a path ending in .tar for an archive")
    if not out.parent.is_dir():
        raise InputError(f"{out.parent} does not exist; create it first")
