"""One handler per config type: how a single weight matrix is quantized.

``HANDLERS`` maps a config class to its function, as torchao looks its quantizers up by config
type; :func:`quantize_weight` is the only caller. A new algorithm registers its handler with
``@handles(NewConfig)``. A :class:`~edgepipe.quantize.weight_cache.WeightCache` given to
:func:`quantize_weight` keeps each result on disk (same results, computed once).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np

from edgepipe.errors import InputError
from edgepipe.quantize.blockwise import QuantizedBlocks, quantize_matrix
from edgepipe.quantize.configs import Gptq, Imatrix, Mse, Rtn, WeightOnlyConfig
from edgepipe.quantize.gptq import gptq_matrix

if TYPE_CHECKING:
    from edgepipe.quantize.weight_cache import WeightCache

__all__ = ["HANDLERS", "WeightStats", "handles", "quantize_weight"]

C = TypeVar("C", bound=WeightOnlyConfig)
Handler = Callable[[Any, np.ndarray, "WeightStats"], QuantizedBlocks]
HANDLERS: dict[type[WeightOnlyConfig], Handler] = {}


@dataclass(frozen=True)
class WeightStats:
    """What calibration measured for one weight, read on demand: a stored Hessian is memory-mapped
    from disk only when the handler asks for it."""

    source: Mapping[str, np.ndarray]
    name: str

    @property
    def importance(self) -> np.ndarray | None:
        """Mean square of each input channel of the activation (K,)."""
        return self.source.get(self.name)

    @property
    def hessian(self) -> np.ndarray | None:
        """Mean of x x^T over calibration tokens (K, K)."""
        return self.source.get(f"{self.name}@H")


def handles(config_type: type[C]) -> Callable[[Callable[[C, np.ndarray, WeightStats], QuantizedBlocks]], Handler]:
    def register(fn: Callable[[C, np.ndarray, WeightStats], QuantizedBlocks]) -> Handler:
        HANDLERS[config_type] = fn
        return fn

    return register


def quantize_weight(cfg: WeightOnlyConfig, w: np.ndarray, stats: WeightStats, *, cache: WeightCache | None = None) -> QuantizedBlocks:
    """Quantize the weight ``w`` [K, N] as ``cfg`` says (read from / stored in ``cache`` if given)."""
    handler = HANDLERS.get(type(cfg))
    if handler is None:
        raise InputError(f"no quantizer handles {type(cfg).__name__}; use one of {', '.join(c.__name__ for c in HANDLERS)}")
    if cache is None:
        return handler(cfg, w, stats)
    return cache.get_or_make(cfg, w, stats, lambda: handler(cfg, w, stats))


@handles(Rtn)
def _rtn(cfg: Rtn, w: np.ndarray, stats: WeightStats) -> QuantizedBlocks:
    return quantize_matrix(w, bits=cfg.bits, block_size=cfg.block_size, symmetric=cfg.symmetric, algorithm="rtn")


@handles(Mse)
def _mse(cfg: Mse, w: np.ndarray, stats: WeightStats) -> QuantizedBlocks:
    return quantize_matrix(w, bits=cfg.bits, block_size=cfg.block_size, symmetric=cfg.symmetric, algorithm="mse", steps=cfg.steps)


@handles(Imatrix)
def _imatrix(cfg: Imatrix, w: np.ndarray, stats: WeightStats) -> QuantizedBlocks:
    return quantize_matrix(
        w, bits=cfg.bits, block_size=cfg.block_size, symmetric=cfg.symmetric, algorithm="imatrix", importance=stats.importance, steps=cfg.steps
    )


@handles(Gptq)
def _gptq(cfg: Gptq, w: np.ndarray, stats: WeightStats) -> QuantizedBlocks:
    hessian = stats.hessian
    if hessian is None or w.shape[0] % cfg.block_size:
        # no Hessian (not calibrated) or blocks that would straddle K's end: the importance-weighted search
        fallback = Imatrix(bits=cfg.bits, block_size=cfg.block_size, symmetric=cfg.symmetric, accuracy_level=cfg.accuracy_level)
        return _imatrix(fallback, w, stats)
    return gptq_matrix(w, hessian, bits=cfg.bits, block_size=cfg.block_size, symmetric=cfg.symmetric, damp=cfg.damp, act_order=cfg.act_order)
