"""Llama-architecture causal LM -> two static fp32 graphs (prefill + decode) with a fixed KV cache.

Why two graphs: the HTP compiles fixed shapes only, so one graph cannot serve both the prompt
(many tokens at once) and generation (one token per step). Both are written here from the HF
weights by a small torch module (:func:`_static_module`) instead of exporting transformers'
modeling code, whose cache classes and mask helpers export as dynamic-shape ops, and so that every
op is a plain ONNX op the HTP has a kernel for (no com.microsoft GroupQueryAttention):

- **prefill**: ``input_ids [1, P]`` (right-padded), ``cos``/``sin [1, 1, P, D]``, ``attn_bias
  [1, 1, P, P]`` (causal, 0 or ``MASK_BIAS``) -> ``logits [1, P, V]`` and, per layer,
  ``present_key_i`` / ``present_value_i [1, kv_heads, C, D]`` (the P positions, zero-padded to the
  cache capacity C, so the decode graph takes them as they are).
- **decode**: ``input_ids [1, 1]``, ``cos``/``sin [1, 1, 1, D]``, ``attn_bias [1, 1, 1, C + 1]``
  (0 over the valid cache slots and the new token, ``MASK_BIAS`` elsewhere), ``past_key_i`` /
  ``past_value_i [1, kv_heads, C, D]`` -> ``logits [1, 1, V]`` and ``key_i`` / ``value_i [1,
  kv_heads, 1, D]``, which the host writes into slot ``position`` of its cache.

Cache slot ``i`` holds position ``i``; the host computes the rotary tables (``sin`` carries the
sign of rotate-half, so rotary is Slice/Concat/Mul/Add) and the masks, see
:mod:`edgepipe.runtime.static_lm`. GQA stays 4-D: the query heads of one KV head are stacked
along the sequence axis, so K/V are never repeated. RMSNorm is one RMSNormalization op.
"""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.errors import EdgepipeError, InputError, ModelError
from edgepipe.runtime.static_lm import decode_bias, prefill_bias, rope_tables

OPSET = 23  # RMSNormalization is an ONNX op from 23 on (16-bit QuantizeLinear from 21)
DECODER_MODEL_TYPES = ("llama",)
MODES = ("prefill", "decode")


def is_causal_lm(model_dir: Path) -> bool:
    """True when ``config.json`` names a ``...ForCausalLM`` architecture (the decoder NPU path)."""
    cfg_path = Path(model_dir) / "config.json"
    if not cfg_path.is_file():
        raise ModelError(f"{model_dir} has no config.json; point --model at a Hugging Face model folder")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {cfg_path}: {e}; fix or re-save the model folder") from None
    archs = cfg.get("architectures") or []
    return isinstance(archs, list) and any(str(a).endswith("ForCausalLM") for a in archs)


@dataclasses.dataclass(frozen=True)
class DecoderSpec:
    """The shape facts of a Llama-architecture model that the static graphs are built from."""

    model_dir: Path
    architecture: str
    hidden_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rope_theta: float
    rms_eps: float
    tied: bool
    max_positions: int


def read_decoder_spec(model_dir: Path) -> DecoderSpec:
    """Read ``config.json``; only the plain Llama block (default rotary, no biases) is built."""
    model_dir = Path(model_dir)
    if not is_causal_lm(model_dir):
        raise ModelError(
            f"{model_dir}: config.json names no ...ForCausalLM architecture; the NPU decoder path needs a causal LM"
        )
    if not (model_dir / "tokenizer.json").is_file():
        raise ModelError(
            f"{model_dir} has no tokenizer.json; save the tokenizer with the model (fast tokenizer)"
        )
    cfg = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    model_type = str(cfg.get("model_type", ""))
    if model_type not in DECODER_MODEL_TYPES:
        raise ModelError(
            f"{model_dir}: model_type {model_type!r} is not supported by the NPU decoder path "
            f"(supported: {', '.join(DECODER_MODEL_TYPES)}); use a CPU target for it"
        )
    rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
    rope_type = str(rope.get("rope_type", rope.get("type", "default")) or "default")
    if rope_type != "default":
        raise ModelError(
            f"{model_dir}: rope_type {rope_type!r} is not supported on the NPU path (default rotary only)"
        )
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ModelError(f"{model_dir}: attention/MLP biases are not supported on the NPU decoder path")
    if str(cfg.get("hidden_act", "silu")) != "silu":
        raise ModelError(f"{model_dir}: hidden_act {cfg.get('hidden_act')!r} is not supported (silu only)")
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    return DecoderSpec(
        model_dir=model_dir,
        architecture=str((cfg.get("architectures") or ["?"])[0]),
        hidden_size=hidden,
        layers=int(cfg["num_hidden_layers"]),
        heads=heads,
        kv_heads=int(cfg.get("num_key_value_heads") or heads),
        head_dim=int(cfg.get("head_dim") or hidden // heads),
        intermediate_size=int(cfg["intermediate_size"]),
        vocab_size=int(cfg["vocab_size"]),
        rope_theta=float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))),
        rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        tied=bool(cfg.get("tie_word_embeddings", False)),
        max_positions=int(cfg.get("max_position_embeddings", 2048)),
    )


