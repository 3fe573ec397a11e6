"""Give back the pages of a model's weight file that a loaded session no longer reads (Linux).

onnxruntime maps the external data file (one mapping per initializer) and reads every weight once
while it prepacks the ``MatMulNBits`` weights into its own heap buffers. The mapped pages it read stay
resident although most are never read again: the zero points and scales of the prepacked matrices,
and the tied embedding table, of which a step reads one row per token. On the default model's int8
build that is 48 MB; giving them back after loading (the table not folded: edgepipe.quantize.graph)
took its peak RSS from 308 to 283 MB, the peak now being the end of session creation
(benchmarks/RESULTS.md, issue 16).

:func:`release_file_pages` drops this process's pages of those mappings (``MADV_DONTNEED``: clean
pages of a file mapping come back from the file on the next read, so nothing is lost; a mapping
holding a page the process wrote is skipped) and turns off read-ahead on them (``MADV_RANDOM``: a
looked-up row faults in its own page, not its neighbours'). The file stays in the page cache: dropping
it too (``POSIX_FADV_DONTNEED``) kept the kernel's fault-around from mapping cached neighbours (a
512-token prompt of random tokens brought 19 MB of the table back, 8 MB without them) and lowered the
int8 peak from 284 to 278 MB, but every start's first prompt then read its rows from storage
(a 512-distinct-token prefill 857 instead of 724 ms; slower still from an SD card), and other
processes lost the cached file too.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import re
import sys
from pathlib import Path

logger = logging.getLogger(__name__)

MADV_RANDOM = 1
MADV_DONTNEED = 4
_HEADER = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) \S+ \S+ \S+ \S+\s*(.*)$")


def file_mappings(path: Path | str) -> list[tuple[int, int, int, bool]]:
    """This process's mappings of ``path``: (start, end, resident bytes, whether it holds a page
    the process wrote), from ``/proc/self/smaps``. A write to a private file mapping makes the page
    anonymous (``Anonymous``); ``Private_Dirty`` is no test, it also counts file pages written to
    the page cache and not yet to storage, which nothing would lose."""
    target = os.path.realpath(path)
    maps: list[list[int]] = []
    mine = False
    with open("/proc/self/smaps", encoding="utf-8", errors="replace") as f:
        for line in f:
            header = _HEADER.match(line)
            if header:
                mine = header[3] == target
                if mine:
                    maps.append([int(header[1], 16), int(header[2], 16), 0, 0])
                continue
            key, _, rest = line.partition(":")
            if mine and key == "Rss":
                maps[-1][2] = int(rest.split()[0]) * 1024
            elif mine and key == "Anonymous" and int(rest.split()[0]):
                maps[-1][3] = 1
    return [(a, b, rss, bool(w)) for a, b, rss, w in maps]


@functools.cache
def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    return libc


def madvise(address: int, length: int, advice: int) -> bool:
    """``madvise(2)`` on ``length`` bytes from ``address`` (Linux); True when the kernel accepted it."""
    return bool(_libc().madvise(address, length, advice) == 0)


def release_file_pages(path: Path | str) -> int:
    """Drop this process's resident pages of its mappings of ``path`` (see the module docstring);
    return how many bytes were resident in the mappings released. Does nothing (0) off Linux or
    if the kernel refuses."""
    if not sys.platform.startswith("linux"):
        return 0
    try:
        maps = file_mappings(path)
        released = 0
        for start, end, rss, written in maps:
            if written:
                continue
            if madvise(start, end - start, MADV_DONTNEED):
                released += rss
                madvise(start, end - start, MADV_RANDOM)
    except (OSError, AttributeError, ValueError) as e:
        logger.debug("weight pages of %s not released: %s", path, e)
        return 0
    return released
