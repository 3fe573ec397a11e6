"""Before any export, from ``config.json`` alone: what the model is, which exporter builds it, or why not.

A user who brings a model should learn in seconds, not after minutes of export and calibration,
that a shape cannot run (a head size GroupQueryAttention refuses), that the fused builder would
mis-export it (a projection as wide as the vocabulary taken for the lm_head), or that nothing
here can build it. The rules are data (:data:`RULES`), checked in order; the first that matches
decides the path, and every decision carries its reason.

Paths: ``genai-builder`` (onnxruntime-genai's model builder: fused GroupQueryAttention, the
fastest graph), ``generic`` (:mod:`edgepipe.export.generic`: a torch.onnx export of any
``...ForCausalLM`` transformers loads, plain attention ops), or ``refused`` (one line: why, and
what to do).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgepipe.errors import ModelError

BUILDER = "genai-builder"
GENERIC = "generic"
REFUSED = "refused"

# Projections whose checkpoint Linear is fused, as (architecture, widths): the builder's
# has_lm_head (builders/base.py) takes *any* Linear with out_features == vocab_size for the head.
FUSED_WIDTHS: dict[str, tuple[str, ...]] = {
    "Phi3ForCausalLM": ("qkv", "gate_up"),  # modeling_phi3: qkv_proj (q + 2 kv), gate_up_proj (2 x intermediate)
}

# Builder graphs whose sliding-window GroupQueryAttention refuses an empty past (measured: tiny Gemma-3, builder 0.18)
SLIDING_CACHE = frozenset({"Gemma3ForCausalLM"})
GQA_HEAD_MULTIPLE = 16  # onnxruntime GroupQueryAttention (CPU): "head_size shall be a multiple of 16"
MOE_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
MOE_ACTIVE_KEYS = ("num_experts_per_tok", "experts_per_token", "moe_top_k")


@dataclass(frozen=True)
class Preflight:
    """What ``config.json`` says, and the export path a build takes (with why)."""

    architecture: str
    model_type: str
    path: str  # BUILDER, GENERIC or REFUSED
    reason: str
    hidden: int
    layers: int
    heads: int
    kv_heads: int
    head_size: int
    vocab: int
    intermediate: int
    rope_type: str | None
    sliding_window: int | None
    tied: bool
    experts: int = 0  # MoE: experts per layer (0: dense)
    experts_per_token: int = 0
    fix: str = ""  # what to do, for a refusal
    rule: str = ""  # the RULES row that decided
    normalized: tuple[str, ...] = field(default=())  # the normalize rows that apply

    @property
    def layout(self) -> str:
        if self.kv_heads == self.heads:
            return f"MHA ({self.heads} heads)"
        if self.kv_heads == 1:
            return f"MQA ({self.heads} query heads, 1 kv head)"
        return f"GQA ({self.heads} query heads, {self.kv_heads} kv heads)"

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "normalized": list(self.normalized), "attention": self.layout}

    def raise_if_refused(self) -> None:
        if self.path == REFUSED:
            raise ModelError(f"architecture {self.architecture} is not supported: {self.reason}; {self.fix}")


def _int(config: dict[str, Any], *keys: str, default: int = 0) -> int:
    for k in keys:
        v = config.get(k)
        if isinstance(v, int) and not isinstance(v, bool):
            return v
    return default


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """A multimodal wrapper's text part carries the shapes; the rest is the top level."""
    text = config.get("text_config")
    return {**config, **text} if isinstance(text, dict) else config


def _rope_type(config: dict[str, Any]) -> str | None:
    rp = config.get("rope_parameters") or config.get("rope_scaling")
    if not isinstance(rp, dict):
        return "default" if "rope_theta" in config else None
    if "rope_type" in rp or "type" in rp:
        return str(rp.get("rope_type", rp.get("type")))
    types = sorted({str(v.get("rope_type", "default")) for v in rp.values() if isinstance(v, dict)})
    return "/".join(types) + " (per layer type)" if types else None


class _AnyArchitecture:
    """Every architecture name: the preflight's rules, not a list, decide which ones build."""

    def __contains__(self, name: object) -> bool:
        return True


