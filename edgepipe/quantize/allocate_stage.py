"""The stages between calibration and quantize when a profile states a size budget.

``calib-stats`` (:mod:`edgepipe.quantize.calib_stats`, cached by the export and the calibration text
alone): the statistics the proxy reads (the Fisher pass, activation moments). ``sensitivity`` (cached
by those, the allowed formats, the algorithms and the proxy, so every budget of a search shares it):
the proxy for every matrix in every allowed format, priced from the statistics, so a changed format
list does not rerun the calibration passes. ``allocate`` (cached by that and the budget):
the format of each matrix, within the budget exactly in bytes. :func:`preflight_budget` refuses an
unreachable budget from ``config.json`` alone, before any export.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.export.stage import ExportResult
from edgepipe.quantize.allocate import Allocation, Budget, allocate, check_reachable, graph_bytes, options_for, plan_from_labels
from edgepipe.quantize.bitplan import BitPlan
from edgepipe.quantize.calib_stats import StatisticsConfig
from edgepipe.quantize.configs import allowed_formats, scheme_from_target
from edgepipe.quantize.kernel_time import KernelTimes, allocate_within_time
from edgepipe.quantize.sensitivity import Sensitivity
from edgepipe.stage import StageContext, run_cached

logger = logging.getLogger(__name__)

__all__ = ["AllocateConfig", "SensitivityConfig", "built_plan", "exported_other_bytes", "other_bytes", "preflight_budget", "run_allocation"]


@dataclass(frozen=True)
class SensitivityConfig:
    # v3: priced from the calib-stats stage's entries (edgepipe.quantize.calib_stats); the fisher-output proxy
    VERSION = 3

    export_key: str
    calib_key: str  # with export_key and statistics_version: the calib-stats entries it reads
    formats: tuple[str, ...]  # the allowed formats' labels
    algorithm: str  # the 4-bit algorithm (fisher-output prices its error; the other proxies round to nearest)
    proxy: str  # edgepipe.quantize.sensitivity.PROXIES: what the profile asks for
    eight_bit_algorithm: str = "rtn"
    statistics_version: int = StatisticsConfig.VERSION


@dataclass(frozen=True)
class AllocateConfig:
    VERSION = 2

    sensitivity_key: str
    plan: BitPlan  # the scheme's plan (pinned matrices included) the allocation edits
    budget: Budget  # its max_decode_time too
    budget_bytes: int
    kernel_time: tuple[Any, ...] = ()  # the profile's rows (edgepipe.targets.schema.KernelTime)


# what quantizing adds to model.onnx per matrix (MatMulNBits' attributes and its scale / zero-point
# names): SmolLM2-135M's graph grows from 170,928 to 261,340 bytes for 151 matrices, 599 each
GRAPH_BYTES_PER_MATRIX = 768


def other_bytes(info: Any, plan: BitPlan) -> int:
    """The artifact's bytes besides the quantized matrices, from ``config.json`` before any export:
    fp32 parameters, rotary caches, an upper bound on the graph."""
    from edgepipe.quantize.architectures import dimensions

    d = dimensions(info.config)
    fp32 = max(info.num_parameters - plan.parameters(), 0) * 4
    rope = int(info.config.get("max_position_embeddings", 4096)) * d["head_dim"] * 4
    return fp32 + rope + graph_bytes(plan.num_layers)


def exported_other_bytes(model_dir: Path, plan: BitPlan) -> int:
    """The same, measured on the fp32 export (any architecture): everything it stores at 4 bytes a
    weight stays so in the artifact except the plan's matrices; the graph grows a little per matrix.
    On SmolLM2-135M: 2,524,592 predicted, 2,499,040 built."""
    stored = sum(f.stat().st_size for f in Path(model_dir).iterdir() if f.name.startswith("model.onnx"))
    return stored - 4 * plan.parameters() + GRAPH_BYTES_PER_MATRIX * len(plan)


def _pinned(plan: BitPlan) -> frozenset[str]:
    """Matrices the profile's expert rules (eight_bit_ops / eight_bit_layers) put in 8 bits."""
    s = plan.scheme
    return frozenset(
        e.matrix.name for e in plan if s.eight_bit is not None and not e.matrix.vocab_table and s.names_eight_bit(e.matrix.name, e.matrix.layer, plan.num_layers)
    )


def preflight_budget(info: Any, q: Any) -> None:
    """Raise TargetError (exit 2) when the profile's budget is below the smallest size this model
    reaches with the allowed formats, from ``config.json`` alone (the plan ``estimate`` makes). An
    architecture without a table of its matrices (the generic export path: GPT-2, GPT-J, ...) is
    checked after export instead, on the graph's own matrices (:func:`run_allocation`)."""
    from edgepipe.quantize.architectures import ARCHITECTURES, plan_from_config

    budget = Budget.of(q)
    if budget is None or not any(a in ARCHITECTURES for a in info.config.get("architectures") or []):
        return
    plan = plan_from_config(info.config, scheme_from_target(q))
    other = other_bytes(info, plan)
    options = options_for(plan, allowed_formats(q), q, _pinned(plan))
    check_reachable(plan, options, budget, budget.matrix_bytes(plan.parameters(), other), other)


