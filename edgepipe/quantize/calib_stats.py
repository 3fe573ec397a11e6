"""The calibration statistics the size allocator's proxies read, one cached stage per kind.

Why a stage of its own: the statistics depend on the export and the calibration text only, while the
proxy's per-format losses (:mod:`edgepipe.quantize.sensitivity`) depend on the profile's formats too.
Cached apart, a profile that changes its ``formats`` (or its algorithm) reprices the matrices from the
stored statistics instead of running the forward and backward passes over the calibration windows
again (the default model: about a minute quiet, several at load).

Kinds (what :data:`edgepipe.quantize.sensitivity.NEEDS` says each proxy reads):

- ``fisher``: per matrix of the export, the Fisher factors a [K] (mean x_k^2), b [N] (mean g_n^2) and,
  up to ``fisher.EXACT_MAX_PARAMETERS``, the whole diagonal F [K, N]
  (:func:`edgepipe.quantize.fisher.fisher_statistics`, matched to the export's matrices by value). A
  matrix that matches no linear of the checkpoint is named in ``unmatched`` (the proxy then falls back).
- ``activations``: per matrix, the mean square of each input channel (:func:`collect_importance`).
- ``hessians``: the same and each input's second moment E[x x^T] [K, K] (GPTQ's Hessian), one .npy
  per distinct input, memory-mapped on use.
"""

from __future__ import annotations

import functools
import json
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.stage import StageContext, run_cached

__all__ = ["KINDS", "MatrixStats", "StatisticsConfig", "run_statistics"]

KINDS = ("fisher", "activations", "hessians")


@dataclass(frozen=True)
class StatisticsConfig:
    VERSION = 1

    export_key: str
    calib_key: str  # the calibration text and its window count
    kind: str  # one of KINDS


@dataclass(frozen=True)
class MatrixStats:
    """The statistics of every kind a proxy asked for, read from their stage folders on demand (the
    small indexes and per-channel vectors once; the large arrays per matrix, when asked for)."""

    dirs: Mapping[str, Path]  # kind -> its stage folder

    @functools.cached_property
    def _indexes(self) -> dict[str, dict[str, Any]]:
        return {kind: json.loads((d / "index.json").read_text(encoding="utf-8")) for kind, d in self.dirs.items()}

    @functools.cached_property
    def _channel_means(self) -> dict[str, np.ndarray]:
        d = self.dirs.get("hessians") or self.dirs.get("activations")
        if d is None:
            return {}
        with np.load(d / "importance.npz") as z:
            return {k: z[k] for k in z.files}

    def fisher(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None] | None:
        """(a, b, F or None) of matrix ``name``; None when it matched no linear of the checkpoint."""
        d = self.dirs["fisher"]
        i = self._indexes["fisher"]["matrices"].get(name)
        if i is None:
            return None
        full = d / f"m{i:04d}.F.npy"
        return np.load(d / f"m{i:04d}.a.npy"), np.load(d / f"m{i:04d}.b.npy"), np.load(full, mmap_mode="r") if full.exists() else None

    def unmatched(self) -> str | None:
        """A matrix the Fisher pass could not find in the checkpoint (None: every one was found)."""
        found: str | None = self._indexes["fisher"].get("unmatched")
        return found

    def importance(self, name: str) -> np.ndarray | None:
        """Mean square of each input channel of matrix ``name``."""
        return self._channel_means.get(name)

    def hessian(self, name: str) -> np.ndarray | None:
        """E[x x^T] of matrix ``name``'s input (memory-mapped)."""
        f = self._indexes["hessians"]["hessians"].get(name)
        return None if f is None else np.load(self.dirs["hessians"] / f, mmap_mode="r")

    def as_importance(self) -> Mapping[str, np.ndarray]:
        """The ``weight`` / ``weight@H`` mapping the quantizer's handlers read (:class:`WeightStats`)."""
        return _Importance(self)


class _Importance(Mapping[str, np.ndarray]):
    def __init__(self, stats: MatrixStats):
        self._s = stats

    def __getitem__(self, key: str) -> np.ndarray:
        name, _at, h = key.partition("@")
        got = self._s.hessian(name) if h == "H" else self._s.importance(name)
        if got is None:
            raise KeyError(key)
        return got

    def __iter__(self) -> Iterator[str]:
        yield from self._s._channel_means
        if "hessians" in self._s.dirs:
            yield from (f"{n}@H" for n in self._s._indexes["hessians"]["hessians"])

    def __len__(self) -> int:
        return sum(1 for _ in self)


