"""The quantize stage: the fp32 export -> a weight-only quantized decoder, calibrated as the scheme says.

Keyed by the export's key, the scheme and the calibration text, so two targets that ask for the
same scheme share one quantized model, and a changed calibration text re-quantizes.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.estimate import stage_ram_bytes
from edgepipe.export.stage import ExportResult
from edgepipe.quantize import BitPlan, MixedPrecision, plan_from_onnx
from edgepipe.stage import StageContext, run_cached


@dataclass(frozen=True)
class QuantizeConfig:
    # v3: Hessians accumulated in float32, piece by piece (edgepipe.export.segmented)
    # v5: the scale search in torch (float64 error expansion: rare ties resolve differently)
    # v6: the tied table's Reshape shape is a graph input (no folded heap copy of the table)
    VERSION = 6

    export_key: str
    scheme: MixedPrecision
    calib_key: str  # hash of the calibration text
    plan: BitPlan | None = None  # an allocated plan (edgepipe.quantize.allocate): every matrix's config; None: the scheme's


@dataclass(frozen=True)
class QuantizeResult:
    model_dir: Path
    key: str
    info: dict[str, Any]  # the manifest's "quantization" section


def hessian_bytes(config: dict[str, Any]) -> int:
    """Disk that GPTQ's float32 Hessians take while quantizing: one per distinct MatMul input.

    Per layer: the attention input, the attention output and the MLP input (hidden x hidden
    each) and the MLP's inner activation (intermediate x intermediate).
    """
    hidden = int(config.get("hidden_size") or 0)
    inter = int(config.get("intermediate_size") or 4 * hidden)
    layers = int(config.get("num_hidden_layers") or 0)
    return layers * (3 * hidden * hidden + inter * inter) * 4


def run_quantize(
    source: ExportResult,
    config: QuantizeConfig,
    calib_windows: list[np.ndarray],
    ctx: StageContext,
    *,
    num_parameters: int,
    model_config: dict[str, Any],
) -> QuantizeResult:
    scheme = config.scheme
    target: BitPlan | MixedPrecision = config.plan if config.plan is not None else scheme

    def produce(tmp: Path) -> dict[str, Any]:
        from edgepipe.quantize import quantize
        from edgepipe.quantize.calibrate import collect_importance

        importance = None
        if scheme.needs_calibration or (config.plan is not None and any(e.config is not None and e.config.needs_calibration for e in config.plan)):
            ctx.progress("calibrating: activation statistics on the calibration text")
            # Hessians go to disk and come back one at a time: 12 GB of them for a 2.5B model
            importance = collect_importance(
                source.model_dir, calib_windows, threads=ctx.threads,
                hessians=_plan(target, source).hessian_weights(), store=tmp / "hessians",
                progress=ctx.progress,
            )
        try:
            return quantize(source.model_dir, tmp / "model", target, importance=importance, progress=ctx.progress)
        finally:
            del importance
            shutil.rmtree(tmp / "hessians", ignore_errors=True)

    extra = hessian_bytes(model_config) if scheme.needs_hessian or (config.plan is not None and config.plan.hessian_weights()) else 0
    out = run_cached(
        "quantize", config, produce, ctx,
        need_bytes=int(num_parameters * 1.5) + extra, need_ram_bytes=stage_ram_bytes(num_parameters)["quantize"],
    )
    return QuantizeResult(model_dir=out.dir / "model", key=out.key, info=out.info)


def _plan(target: BitPlan | MixedPrecision, source: ExportResult) -> BitPlan:
    return target if isinstance(target, BitPlan) else plan_from_onnx(source.model_dir / "model.onnx", target)
