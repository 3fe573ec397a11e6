"""Quantized matrices kept on disk, keyed by everything that decides them.

A quantized matrix depends only on its weight, its config (type and fields) and the calibration
statistics that config reads; not on how the other matrices of the model are quantized. A search
that quantizes the same model under many bit allocations (``benchmarks/int4_search.py``) then
re-packs the graph and reads each matrix it has already quantized the same way, instead of running
GPTQ again. Pass a :class:`WeightCache` to :func:`~edgepipe.quantize.quantize` or
:func:`~edgepipe.quantize.handlers.quantize_weight`; the results are the same with or without it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgepipe.quantize.blockwise import QuantizedBlocks
from edgepipe.quantize.configs import WeightOnlyConfig

if TYPE_CHECKING:
    from edgepipe.quantize.handlers import WeightStats

logger = logging.getLogger(__name__)

__all__ = ["WeightCache"]


def _update(h: Any, arr: np.ndarray | None) -> None:
    """Hash an array with its dtype and shape (None hashes as absent)."""
    if arr is None:
        h.update(b"none")
        return
    a = np.ascontiguousarray(arr)
    h.update(f"{a.dtype.str}{a.shape}".encode())
    h.update(a.tobytes())


@dataclass(frozen=True)
class WeightCache:
    """One ``.npz`` per quantized matrix under ``root`` (created on first use).

    The key does not know the quantizers' code: a working cache for one search, not a store that
    outlives an upgrade of edgepipe (the build's own stage cache is versioned; this is not)."""

    root: Path

    def key(self, cfg: WeightOnlyConfig, weight: np.ndarray, stats: WeightStats) -> str:
        """Hash of the weight, the config and the statistics the config's handler reads (a Hessian is
        read only for a config that needs one)."""
        h = hashlib.sha256(json.dumps(cfg.to_dict(), sort_keys=True).encode())
        _update(h, weight)
        if cfg.needs_calibration:
            _update(h, stats.importance)
        if cfg.needs_hessian:
            _update(h, stats.hessian)
        return h.hexdigest()[:32]

    def get_or_make(
        self, cfg: WeightOnlyConfig, weight: np.ndarray, stats: WeightStats, make: Callable[[], QuantizedBlocks]
    ) -> QuantizedBlocks:
        """The stored blocks for this matrix, or ``make()``'s, stored (atomically) for next time."""
        path = Path(self.root) / f"{self.key(cfg, weight, stats)}.npz"
        if path.is_file():
            return _load(path)
        qb = make()
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".tmp-{os.getpid()}-{path.name}")
        arrays: dict[str, Any] = {"data": qb.data, "scales": qb.scales, "shape": np.array([qb.bits, qb.block_size, qb.K, qb.N])}
        if qb.zero_points is not None:
            arrays["zero_points"] = qb.zero_points
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)
        os.replace(tmp, path)
        logger.debug("stored %s %s in %s", type(cfg).__name__, qb.data.shape, path.name)
        return qb


def _load(path: Path) -> QuantizedBlocks:
    with np.load(path) as z:
        bits, block_size, k, n = (int(x) for x in z["shape"])
        zero_points = z["zero_points"] if "zero_points" in z.files else None
        return QuantizedBlocks(z["data"], z["scales"], zero_points, bits, block_size, k, n)
