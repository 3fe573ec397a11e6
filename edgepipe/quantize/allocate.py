"""Bit allocation: which format each matrix gets, so that the predicted loss is least within a byte budget.

A profile states a size budget (mean bits per weight, or the artifact's MiB) and the formats it
allows; the build measures every matrix's sensitivity (:mod:`edgepipe.quantize.sensitivity`) and this
module picks one format per matrix. That is a multiple-choice knapsack. It is solved by dynamic
programming over the bytes each matrix takes above its cheapest option, counted in units of
``span / RESOLUTION`` with every cost rounded *up*: the plan's exact bytes (:meth:`BitPlan.bytes`)
therefore never exceed the budget, and a larger budget never gives a larger predicted loss (its
capacity in units only grows, and the optimum over a larger capacity is no worse). Rounding wastes
less than one unit per matrix: 0.1 % of the span for 150 matrices.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from edgepipe.errors import InputError, TargetError
from edgepipe.quantize.bitplan import BitPlan, Matrix, PlannedMatrix, fitted_table_config
from edgepipe.quantize.configs import Format, WeightOnlyConfig, config_for_format

__all__ = ["Allocation", "Budget", "allocate", "check_reachable", "graph_bytes", "option_bytes", "options_for", "plan_from_labels", "smallest_bytes"]

logger = logging.getLogger(__name__)

RESOLUTION = 1 << 17
Options = Mapping[str, tuple[WeightOnlyConfig | None, ...]]


def graph_bytes(num_layers: int) -> int:
    """An upper bound on ``model.onnx`` itself (nodes, names, small tensors): SmolLM2's 30 layers
    measure 240 kB; a max-MiB budget keeps this much aside."""
    return 65536 + 16384 * num_layers


@dataclass(frozen=True)
class Budget:
    """A size budget: ``bits_per_weight`` (mean stored bits over every quantized matrix, the table
    included) or ``max_mb`` (the whole artifact, MiB, as the manifest's ``artifact_mb``); and
    optionally a time budget within it, ``max_decode_time`` (:mod:`edgepipe.quantize.kernel_time`)."""

    bits_per_weight: float | None = None
    max_mb: float | None = None
    max_decode_time: float | None = None

    def __post_init__(self) -> None:
        given = [v for v in (self.bits_per_weight, self.max_mb) if v is not None]
        if len(given) != 1:
            raise InputError("a size budget is bits per weight or a maximum size in MiB: give exactly one")
        for v in (given[0], self.max_decode_time):
            if v is not None and not (math.isfinite(v) and v > 0):
                raise InputError(f"a size or time budget must be a positive number, got {v}")

    @classmethod
    def of(cls, q: Any) -> Budget | None:
        """The budget of a profile's ``quantization`` section, if it states one."""
        if q.bits_per_weight is None and q.max_mb is None:
            return None
        return cls(q.bits_per_weight, q.max_mb, getattr(q, "max_decode_time", None))

    def matrix_bytes(self, parameters: int, other_bytes: int) -> int:
        """Bytes the quantized matrices may take: ``parameters`` weights in them, ``other_bytes`` the
        rest of the artifact (fp32 norms, caches, the graph)."""
        if self.bits_per_weight is not None:
            return int(self.bits_per_weight * parameters // 8)
        return int((self.max_mb or 0.0) * 2**20) - other_bytes

    @property
    def label(self) -> str:
        """The size budget in words (the time budget, if any, is named where it binds)."""
        return f"{self.bits_per_weight:g} bits/weight" if self.bits_per_weight is not None else f"{self.max_mb:g} MiB"

    def to_dict(self) -> dict[str, Any]:
        size = {"bits_per_weight": self.bits_per_weight, "max_mb": self.max_mb}
        return size if self.max_decode_time is None else {**size, "max_decode_time": self.max_decode_time}


def option_bytes(plan: BitPlan, matrix: Matrix, config: WeightOnlyConfig | None) -> int:
    """Bytes of ``matrix`` stored with ``config``, counted as :meth:`BitPlan.bytes` counts them: a tied
    table whose block does not divide its rows keeps an fp32 copy for the lookup."""
    n = PlannedMatrix(matrix, config).nbytes
    if plan.tied and matrix.is_table and config is not None and matrix.K % config.block_size:
        n += matrix.K * matrix.N * 4
    return n


def options_for(plan: BitPlan, formats: Sequence[Format], q: Any, pinned: frozenset[str] = frozenset()) -> dict[str, tuple[WeightOnlyConfig | None, ...]]:
    """Per matrix, the configs it may get (cheapest first): one per allowed format (the table: those of its
    planned bits, the block fitted to its rows), or only its planned config if ``pinned`` names it."""
    out: dict[str, tuple[WeightOnlyConfig | None, ...]] = {}
    for e in plan:
        m = e.matrix
        # a tied table keeps the profile's embedding_bits (any allowed block): the proxy scores every
        # matrix at round-to-nearest's error, and for this table the build's GPTQ does 5x better than
        # that (SmolLM2's table alone at int4: KL 0.095 rounded, 0.018 with GPTQ), so freed it buys the
        # 8-bit table too dearly (tried: KL 0.0439 instead of 0.0399 at 6.12 bits/weight;
        # benchmarks/RESULTS.md). An untied lm_head and input embedding choose as any matrix does,
        # in blocks that divide the hidden size.
        fmts = [f for f in formats if not (plan.tied and m.is_table) or f.bits == e.format.bits]
        if m.name in pinned or not fmts:
            out[m.name] = (e.config,)
            continue
        configs: dict[str, WeightOnlyConfig | None] = {}
        for fmt in fmts:
            cfg = fitted_table_config(m, config_for_format(fmt, q))
            configs.setdefault(cfg.format.label if cfg is not None else "fp32", cfg)
        out[m.name] = tuple(sorted(configs.values(), key=lambda c: option_bytes(plan, m, c)))
    return out


def smallest_bytes(plan: BitPlan, options: Options) -> int:
    return sum(min(option_bytes(plan, plan[n].matrix, c) for c in cfgs) for n, cfgs in options.items())


def check_reachable(plan: BitPlan, options: Options, budget: Budget, budget_bytes: int, other_bytes: int = 0) -> None:
    """Refuse, in one line naming the smallest reachable size, a budget that no allowed format meets."""
    low = smallest_bytes(plan, options)
    if low <= budget_bytes:
        return
    bpw = 8 * low / max(plan.parameters(), 1)
    raise TargetError(
        f"size budget {budget.label} cannot be met: the smallest this model reaches with the allowed formats is "
        f"{bpw:.3f} bits/weight ({(low + other_bytes) / 2**20:.2f} MiB, {low} bytes of matrices); raise the budget or allow a smaller format"
    )


@dataclass(frozen=True)
class Allocation:
    """The allocated plan, the budget it was made for and the loss the proxy predicts for it; with a
    profile's ``kernel_time``, its predicted kernel time per phase as a fraction of the base format's."""

    plan: BitPlan
    budget: Budget
    budget_bytes: int
    predicted_loss: float
    proxy: str
    kernel_time: Mapping[str, float] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The manifest's record: budget, bytes, predicted loss (every matrix's format is the quantization
        record's ``matrix_formats``)."""
        return {
            "budget": self.budget.to_dict(), "budget_bytes": self.budget_bytes, "bytes": self.plan.bytes(),
            "bits_per_weight": round(8 * self.plan.bytes() / max(self.plan.parameters(), 1), 4),
            "predicted_loss": self.predicted_loss, "proxy": self.proxy, "formats": self.plan.summary()["formats"],
            **({"kernel_time": dict(self.kernel_time)} if self.kernel_time else {}),
        }


def allocate(
    plan: BitPlan, options: Options, losses: Mapping[str, Mapping[str, float]], budget: Budget, budget_bytes: int, proxy: str = "",
) -> Allocation:
    """The plan with the least summed predicted loss whose bytes are at most ``budget_bytes``.

    ``losses[name][format label]`` is a matrix's predicted loss in that format (a missing entry: 0, as
    for a matrix with one option). Raises :class:`TargetError` when even the cheapest options do not fit.
    """
    check_reachable(plan, options, budget, budget_bytes)
    names = list(options)
    costs = [[option_bytes(plan, plan[n].matrix, c) for c in options[n]] for n in names]
    base = [min(c) for c in costs]
    span = sum(max(c) - b for c, b in zip(costs, base, strict=True))
    unit = max(1, -(-span // RESOLUTION))
    capacity = min((budget_bytes - sum(base)) // unit, sum(-(-(max(c) - b) // unit) for c, b in zip(costs, base, strict=True)))
    best = np.zeros(capacity + 1)
    choice = np.zeros((len(names), capacity + 1), dtype=np.uint8)
    for i, n in enumerate(names):
        cands = np.full((len(options[n]), capacity + 1), np.inf)
        for o, cfg in enumerate(options[n]):
            u = -(-(costs[i][o] - base[i]) // unit)
            if u <= capacity:
                loss = float(losses.get(n, {}).get(cfg.format.label if cfg is not None else "fp32", 0.0))
                cands[o, u:] = best[: capacity + 1 - u] + loss
        choice[i] = np.argmin(cands, axis=0)
        best = cands[choice[i], np.arange(capacity + 1)]
    picked: dict[str, WeightOnlyConfig | None] = {}
    c = capacity
    for i in reversed(range(len(names))):
        o = int(choice[i, c])
        picked[names[i]] = options[names[i]][o]
        c -= -(-(costs[i][o] - base[i]) // unit)
    out = plan.replace(picked)
    if out.bytes() > budget_bytes:  # the rounding makes this impossible; a bug if it happens
        raise RuntimeError(f"allocation overran its budget: {out.bytes()} > {budget_bytes} bytes")
    logger.info("allocated %d matrices into %d of %d bytes (unit %d)", len(names), out.bytes(), budget_bytes, unit)
    return Allocation(out, budget, budget_bytes, float(best[capacity]), proxy)


def plan_from_labels(plan: BitPlan, labels: Mapping[str, str], q: Any) -> BitPlan:
    """A plan whose matrices take the formats ``labels`` names (an allocation read back from its record)."""
    configs: dict[str, WeightOnlyConfig | None] = {}
    for name, label in labels.items():
        if name not in plan:
            raise InputError(f"the allocation names a matrix {name!r} that the model does not have")
        current = plan[name].config
        fmt = Format.parse(label)
        configs[name] = current if current is not None and current.format == fmt else config_for_format(fmt, q)
    return plan.replace(configs)
