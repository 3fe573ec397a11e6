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

    def stored_hessians(self) -> dict[str, Path]:
        """``weight -> .npy file`` of the Hessians written to a ``store`` folder (one per distinct input)."""
        return {k.removesuffix("@H"): h for k, h in self._hessians.items() if isinstance(h, Path)}


def _hessian_activations(acts: dict[str, str], hessians: bool | Collection[str]) -> set[str]:
    """The activations whose x^T x calibration keeps: all, or those of the named weights."""
    if hessians is True:
        return set(acts.values())
    named = set(hessians or ())
    return {a for w, a in acts.items() if w in named}


class _Accumulator:
    """Sums of x^2 (per channel) and x^T x per watched activation, reduced to means as each piece
    of the segmented run finishes; a finished Hessian goes to ``store`` when one is given."""

    def __init__(self, h_acts: set[str], count: int, store: Path | None):
        self.h_acts, self.count, self.store = h_acts, count, store
        self.sums: dict[str, np.ndarray] = {}
        self.outer: dict[str, np.ndarray] = {}
        self.diag: dict[str, np.ndarray] = {}
        self.hessians: dict[str, np.ndarray | Path] = {}

    def on_watched(self, _feed: int, name: str, val: np.ndarray) -> None:
        x = val.reshape(-1, val.shape[-1]).astype(np.float32, copy=False)
        sq = np.square(x, dtype=np.float64).sum(0)
        self.sums[name] = sq if name not in self.sums else self.sums[name] + sq
        if name in self.h_acts:
            xtx = x.T @ x  # float32 GEMM; a window's 512 tokens lose nothing that matters here
            if name in self.outer:
                self.outer[name] += xtx
            else:
                self.outer[name] = xtx

    def on_segment_done(self, _k: int, names: list[str]) -> None:
        for name in names:
            self.diag[name] = (self.sums.pop(name) / self.count).astype(np.float32)
            if name in self.outer:
                h = self.outer.pop(name)
                h /= self.count
                self.hessians[name] = self._keep(h)

    def _keep(self, h: np.ndarray) -> np.ndarray | Path:
        if self.store is None:
            return h
        path = Path(self.store) / f"h{len(self.hessians):04d}.npy"
        np.save(path, h)
        return path


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
    count = sum(int(np.asarray(w).shape[0]) for w in windows)
    if not count:
        return Importance({}, {})
    if store is not None:
        Path(store).mkdir(parents=True, exist_ok=True)
    acc = _Accumulator(_hessian_activations(acts, hessians), count, store)

    def say(msg: str) -> None:
        if progress:
            progress(f"calibrating: {msg.removeprefix('fp32 reference: ')}")

    runner.run(
        decoder_feeds(model_dir, windows), [], watch=set(acts.values()), on_watched=acc.on_watched,
        on_segment_done=acc.on_segment_done, progress=say,
    )
    diag = {w: acc.diag[a] for w, a in acts.items() if a in acc.diag}
    hs = {f"{w}@H": acc.hessians[a] for w, a in acts.items() if a in acc.hessians}
    return Importance(diag, hs)
