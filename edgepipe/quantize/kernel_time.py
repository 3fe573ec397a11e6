"""A format's cost in kernel time: the allocator's second budget.

Bytes are not the whole price of a format on a device. onnxruntime's ``MatMulNBits`` streams some
formats faster than others per weight: on an AVX-512 host a decode step of Llama-3.2-1B's matrices
costs 0.75x per weight at int4/b128/sym and 1.12-1.17x at int8 what it costs at int4/b32/asym, and
with AVX2 kernels an int8 prefill costs 1.65x an int4 one (``benchmarks/formats.py``;
benchmarks/RESULTS.md). A profile may state these ratios, measured on its device, as
``kernel_time`` rows; the build then predicts each allocation's kernel time per token and, given
``max_decode_time`` (a fraction of the time with every matrix in the profile's base format), keeps
within it as well as within the size budget.

Both budgets at once are a knapsack with two capacities. The allocator solves it by Lagrangian
relaxation: the byte-exact dynamic program of :func:`edgepipe.quantize.allocate.allocate` minimises
``loss + mu * time`` and ``mu`` is bisected to the smallest value whose plan meets the time budget.
The result meets both budgets; its loss is optimal among the plans the relaxation can reach (the
lower convex hull of loss against time), which for a few hundred matrices is within one matrix's
step of the true optimum.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from edgepipe.errors import TargetError
from edgepipe.quantize.allocate import Allocation, Budget, allocate
from edgepipe.quantize.bitplan import BitPlan, Matrix
from edgepipe.quantize.configs import FP32, Format, WeightOnlyConfig

__all__ = ["KernelTimes", "allocate_within_time"]

logger = logging.getLogger(__name__)

BISECTIONS = 20  # mu's bracket, 2^40 wide, shrinks to a factor of 2^(40/2^20): well inside one matrix's step


@dataclass(frozen=True)
class KernelTimes:
    """Per format label, the kernel time per weight relative to ``base`` (the profile's own format),
    for a decode step (M = 1) and, where measured, a prefill (M = 512)."""

    base: str
    decode: Mapping[str, float]
    prefill: Mapping[str, float]

    @classmethod
    def of(cls, q: Any) -> KernelTimes | None:
        """The table of a profile's ``quantization`` section, or None if it states none."""
        if not q.kernel_time:
            return None
        base = Format(q.bits, q.block_size, q.symmetric).label
        decode = {Format.parse(r.format).label: r.decode for r in q.kernel_time}
        prefill = {Format.parse(r.format).label: r.prefill for r in q.kernel_time if r.prefill is not None}
        return cls(base, decode, prefill)

    def missing(self, labels: Sequence[str]) -> list[str]:
        """The formats of ``labels`` (and the base) that the table gives no decode time."""
        return [x for x in (self.base, *labels) if x not in self.decode]

    def matrix_time(self, m: Matrix, config: WeightOnlyConfig | None, phase: str = "decode") -> float:
        """The matrix's kernel time per token in base-format weight units. An untied input embedding
        costs nothing (a lookup reads one row), an fp32 matrix is not priced (the table has no row)."""
        if m.lookup or config is None:
            return 0.0
        table = self.decode if phase == "decode" else self.prefill
        return m.K * m.N * table.get(config.format.label, float("nan"))

    def reference_time(self, plan: BitPlan, phase: str = "decode") -> float:
        """The kernel time of every priced matrix of ``plan`` in the base format: what fractions are of."""
        table = self.decode if phase == "decode" else self.prefill
        return sum(e.matrix.K * e.matrix.N * table.get(self.base, float("nan")) for e in plan if not e.matrix.lookup and e.config is not None)

    def plan_time(self, plan: BitPlan, phase: str = "decode") -> float | None:
        """The plan's kernel time as a fraction of :meth:`reference_time`; None when the base or a
        format of the plan has no time for ``phase``."""
        table = self.decode if phase == "decode" else self.prefill
        if self.base not in table or any(e.config.format.label not in table for e in plan if not e.matrix.lookup and e.config is not None):
            return None
        ref = self.reference_time(plan, phase)
        return sum(self.matrix_time(e.matrix, e.config, phase) for e in plan) / ref if ref else None


def allocate_within_time(
    plan: BitPlan, options: Mapping[str, tuple[WeightOnlyConfig | None, ...]], losses: Mapping[str, Mapping[str, float]],
    budget: Budget, budget_bytes: int, proxy: str, times: KernelTimes, max_decode_time: float,
) -> Allocation:
    """The size allocation of least predicted loss whose predicted decode kernel time is at most
    ``max_decode_time`` (a fraction of the base format's), by bisecting the Lagrange multiplier of time.

    Raises :class:`TargetError` naming the fastest reachable fraction when even the fastest formats
    the size budget affords are too slow."""
    missing = times.missing(sorted({c.format.label for cfgs in options.values() for c in cfgs if c is not None}))
    if missing:
        raise TargetError(f"max_decode_time needs the profile's kernel_time for every allowed format; add a row for {missing[0]}")
    ref = times.reference_time(plan) or 1.0
    seconds = {n: {(c.format if c is not None else FP32).label: times.matrix_time(plan[n].matrix, c) / ref for c in cfgs} for n, cfgs in options.items()}
    spread = {n: max(v.values()) - min(v.values()) for n, v in seconds.items()}
    loss_scale = sum(max(losses.get(n, {}).values(), default=0.0) for n in options) or 1.0

    def at(mu: float) -> tuple[Allocation, float]:
        penalised = {n: {lab: float(losses.get(n, {}).get(lab, 0.0)) + mu * t for lab, t in seconds[n].items()} for n in options}
        alloc = allocate(plan, options, penalised, budget, budget_bytes, proxy)
        return alloc, times.plan_time(alloc.plan) or 0.0

    best, t = at(0.0)
    if t <= max_decode_time:
        return _with_true_loss(best, losses)
    hi = loss_scale / max(min((s for s in spread.values() if s > 0), default=1.0), 1e-12)
    fastest, t_hi = at(hi)
    if t_hi > max_decode_time:
        raise TargetError(
            f"decode-time budget {max_decode_time:g} cannot be met within {budget.label}: the fastest the allowed formats reach "
            f"there is {t_hi:.3f} of the base format's ({times.base}); raise max_decode_time or the size budget"
        )
    lo = hi * 2.0**-40  # at(0) was too slow: the smallest mu that suffices lies in (lo, hi], bisected in log space
    for _ in range(BISECTIONS):
        mid = (lo * hi) ** 0.5
        cand, t_mid = at(mid)
        if t_mid <= max_decode_time:
            hi, fastest = mid, cand
        else:
            lo = mid
    logger.info("decode-time budget %.3f met at %.3f (mu %.3g)", max_decode_time, times.plan_time(fastest.plan) or 0.0, hi)
    return _with_true_loss(fastest, losses)


def _with_true_loss(alloc: Allocation, losses: Mapping[str, Mapping[str, float]]) -> Allocation:
    """The allocation with its predicted loss summed from the proxy alone (without the time penalty)."""
    loss = sum(float(losses.get(e.matrix.name, {}).get(e.format.label, 0.0)) for e in alloc.plan)
    return dataclasses.replace(alloc, predicted_loss=loss)