def run_allocation(
    source: ExportResult, q: Any, info: Any, calib_windows: list[np.ndarray], calib_key: str, ctx: StageContext,
) -> Allocation | None:
    """The allocated plan for the profile's budget (None without one): sensitivity, then allocation."""
    from edgepipe.quantize.bitplan import plan_from_onnx

    budget = Budget.of(q)
    if budget is None:
        return None
    plan = plan_from_onnx(source.model_dir / "model.onnx", scheme_from_target(q))
    formats = allowed_formats(q)
    options = options_for(plan, formats, q, _pinned(plan))
    scfg = SensitivityConfig(
        source.key, calib_key, tuple(f.label for f in formats), q.algorithm, q.sensitivity, q.eight_bit_algorithm,
    )

    def measure(tmp: Path) -> dict[str, Any]:
        sens, keys = _measure(source, info, options_for(plan, formats, q), calib_windows, calib_key, scfg.proxy, ctx)
        sens.write(tmp / "sensitivity.json")
        return {"proxy": sens.proxy, "matrices": len(sens.losses), "statistics": keys}

    sens_out = run_cached("sensitivity", scfg, measure, ctx)
    sens = Sensitivity.read(sens_out.dir / "sensitivity.json")
    budget_bytes = budget.matrix_bytes(plan.parameters(), exported_other_bytes(source.model_dir, plan))
    acfg = AllocateConfig(sens_out.key, plan, budget, budget_bytes, tuple(q.kernel_time))
    times = KernelTimes.of(q)

    def choose(tmp: Path) -> dict[str, Any]:
        if budget.max_decode_time is not None and times is not None:
            alloc = allocate_within_time(plan, options, sens.losses, budget, budget_bytes, sens.proxy, times, budget.max_decode_time)
        else:
            alloc = allocate(plan, options, sens.losses, budget, budget_bytes, sens.proxy)
        predicted = {ph: round(t, 4) for ph in ("decode", "prefill") if times is not None and (t := times.plan_time(alloc.plan, ph)) is not None}
        alloc = dataclasses.replace(alloc, kernel_time=predicted or None)
        (tmp / "allocation.json").write_text(json.dumps({**alloc.to_dict(), "matrices": alloc.plan.labels()}, indent=0, sort_keys=True), encoding="utf-8")
        return {"bytes": alloc.plan.bytes(), "predicted_loss": alloc.predicted_loss, **({"kernel_time": predicted} if predicted else {})}

    out = run_cached("allocate", acfg, choose, ctx)
    record = json.loads((out.dir / "allocation.json").read_text(encoding="utf-8"))
    allocated = plan_from_labels(plan, record["matrices"], q)
    speed = "".join(f", {ph} kernel time {t:g} of {times.base}'s" for ph, t in record.get("kernel_time", {}).items()) if times else ""
    within = f" within decode time {budget.max_decode_time:g}" if budget.max_decode_time is not None else ""
    ctx.progress(f"allocation: {record['bits_per_weight']} bits/weight, {record['bytes'] / 2**20:.2f} MiB of matrices for {budget.label}{within}{speed}")
    return Allocation(allocated, budget, budget_bytes, float(record["predicted_loss"]), record["proxy"], record.get("kernel_time"))


def _measure(
    source: ExportResult, info: Any, options: Any, windows: list[np.ndarray], calib_key: str, proxy: str, ctx: StageContext,
) -> tuple[Sensitivity, dict[str, str]]:
    """The sensitivity of every matrix by ``proxy`` and the calib-stats entries (kind -> key) it was
    priced from; a Fisher proxy falls back to the relative output error (logged) when a matrix of the
    export matches no linear of the checkpoint."""
    from edgepipe.quantize.calib_stats import run_statistics
    from edgepipe.quantize.sensitivity import NEEDS, PROXY, measure_sensitivity

    stats, keys = run_statistics(NEEDS[proxy], source, info, windows, calib_key, ctx)
    try:
        return measure_sensitivity(source.model_dir, options, stats, proxy, ctx.progress), keys
    except LookupError as e:
        logger.warning("Fisher sensitivity not measurable (%s); using the relative output error", e)
        ctx.progress("sensitivity: the export does not match the checkpoint's linears; using the relative output error")
    stats, keys = run_statistics(NEEDS[PROXY], source, info, windows, calib_key, ctx)
    return measure_sensitivity(source.model_dir, options, stats, PROXY, ctx.progress), keys


def built_plan(model: Any, q: Any, quantization: dict[str, Any]) -> BitPlan:
    """The plan a build wrote, from the fp32 export (``model``: its model.onnx or a ModelProto), the
    profile's ``quantization`` section and the manifest's ``quantization`` record (its allocation)."""
    from edgepipe.quantize.bitplan import plan_from_onnx

    plan = plan_from_onnx(model, scheme_from_target(q))
    return plan_from_labels(plan, quantization["matrix_formats"], q) if quantization.get("allocation") else plan