def read_config(model_dir: Path | str) -> dict[str, Any]:
    """``config.json`` of a folder, its shape fields checked (inspect's checks and messages)."""
    from edgepipe.export.inspect import _read_config

    config, _ = _read_config(Path(model_dir), _AnyArchitecture())  # type: ignore[arg-type]
    return config


def facts(config: dict[str, Any]) -> dict[str, Any]:
    """The shape facts the rules read (hidden, heads, head size, projection widths, MoE...)."""
    c = _text_config(config)
    archs = c.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise ModelError("config.json has no 'architectures' list; re-save the model with save_pretrained")
    hidden = _int(c, "hidden_size", "n_embd", "d_model")
    heads = _int(c, "num_attention_heads", "n_head", "num_heads")
    if hidden <= 0 or heads <= 0:
        raise ModelError(f"config.json gives no hidden size or attention heads for {archs[0]}; fix the config")
    head = _int(c, "head_dim", default=hidden // heads)
    kv = _int(c, "num_key_value_heads", "multi_query_group_num", default=heads)
    inter = _int(c, "intermediate_size", "ffn_dim", "n_inner", "ffn_hidden_size", default=4 * hidden)
    window = c.get("sliding_window")
    tied = c.get("tie_word_embeddings", c.get("tie_embeddings"))
    return {
        "architecture": archs[0], "model_type": str(c.get("model_type", "")), "hidden": hidden,
        "layers": _int(c, "num_hidden_layers", "n_layer", "num_layers"), "heads": heads, "kv_heads": kv, "head_size": head,
        "vocab": _int(c, "vocab_size"), "intermediate": inter, "rope_type": _rope_type(c),
        "sliding_window": window if isinstance(window, int) and not isinstance(window, bool) else None,
        "tied": True if tied is None else bool(tied),  # transformers' PretrainedConfig default
        "experts": _int(c, *MOE_KEYS), "experts_per_token": _int(c, *MOE_ACTIVE_KEYS),
    }


def projection_widths(f: dict[str, Any]) -> dict[str, int]:
    """Output widths of the checkpoint's Linears (fused ones as stored), by projection."""
    q, kv = f["heads"] * f["head_size"], f["kv_heads"] * f["head_size"]
    widths = {"q": q, "kv": kv, "o": f["hidden"], "mlp": f["intermediate"], "down": f["hidden"]}
    fused = {"qkv": q + 2 * kv, "gate_up": 2 * f["intermediate"]}
    widths.update({k: fused[k] for k in FUSED_WIDTHS.get(f["architecture"], ())})
    return widths


def _builder_arch(arch: str) -> bool:
    from edgepipe.export.genai_builder import SUPPORTED_ARCHITECTURES

    return arch in SUPPORTED_ARCHITECTURES


def _transformers_knows(f: dict[str, Any]) -> bool:
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    return f["model_type"] in CONFIG_MAPPING_NAMES


def _vocab_wide(f: dict[str, Any]) -> str | None:
    hit = sorted(k for k, w in projection_widths(f).items() if w == f["vocab"])
    return ", ".join(hit) if hit else None


# (name, applies?, path, reason, fix): the first row that applies decides. The reason may use the facts.
Rule = tuple[str, Callable[[dict[str, Any]], bool], str, str, str]
RULES: tuple[Rule, ...] = (
    ("not-causal-lm", lambda f: not f["architecture"].endswith(("ForCausalLM", "LMHeadModel")), REFUSED,
     "not a causal language model (edgepipe builds text generators from ...ForCausalLM checkpoints)",
     "pass a decoder-only language model folder (LlamaForCausalLM, GraniteForCausalLM, Qwen2ForCausalLM, Phi3ForCausalLM, "
     "GPT2LMHeadModel or any other ...ForCausalLM transformers ships)"),
    ("no-shapes", lambda f: f["layers"] <= 0 or f["vocab"] <= 0, REFUSED,
     "config.json gives no number of layers or vocabulary size", "fix the config (num_hidden_layers, vocab_size)"),
    ("vocab-wide-projection", lambda f: _builder_arch(f["architecture"]) and _vocab_wide(f) is not None, GENERIC,
     "a projection ({vocab_wide}) is as wide as the vocabulary ({vocab}): the genai builder would take it for the lm_head",
     ""),
    ("gqa-head-size", lambda f: _builder_arch(f["architecture"]) and f["head_size"] % GQA_HEAD_MULTIPLE != 0, GENERIC,
     "head size {head_size} is not a multiple of 16: onnxruntime's GroupQueryAttention refuses it at run time", ""),
    ("sliding-window-cache", lambda f: f["architecture"] in SLIDING_CACHE and bool(f["sliding_window"]), GENERIC,
     "sliding window {sliding_window}: the builder's GroupQueryAttention needs a KV buffer of at least the window "
     "(\"KV cache capacity (0) must be at least local_window_size\"), and calibration and validation start from an "
     "empty cache", ""),
    ("builder", lambda f: _builder_arch(f["architecture"]), BUILDER,
     "the onnxruntime-genai builder supports {architecture}", ""),
    ("unknown-model-type", lambda f: not _transformers_knows(f), REFUSED,
     "transformers does not know model type {model_type!r} (edgepipe never runs a checkpoint's remote code)",
     "convert the model to an architecture transformers ships, or upgrade transformers"),
    ("generic", lambda f: True, GENERIC, "the genai builder has no {architecture} path: generic torch.onnx export", ""),
)


def preflight_config(config: dict[str, Any]) -> Preflight:
    """The decision for a model from its ``config.json`` (see :data:`RULES`)."""
    from edgepipe.export.normalize import rows_for

    f = facts(config)
    f["vocab_wide"] = _vocab_wide(f) if f["vocab"] > 0 else None
    name, _, path, reason, fix = next(r for r in RULES if r[1](f))
    fields = {k: v for k, v in f.items() if k != "vocab_wide"}
    return Preflight(
        **fields, path=path, reason=reason.format(**f), fix=fix, rule=name,
        normalized=tuple(r.name for r in rows_for(config)) if path == BUILDER else (),
    )


def preflight(model_dir: Path | str) -> Preflight:
    """The decision for the model folder ``model_dir`` (reads ``config.json`` only)."""
    return preflight_config(read_config(model_dir))


# model_type -> MLP of two matrices (fc in, fc out) instead of the gated three; source: each modeling_*.py
FC_MLP = frozenset({"gpt2", "gptj", "gpt_neox", "opt", "bloom", "falcon", "gpt_bigcode", "codegen", "phi", "gpt_neo"})


def generic_matrices(pre: Preflight) -> Any:
    """The weight matrices a generic export will have, from the preflight's facts (names as
    :mod:`edgepipe.export.generic_graph` writes them). MoE experts are 3-D parameters, not MatMuls:
    the export keeps them fp32, so they are not listed (``estimate`` counts them as fp32)."""
    from edgepipe.quantize.bitplan import EMBEDDING, Matrix, ModelMatrices

    h, q, kv, inter = pre.hidden, pre.heads * pre.head_size, pre.kv_heads * pre.head_size, pre.intermediate
    rows = [("self_attn.q_proj", h, q), ("self_attn.k_proj", h, kv), ("self_attn.v_proj", h, kv), ("self_attn.o_proj", q, h)]
    if not pre.experts:
        gated = pre.model_type not in FC_MLP
        rows += [("mlp.gate_proj", h, inter), ("mlp.up_proj", h, inter)] if gated else [("mlp.fc_in", h, inter)]
        rows += [("mlp.down_proj", inter, h)] if gated else [("mlp.fc_out", inter, h)]
    mats = [Matrix(f"model.layers.{i}.{name}.weight", k, n) for i in range(pre.layers) for name, k, n in rows]
    mats.append(Matrix("lm_head.MatMul.weight", h, pre.vocab))
    if not pre.tied:  # the token embedding's own table (generic_graph names it as the builder does)
        mats.append(Matrix(EMBEDDING, h, pre.vocab, lookup=True))
    return ModelMatrices(tuple(mats), pre.layers, pre.tied)


def expert_parameters(pre: Preflight) -> int:
    """Parameters of the MoE experts (gated: gate, up, down per expert per layer)."""
    return pre.layers * pre.experts * 3 * pre.hidden * pre.intermediate
