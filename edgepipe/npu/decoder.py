"""Llama-architecture causal LM -> two static HTP graphs (prefill + decode) with a fixed KV cache.

Why two graphs: the HTP compiles fixed shapes only, so one graph cannot serve both the prompt
(many tokens at once) and generation (one token per step). Both are written here from the HF
weights by a small torch module (:class:`_StaticLlama`) instead of exporting transformers'
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
sign of rotate-half, so rotary is Slice/Concat/Mul/Add) and the masks, see :func:`rope_tables`
and :class:`StaticDecoder`. GQA stays 4-D: the query heads of one KV head are stacked along the
sequence axis, so K/V are never repeated. RMSNorm is ReduceMean/Add/Sqrt/Div/Mul.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.errors import EdgepipeError, InputError, ModelError, TargetError
from edgepipe.runtime.evaluate import compare_logits
from edgepipe.runtime.static_lm import (  # noqa: F401  (the host loop runs on the device too)
    CONFIG_FILE,
    MASK_BIAS,
    StaticDecoder,
    decode_bias,
    prefill_bias,
    rope_tables,
)

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

OPSET = 23  # RMSNormalization is an ONNX op from 23 on (16-bit QuantizeLinear from 21)
PREFILL_QDQ, DECODE_QDQ = "prefill.qdq.onnx", "decode.qdq.onnx"
PREFILL_CTX, DECODE_CTX = "prefill_ctx.onnx", "decode_ctx.onnx"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
)
DECODER_MODEL_TYPES = ("llama",)
DEFAULT_CONTEXT_LENGTH = 256
# How many eval windows and decode steps the simulator scores by default: each window costs one
# prefill run (P positions) plus ``EVAL_DECODE_STEPS`` decode runs, and the HTP simulator runs the
# default model's decode step in seconds (measured: see README), so more would make a build take
# hours. Callers can ask for more.
EVAL_WINDOWS = 2
EVAL_DECODE_STEPS = 6


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


def _static_module(hf: Any, spec: DecoderSpec, mode: str, seq_len: int, capacity: int, conv: bool = True) -> Any:
    """A torch module computing the Llama forward with the static I/O of ``mode``."""
    import torch

    inner = hf.model
    def t(w: Any) -> Any:
        """The weight in the form ``lin`` takes: [N, K, 1, 1] for Conv, else W^T for one MatMul."""
        w = w.detach().to(torch.float32)
        return w[:, :, None, None].contiguous() if conv else w.t().contiguous()

    def lin(x: Any, w: Any) -> Any:
        """``x @ W^T``. As a 1x1 Conv over T "images" of K channels when ``conv``: QNN quantizes
        Conv weights per output channel but MatMul weights only per tensor, and per-tensor int8
        costs SmolLM2-135M 11 points of top-1 agreement (weights alone: 83 % vs 94 %)."""
        if not conv:
            return x @ w
        T, K = x.shape[1], x.shape[2]
        return torch.nn.functional.conv2d(x.reshape(T, K, 1, 1), w).reshape(1, T, w.shape[0])

    class _StaticLlama(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed = torch.nn.Parameter(inner.embed_tokens.weight.detach().clone(), requires_grad=False)
            self.lm_t = torch.nn.Parameter(t(hf.lm_head.weight), requires_grad=False)
            self.final_norm = torch.nn.Parameter(inner.norm.weight.detach().clone(), requires_grad=False)
            params = torch.nn.ParameterList()
            for layer in inner.layers:
                a, m = layer.self_attn, layer.mlp
                for w in (
                    layer.input_layernorm.weight.detach().clone(),
                    t(a.q_proj.weight),
                    t(a.k_proj.weight),
                    t(a.v_proj.weight),
                    t(a.o_proj.weight),
                    layer.post_attention_layernorm.weight.detach().clone(),
                    t(m.gate_proj.weight),
                    t(m.up_proj.weight),
                    t(m.down_proj.weight),
                ):
                    params.append(torch.nn.Parameter(w, requires_grad=False))
            self.layer_params = params

        def _norm(self, x: Any, w: Any) -> Any:
            # one RMSNormalization op (opset 23), not ReduceMean(x * x)...: quantized, the x * x
            # tensor's range is set by the residual stream's outliers (hundreds squared), which
            # leaves ordinary tokens' squares at zero and their norm exploding
            return torch.nn.functional.rms_norm(x, (spec.hidden_size,), w, spec.rms_eps)

        @staticmethod
        def _rope(x: Any, cos: Any, sin: Any) -> Any:
            half = spec.head_dim // 2
            swapped = torch.cat([x[..., half:], x[..., :half]], dim=-1)
            return x * cos + swapped * sin

        def forward(self, input_ids: Any, cos: Any, sin: Any, attn_bias: Any, *past: Any) -> Any:
            T, H, KV, D = input_ids.shape[1], spec.heads, spec.kv_heads, spec.head_dim
            rep = H // KV
            h = torch.nn.functional.embedding(input_ids, self.embed)
            outs_k, outs_v = [], []
            for i in range(spec.layers):
                ln1, wq, wk, wv, wo, ln2, wg, wu, wd = self.layer_params[9 * i : 9 * i + 9]
                x = self._norm(h, ln1)
                q = lin(x, wq).reshape(1, T, H, D).transpose(1, 2)
                k = lin(x, wk).reshape(1, T, KV, D).transpose(1, 2)
                v = lin(x, wv).reshape(1, T, KV, D).transpose(1, 2)
                q = self._rope(q, cos, sin) * (1.0 / math.sqrt(D))
                k = self._rope(k, cos, sin)
                if mode == "decode":
                    keys = torch.cat([past[2 * i], k], dim=2)
                    vals = torch.cat([past[2 * i + 1], v], dim=2)
                    outs_k.append(k)
                    outs_v.append(v)
                else:
                    keys, vals = k, v
                    pad = (0, 0, 0, capacity - T)
                    outs_k.append(torch.nn.functional.pad(k, pad))
                    outs_v.append(torch.nn.functional.pad(v, pad))
                S = keys.shape[2]
                scores = torch.matmul(q.reshape(1, KV, rep * T, D), keys.transpose(2, 3))
                scores = scores.reshape(1, H, T, S) + attn_bias
                probs = torch.softmax(scores, dim=-1).reshape(1, KV, rep * T, S)
                o = torch.matmul(probs, vals).reshape(1, H, T, D).transpose(1, 2).reshape(1, T, H * D)
                h = h + lin(o, wo)
                x = self._norm(h, ln2)
                gate = lin(x, wg)
                h = h + lin(gate * torch.sigmoid(gate) * lin(x, wu), wd)
            logits = lin(self._norm(h, self.final_norm), self.lm_t)
            flat = []
            for k, v in zip(outs_k, outs_v, strict=True):
                flat += [k, v]
            return (logits, *flat)

    return _StaticLlama().eval()


def io_names(spec: DecoderSpec, mode: str) -> tuple[list[str], list[str]]:
    ins = ["input_ids", "cos", "sin", "attn_bias"]
    if mode == "decode":
        for i in range(spec.layers):
            ins += [f"past_key_{i}", f"past_value_{i}"]
        kv = [n for i in range(spec.layers) for n in (f"key_{i}", f"value_{i}")]
    else:
        kv = [n for i in range(spec.layers) for n in (f"present_key_{i}", f"present_value_{i}")]
    return ins, ["logits", *kv]


def load_hf(spec: DecoderSpec) -> Any:
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
    for mode in ("prefill", "decode"):
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
    from tokenizers import Tokenizer

    return np.asarray(
        Tokenizer.from_file(str(Path(model_dir) / "tokenizer.json")).encode(text).ids, dtype=np.int64
    )


def pad_token_id(model_dir: Path) -> int:
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


def calibration_feeds(
    spec: DecoderSpec,
    fp32: dict[str, Path],
    ids: np.ndarray,
    seq_len: int,
    capacity: int,
    samples: int,
    pad_id: int,
) -> tuple[list[dict[str, np.ndarray]], list[dict[str, np.ndarray]]]:
    """Prefill feeds (full windows of calibration text) and decode feeds with a real KV cache.

    Decode feeds come from the fp32 graphs on the CPU: each window is prefilled with a prompt of
    a different length (short to full, right-padded), then two teacher-forced decode steps are
    recorded, so the decode graph is calibrated on the cache states and positions it meets.
    """
    import onnxruntime as ort

    if len(ids) < seq_len + 2:
        raise InputError(
            f"the calibration text has {len(ids)} tokens; the decoder needs at least {seq_len + 2}"
        )
    n = max(1, min(samples, (len(ids) - 2) // seq_len))
    starts = np.linspace(0, len(ids) - seq_len - 2, n).astype(int)
    host = StaticDecoder(spec, seq_len, capacity)
    prefill = [host.prefill_feeds(ids[s : s + seq_len], pad_id) for s in starts]
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    pre = ort.InferenceSession(str(fp32["prefill"]), so, providers=["CPUExecutionProvider"])
    dec = ort.InferenceSession(str(fp32["decode"]), so, providers=["CPUExecutionProvider"])
    decode = []
    for k, s in enumerate(starts):
        plen = int(np.clip(round(seq_len * (k + 1) / n), 4, seq_len))
        out = pre.run(None, host.prefill_feeds(ids[s : s + plen], pad_id))
        cache = host.cache_from_prefill(out)
        for pos in range(plen, plen + 2):
            feeds = host.decode_feeds(int(ids[s + pos]), pos, cache)
            decode.append({k2: np.array(v) for k2, v in feeds.items()})
            host.write_cache(cache, dec.run(None, feeds), pos)
    return prefill, decode


@dataclasses.dataclass(frozen=True)
class QdqConfig:
    activation_type: str = "uint16"
    weight_type: str = "int8"
    per_channel: bool = True


def quantize_graph(
    fp32: Path, out: Path, feeds: list[dict[str, np.ndarray]], cfg: QdqConfig, workdir: Path
) -> None:
    """QNN pre-processing + QDQ quantization calibrated (MinMax) on ``feeds``.

    Ranges are computed per calibration run and merged (``CalibStridedMinMax`` = 1): the augmented
    graph outputs every tensor, and keeping them for all runs of a 30-layer model would need
    gigabytes. (``CalibMaxIntermediateOutputs`` is no alternative: onnxruntime 1.24's MinMax
    calibrator drops the collected outputs without computing their ranges.)
    """
    from onnxruntime.quantization.execution_providers.qnn import qnn_preprocess_model

    from edgepipe.npu.qnn import qdq_quantize

    workdir.mkdir(parents=True, exist_ok=True)
    pre = workdir / (fp32.stem + ".pre.onnx")
    if not qnn_preprocess_model(str(fp32), str(pre)):
        pre = fp32

    # one self-contained file per graph (well under 2 GB)
    qdq_quantize(pre, out, feeds, cfg, stride=1, external_data=False)


def _session_runner(sess: Any, names: list[str]) -> Callable[[dict[str, np.ndarray]], list[np.ndarray]]:
    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return sess.run(names, feeds)

    return run


def _cpu_session(path: Path) -> Any:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def evaluate_windows(
    host: StaticDecoder,
    prefill_model: Path,
    decode_model: Path,
    windows: list[np.ndarray],
    pad_id: int,
    make_session: Callable[[Path], Any],
) -> tuple[list[np.ndarray], dict[str, float]]:
    """Teacher-forced logits for each window; prefill for all windows first, then decode, so only
    one session is alive at a time (the HTP simulator fails with two). Returns per-phase timings."""
    spec = host.spec
    pre_names, dec_names = io_names(spec, "prefill")[1], io_names(spec, "decode")[1]
    t = time.perf_counter()
    sess = make_session(prefill_model)
    t_load = time.perf_counter() - t
    t = time.perf_counter()
    firsts = [host.teacher_forced(_session_runner(sess, pre_names), None, w, pad_id) for w in windows]
    t_pre = time.perf_counter() - t
    del sess
    t = time.perf_counter()
    sess = make_session(decode_model)
    t_load += time.perf_counter() - t
    t = time.perf_counter()
    results = []
    steps = 0
    for w, (logits, cache) in zip(windows, firsts, strict=True):
        P = min(host.seq_len, len(w))
        full, _ = host.teacher_forced(
            lambda f: [], _session_runner(sess, dec_names), w, pad_id, cache=cache, prefill_logits=logits
        )
        steps += len(w) - P
        results.append(full)
    t_dec = time.perf_counter() - t
    del sess
    return results, {
        "session_load_s": t_load,
        "prefill_s_per_run": t_pre / max(1, len(windows)),
        "decode_s_per_token": t_dec / max(1, steps),
    }


def hf_logits(hf: Any, window: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return hf(input_ids=torch.from_numpy(window[None].astype(np.int64))).logits[0].float().numpy()


def verdict_reasons(
    coverage: dict[str, Any], allow_cpu_fallback: bool, acc: dict[str, Any], budgets: Any
) -> list[str]:
    """Why the artifact fails, each reason led by the budget's name; empty when it passes.

    Coverage below 100 % fails only when the profile forbids CPU fallback; the top-1 / perplexity
    budgets of the profile apply to the simulator-vs-fp32 figures.
    """
    failures = []
    for mode, cov in coverage.items():
        if not cov.whole and not allow_cpu_fallback:
            failures.append(
                f"npu_coverage_{mode}: {cov.npu_nodes}/{cov.total_nodes} nodes ({100 * cov.fraction:.1f}%) on the NPU, "
                "the profile forbids CPU fallback"
            )
    if budgets.min_top1_agreement is not None and acc["top1_agreement"] < budgets.min_top1_agreement:
        failures.append(f"min_top1_agreement: {acc['top1_agreement']:.3f} < {budgets.min_top1_agreement}")
    if budgets.max_ppl_increase_pct is not None and acc["ppl_increase_pct"] > budgets.max_ppl_increase_pct:
        failures.append(
            f"max_ppl_increase_pct: {acc['ppl_increase_pct']:.2f} > {budgets.max_ppl_increase_pct}"
        )
    return failures


def build_decoder_npu(
    model_dir: Path,
    target: Any,
    out_dir: Path,
    *,
    calib_text: str,
    eval_text: str,
    eval_windows: int = EVAL_WINDOWS,
    eval_decode_steps: int = EVAL_DECODE_STEPS,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Build the HTP artifact of a Llama-architecture causal LM into ``out_dir``; return metrics.

    Never raises for incomplete NPU coverage: the coverage of each graph goes into the metrics
    and ``verdict_reasons`` names it when the profile forbids CPU fallback, so the caller writes
    the artifact with the honest report and exits 3. Accuracy is then measured with the CPU
    fallback allowed (what such a graph would do), and the EPContext binaries are compiled only
    for graphs that run wholly on the NPU.
    """
    from edgepipe.npu import qnn

    def say(msg: str) -> None:
        log.info(msg)
        if progress is not None:
            progress(msg)

    npu = getattr(target, "npu", None)
    if npu is None:
        raise TargetError(
            f"target {getattr(target, 'name', target)!r} has no npu section; choose a snapdragon-* target"
        )
    if eval_windows < 1 or eval_decode_steps < 0:
        raise InputError("the NPU decoder evaluation needs at least one window and zero or more decode steps")
    spec = read_decoder_spec(Path(model_dir))
    seq_len, capacity = npu.seq_len, npu.context_length
    if seq_len + eval_decode_steps > capacity:
        raise InputError(
            f"npu.seq_len {seq_len} + {eval_decode_steps} decode steps exceed npu.context_length {capacity}; raise context_length"
        )
    sdk = qnn.qnn_sdk_info()
    qnn.register()  # fail early, before the slow export, when the EP cannot load
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / ".work"
    work.mkdir(exist_ok=True)
    timings: dict[str, float] = {}
    pad_id = pad_token_id(spec.model_dir)
    qcfg = QdqConfig(npu.activation_type, npu.weight_type, npu.per_channel)
    try:
        calib_ids = token_ids(spec.model_dir, calib_text)
        eval_ids = token_ids(spec.model_dir, eval_text)
        win = seq_len + eval_decode_steps
        if len(eval_ids) < win:
            raise InputError(
                f"the eval text has {len(eval_ids)} tokens; the decoder check needs at least {win}"
            )
        starts = np.linspace(0, len(eval_ids) - win, min(eval_windows, len(eval_ids) // win)).astype(int)
        windows = [eval_ids[s : s + win] for s in starts]

        t = time.perf_counter()
        say(f"exporting fp32 prefill (1x{seq_len}) and decode (1 token, KV cache {capacity}) graphs")
        hf = load_hf(spec)
        fp32 = export_static(spec, seq_len, capacity, work / "fp32", hf=hf, linear_as_conv=npu.per_channel)
        timings["export_s"] = time.perf_counter() - t

        t = time.perf_counter()
        say("sanity: fp32 static graphs vs the transformers model on the first eval window")
        host = StaticDecoder(spec, seq_len, capacity)
        ref_hf = hf_logits(hf, windows[0])
        del hf
        static0, _ = evaluate_windows(
            host, fp32["prefill"], fp32["decode"], windows[:1], pad_id, _cpu_session
        )
        sanity = compare_logits(ref_hf, static0[0], windows[0][1:].tolist() + [0])
        sanity = {
            k: sanity[k] for k in ("positions", "top1_agreement", "max_abs_logit_diff", "kl_divergence")
        }
        timings["sanity_s"] = time.perf_counter() - t

        t = time.perf_counter()
        n_cal = max(2, npu.calibration_samples // 4)
        say(
            f"calibration feeds: {n_cal} prefill windows and {2 * n_cal} decode steps of the calibration text"
        )
        cal_pre, cal_dec = calibration_feeds(spec, fp32, calib_ids, seq_len, capacity, n_cal, pad_id)
        qdq = {"prefill": out_dir / PREFILL_QDQ, "decode": out_dir / DECODE_QDQ}
        for mode, feeds in (("prefill", cal_pre), ("decode", cal_dec)):
            say(
                f"QDQ {mode}: activations {qcfg.activation_type}, weights {qcfg.weight_type}"
                f"{' per-channel where QNN allows' if qcfg.per_channel else ''}, {len(feeds)} calibration runs"
            )
            quantize_graph(fp32[mode], qdq[mode], feeds, qcfg, work / "q")
        del cal_pre, cal_dec
        timings["quantize_s"] = time.perf_counter() - t

        coverage = {}
        for mode in ("prefill", "decode"):
            t = time.perf_counter()
            say(f"op coverage of the {mode} graph on HTP v{npu.htp_arch}")
            coverage[mode] = qnn.check_coverage(qdq[mode], npu.htp_arch, npu.soc_model)
            timings[f"coverage_{mode}_s"] = time.perf_counter() - t
            say(f"{mode}: {coverage[mode].summary()}")
        whole = all(c.whole for c in coverage.values())

        binaries: dict[str, Path] = {}
        for mode, ctx_name in (("prefill", PREFILL_CTX), ("decode", DECODE_CTX)):
            if not coverage[mode].whole:
                continue  # a partial graph has no single context binary: ship its QDQ model only
            t = time.perf_counter()
            say(f"compiling the {mode} EPContext binary for HTP v{npu.htp_arch}")
            binaries[mode] = qnn.compile_context(qdq[mode], out_dir / ctx_name, npu.htp_arch, npu.soc_model)
            timings[f"compile_{mode}_s"] = time.perf_counter() - t

        t = time.perf_counter()
        say(f"reference: fp32 static graphs on the CPU, {len(windows)} eval windows x {win} tokens")
        ref, ref_t = evaluate_windows(host, fp32["prefill"], fp32["decode"], windows, pad_id, _cpu_session)
        timings["fp32_cpu_s"] = time.perf_counter() - t

        t = time.perf_counter()
        say(
            f"HTP simulator: {len(windows)} prefill runs + {len(windows) * eval_decode_steps} decode steps "
            "(simulated; says nothing about device speed)"
        )

        def htp_session(path: Path) -> Any:
            mode = "prefill" if path == qdq["prefill"] else "decode"
            model = out_dir / (PREFILL_CTX if mode == "prefill" else DECODE_CTX) if mode in binaries else path
            return qnn.create_session(
                model, npu.htp_arch, npu.soc_model, allow_cpu_fallback=not coverage[mode].whole
            )

        got, sim_t = evaluate_windows(host, qdq["prefill"], qdq["decode"], windows, pad_id, htp_session)
        timings["htp_simulator_s"] = time.perf_counter() - t

        targets = np.concatenate([w[1:] for w in windows])
        drop_last = lambda xs: np.concatenate([x[:-1] for x in xs])  # noqa: E731  (last row predicts past the window)
        acc = compare_logits(drop_last(ref), drop_last(got), targets)
        split = {}
        for phase, sl in (("prefill", slice(0, seq_len - 1)), ("decode", slice(seq_len - 1, win - 1))):
            r = np.concatenate([x[sl] for x in ref])
            if len(r):
                g = np.concatenate([x[sl] for x in got])
                tg = np.concatenate([w[1:][sl] for w in windows])
                split[phase] = {
                    k: v for k, v in compare_logits(r, g, tg).items() if k != "max_abs_logit_diff"
                }
        acc = {k: (round(v, 6) if isinstance(v, float) else v) for k, v in acc.items()}

        failures = verdict_reasons(coverage, npu.allow_cpu_fallback, acc, target.budgets)

        copied = []
        for name in TOKENIZER_FILES:
            if (spec.model_dir / name).is_file():
                shutil.copyfile(spec.model_dir / name, out_dir / name)
                copied.append(name)
        files: dict[str, Any] = {"prefill_qdq": PREFILL_QDQ, "decode_qdq": DECODE_QDQ, "tokenizer": copied}
        for mode, ctx_name in (("prefill", PREFILL_CTX), ("decode", DECODE_CTX)):
            if mode in binaries:
                files[f"{mode}_context_model"] = ctx_name
                files[f"{mode}_context_binary"] = binaries[mode].name
        pre_in, pre_out = io_names(spec, "prefill")
        dec_in, dec_out = io_names(spec, "decode")
        config = {
            "task": "causal-lm",
            "execution_provider": "QNNExecutionProvider",
            "backend": "htp",
            "htp_arch": npu.htp_arch,
            "soc_model": npu.soc_model,
            "qnn_sdk_version": sdk["qnn_sdk"],
            "onnxruntime_qnn_version": sdk["onnxruntime_qnn"],
            "seq_len": seq_len,
            "context_length": capacity,
            "pad_token_id": pad_id,
            "eos_token_ids": eos_token_ids(spec.model_dir),
            "rope_theta": spec.rope_theta,
            "head_dim": spec.head_dim,
            "layers": spec.layers,
            "kv_heads": spec.kv_heads,
            "mask_bias": MASK_BIAS,
            "sin_sign": "first half negated (rotate-half folded into sin)",
            "prefill": {"inputs": pre_in, "outputs": pre_out},
            "decode": {
                "inputs": dec_in[:4] + ["past_key_i", "past_value_i"],
                "outputs": ["logits", "key_i", "value_i"],
            },
            "quantization": dataclasses.asdict(qcfg),
            "linear_layers": "1x1 Conv (per-channel weights)" if npu.per_channel else "MatMul (per-tensor weights)",
            "files": files,
        }
        (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

        metrics: dict[str, Any] = {
            "task": "causal-lm",
            "coverage": {mode: cov.to_dict() for mode, cov in coverage.items()},
            "whole_model_on_npu": whole,
            "npu_accuracy": {**acc, "by_phase": split},
            "fp32_static_vs_transformers": {
                k: (round(v, 6) if isinstance(v, float) else v) for k, v in sanity.items()
            },
            "eval": {
                "windows": len(windows),
                "window_tokens": win,
                "prefill_positions_per_window": seq_len - 1,
                "decode_steps_per_window": eval_decode_steps,
                "scored_positions": acc["positions"],
                "protocol": "teacher-forced: the first seq_len tokens through the prefill graph, the rest "
                "one by one through the decode graph with the KV cache; every position scored",
            },
            "simulator_speed": {k: round(v, 3) for k, v in sim_t.items()},
            "fp32_cpu_speed": {k: round(v, 3) for k, v in ref_t.items()},
            "qnn_sdk_version": sdk["qnn_sdk"],
            "onnxruntime_qnn_version": sdk["onnxruntime_qnn"],
            "htp_arch": npu.htp_arch,
            "soc_model": npu.soc_model,
            "seq_len": seq_len,
            "context_length": capacity,
            "activation_type": npu.activation_type,
            "weight_type": npu.weight_type,
            "per_channel": npu.per_channel,
            "linear_layers": "1x1 Conv (per-channel weights)" if npu.per_channel else "MatMul (per-tensor weights)",
            "qdq_model_bytes": {m: p.stat().st_size for m, p in qdq.items()},
            "context_binary_bytes": {m: b.stat().st_size for m, b in binaries.items()},
            "timings_s": {k: round(v, 2) for k, v in timings.items()},
            "claims": "accuracy and NPU op coverage from the QNN HTP simulator on x86-64 against the fp32 static "
            "graphs on the CPU; simulator timings are not device throughput",
            "verdict": "fail" if failures else "pass",
            "verdict_reasons": failures,
        }
        say(
            f"top-1 agreement {acc['top1_agreement']:.3f}, perplexity {acc['reference_perplexity']:.2f} -> "
            f"{acc['perplexity']:.2f} ({acc['ppl_increase_pct']:+.2f}%) over {acc['positions']} positions: {metrics['verdict']}"
        )
        return metrics
    except EdgepipeError:
        raise
    except MemoryError as e:
        raise EdgepipeError(f"out of memory during the NPU decoder build: {e}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
