"""Hand onnxruntime the model's external weights from a read-only mapping the runtime owns.

Left to itself, onnxruntime maps the external data file one initializer at a time, reads every weight
while it prepacks the ``MatMulNBits`` matrices into its own heap buffers, and unmaps a prepacked weight
when it is done with it. The pages it read of what it keeps mapped (the tied embedding table, the
scales and zero points: 48 MB on the default model's int8 build) stay resident until the session
exists, so the end of session creation was the process's peak (:mod:`edgepipe.runtime.pages` gives
them back only afterwards). They could not be given back sooner: a thread calling ``madvise`` while
onnxruntime unmaps its own mappings raced with ``malloc`` reusing the addresses (session 9: every such
process died at exit).

Here the runtime maps the file itself, read-only, and passes each external tensor to onnxruntime as a
user initializer over that mapping (``SessionOptions.add_initializer``: onnxruntime reads the buffer in
place and never frees or unmaps it). The mapping stays put for the process's life (``MappedWeights.open``
says why), so a thread can drop
its resident pages every few milliseconds while the session is created: a dropped page of a read-only
file mapping comes back from the page cache on its next read, unchanged, and nothing else ever lives at
those addresses. The peak falls to the prepacked weights plus a few milliseconds' reads (int8 build of
the default model: 277 -> 240 MB), in the same time (0.25-0.30 s either way, 5 interleaved loads).

The runtime may not import ``onnx``, so :func:`external_tensors` reads the few fields it needs from the
model's protobuf encoding itself: the main graph's initializers, their names, types, dims and
external-data entries. Anything it does not understand leaves that tensor, or the whole file, to
onnxruntime's own loading, which also reports a malformed model in its own words.
"""

from __future__ import annotations

import logging
import mmap
import sys
import threading
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort

from edgepipe.runtime.pages import MADV_DONTNEED, MADV_RANDOM, madvise

logger = logging.getLogger(__name__)

__all__ = ["ExternalTensor", "MappedWeights", "external_tensors"]

RELEASE_EVERY_S = 0.01
_OPEN: dict[tuple[tuple[int, int, int, int], tuple[int, int, int, int]], MappedWeights] = {}
_OPEN_LOCK = threading.Lock()

# TensorProto.DataType -> numpy (onnx.proto); types numpy cannot hold (bfloat16, 4-bit, float8) are left to onnxruntime
_DTYPES = {
    1: np.float32,
    2: np.uint8,
    3: np.int8,
    4: np.uint16,
    5: np.int16,
    6: np.int32,
    7: np.int64,
    9: np.bool_,
    10: np.float16,
    11: np.float64,
    12: np.uint32,
    13: np.uint64,
}
_EXTERNAL = 1  # TensorProto.DataLocation.EXTERNAL


@dataclass(frozen=True)
class ExternalTensor:
    """One initializer stored in the external data file: where, and as what."""

    name: str
    dtype: np.dtype[Any]
    shape: tuple[int, ...]
    location: str
    offset: int
    length: int