def run_statistics(
    kinds: tuple[str, ...], source: Any, info: Any, windows: list[np.ndarray], calib_key: str, ctx: StageContext,
) -> tuple[MatrixStats, dict[str, str]]:
    """The statistics of each of ``kinds`` (each its own cached stage entry) and their cache keys."""
    dirs: dict[str, Path] = {}
    keys: dict[str, str] = {}
    for kind in kinds:
        cfg = StatisticsConfig(source.key, calib_key, kind)

        def produce(tmp: Path, kind: str = kind) -> dict[str, Any]:
            return _PRODUCERS[kind](source, info, windows, tmp, ctx)

        out = run_cached("calib-stats", cfg, produce, ctx, need_bytes=_disk_bytes(kind, info))
        dirs[kind], keys[kind] = out.dir, out.key
    return MatrixStats(dirs), keys


def _disk_bytes(kind: str, info: Any) -> int:
    """What an entry stores: the whole Fisher diagonal (fp32, a model up to EXACT_MAX_PARAMETERS), or
    GPTQ's Hessians (:func:`edgepipe.quantize.stage.hessian_bytes`), or a few vectors."""
    from edgepipe.quantize.fisher import EXACT_MAX_PARAMETERS
    from edgepipe.quantize.stage import hessian_bytes

    if kind == "fisher":
        return 4 * info.num_parameters if info.num_parameters <= EXACT_MAX_PARAMETERS else 1 << 26
    return hessian_bytes(info.config) if kind == "hessians" else 1 << 26


def _fisher(source: Any, info: Any, windows: list[np.ndarray], tmp: Path, ctx: StageContext) -> dict[str, Any]:
    """Fisher factors per matrix of the export (one forward and backward pass per window)."""
    from edgepipe.export.normalize import normalized_folder
    from edgepipe.quantize.fisher import fisher_pair, fisher_statistics

    ctx.progress("calib-stats: Fisher statistics (one forward and backward pass per calibration window)")
    src, _rows = normalized_folder(info.path, tmp / "hf")
    stats, index = fisher_statistics(src, windows, num_parameters=info.num_parameters, threads=ctx.threads, progress=ctx.progress)
    shutil.rmtree(tmp / "hf", ignore_errors=True)
    matrices: dict[str, int] = {}
    unmatched = None
    for i, (name, w) in enumerate(_export_weights(source.model_dir)):
        parts = index.split(w)
        if parts is None:
            unmatched = name
            break
        a, b, full = fisher_pair(stats, parts)
        np.save(tmp / f"m{i:04d}.a.npy", a)
        np.save(tmp / f"m{i:04d}.b.npy", b)
        if full is not None:
            np.save(tmp / f"m{i:04d}.F.npy", np.ascontiguousarray(full, dtype=np.float32))
        matrices[name] = i
    (tmp / "index.json").write_text(json.dumps({"matrices": matrices, "unmatched": unmatched}), encoding="utf-8")
    return {"matrices": len(matrices), **({"unmatched": unmatched} if unmatched else {})}


def _export_weights(model_dir: Path) -> Iterator[tuple[str, np.ndarray]]:
    """Every planned matrix of the fp32 export as [K, N], read one at a time from its external data."""
    import onnx
    from onnx import numpy_helper

    from edgepipe.quantize.bitplan import matrices_from_onnx

    model = onnx.load(str(Path(model_dir) / "model.onnx"), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    for m in matrices_from_onnx(model).matrices:
        yield m.name, m.oriented(numpy_helper.to_array(inits[m.name], base_dir=str(model_dir)))


def _activations(source: Any, info: Any, windows: list[np.ndarray], tmp: Path, ctx: StageContext, *, hessians: bool = False) -> dict[str, Any]:
    """Each matrix input's mean square per channel (and, with ``hessians``, its E[x x^T])."""
    from edgepipe.quantize.calibrate import collect_importance

    ctx.progress("calib-stats: activation statistics on the calibration text")
    imp = collect_importance(source.model_dir, windows, threads=ctx.threads, hessians=hessians, store=tmp / "h" if hessians else None, progress=ctx.progress)
    diag: dict[str, Any] = {k: np.asarray(imp[k]) for k in imp if not k.endswith("@H")}
    np.savez(tmp / "importance.npz", **diag)
    files = {name: str(path.relative_to(tmp)) for name, path in imp.stored_hessians().items()}
    (tmp / "index.json").write_text(json.dumps({"hessians": files}), encoding="utf-8")
    return {"matrices": len(diag), **({"hessians": len(set(files.values()))} if hessians else {})}


def _hessians(source: Any, info: Any, windows: list[np.ndarray], tmp: Path, ctx: StageContext) -> dict[str, Any]:
    return _activations(source, info, windows, tmp, ctx, hessians=True)


_PRODUCERS = {"fisher": _fisher, "activations": _activations, "hessians": _hessians}
