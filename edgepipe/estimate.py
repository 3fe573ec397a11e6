"""Predict an artifact's size, the device's peak RAM and decode speed before any export.

Decode is memory-bound on these boards: every generated token reads every weight once, so
tok/s ~= sustained read bandwidth / bytes of weights. Prefill is compute-bound: 2 ops per
parameter per token at the target's sustained int8 GOP/s.
"""

from __future__ import annotations

from typing import Any

from edgepipe.targets import Target

RUNTIME_BASE_MB = 90.0  # python + numpy + onnxruntime + tokenizers, measured on the host
PREFILL_TOKENS = 256  # the bench's prompt length: its logits and activations are the transient peak


def bits_per_weight(bits: int, block: int, symmetric: bool) -> float:
    """Storage per weight: the value, an fp32 scale per block, a packed zero point per block if asymmetric."""
    if bits >= 16:
        return 32.0
    return bits + 32.0 / block + (0.0 if symmetric else bits / block)


def _eight_bit_params(config: dict[str, Any], q: Any, layers: int, hidden: int, heads: int, kv_heads: int, head_dim: int) -> int:
    """Parameters the profile keeps at 8 bits (``eight_bit_layers`` / ``eight_bit_ops``)."""
    from edgepipe.quantize import _layer_matches

    if q.bits >= 8:
        return 0
    inter = int(config.get("intermediate_size") or 4 * hidden)
    per_op = {
        "qkv_proj": hidden * (heads + 2 * kv_heads) * head_dim,
        "o_proj": heads * head_dim * hidden,
        "gate_proj": hidden * inter,
        "up_proj": hidden * inter,
        "down_proj": inter * hidden,
    }
    total = 0
    for layer in range(layers):
        if any(_layer_matches(s, layer, layers) for s in q.eight_bit_layers):
            total += sum(per_op.values())
            continue
        for spec in q.eight_bit_ops:
            op, _, where = spec.partition("@")
            if op in per_op and (not where or _layer_matches(where, layer, layers)):
                total += per_op[op]
    return total


def estimate(config: dict[str, Any], num_parameters: int, target: Target) -> dict[str, Any]:
    q = target.quantization
    hidden = int(config["hidden_size"])
    vocab = int(config["vocab_size"])
    layers = int(config["num_hidden_layers"])
    heads = int(config.get("num_attention_heads") or 1)
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or hidden // heads)
    tied = bool(config.get("tie_word_embeddings", False))
    table = vocab * hidden
    embeddings = table if tied else 2 * table
    body = max(num_parameters - embeddings, 0)
    bpw = bits_per_weight(q.bits, q.block_size, q.symmetric)
    emb_bpw = bits_per_weight(q.embedding_bits, q.embedding_block_size or q.block_size, q.symmetric)
    body8 = min(_eight_bit_params(config, q, layers, hidden, heads, kv_heads, head_dim), body)
    bpw8 = bits_per_weight(8, q.eight_bit_block_size or q.block_size, q.symmetric)
    body_bytes = (body - body8) * bpw / 8 + body8 * bpw8 / 8
    emb_bytes = table * emb_bpw / 8 * (1 if tied else 2)
    rope_bytes = int(config.get("max_position_embeddings", 4096)) * head_dim * 4  # cos + sin caches, fp32
    size = body_bytes + emb_bytes + rope_bytes
    ctx = target.runtime.context_length
    kv_bytes = 2 * layers * kv_heads * head_dim * ctx * 4
    # prefill transients: fp32 logits for the prompt plus a few hidden-size activations per token
    transient = PREFILL_TOKENS * vocab * 4 * 2 + PREFILL_TOKENS * hidden * 4 * 16
    peak_ram = size + kv_bytes + transient + RUNTIME_BASE_MB * 2**20
    per_token = body_bytes + emb_bytes / (1 if tied else 2) + hidden * 4
    bw = target.cpu.mem_bandwidth_gbps * 1e9
    decode = bw / per_token
    prefill = target.cpu.gops * 1e9 / (2 * max(num_parameters - table, 1) + 2 * table)
    budget = target.budgets.max_ram_mb or target.cpu.ram_gb * 1024
    return {
        "artifact_mb": round(size / 2**20, 1),
        "peak_ram_mb": round(peak_ram / 2**20, 1),
        "kv_cache_mb": round(kv_bytes / 2**20, 1),
        "decode_tok_s": round(decode, 1),
        "prefill_tok_s": round(prefill, 1),
        "bits_per_weight": round(bpw, 3),
        "ram_budget_mb": round(budget, 1),
        "fits": peak_ram / 2**20 <= budget and (target.budgets.max_artifact_mb is None or size / 2**20 <= target.budgets.max_artifact_mb),
        "basis": f"{target.cpu.mem_bandwidth_gbps} GB/s read bandwidth, {target.cpu.gops} GOP/s, context {ctx}",
    }


def estimate_for(info: Any, target: Target) -> dict[str, Any]:
    return estimate(info.config, info.num_parameters, target)