def _lin(torch: Any, x: Any, w: Any, conv: bool) -> Any:
    """``x @ W^T``. As a 1x1 Conv over T "images" of K channels when ``conv``: QNN quantizes
    Conv weights per output channel but MatMul weights only per tensor, and per-tensor int8
    costs SmolLM2-135M 11 points of top-1 agreement (weights alone: 83 % vs 94 %)."""
    if not conv:
        return x @ w
    T, K = x.shape[1], x.shape[2]
    return torch.nn.functional.conv2d(x.reshape(T, K, 1, 1), w).reshape(1, T, w.shape[0])


def _norm(torch: Any, spec: DecoderSpec, x: Any, w: Any) -> Any:
    # one RMSNormalization op (opset 23), not ReduceMean(x * x)...: quantized, the x * x
    # tensor's range is set by the residual stream's outliers (hundreds squared), which
    # leaves ordinary tokens' squares at zero and their norm exploding
    return torch.nn.functional.rms_norm(x, (spec.hidden_size,), w, spec.rms_eps)


def _rope(torch: Any, x: Any, cos: Any, sin: Any) -> Any:
    half = x.shape[-1] // 2
    swapped = torch.cat([x[..., half:], x[..., :half]], dim=-1)
    return x * cos + swapped * sin


@dataclasses.dataclass(frozen=True)
class _Shape:
    """What one traced forward is: its mode, the cache capacity and whether projections are Conv."""

    spec: DecoderSpec
    mode: str
    capacity: int
    conv: bool


def _layer(torch: Any, s: _Shape, h: Any, params: Any, cos: Any, sin: Any, attn_bias: Any, past: Any) -> tuple[Any, Any, Any]:
    """One decoder layer; returns the new hidden state and the K/V this step outputs."""
    spec = s.spec
    T, H, KV, D = h.shape[1], spec.heads, spec.kv_heads, spec.head_dim
    rep = H // KV
    ln1, wq, wk, wv, wo, ln2, wg, wu, wd = params
    x = _norm(torch, spec, h, ln1)
    q = _lin(torch, x, wq, s.conv).reshape(1, T, H, D).transpose(1, 2)
    k = _lin(torch, x, wk, s.conv).reshape(1, T, KV, D).transpose(1, 2)
    v = _lin(torch, x, wv, s.conv).reshape(1, T, KV, D).transpose(1, 2)
    q = _rope(torch, q, cos, sin) * (1.0 / math.sqrt(D))
    k = _rope(torch, k, cos, sin)
    if s.mode == "decode":
        keys, vals = torch.cat([past[0], k], dim=2), torch.cat([past[1], v], dim=2)
        out_k, out_v = k, v
    else:
        keys, vals = k, v
        pad = (0, 0, 0, s.capacity - T)
        out_k, out_v = torch.nn.functional.pad(k, pad), torch.nn.functional.pad(v, pad)
    S = keys.shape[2]
    scores = torch.matmul(q.reshape(1, KV, rep * T, D), keys.transpose(2, 3))
    scores = scores.reshape(1, H, T, S) + attn_bias
    probs = torch.softmax(scores, dim=-1).reshape(1, KV, rep * T, S)
    o = torch.matmul(probs, vals).reshape(1, H, T, D).transpose(1, 2).reshape(1, T, H * D)
    h = h + _lin(torch, o, wo, s.conv)
    x = _norm(torch, spec, h, ln2)
    gate = _lin(torch, x, wg, s.conv)
    h = h + _lin(torch, gate * torch.sigmoid(gate) * _lin(torch, x, wu, s.conv), wd, s.conv)
    return h, out_k, out_v


