"""Activation statistics for importance-weighted quantization (llama.cpp's "imatrix" idea).

For every MatMul with a constant weight we collect the mean square of each input channel of its
activation over calibration text: a weight error on a channel that carries large activations
costs more output error, so the quantizer weights its squared error by these numbers. GPTQ also
needs each activation's Hessian, the mean of x x^T over tokens.

The fp32 export runs a few layers at a time (:mod:`edgepipe.export.segmented`), so calibrating a
2.5B-parameter model never holds its 10 GB of fp32 weights at once; Hessians (0.3 GB per layer of
such a model) are reduced as each piece finishes and, with ``store``, written to disk and read back
one at a time by the quantizer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping
from pathlib import Path

import numpy as np

logger = logging.getLogger(__name__)


def weight_matmuls(model) -> dict[str, str]:
    """Map weight-initializer name -> activation tensor name, for MatMuls with 2-D constant weights."""
    inits = {t.name: t for t in model.graph.initializer}
    out: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2:
            out[node.input[1]] = node.input[0]
    return out


class Importance(Mapping):
    """``weight -> mean square per input channel`` and ``"weight@H" -> Hessian``.

    Hessians kept in a folder are memory-mapped on access, so the quantizer holds one at a time.
    """

    def __init__(self, diag: dict[str, np.ndarray], hessians: dict[str, np.ndarray | Path]):
        self._diag = diag
        self._hessians = hessians

    def __getitem__(self, key: str) -> np.ndarray:
        if key in self._diag:
            return self._diag[key]
        h = self._hessians[key]
        return np.load(h, mmap_mode="r") if isinstance(h, Path) else h

    def __iter__(self) -> Iterator[str]:
        yield from self._diag
        yield from self._hessians

    def __len__(self) -> int:
        return len(self._diag) + len(self._hessians)


def collect_importance(
    model_dir: Path,
    windows: Iterable[np.ndarray],
    *,
    threads: int = 0,
    hessians: bool | Collection[str] = False,
    store: Path | None = None,
    max_segment_bytes: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> Importance:
    """Mean square of each input channel of every weight MatMul, over the token ``windows``.

    With ``hessians``, also ``"<weight>@H"``: the mean of x x^T over tokens (for GPTQ), one per
    distinct activation (MatMuls that share an input share the array); with ``store``, those
    arrays are written there as .npy files instead of kept in memory. ``hessians`` may name the
    weights that need one (those GPTQ will quantize); the other activations get the diagonal only.
    """
    from edgepipe.export.segmented import DEFAULT_SEGMENT_BYTES, SegmentedRunner, decoder_feeds

    windows = list(windows)
    runner = SegmentedRunner(model_dir, max_bytes=max_segment_bytes or DEFAULT_SEGMENT_BYTES, threads=threads)
    acts = weight_matmuls(runner.model)
    wanted = set(acts.values())
    if hessians is True:
        h_acts = wanted
    else:
        named = set(hessians or ())
        h_acts = {a for w, a in acts.items() if w in named}
    count = sum(int(np.asarray(w).shape[0]) for w in windows)
    if not count:
        return Importance({}, {})
    sums: dict[str, np.ndarray] = {}
    outer: dict[str, np.ndarray] = {}
    done_diag: dict[str, np.ndarray] = {}
    done_h: dict[str, np.ndarray | Path] = {}
    if store is not None:
        Path(store).mkdir(parents=True, exist_ok=True)

    def on_watched(_feed: int, name: str, val: np.ndarray) -> None:
        x = val.reshape(-1, val.shape[-1]).astype(np.float32, copy=False)
        sq = np.square(x, dtype=np.float64).sum(0)
        sums[name] = sq if name not in sums else sums[name] + sq
        if name in h_acts:
            xtx = x.T @ x  # float32 GEMM; a window's 512 tokens lose nothing that matters here
            if name in outer:
                outer[name] += xtx
            else:
                outer[name] = xtx

    def on_segment_done(_k: int, names: list[str]) -> None:
        for name in names:
            done_diag[name] = (sums.pop(name) / count).astype(np.float32)
            if name in outer:
                h = outer.pop(name)
                h /= count
                if store is not None:
                    path = Path(store) / f"h{len(done_h):04d}.npy"
                    np.save(path, h)
                    done_h[name] = path
                else:
                    done_h[name] = h

    def say(msg: str) -> None:
        if progress:
            progress(f"calibrating: {msg.removeprefix('fp32 reference: ')}")

    runner.run(
        decoder_feeds(model_dir, windows), [], watch=wanted, on_watched=on_watched, on_segment_done=on_segment_done, progress=say
    )
    diag = {w: done_diag[a] for w, a in acts.items() if a in done_diag}
    hs = {f"{w}@H": done_h[a] for w, a in acts.items() if a in done_h}
    return Importance(diag, hs)
