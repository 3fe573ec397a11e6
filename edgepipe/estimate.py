"""Predict an artifact's size, the device's peak RAM and decode speed before any export.

The size is the :class:`~edgepipe.quantize.BitPlan`'s: the same plan ``quantize`` will write, made
from ``config.json`` alone, with its bytes counted as stored; what is not a weight matrix (norms,
biases, an untied input embedding, the rotary caches) stays fp32.

Decode is memory-bound on these boards: every generated token reads every weight once, so
tok/s ~= sustained read bandwidth / bytes of weights. Prefill is compute-bound: 2 ops per
parameter per token at the target's sustained int8 GOP/s.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from edgepipe.targets import Target

RUNTIME_BASE_MB = 90.0  # python + numpy + onnxruntime + tokenizers, measured on the host
PREFILL_TOKENS = 256  # the bench's prompt length: its logits and activations are the transient peak


@dataclass(frozen=True)
class ArtifactSize:
    """Bytes of the artifact's weights, and of what one decode step reads."""

    matrices: int  # the BitPlan's bytes: every weight MatMul (and the shared table) as stored
    fp32: int  # the other parameters, fp32 as exported: norms, biases, an untied input embedding
    rope: int  # cos + sin caches, fp32
    per_token: int  # bytes a decode step reads: all of the above but one row of the tables

    @property
    def total(self) -> int:
        return self.matrices + self.fp32 + self.rope


def artifact_size(config: dict[str, Any], num_parameters: int, target: Target) -> ArtifactSize:
    """The artifact's bytes for a model (its ``config.json`` and parameter count) built for ``target``."""
    from edgepipe.quantize import plan_from_config, scheme_from_target
    from edgepipe.quantize.allocate import Budget
    from edgepipe.quantize.architectures import dimensions

    d = dimensions(config)
    plan = plan_from_config(config, scheme_from_target(target.quantization))
    untied_embedding = 0 if plan.tied else d["vocab"] * d["hidden"]  # a Gather of the fp32 table: a row per token
    fp32 = max(num_parameters - plan.parameters(), 0) * 4
    rope = int(config.get("max_position_embeddings", 4096)) * d["head_dim"] * 4
    matrices = plan.bytes()
    budget = Budget.of(target.quantization)
    if budget is not None:  # the allocator fills the budget to within a few kB (edgepipe.quantize.allocate)
        from edgepipe.quantize.allocate import graph_bytes

        matrices = max(budget.matrix_bytes(plan.parameters(), fp32 + rope + graph_bytes(plan.num_layers)), 0)
    per_token = matrices + fp32 - untied_embedding * 4 + d["hidden"] * 4
    return ArtifactSize(matrices, fp32, rope, per_token)


def estimate(config: dict[str, Any], num_parameters: int, target: Target) -> dict[str, Any]:
    from edgepipe.quantize import scheme_from_target
    from edgepipe.quantize.architectures import dimensions

    d = dimensions(config)
    vocab, hidden = d["vocab"], d["hidden"]
    sized = artifact_size(config, num_parameters, target)
    size = sized.total
    ctx = target.runtime.context_length
    kv_bytes = 2 * d["layers"] * d["kv_heads"] * d["head_dim"] * ctx * 4
    # prefill transients: fp32 logits for the prompt plus a few hidden-size activations per token
    transient = PREFILL_TOKENS * vocab * 4 * 2 + PREFILL_TOKENS * hidden * 4 * 16
    peak_ram = size + kv_bytes + transient + RUNTIME_BASE_MB * 2**20
    decode = target.cpu.mem_bandwidth_gbps * 1e9 / sized.per_token
    table = vocab * hidden
    prefill = target.cpu.gops * 1e9 / (2 * max(num_parameters - table, 1) + 2 * table)
    budget = target.budgets.max_ram_mb or target.cpu.ram_gb * 1024
    default = scheme_from_target(target.quantization).default
    return {
        "artifact_mb": round(size / 2**20, 1),
        "peak_ram_mb": round(peak_ram / 2**20, 1),
        "kv_cache_mb": round(kv_bytes / 2**20, 1),
        "decode_tok_s": round(decode, 1),
        "prefill_tok_s": round(prefill, 1),
        "bits_per_weight": round(default.format.bits_per_weight if default else 32.0, 3),
        "ram_budget_mb": round(budget, 1),
        "fits": peak_ram / 2**20 <= budget and (target.budgets.max_artifact_mb is None or size / 2**20 <= target.budgets.max_artifact_mb),
        "basis": f"{target.cpu.mem_bandwidth_gbps} GB/s read bandwidth, {target.cpu.gops} GOP/s, context {ctx}",
    }


def estimate_for(info: Any, target: Target) -> dict[str, Any]:
    return estimate(info.config, info.num_parameters, target)