def _varint(buf: memoryview, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        if i >= len(buf) or shift > 63:
            raise ValueError("truncated varint")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, i
        shift += 7


def _fields(buf: memoryview) -> Iterator[tuple[int, int, Any]]:
    """(field number, wire type, value) of one protobuf message: an int for varints, a memoryview for
    length-delimited fields; fixed-width fields are skipped (none of the fields read here is one)."""
    i = 0
    while i < len(buf):
        key, i = _varint(buf, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(buf, i)
            yield field, wire, value
        elif wire == 2:
            n, i = _varint(buf, i)
            if i + n > len(buf):
                raise ValueError("truncated field")
            yield field, wire, buf[i : i + n]
            i += n
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        else:
            raise ValueError(f"unsupported wire type {wire}")


def _packed(buf: memoryview) -> list[int]:
    out, i = [], 0
    while i < len(buf):
        value, i = _varint(buf, i)
        out.append(value)
    return out


def _tensor(buf: memoryview) -> ExternalTensor | None:
    """A TensorProto's external placement, or None when it is not external or not of a numpy type."""
    dims: list[int] = []
    scalars: dict[int, int] = {}  # data_type (2), data_location (14)
    name = ""
    entries: dict[str, str] = {}
    for field, wire, value in _fields(buf):
        if field == 1:  # dims: packed or one varint per dim
            dims.extend(_packed(value) if wire == 2 else [value])
        elif field in (2, 14) and wire == 0:
            scalars[field] = value
        elif field == 8 and wire == 2:
            name = bytes(value).decode("utf-8")
        elif field == 13 and wire == 2:
            entry = {f: bytes(v).decode("utf-8") for f, w, v in _fields(value) if w == 2}
            entries[entry.get(1, "")] = entry.get(2, "")
    dtype = _DTYPES.get(scalars.get(2, 0))
    if scalars.get(14) != _EXTERNAL or dtype is None or "location" not in entries:
        return None
    np_dtype = np.dtype(dtype)
    length = int(np.prod(dims, dtype=np.int64)) * np_dtype.itemsize
    if int(entries.get("length", length)) != length:
        return None
    return ExternalTensor(name, np_dtype, tuple(dims), entries["location"], int(entries.get("offset", 0)), length)


def external_tensors(model_path: Path | str) -> list[ExternalTensor]:
    """The main graph's initializers that live in an external data file (ModelProto.graph = 7,
    GraphProto.initializer = 5). Raises ValueError on an encoding it cannot read."""
    buf = memoryview(Path(model_path).read_bytes())
    out: list[ExternalTensor] = []
    for field, wire, graph in _fields(buf):
        if field != 7 or wire != 2:
            continue
        for gfield, gwire, init in _fields(graph):
            if gfield == 5 and gwire == 2 and (t := _tensor(init)) is not None:
                out.append(t)
    return out


def _forget_stale() -> None:
    """Close the mappings no live session uses whose data file was deleted or replaced (lock held)."""
    for key, weights in list(_OPEN.items()):
        if weights.sessions:
            continue
        try:
            current = _identity(weights.path)
        except OSError:
            current = None
        if current != key[1]:
            del _OPEN[key]


def _identity(path: Path) -> tuple[int, int, int, int]:
    """Which file, in which version: a rebuilt file gets a mapping of its own."""
    st = path.stat()
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


class MappedWeights:
    """The external tensors of one model file, mapped read-only, as onnxruntime user initializers."""

    def __init__(self, data_path: Path, tensors: list[ExternalTensor]):
        self.path = data_path
        with open(data_path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        size = len(self._map)
        whole = np.frombuffer(self._map, dtype=np.uint8)
        self._address = int(whole.ctypes.data)
        self.values: dict[str, Any] = {}
        for t in tensors:
            if t.offset < 0 or t.offset + t.length > size or t.offset % t.dtype.itemsize:
                raise ValueError(f"{t.name}: bytes {t.offset}..{t.offset + t.length} outside {data_path.name} ({size} B)")
            array = whole[t.offset : t.offset + t.length].view(t.dtype).reshape(t.shape)
            self.values[t.name] = ort.OrtValue.ortvalue_from_numpy(array)
        self.mapped_bytes = sum(t.length for t in tensors)  # what the session reads from this mapping, not resident
        self.sessions = 0  # live sessions made with these initializers (``serve``)

    @classmethod
    def open(cls, model_path: Path) -> MappedWeights | None:
        """The model's external weights mapped, or None (off Linux, no external data, tensors in
        another file, or a file this reader cannot follow: onnxruntime then loads them itself).

        A mapping outlives the session that asked for it and is shared by every later session of the
        same two files: onnxruntime keeps raw pointers to user initializers in the options of each
        session made with them, and ``session.get_session_options()`` hands those options on, so a
        mapping closed with the session that asked for it could leave another reading freed memory.
        What a dead session leaves resident is given back (``release``). A mapping is closed only when
        its file is gone or was replaced and no session made by the runtime reads it, so a long-lived
        process (a matrix worker) keeps no deleted file's disk space."""
        if not sys.platform.startswith("linux"):
            return None
        try:
            data = model_path.with_name(model_path.name + ".data")
            key = (_identity(model_path), _identity(data))
            with _OPEN_LOCK:
                _forget_stale()
                if key in _OPEN:
                    return _OPEN[key]
                tensors = [t for t in external_tensors(model_path) if t.location == data.name]
                if not tensors:
                    return None
                _OPEN[key] = cls(data, tensors)
                return _OPEN[key]
        except (OSError, ValueError, UnicodeDecodeError) as e:
            logger.debug("weights of %s left to onnxruntime: %s", model_path, e)
            return None

    def add_to(self, options: Any) -> None:
        """Make every mapped tensor an initializer of sessions made with ``options``."""
        for name, value in self.values.items():
            options.add_initializer(name, value)

    def serve(self, session: Any) -> None:
        """Count ``session`` as reading this mapping until it is gone; then give back its pages."""
        with _OPEN_LOCK:
            self.sessions += 1
        weakref.finalize(session, self._session_gone)

    def _session_gone(self) -> None:
        with _OPEN_LOCK:
            self.sessions -= 1
        self.release()

    def release(self) -> None:
        """Drop the mapping's resident pages (they come back from the page cache when read)."""
        madvise(self._address, len(self._map), MADV_DONTNEED)

    @contextmanager
    def released_while(self) -> Iterator[None]:
        """Drop the mapping's pages every few milliseconds until the block ends (onnxruntime releases
        the GIL while it makes a session), then once more, and from then on read it at random (no
        read-ahead: a looked-up table row faults in its own page, as edgepipe.runtime.pages does for
        onnxruntime's mappings; prepacking itself reads in order, so not before)."""
        done = threading.Event()

        def loop() -> None:
            while not done.wait(RELEASE_EVERY_S):
                self.release()

        thread = threading.Thread(target=loop, name="edgepipe-release-weights", daemon=True)
        thread.start()
        try:
            yield
        finally:
            done.set()
            thread.join()
            self.release()
            madvise(self._address, len(self._map), MADV_RANDOM)
