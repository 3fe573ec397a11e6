"""The one budget checker: every backend's measurements against the target's budgets.

A budget holds only on what was measured where it counts: decode speed only on the reference
device (an ssh board), RAM only where a process ran the model (not on the HTP simulator). What was
not measured is listed as ``unchecked`` with the reason, never passed silently. NPU targets add
their own thresholds (op coverage when CPU fallback is forbidden, encoder cosine and retrieval
agreement) as rows of the same table.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from edgepipe.runtime.manifest import BudgetCheck
from edgepipe.targets import Target

# A quantized model cannot be much better than the fp32 model it approximates: perplexity this far
# *below* the reference means the comparison is broken (or both models are garbage), so it fails.
SUSPICIOUS_PPL_DECREASE_PCT = -20.0


@dataclass(frozen=True)
class Coverage:
    """Nodes of one graph on the NPU out of its total."""

    npu_nodes: int
    total_nodes: int

    @property
    def fraction(self) -> float:
        return self.npu_nodes / self.total_nodes if self.total_nodes else 0.0


@dataclass(frozen=True)
class Measured:
    """What a build measured. ``None``: not measured (``unmeasured`` may say why)."""

    artifact_mb: float | None = None
    peak_rss_mb: float | None = None
    ppl_increase_pct: float | None = None
    top1_agreement: float | None = None
    device_decode_tok_s: float | None = None  # on the reference device only
    kl_divergence: float | None = None  # mean KL(fp32 || quantized) per scored token
    coverage: Mapping[str, Coverage] = field(default_factory=dict)  # NPU graphs
    cosine_min: float | None = None  # NPU encoders
    retrieval_top1_agreement: float | None = None
    unmeasured: Mapping[str, str] = field(default_factory=dict)  # budget name -> why it was not measured


def _row(name: str, limit: float | None, value: float | None, op: str, measured: Measured, note: str | None = None) -> BudgetCheck | None:
    if limit is None:
        return None
    if value is None:
        why = measured.unmeasured.get(name) or ("not measured on the reference device" if name == "min_decode_tok_s" else "not measured")
        return BudgetCheck(name, limit, None, "unchecked", why)
    ok = value <= limit if op == "<=" else value >= limit
    return BudgetCheck(name, limit, round(float(value), 4), "pass" if ok else "fail", note)


def check_budgets(target: Target, measured: Measured) -> list[BudgetCheck]:
    """Every budget the target sets, in a fixed order, against ``measured``."""
    b = target.budgets
    rows = [
        _row("max_artifact_mb", b.max_artifact_mb, measured.artifact_mb, "<=", measured),
        _row("max_ram_mb", b.max_ram_mb, measured.peak_rss_mb, "<=", measured),
        _row("max_ppl_increase_pct", b.max_ppl_increase_pct, measured.ppl_increase_pct, "<=", measured),
        _row("min_top1_agreement", b.min_top1_agreement, measured.top1_agreement, ">=", measured),
        _row("min_decode_tok_s", b.min_decode_tok_s, measured.device_decode_tok_s, ">=", measured),
        _row("max_kl_divergence", b.max_kl_divergence, measured.kl_divergence, "<=", measured),
        _suspicious_decrease(measured),
    ]
    npu = target.npu
    if npu is not None:
        for graph, cov in measured.coverage.items():
            note = f"{cov.npu_nodes}/{cov.total_nodes} nodes ({100 * cov.fraction:.1f}%) on the NPU, the profile forbids CPU fallback"
            limit = None if npu.allow_cpu_fallback else 1.0
            rows.append(_row(f"npu_coverage_{graph}", limit, cov.fraction, ">=", measured, note))
        rows.append(_row("min_cosine", npu.min_cosine if measured.cosine_min is not None else None, measured.cosine_min, ">=", measured))
        rows.append(_row(
            "min_retrieval_agreement", npu.min_retrieval_agreement if measured.retrieval_top1_agreement is not None else None,
            measured.retrieval_top1_agreement, ">=", measured,
        ))
    return [r for r in rows if r is not None]


def _suspicious_decrease(measured: Measured) -> BudgetCheck | None:
    """A perplexity far below the reference's is a broken comparison, not a better model: it fails."""
    value = measured.ppl_increase_pct
    if value is None or value >= SUSPICIOUS_PPL_DECREASE_PCT:
        return None
    note = "the quantized model's perplexity is far below the fp32 reference's: the comparison is broken, not better"
    return BudgetCheck("min_ppl_increase_pct", SUSPICIOUS_PPL_DECREASE_PCT, round(float(value), 4), "fail", note)


def failed(checks: list[BudgetCheck]) -> list[str]:
    return [c.budget for c in checks if c.status == "fail"]
