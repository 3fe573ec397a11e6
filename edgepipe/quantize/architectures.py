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
from edgepipe.quantize.bitplan import EMBEDDING, BitPlan, Matrix, ModelMatrices
from edgepipe.quantize.configs import MixedPrecision, WeightOnlyConfig, as_scheme

__all__ = ["ARCHITECTURES", "checkpoint_tensors", "dimensions", "matrices_from_config", "plan_from_config"]

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
    checkpoint: str | None = None  # key of CHECKPOINT: the tensors its safetensors must hold (None: not tabled)


# Keyed as config.json's "architectures"; the same names as edgepipe.export's SUPPORTED_ARCHITECTURES. "tested": a
# tests/ tiny model; "checked on a tiny export": a random 2-layer model exported once with the builder 0.18, matrices equal.
ARCHITECTURES: dict[str, Architecture] = {
    "LlamaForCausalLM": Architecture("gated", False, "llama"),  # tested (tests/conftest.py); LlamaConfig
    "GraniteForCausalLM": Architecture("gated", False, "llama"),  # tested; GraniteConfig
    "Qwen2ForCausalLM": Architecture("gated", False, "qwen2"),  # tested; Qwen2Config
    "Phi3ForCausalLM": Architecture("gated", False, "phi3"),  # tested; Phi3Config, gate_up_proj split by the builder
    "Qwen3ForCausalLM": Architecture("gated", False, "qwen3"),  # checked on a tiny export; qwen.py Qwen3Model (q/k norms keep the packed MatMul); Qwen3Config
    "MistralForCausalLM": Architecture("gated", False, "llama"),  # checked on a tiny export; mistral.py; MistralConfig
    "GemmaForCausalLM": Architecture("gated", True),  # checked on a tiny export; gemma.py GemmaModel(MistralModel); GemmaConfig ties
    "Gemma2ForCausalLM": Architecture("gated", True),  # checked on a tiny export; gemma.py Gemma2Model; Gemma2Config ties
    "Gemma3ForCausalLM": Architecture("gated", True),  # tested (tests/test_any_causal_lm.py); gemma.py Gemma3Model(Gemma2Model); Gemma3TextConfig ties
    "PhiForCausalLM": Architecture("fc", False),  # checked on a tiny export; phi.py PhiModel: use_fc, dense -> o_proj; PhiConfig
    "OlmoForCausalLM": Architecture("gated", False),  # checked on a tiny export; olmo.py; OlmoConfig
    "NemotronForCausalLM": Architecture("up_down", False),  # checked on a tiny export; nemotron.py; NemotronConfig
    "SmolLM3ForCausalLM": Architecture("gated", True),  # checked on a tiny export; smollm.py SmolLM3Model(LlamaModel); SmolLM3Config ties
    "InternLM2ForCausalLM": Architecture("gated", False),  # not checked (remote code); internlm.py maps wqkv / w1 w3 w2 to q,k,v / gate up down
}


