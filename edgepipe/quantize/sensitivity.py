"""How much each matrix's quantization costs, predicted from calibration statistics: what the size
allocator (:mod:`edgepipe.quantize.allocate`) minimises.

The default proxy, ``fisher`` (:mod:`edgepipe.quantize.fisher`): 0.5 sum F dW^2, the second-order
KL the weight error adds, with F the Fisher diagonal of the model's own output distribution. On
SmolLM2-135M at Q4_K_M's size it allocates nearly the same 8-bit matrices as the measured per-matrix
KL ranking did, and wins over the proxy below (KL 0.0446 vs 0.0525; benchmarks/RESULTS.md).

The fallback, ``relative-output-error`` (a profile may ask for it; Fisher falls back to it when the
export's matrices cannot be found in the checkpoint): for a matrix W [K, N] whose input channel k carries the mean
square activation a_k on the calibration text (the diagonal :func:`collect_importance` measures, llama.cpp's
imatrix), storing it in a format with error dW adds to its output an error of expected square
sum_k a_k |dW_k|^2 (input channels taken as uncorrelated). That is divided by the output's own
sum_k a_k |W_k|^2: the noise-to-signal ratio the matrix adds. Why relative and not absolute: the
absolute Hessian-weighted error (benchmarks/RESULTS.md, "Hessian greedy") ranked the last layers'
o_proj / down_proj first because the residual stream grows ~100x with depth, while each next norm
divides that growth out; it lost to the measured KL ranking.

For ``fisher`` and ``relative-output-error``, dW is round-to-nearest's in every format (one cheap pass
per format, no Hessian), not the final algorithm's: the proxy ranks matrices and formats, it does not
predict the artifact's error. ``fisher-output`` prices the error the profile's own algorithm makes
(GPTQ's, which is 0.06-0.6x rounding's by a factor that differs per matrix and format) in output space:
0.5 sum_n b_n dW_n^T H dW_n, H the input's second moment (GPTQ's Hessian), b_n the output's mean squared
gradient (the Fisher factor); see :func:`realised_losses`. Each proxy's statistics come from the
``calib-stats`` stage (:mod:`edgepipe.quantize.calib_stats`, the kinds ``NEEDS`` names).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from edgepipe.quantize.configs import WeightOnlyConfig

if TYPE_CHECKING:
    from edgepipe.quantize.calib_stats import MatrixStats
    from edgepipe.quantize.handlers import WeightStats

__all__ = ["FISHER", "FISHER_OUTPUT", "NEEDS", "PROXIES", "PROXY", "Sensitivity", "matrix_losses", "measure_sensitivity", "realised_losses"]

logger = logging.getLogger(__name__)

PROXY = "relative-output-error"
FISHER = "fisher"  # edgepipe.quantize.fisher: 0.5 sum_kn F_kn dW_kn^2, a predicted KL in nats
FISHER_OUTPUT = "fisher-output"  # 0.5 sum_n b_n dW_n^T H dW_n, dW the profile's own algorithm's error
PROXIES = (FISHER, FISHER_OUTPUT, PROXY)
# the calibration statistics (edgepipe.quantize.calib_stats kinds) each proxy reads
NEEDS: dict[str, tuple[str, ...]] = {FISHER: ("fisher",), FISHER_OUTPUT: ("fisher", "hessians"), PROXY: ("activations",)}


@dataclass(frozen=True)
class Sensitivity:
    """Per matrix, per format label: the predicted loss of storing it so (``proxy`` names how)."""

    proxy: str
    losses: Mapping[str, Mapping[str, float]]

    def to_dict(self) -> dict[str, Any]:
        return {"proxy": self.proxy, "losses": {n: dict(v) for n, v in self.losses.items()}}

    @classmethod
    def read(cls, path: Path) -> Sensitivity:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(data["proxy"], data["losses"])

    def write(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=0, sort_keys=True), encoding="utf-8")


def matrix_losses(
    w: np.ndarray, importance: np.ndarray | None, configs: tuple[WeightOnlyConfig | None, ...], outputs: np.ndarray | None = None,
    fisher: np.ndarray | None = None,
) -> dict[str, float]:
    """The proxy for one weight ``w`` [K, N] in each of ``configs`` (None: fp32, no loss): with
    ``outputs`` (the Fisher factor b of each output column), 0.5 a^T dW^2 b; without, the relative
    output error."""
    from edgepipe.quantize.blockwise import rtn_squared_error

    w = np.asarray(w, dtype=np.float32)
    wt = np.ascontiguousarray(w.T)  # [N, K]: the blocks' layout, transposed once for every format
    a = np.ones(w.shape[0]) if importance is None else np.asarray(importance, dtype=np.float64)
    b = np.ones(w.shape[1]) if outputs is None else np.asarray(outputs, dtype=np.float64)
    signal = 2.0 if outputs is not None else float(a @ np.square(w, dtype=np.float64).sum(1)) or 1.0
    ft = None if fisher is None else np.ascontiguousarray(fisher.T, dtype=np.float32)
    a32 = a.astype(np.float32)
    out = {}
    for cfg in configs:
        if cfg is None:
            out["fp32"] = 0.0
            continue
        dw2 = rtn_squared_error(wt, cfg.bits, cfg.block_size, cfg.symmetric)  # [N, K]
        if ft is not None:
            out[cfg.format.label] = float(np.sum(dw2 * ft, dtype=np.float64)) / signal
            continue
        out[cfg.format.label] = float(b @ (dw2 @ a32).astype(np.float64)) / signal
    return out


def realised_losses(
    w: np.ndarray, configs: tuple[WeightOnlyConfig | None, ...], outputs: np.ndarray, stats: WeightStats,
) -> dict[str, float]:
    """The ``fisher-output`` proxy for one weight ``w`` [K, N]: 0.5 sum_n b_n dW_n^T H dW_n with dW the
    error each config's own algorithm makes (GPTQ's, with the calibration Hessian ``stats`` holds), H
    the input's second moment and b (``outputs``) each output's mean squared gradient. In output space
    because GPTQ's error is correlated across input channels (it compensates one channel's rounding
    on the others): the element-wise Fisher diagonal would price that compensation as extra error."""
    from edgepipe.quantize.handlers import quantize_weight

    w = np.asarray(w, dtype=np.float32)
    h = np.asarray(stats.hessian, dtype=np.float32)
    b = np.asarray(outputs, dtype=np.float64)
    out = {}
    for cfg in configs:
        if cfg is None:
            out["fp32"] = 0.0
            continue
        d = w - quantize_weight(cfg, w, stats).dequantize()
        hd = h @ d
        out[cfg.format.label] = 0.5 * float(np.einsum("kn,kn->n", hd, d, dtype=np.float64) @ b)
    return out


def measure_sensitivity(
    model_dir: Path,
    options: Mapping[str, tuple[WeightOnlyConfig | None, ...]],
    stats: MatrixStats,
    proxy: str,
    progress: Callable[[str], None] | None = None,
) -> Sensitivity:
    """The ``proxy`` for every matrix of the fp32 export in ``model_dir`` with more than one option,
    each weight read from the external data on its own (a 2.5B model never sits in RAM whole), from
    the calibration statistics ``stats`` (the kinds ``NEEDS[proxy]`` names). LookupError when a Fisher
    proxy meets a matrix that matched no checkpoint linear (the caller then measures the fallback)."""
    import onnx
    from onnx import numpy_helper

    from edgepipe.quantize.bitplan import matrices_from_onnx
    from edgepipe.quantize.handlers import WeightStats

    if proxy != PROXY and (missing := stats.unmatched()):
        raise LookupError(f"matrix {missing} matches no linear of the checkpoint")
    model = onnx.load(str(Path(model_dir) / "model.onnx"), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    matrices = {m.name: m for m in matrices_from_onnx(model).matrices}
    importance = stats.as_importance() if proxy == FISHER_OUTPUT else None
    losses: dict[str, dict[str, float]] = {}
    todo = [n for n, cfgs in options.items() if len(cfgs) > 1]
    for i, name in enumerate(todo):
        w = matrices[name].oriented(numpy_helper.to_array(inits[name], base_dir=str(model_dir)))
        if proxy == PROXY:
            losses[name] = matrix_losses(w, stats.importance(name), options[name])
        else:
            a, b, full = stats.fisher(name) or (None, None, None)
            if importance is not None and b is not None and f"{name}@H" in importance:
                losses[name] = realised_losses(w, options[name], b, WeightStats(importance, name))
            else:  # fisher, or a matrix no MatMul reads (an untied input embedding: GPTQ rounds it too)
                losses[name] = matrix_losses(w, a, options[name], b, full)
        if progress and (i + 1) % 25 == 0:
            progress(f"sensitivity: {i + 1}/{len(todo)} matrices")
    return Sensitivity(proxy, losses)
