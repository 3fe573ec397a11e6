"""Predict an artifact's size, the device's peak RAM and decode speed before any export.

The size is the :class:`~edgepipe.quantize.BitPlan`'s: the same plan ``quantize`` will write, made
from ``config.json`` alone, with its bytes counted as stored (an untied input embedding is one of its
tables); what is not a weight matrix (norms, biases, the rotary caches) stays fp32.

Decode is memory-bound on these boards: every generated token reads every weight once, so
tok/s ~= sustained read bandwidth / bytes of weights. Prefill is compute-bound: 2 ops per
parameter per token at the target's sustained int8 GOP/s.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepipe.export.preflight import BUILDER, REFUSED, Preflight, expert_parameters, generic_matrices
from edgepipe.targets import Target

RUNTIME_BASE_MB = 90.0  # python + numpy + onnxruntime + tokenizers, measured on the host
PREFILL_TOKENS = 256  # the bench's prompt length: its logits and activations are the transient peak
KV_BYTES = {"float32": 4, "float16": 2, "int8": 1}  # bytes per cached element, by runtime.kv_cache_dtype (int8's scales: a few KB)


def stage_ram_bytes(num_parameters: int, export_path: str = BUILDER) -> dict[str, int]:
    """Peak RAM of each build stage on the build host, for a model of ``num_parameters`` (the stages'
    out-of-memory messages and ``edgepipe matrix``'s task memory requests use these).

    - export: the builder holds the checkpoint in its own dtype and casts one tensor at a time
      (measured: Granite-2B bf16, 5.07 GB of safetensors -> 6.3 GB peak); the generic path holds the
      fp32 model and its traced copy.
    - sensitivity: the Fisher pass in torch (:mod:`edgepipe.quantize.fisher`): fp32 weights and, up to
      600M parameters, a whole Fisher diagonal of the same size (8 bytes a parameter); beyond 1B the
      checkpoint in bf16, 128-token pieces (Granite-2B: 6.72 GB, 2.65 bytes a parameter); 10 % to spare.
    - quantize: one fp32 initializer at a time, plus GPTQ's Hessian of one matrix and the calibration pass.
    - validate: the fp32 reference in pieces beside the quantized model (Granite-2B: 6.41 GB int8,
      5.54 GB int4: 2.53 bytes a parameter at most).
    - package: the throughput benchmark of the artifact in a fresh process beside the build
      (Granite-2B: 6.18 GB int8).

    Each stage also holds Python, torch and onnxruntime: at least 1 GiB (``BUILD_BASE``).
    """
    per_param = {
        "export": 2 * 1.3 if export_path == BUILDER else 4 * 2.5,
        "sensitivity": _fisher_bytes_per_parameter(num_parameters) * 1.1,
        "quantize": 1.2,
        "validate": 2.53 * 1.1,
        "package": 2.44 * 1.1,
    }
    extra = {"quantize": 3 << 30, "sensitivity": 1 << 30}  # sensitivity: python + torch beside the model
    return {stage: max(int(num_parameters * b) + extra.get(stage, 0), BUILD_BASE) for stage, b in per_param.items()}


BUILD_BASE = 1 << 30


def _fisher_bytes_per_parameter(num_parameters: int) -> float:
    from edgepipe.quantize.fisher import EXACT_MAX_PARAMETERS, FP32_MAX_PARAMETERS

    if num_parameters <= EXACT_MAX_PARAMETERS:
        return 8.0
    return 4.0 if num_parameters <= FP32_MAX_PARAMETERS else 2.65


@dataclass(frozen=True)
class ArtifactSize:
    """Bytes of the artifact's weights, and of what one decode step reads."""

    matrices: int  # the BitPlan's bytes: every weight MatMul (and the shared table) as stored
    fp32: int  # the other parameters, fp32 as exported: norms, biases (an fp32 input embedding of the generic path)
    rope: int  # cos + sin caches, fp32
    per_token: int  # bytes a decode step reads: all of the above but one row of the tables

    @property
    def total(self) -> int:
        return self.matrices + self.fp32 + self.rope


def _plan(config: dict[str, Any], target: Target, pre: Preflight | None) -> Any:
    """The builder path's plan from config.json's rows; the generic path's from the preflight's facts."""
    from edgepipe.quantize import BitPlan, plan_from_config, scheme_from_target
    from edgepipe.quantize.configs import as_scheme

    scheme = scheme_from_target(target.quantization)
    if pre is None or pre.path == BUILDER:
        return plan_from_config(config, scheme)
    return BitPlan.build(as_scheme(scheme), generic_matrices(pre))


def artifact_size(config: dict[str, Any], num_parameters: int, target: Target, pre: Preflight | None = None) -> ArtifactSize:
    """The artifact's bytes for a model (its ``config.json`` and parameter count) built for ``target``.
    ``pre``: the preflight's decision (the generic path lists its matrices from it; MoE experts are
    read ``experts_per_token`` of ``experts`` per decode step)."""
    from edgepipe.quantize.allocate import Budget

    plan = _plan(config, target, pre)
    hidden, vocab = (pre.hidden, pre.vocab) if pre else (dimensions(config)["hidden"], dimensions(config)["vocab"])
    head_dim = pre.head_size if pre else dimensions(config)["head_dim"]
    lookup = plan.embedding  # an untied input embedding's own table: a decode step reads one row of it
    if lookup is not None:
        unread = lookup.nbytes - lookup.nbytes // vocab
    else:  # tied (a row of the table besides the head), or an fp32 Gather the plan does not list (generic path)
        unread = (0 if plan.tied else vocab * hidden * 4) - hidden * 4
    fp32 = max(num_parameters - plan.parameters(), 0) * 4
    rope = int(config.get("max_position_embeddings", 4096)) * head_dim * 4
    idle_experts = 0
    if pre is not None and pre.experts:
        idle_experts = expert_parameters(pre) * (pre.experts - max(pre.experts_per_token, 1)) // pre.experts * 4
    matrices = plan.bytes()
    budget = Budget.of(target.quantization)
    if budget is not None:  # the allocator fills the budget to within a few kB (edgepipe.quantize.allocate)
        from edgepipe.quantize.allocate import graph_bytes

        matrices = max(budget.matrix_bytes(plan.parameters(), fp32 + rope + graph_bytes(plan.num_layers)), 0)
    per_token = matrices + fp32 - unread - idle_experts
    return ArtifactSize(matrices, fp32, rope, per_token)


def dimensions(config: dict[str, Any]) -> dict[str, int]:
    from edgepipe.quantize.architectures import dimensions as dims

    return dims(config)


def estimate(config: dict[str, Any], num_parameters: int, target: Target, pre: Preflight | None = None) -> dict[str, Any]:
    from edgepipe.quantize import scheme_from_target

    if pre is not None:
        d = {"vocab": pre.vocab, "hidden": pre.hidden, "layers": pre.layers, "kv_heads": pre.kv_heads, "head_dim": pre.head_size}
    else:
        d = dimensions(config)
    vocab, hidden = d["vocab"], d["hidden"]
    sized = artifact_size(config, num_parameters, target, pre)
    size = sized.total
    ctx = target.runtime.context_length
    kv_bytes = 2 * d["layers"] * d["kv_heads"] * d["head_dim"] * ctx * KV_BYTES[target.runtime.kv_cache_dtype]
    # prefill transients: fp32 logits for the prompt plus a few hidden-size activations per token
    transient = PREFILL_TOKENS * vocab * 4 * 2 + PREFILL_TOKENS * hidden * 4 * 16
    peak_ram = size + kv_bytes + transient + RUNTIME_BASE_MB * 2**20
    decode = target.cpu.mem_bandwidth_gbps * 1e9 / sized.per_token
    table = vocab * hidden
    active = num_parameters - (expert_parameters(pre) * (pre.experts - max(pre.experts_per_token, 1)) // pre.experts
                               if pre is not None and pre.experts else 0)
    prefill = target.cpu.gops * 1e9 / (2 * max(active - table, 1) + 2 * table)
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
        "build_ram_mb": {k: round(v / 2**20, 1) for k, v in stage_ram_bytes(num_parameters, pre.path if pre else BUILDER).items()},
    }


def estimate_for(info: Any, target: Target, pre: Preflight | None = None) -> dict[str, Any]:
    out = estimate(info.config, info.num_parameters, target, pre)
    if pre is not None:
        out["export_path"] = pre.path
        out["export_reason"] = pre.reason
    return out


def estimate_model(model: Path | str, target: Target) -> dict[str, Any]:
    """``edgepipe estimate``: the preflight, the folder's checks, then the numbers. A model whose
    build the preflight refuses still gets its numbers (and the refusal in ``export_path``)."""
    from edgepipe.export import inspect_model
    from edgepipe.export.preflight import preflight

    pre = preflight(model)
    if pre.path == REFUSED and pre.rule != "moe":
        pre.raise_if_refused()
    info = inspect_model(model, supported={pre.architecture: pre.path})
    out = estimate_for(info, target, pre)
    if pre.path == REFUSED:
        out["fits"] = False
        out["refused"] = f"{pre.reason}; {pre.fix}"
    return out