# The Hugging Face checkpoint's tensors (what ``save_pretrained`` writes), so a folder that lacks one, or
# holds one of another shape, is refused before transformers would initialise it at random. A row:
# (name after "model.layers.<i>.", shape as sums of dimensions, the config.json flag that adds it or None).
# Source: transformers 4.5x modeling_<arch>.py (the module tree of <Arch>ForCausalLM).
CkptRow = tuple[str, tuple[tuple[str, ...], ...], str | None]
_LLAMA_ATTN: tuple[CkptRow, ...] = (
    ("self_attn.q_proj.weight", (("q",), ("hidden",)), None),  # modeling_llama.py LlamaAttention
    ("self_attn.k_proj.weight", (("kv",), ("hidden",)), None),
    ("self_attn.v_proj.weight", (("kv",), ("hidden",)), None),
    ("self_attn.o_proj.weight", (("hidden",), ("q",)), None),
    ("self_attn.q_proj.bias", (("q",),), "attention_bias"),  # LlamaConfig.attention_bias
    ("self_attn.k_proj.bias", (("kv",),), "attention_bias"),
    ("self_attn.v_proj.bias", (("kv",),), "attention_bias"),
    ("self_attn.o_proj.bias", (("hidden",),), "attention_bias"),
)
_GATED_MLP: tuple[CkptRow, ...] = (
    ("mlp.gate_proj.weight", (("intermediate",), ("hidden",)), None),  # modeling_llama.py LlamaMLP
    ("mlp.up_proj.weight", (("intermediate",), ("hidden",)), None),
    ("mlp.down_proj.weight", (("hidden",), ("intermediate",)), None),
    ("mlp.gate_proj.bias", (("intermediate",),), "mlp_bias"),  # LlamaConfig.mlp_bias
    ("mlp.up_proj.bias", (("intermediate",),), "mlp_bias"),
    ("mlp.down_proj.bias", (("hidden",),), "mlp_bias"),
)
_NORMS: tuple[CkptRow, ...] = (
    ("input_layernorm.weight", (("hidden",),), None),
    ("post_attention_layernorm.weight", (("hidden",),), None),
)
CHECKPOINT: dict[str, tuple[CkptRow, ...]] = {
    "llama": _LLAMA_ATTN + _GATED_MLP + _NORMS,  # Llama, Granite (modeling_granite.py), Mistral (no biases)
    "qwen2": (  # modeling_qwen2.py Qwen2Attention: q/k/v always biased, o_proj never
        *(r for r in _LLAMA_ATTN if not r[0].endswith("bias")),
        ("self_attn.q_proj.bias", (("q",),), None),
        ("self_attn.k_proj.bias", (("kv",),), None),
        ("self_attn.v_proj.bias", (("kv",),), None),
        *_GATED_MLP[:3], *_NORMS,
    ),
    "qwen3": (  # modeling_qwen3.py: RMSNorm over each head's q and k
        *_LLAMA_ATTN, ("self_attn.q_norm.weight", (("head_dim",),), None), ("self_attn.k_norm.weight", (("head_dim",),), None),
        *_GATED_MLP[:3], *_NORMS,
    ),
    "phi3": (  # modeling_phi3.py: fused qkv_proj and gate_up_proj
        ("self_attn.qkv_proj.weight", (("q", "kv", "kv"), ("hidden",)), None),
        ("self_attn.o_proj.weight", (("hidden",), ("q",)), None),
        ("mlp.gate_up_proj.weight", (("intermediate", "intermediate"), ("hidden",)), None),
        ("mlp.down_proj.weight", (("hidden",), ("intermediate",)), None),
        *_NORMS,
    ),
}
# Outside the layers: embedding, final norm, and the lm_head (absent or equal to the embedding when tied).
CKPT_EMBEDDING = (EMBEDDING, ("vocab", "hidden"))
CKPT_NORM = ("model.norm.weight", ("hidden",))
CKPT_LM_HEAD = ("lm_head.weight", ("vocab", "hidden"))
# Buffers some older checkpoints carry that transformers recomputes and ignores on load.
CKPT_IGNORED_SUFFIXES = (".rotary_emb.inv_freq", ".masked_bias", ".attn.bias")


def checkpoint_tensors(config: Mapping[str, Any]) -> tuple[dict[str, tuple[int, ...]], set[str]] | None:
    """(required tensor -> shape, optional tensor names) of this ``config.json``'s checkpoint, or None
    when the architecture's checkpoint is not tabled here (then only the generic checks apply: the
    generic export path's architectures have no row; transformers' own key check covers them)."""
    names = config.get("architectures") or []
    arch = next((ARCHITECTURES[n] for n in names if n in ARCHITECTURES), None)
    if arch is None or arch.checkpoint is None:
        return None
    dims = dimensions(config)
    required: dict[str, tuple[int, ...]] = {}
    for i in range(dims["layers"]):
        for name, shape, flag in CHECKPOINT[arch.checkpoint]:
            if flag is None or config.get(flag):
                required[LAYER_PREFIX.format(i) + name] = tuple(sum(dims[d] for d in part) for part in shape)
    required[CKPT_EMBEDDING[0]] = (dims["vocab"], dims["hidden"])
    required[CKPT_NORM[0]] = (dims["hidden"],)
    tied = config.get("tie_word_embeddings")
    optional: set[str] = set()
    if (arch.tied_default if tied is None else bool(tied)):
        optional.add(CKPT_LM_HEAD[0])
    else:
        required[CKPT_LM_HEAD[0]] = (dims["vocab"], dims["hidden"])
    return required, optional


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
    tied = arch.tied_default if tied is None else bool(tied)
    if not tied:  # base.py make_embedding: a Gather of its own table, listed [hidden, vocab] (Matrix.lookup)
        matrices.append(Matrix(EMBEDDING, dims["hidden"], dims["vocab"], lookup=True))
    return ModelMatrices(tuple(matrices), dims["layers"], tied)


def plan_from_config(config: Mapping[str, Any], scheme: MixedPrecision | WeightOnlyConfig) -> BitPlan:
    """The plan for a model from its ``config.json`` alone (what ``estimate`` uses before any export)."""
    return BitPlan.build(as_scheme(scheme), matrices_from_config(config))
