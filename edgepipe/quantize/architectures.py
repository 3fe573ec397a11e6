"""A decoder's weight matrices from its ``config.json`` alone, named as the fp32 export names them.

``estimate`` needs the :class:`~edgepipe.quantize.bitplan.BitPlan` before anything is exported, and a
plan's rules match matrix names ("down_proj@0-2"), so this lists exactly the MatMul weights
onnxruntime-genai's model builder (0.18) writes: same names, same [K, N]. The facts are data, one row
each with where it comes from (as llama.cpp's gguf-py ``TensorNameMap``); ``tests/test_bitplan.py``
checks the list against real exports of the tested architectures.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from edgepipe.errors import ModelError
from edgepipe.quantize.bitplan import BitPlan, Matrix, ModelMatrices
from edgepipe.quantize.configs import MixedPrecision, WeightOnlyConfig, as_scheme

__all__ = ["ARCHITECTURES", "dimensions", "matrices_from_config", "plan_from_config"]

# A dimension -> the config.json keys that give it, the first one present (and not null) wins.
# Source: onnxruntime_genai/models/builders/base.py, Model.__init__.
DIMENSIONS: dict[str, tuple[str, ...]] = {
    "hidden": ("hidden_size",),
    "intermediate": ("ffn_hidden_size", "intermediate_size"),
    "heads": ("num_attention_heads",),
    "kv_heads": ("num_key_value_heads", "multi_query_group_num", "num_attention_heads"),
    "head_dim": ("head_dim",),  # absent or null: hidden // heads
    "layers": ("num_hidden_layers", "num_layers"),
    "vocab": ("vocab_size",),
}

# One layer's matrices: (initializer name after "model.layers.<i>.", K, N); K and N are sums of
# dimensions, with q = heads * head_dim and kv = kv_heads * head_dim.
Row = tuple[str, tuple[str, ...], tuple[str, ...]]
ATTENTION: tuple[Row, ...] = (
    ("attn.qkv_proj.MatMul.weight", ("hidden",), ("q", "kv", "kv")),  # base.py make_attention: q/k/v packed in one MatMul (use_packed_matmul on CPU)
    ("attn.o_proj.MatMul.weight", ("q",), ("hidden",)),  # base.py make_attention: o_proj, out_proj and dense all become attn/o_proj
)
MLP: dict[str, tuple[Row, ...]] = {
    "gated": (
        ("mlp.gate_proj.MatMul.weight", ("hidden",), ("intermediate",)),  # base.py make_mlp_proj (a fused gate_up_proj is split first: make_mlp_unpacked)
        ("mlp.up_proj.MatMul.weight", ("hidden",), ("intermediate",)),  # base.py make_mlp_proj
        ("mlp.down_proj.MatMul.weight", ("intermediate",), ("hidden",)),  # base.py make_mlp_proj
    ),
    "up_down": (
        ("mlp.up_proj.MatMul.weight", ("hidden",), ("intermediate",)),  # nemotron.py make_mlp_proj: no gate
        ("mlp.down_proj.MatMul.weight", ("intermediate",), ("hidden",)),  # nemotron.py make_mlp_proj
    ),
    "fc": (
        ("mlp.fc1.MatMul.weight", ("hidden",), ("intermediate",)),  # base.py make_mlp_fc (phi.py sets use_fc)
        ("mlp.fc2.MatMul.weight", ("intermediate",), ("hidden",)),  # base.py make_mlp_fc
    ),
}
LAYER_PREFIX = "model.layers.{}."  # base.py: node "/model/layers.<i>/..." -> weight "model.layers.<i>....weight"
LM_HEAD: Row = ("lm_head.MatMul.weight", ("hidden",), ("vocab",))  # base.py make_lm_head; tied: Transpose -> Gather reads it (make_embedding_lookup)


@dataclass(frozen=True)
class Architecture:
    mlp: str  # key of MLP
    tied_default: bool  # tie_word_embeddings when config.json leaves it out: the transformers config class's default


# Keyed as config.json's "architectures"; the same names as edgepipe.export's SUPPORTED_ARCHITECTURES. "tested": a
# tests/ tiny model; "checked on a tiny export": a random 2-layer model exported once with the builder 0.18, matrices equal.
ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture("gated", False),  # tested (tests/conftest.py); LlamaConfig
    "GraniteForCausalLM": Architecture("gated", False),  # tested; GraniteConfig
    "Qwen2ForCausalLM": Architecture("gated", False),  # tested; Qwen2Config
    "Phi3ForCausalLM": Architecture("gated", False),  # tested; Phi3Config, gate_up_proj split by the builder
    "Qwen3ForCausalLM": Architecture("gated", False),  # checked on a tiny export; qwen.py Qwen3Model (q/k norms keep the packed MatMul); Qwen3Config
    "MistralForCausalLM": Architecture("gated", False),  # checked on a tiny export; mistral.py; MistralConfig
    "GemmaForCausalLM": Architecture("gated", True),  # checked on a tiny export; gemma.py GemmaModel(MistralModel); GemmaConfig ties
    "Gemma2ForCausalLM": Architecture("gated", True),  # checked on a tiny export; gemma.py Gemma2Model; Gemma2Config ties
    "Gemma3ForCausalLM": Architecture("gated", True),  # tested (tests/test_any_causal_lm.py); gemma.py Gemma3Model(Gemma2Model); Gemma3TextConfig ties
    "PhiForCausalLM": Architecture("fc", False),  # checked on a tiny export; phi.py PhiModel: use_fc, dense -> o_proj; PhiConfig
    "OlmoForCausalLM": Architecture("gated", False),  # checked on a tiny export; olmo.py; OlmoConfig
    "NemotronForCausalLM": Architecture("up_down", False),  # checked on a tiny export; nemotron.py; NemotronConfig
    "SmolLM3ForCausalLM": Architecture("gated", True),  # checked on a tiny export; smollm.py SmolLM3Model(LlamaModel); SmolLM3Config ties
    "InternLM2ForCausalLM": Architecture("gated", False),  # not checked (remote code); internlm.py maps wqkv / w1 w3 w2 to q,k,v / gate up down
}


def dimensions(config: Mapping[str, Any]) -> dict[str, int]:
    """The model's dimensions as the builder reads them, with q and kv (projection widths) derived."""
    dims: dict[str, int] = {}
    for dim, keys in DIMENSIONS.items():
        value = next((config[k] for k in keys if config.get(k) is not None), None)
        if value is not None:
            dims[dim] = int(value)
    missing = [d for d in ("hidden", "intermediate", "heads", "layers", "vocab") if d not in dims]
    if missing:
        raise ModelError(f"config.json gives no {DIMENSIONS[missing[0]][0]}; the model folder is incomplete")
    dims.setdefault("head_dim", dims["hidden"] // dims["heads"])
    dims["q"] = dims["heads"] * dims["head_dim"]
    dims["kv"] = dims["kv_heads"] * dims["head_dim"]
    return dims


def _matrix(name: str, row: Row, dims: Mapping[str, int]) -> Matrix:
    _, k, n = row
    return Matrix(name, sum(dims[d] for d in k), sum(dims[d] for d in n))


def architecture_of(config: Mapping[str, Any]) -> Architecture:
    names = config.get("architectures") or []
    arch = next((ARCHITECTURES[n] for n in names if n in ARCHITECTURES), None)
    if arch is None:
        raise ModelError(f"architecture {', '.join(names) or '(none in config.json)'} is not one edgepipe exports; use one of {', '.join(ARCHITECTURES)}")
    return arch


def matrices_from_config(config: Mapping[str, Any]) -> ModelMatrices:
    """The weight matrices the export of a model with this ``config.json`` will have."""
    arch = architecture_of(config)
    dims = dimensions(config)
    rows = ATTENTION + MLP[arch.mlp]
    matrices = [_matrix(LAYER_PREFIX.format(i) + row[0], row, dims) for i in range(dims["layers"]) for row in rows]
    matrices.append(_matrix(LM_HEAD[0], LM_HEAD, dims))
    tied = config.get("tie_word_embeddings")
    return ModelMatrices(tuple(matrices), dims["layers"], arch.tied_default if tied is None else bool(tied))


def plan_from_config(config: Mapping[str, Any], scheme: MixedPrecision | WeightOnlyConfig) -> BitPlan:
    """The plan for a model from its ``config.json`` alone (what ``estimate`` uses before any export)."""
    return BitPlan.build(as_scheme(scheme), matrices_from_config(config))