def _layer_weights(torch: Any, hf: Any, conv: bool) -> list[Any]:
    """Every layer's nine weights in :func:`_layer`'s order, projections in the form ``_lin`` takes:
    [N, K, 1, 1] for Conv, else W^T for one MatMul."""

    def t(w: Any) -> Any:
        w = w.detach().to(torch.float32)
        return w[:, :, None, None].contiguous() if conv else w.t().contiguous()

    out = []
    for layer in hf.model.layers:
        a, m = layer.self_attn, layer.mlp
        out += [
            layer.input_layernorm.weight.detach().clone(), t(a.q_proj.weight), t(a.k_proj.weight),
            t(a.v_proj.weight), t(a.o_proj.weight), layer.post_attention_layernorm.weight.detach().clone(),
            t(m.gate_proj.weight), t(m.up_proj.weight), t(m.down_proj.weight),
        ]
    out.append(t(hf.lm_head.weight))
    return out


def _static_module(hf: Any, spec: DecoderSpec, mode: str, seq_len: int, capacity: int, conv: bool = True) -> Any:
    """A torch module computing the Llama forward with the static I/O of ``mode``."""
    import torch

    shape = _Shape(spec, mode, capacity, conv)
    weights = _layer_weights(torch, hf, conv)

    class _StaticLlama(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            frozen = lambda w: torch.nn.Parameter(w, requires_grad=False)  # noqa: E731
            self.embed = frozen(hf.model.embed_tokens.weight.detach().clone())
            self.final_norm = frozen(hf.model.norm.weight.detach().clone())
            self.lm_t = frozen(weights[-1])
            self.layer_params = torch.nn.ParameterList([frozen(w) for w in weights[:-1]])

        def forward(self, input_ids: Any, cos: Any, sin: Any, attn_bias: Any, *past: Any) -> Any:
            h = torch.nn.functional.embedding(input_ids, self.embed)
            kv = []
            for i in range(spec.layers):
                params = self.layer_params[9 * i : 9 * i + 9]
                h, k, v = _layer(torch, shape, h, params, cos, sin, attn_bias, past[2 * i : 2 * i + 2])
                kv += [k, v]
            logits = _lin(torch, _norm(torch, spec, h, self.final_norm), self.lm_t, conv)
            return (logits, *kv)

    return _StaticLlama().eval()


def io_names(spec: DecoderSpec, mode: str) -> tuple[list[str], list[str]]:
    """Input and output names of the ``mode`` graph (the host loop feeds and reads them by name)."""
    ins = ["input_ids", "cos", "sin", "attn_bias"]
    if mode == "decode":
        for i in range(spec.layers):
            ins += [f"past_key_{i}", f"past_value_{i}"]
        kv = [n for i in range(spec.layers) for n in (f"key_{i}", f"value_{i}")]
    else:
        kv = [n for i in range(spec.layers) for n in (f"present_key_{i}", f"present_value_{i}")]
    return ins, ["logits", *kv]


def load_hf(spec: DecoderSpec) -> Any:
    """The transformers model in fp32 with eager attention: the weights and the reference logits."""
    import torch
    from transformers import AutoModelForCausalLM

    try:
        return AutoModelForCausalLM.from_pretrained(
            str(spec.model_dir), dtype=torch.float32, attn_implementation="eager"
        ).eval()
    except Exception as e:
        raise ModelError(f"cannot load {spec.model_dir} with transformers: {e}") from None


def export_static(
    spec: DecoderSpec,
    seq_len: int,
    capacity: int,
    out_dir: Path,
    hf: Any | None = None,
    linear_as_conv: bool = True,
) -> dict[str, Path]:
    """Export the fp32 prefill and decode graphs (static shapes, plain ONNX ops) into ``out_dir``.

    ``linear_as_conv``: projections as 1x1 Conv (per-channel weight quantization on QNN) rather
    than MatMul (per-tensor only); the profile's ``per_channel`` chooses.
    """
    import torch

    if seq_len < 1 or capacity <= seq_len:
        raise InputError(
            f"npu.context_length ({capacity}) must exceed npu.seq_len ({seq_len}); raise context_length in the profile"
        )
    hf = hf if hf is not None else load_hf(spec)
    out_dir.mkdir(parents=True, exist_ok=True)
    D, KV = spec.head_dim, spec.kv_heads
    paths = {}
    for mode in MODES:
        module = _static_module(hf, spec, mode, seq_len, capacity, conv=linear_as_conv)
        T = seq_len if mode == "prefill" else 1
        cos, sin = (torch.from_numpy(a) for a in rope_tables(range(T), D, spec.rope_theta))
        bias = torch.from_numpy(prefill_bias(T) if mode == "prefill" else decode_bias(1, capacity))
        args: list[Any] = [torch.full((1, T), 5, dtype=torch.long), cos, sin, bias]
        if mode == "decode":
            for _ in range(2 * spec.layers):
                args.append(torch.zeros((1, KV, capacity, D), dtype=torch.float32) + 0.01 * len(args))
        ins, outs = io_names(spec, mode)
        path = out_dir / f"{mode}.fp32.onnx"
        with torch.no_grad():
            torch.onnx.export(
                module,
                tuple(args),
                str(path),
                input_names=ins,
                output_names=outs,
                opset_version=OPSET,
                dynamo=True,
                verbose=False,
                external_data=False,
                optimize=True,
            )
        _check_plain_ops(path)
        paths[mode] = path
        del module
    return paths


def _check_plain_ops(path: Path) -> None:
    """The exported graph must be plain, static ONNX: a contrib op or a dynamic dim is an export bug."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    contrib = sorted({n.op_type for n in model.graph.node if n.domain not in ("", "ai.onnx")})
    if contrib:
        raise EdgepipeError(
            f"{path.name}: the export contains non-standard ops {contrib}; the HTP cannot run them"
        )
    for vi in list(model.graph.input) + list(model.graph.output):
        dims = vi.type.tensor_type.shape.dim
        if any(not d.HasField("dim_value") for d in dims):
            raise EdgepipeError(
                f"{path.name}: {vi.name} has a dynamic dimension; the HTP needs static shapes"
            )


def token_ids(model_dir: Path, text: str) -> np.ndarray:
    """``text`` through the folder's fast tokenizer (what the device tokenizes with too)."""
    from tokenizers import Tokenizer

    return np.asarray(
        Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json")).encode(text).ids, dtype=np.int64
    )


def pad_token_id(model_dir: Path) -> int:
    """The id right-padding fills the prefill graph with (masked anyway, so any real token does)."""
    cfg = json.loads((Path(model_dir) / "config.json").read_text(encoding="utf-8"))
    for key in ("pad_token_id", "eos_token_id", "bos_token_id"):
        v = cfg.get(key)
        if isinstance(v, list) and v:
            v = v[0]
        if isinstance(v, int):
            return v
    return 0


def eos_token_ids(model_dir: Path) -> list[int]:
    """End-of-sequence ids, from ``generation_config.json`` (what ``generate`` stops on) or else
    ``config.json``; the device runtime stops generating at any of them."""
    ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        path = Path(model_dir) / name
        if not path.is_file():
            continue
        v = json.loads(path.read_text(encoding="utf-8")).get("eos_token_id")
        for e in v if isinstance(v, list) else [v]:
            if isinstance(e, int) and not isinstance(e, bool) and e not in ids:
                ids.append(e)
        if ids:
            break
    return ids


def hf_logits(hf: Any, window: np.ndarray) -> np.ndarray:
    """The transformers model's logits over ``window`` (the whole sequence at once): the sanity reference."""
    import torch

    with torch.no_grad():
        return hf(input_ids=torch.from_numpy(window[None].astype(np.int64))).logits[0].float().numpy()
