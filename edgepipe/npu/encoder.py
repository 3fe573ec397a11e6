"""Sentence-embedding encoder (BERT family, sentence-transformers folder) -> HTP artifact.

Stages, each a function so that tests can run them alone:

1. :func:`read_spec` reads the folder: ``config.json``, ``tokenizer.json`` and the
   sentence-transformers ``modules.json`` / pooling config, so the ONNX graph computes the
   same embedding as ``SentenceTransformer.encode`` (mean or CLS pooling, optional L2 norm).
2. :func:`export_fp32` exports a *static* graph (batch 1, ``seq_len`` tokens) with torch.onnx:
   the HTP compiles fixed shapes only. The attention mask is turned into an additive bias of
   ``MASK_BIAS`` inside the graph instead of transformers' ``finfo.min``: the quantizer gives
   the "scores + mask" tensor one scale, and a range reaching -3.4e38 would leave no
   resolution for the scores themselves.
3. :func:`quantize_qdq` rewrites (Erf-GELU -> Gelu), runs onnxruntime's QNN pre-processing and
   QDQ quantization calibrated on real text, then stores LayerNorm weights as uint8.
4. :func:`build_npu` adds the op-coverage check, the EPContext compile and the comparison
   with fp32 on the HTP simulator, and writes the artifact files.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.errors import EdgepipeError, InputError, ModelError, TargetError
from edgepipe.runtime.encoder import encode, load_tokenizer  # noqa: F401  (the device tokenizes the same way)

log = logging.getLogger(__name__)

Progress = Callable[[str], None]

MASK_BIAS = -100.0  # exp(-100) ~ 4e-44: masked keys get no weight, and the range stays small
OPSET = 20  # Gelu is an ONNX op from opset 20 on
MODEL_QDQ = "model.qdq.onnx"
MODEL_CTX = "model_ctx.onnx"
CONFIG_FILE = "npu_config.json"
_ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "distilbert", "mpnet", "electra")


@dataclasses.dataclass(frozen=True)
class EncoderSpec:
    """What the folder says about how to compute one sentence embedding."""

    model_dir: Path
    model_type: str
    hidden_size: int
    pooling: str  # "mean" or "cls"
    normalize: bool
    max_seq_length: int
    uses_token_type_ids: bool


def read_spec(model_dir: Path) -> EncoderSpec:
    """Read ``config.json`` and the sentence-transformers modules of ``model_dir``.

    A plain HF encoder folder (no ``modules.json``) gets mean pooling and L2 normalisation,
    the sentence-transformers default for such models.
    """
    model_dir = Path(model_dir)
    cfg_path = model_dir / "config.json"
    if not cfg_path.is_file():
        raise ModelError(f"{model_dir} has no config.json; point --model at a Hugging Face model folder")
    if not (model_dir / "tokenizer.json").is_file():
        raise ModelError(f"{model_dir} has no tokenizer.json; save the tokenizer with the model (fast tokenizer)")
    try:
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot read {cfg_path}: {e}") from None
    model_type = str(cfg.get("model_type", ""))
    if model_type not in _ENCODER_TYPES:
        raise ModelError(
            f"{model_dir}: model_type {model_type!r} is not a supported encoder for the NPU path "
            f"({', '.join(_ENCODER_TYPES)})"
        )
    pooling, normalize = "mean", True
    max_len = int(cfg.get("max_position_embeddings", 512))
    modules_path = model_dir / "modules.json"
    if modules_path.is_file():
        modules = json.loads(modules_path.read_text(encoding="utf-8"))
        types = [str(m.get("type", "")) for m in modules]
        normalize = any(t.endswith(".Normalize") for t in types)
        for m in modules:
            if str(m.get("type", "")).endswith(".Pooling"):
                pcfg_path = model_dir / m.get("path", "") / "config.json"
                if pcfg_path.is_file():
                    pcfg = json.loads(pcfg_path.read_text(encoding="utf-8"))
                    modes = [k for k, v in pcfg.items() if k.startswith("pooling_mode_") and v]
                    if modes == ["pooling_mode_mean_tokens"]:
                        pooling = "mean"
                    elif modes == ["pooling_mode_cls_token"]:
                        pooling = "cls"
                    else:
                        raise ModelError(f"{pcfg_path}: pooling {modes} is not supported (mean or cls only)")
            elif not any(str(m.get("type", "")).endswith(s) for s in (".Transformer", ".Normalize")):
                raise ModelError(f"{modules_path}: module {m.get('type')} is not supported on the NPU path")
        st_cfg = model_dir / "sentence_bert_config.json"
        if st_cfg.is_file():
            max_len = int(json.loads(st_cfg.read_text(encoding="utf-8")).get("max_seq_length", max_len))
    return EncoderSpec(
        model_dir=model_dir,
        model_type=model_type,
        hidden_size=int(cfg.get("hidden_size", cfg.get("dim", 0))),
        pooling=pooling,
        normalize=normalize,
        max_seq_length=max_len,
        uses_token_type_ids=int(cfg.get("type_vocab_size", 0) or 0) > 0,
    )


def export_fp32(spec: EncoderSpec, seq_len: int, out: Path) -> Path:
    """Export the encoder + pooling + normalisation as a static-shape fp32 ONNX graph."""
    import torch
    from transformers import AutoModel

    try:
        model = AutoModel.from_pretrained(spec.model_dir, attn_implementation="eager").eval()
    except Exception as e:
        raise ModelError(f"cannot load {spec.model_dir} with transformers: {e}") from None

    class SentenceEncoder(torch.nn.Module):
        def __init__(self, inner: torch.nn.Module) -> None:
            super().__init__()
            self.inner = inner

        def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
            mask = attention_mask.to(torch.float32)
            bias = (1.0 - mask)[:, None, None, :] * MASK_BIAS  # 4D masks are used as given
            kwargs = {"input_ids": input_ids, "attention_mask": bias}
            if spec.uses_token_type_ids:
                kwargs["token_type_ids"] = torch.zeros_like(input_ids)
            hidden = self.inner(**kwargs).last_hidden_state
            if spec.pooling == "cls":
                emb = hidden[:, 0]
            else:
                summed = (hidden * mask.unsqueeze(-1)).sum(1)
                emb = summed / mask.sum(1, keepdim=True).clamp(min=1e-9)
            if spec.normalize:
                emb = torch.nn.functional.normalize(emb, p=2.0, dim=1)
            return emb

    wrapper = SentenceEncoder(model).eval()
    # distinct example tensors: the exporter merges inputs that are the same object
    ids = torch.full((1, seq_len), 5, dtype=torch.long)
    am = torch.ones((1, seq_len), dtype=torch.long)
    out.parent.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.onnx.export(
            wrapper,
            (ids, am),
            str(out),
            input_names=["input_ids", "attention_mask"],
            output_names=["sentence_embedding"],
            opset_version=OPSET,
            dynamo=True,
            verbose=False,
            external_data=False,
        )
    return out


def split_sentences(text: str, min_chars: int = 15, max_chars: int = 400) -> list[str]:
    """Plain-text sentences (whitespace-normalised), for calibration and evaluation."""
    flat = re.sub(r"\s+", " ", text)
    parts = re.split(r"(?<=[.!?])\s+(?=[\"'A-Z])", flat)
    return [p.strip() for p in parts if min_chars <= len(p.strip()) <= max_chars]


def calibration_passages(text: str, samples: int) -> list[str]:
    """``samples`` passages of 1-4 consecutive sentences: varied lengths, so that calibration
    sees short, padded inputs as well as inputs that fill the sequence."""
    sentences = split_sentences(text)
    if len(sentences) < 4:
        raise InputError("calibration text is too short: give at least a few paragraphs of real sentences")
    step = max(1, len(sentences) // samples)
    out = []
    for k in range(samples):
        n = 1 + (k % 4)
        start = (k * step) % len(sentences)
        out.append(" ".join(sentences[start : start + n]))
    return out


@dataclasses.dataclass(frozen=True)
class QdqConfig:
    """The QDQ scheme, from the target's ``npu`` section."""

    activation_type: str = "uint16"
    weight_type: str = "int8"
    per_channel: bool = True


def quantize_qdq(
    fp32: Path,
    out: Path,
    feeds: list[dict[str, np.ndarray]],
    cfg: QdqConfig,
    workdir: Path,
) -> dict[str, int]:
    """Rewrite, pre-process and QDQ-quantize ``fp32`` into ``out``; return rewrite counts."""
    import onnx
    from onnxruntime.quantization.execution_providers.qnn import qnn_preprocess_model

    from edgepipe.npu.qnn import qdq_quantize
    from edgepipe.optimize.gelu_fusion import fuse_erf_gelu
    from edgepipe.optimize.layernorm_uint8 import layernorm_weights_to_uint8

    counts = {}
    model = onnx.load(str(fp32))
    counts["erf_gelu_fused"] = fuse_erf_gelu(model)
    rewritten = workdir / "rewritten.onnx"
    onnx.save(model, str(rewritten))
    pre = workdir / "preprocessed.onnx"
    if not qnn_preprocess_model(str(rewritten), str(pre)):
        shutil.copyfile(rewritten, pre)

    qdq_quantize(pre, out, feeds, cfg)
    qmodel = onnx.load(str(out))
    counts["layernorm_uint8"] = layernorm_weights_to_uint8(qmodel)
    onnx.save(qmodel, str(out))
    return counts


def _run(sess: Any, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    return np.concatenate([sess.run(None, f)[0] for f in feeds], axis=0).astype(np.float32)


def compare_embeddings(ref: np.ndarray, got: np.ndarray) -> dict[str, Any]:
    """Cosine per sentence and nearest-neighbour (retrieval) agreement between two embedding sets.

    Retrieval: each sentence queries all the others; the top-1 neighbour under the NPU
    embeddings must be the fp32 one. ``retrieval_top5_overlap`` is the mean share of the fp32
    top-5 found in the NPU top-5.
    """
    def unit(x: np.ndarray) -> np.ndarray:
        return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)

    r, g = unit(ref.astype(np.float64)), unit(got.astype(np.float64))
    cos = np.sum(r * g, axis=1)
    n = len(r)
    metrics: dict[str, Any] = {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()), "eval_sentences": n}
    if n >= 3:
        sr, sg = r @ r.T, g @ g.T
        np.fill_diagonal(sr, -np.inf)
        np.fill_diagonal(sg, -np.inf)
        top1 = np.mean(np.argmax(sr, axis=1) == np.argmax(sg, axis=1))
        k = min(5, n - 1)
        tr, tg = np.argsort(-sr, axis=1)[:, :k], np.argsort(-sg, axis=1)[:, :k]
        overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(tr, tg, strict=False)])
        metrics["retrieval_top1_agreement"] = float(top1)
        metrics["retrieval_top5_overlap"] = float(overlap)
    return metrics


def build_npu(
    model_dir: Path,
    target: Any,
    out_dir: Path,
    *,
    calib_text: str,
    eval_sentences: list[str],
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Build an HTP artifact for a sentence-embedding encoder into ``out_dir``.

    Writes ``model.qdq.onnx`` (portable QDQ model, any HTP generation), ``model_ctx.onnx`` + its
    QNN context binary (precompiled for ``target.npu.htp_arch``), ``tokenizer.json`` and
    ``npu_config.json``; returns the metrics dict (``coverage``, ``cosine_min/mean``,
    ``retrieval_top1_agreement``, ``qnn_sdk_version``, ``htp_arch``, ``verdict``, ...).

    Raises NpuCoverageError (exit 3) when the graph does not run wholly on the NPU and the
    profile forbids CPU fallback; the verdict is "fail" (no exception) when accuracy misses
    the profile's thresholds, so the caller can still inspect the artifact.
    """
    from edgepipe.npu import qnn

    def say(msg: str) -> None:
        log.info(msg)
        if progress is not None:
            progress(msg)

    npu = getattr(target, "npu", None)
    if npu is None:
        raise TargetError(f"target {getattr(target, 'name', target)!r} has no npu section; choose a snapdragon-* target")
    if not eval_sentences or len(eval_sentences) < 3:
        raise InputError("give at least 3 evaluation sentences for the NPU accuracy check")
    sdk = qnn.qnn_sdk_info()
    qnn.register()  # fail early, before the slow export, when the EP cannot load
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = out_dir / ".work"
    work.mkdir(exist_ok=True)
    timings: dict[str, float] = {}
    try:
        spec = read_spec(Path(model_dir))
        seq_len = npu.seq_len
        if seq_len > spec.max_seq_length:
            log.warning("seq_len %d exceeds the model's max_seq_length %d", seq_len, spec.max_seq_length)
        tok = load_tokenizer(spec.model_dir, seq_len)
        calib_feeds = encode(tok, calibration_passages(calib_text, npu.calibration_samples))
        eval_feeds = encode(tok, list(eval_sentences))
        truncated = sum(int(f["attention_mask"].sum()) >= seq_len for f in eval_feeds)

        t = time.perf_counter()
        say(f"exporting fp32 encoder (static 1x{seq_len}, {spec.pooling} pooling)")
        fp32 = export_fp32(spec, seq_len, work / "fp32.onnx")
        timings["export_s"] = time.perf_counter() - t

        t = time.perf_counter()
        say(f"QDQ quantization: activations {npu.activation_type}, weights {npu.weight_type}"
            f"{' per-channel' if npu.per_channel else ''}, {len(calib_feeds)} calibration passages")
        qdq = out_dir / MODEL_QDQ
        rewrites = quantize_qdq(
            fp32, qdq, calib_feeds,
            QdqConfig(npu.activation_type, npu.weight_type, npu.per_channel), work,
        )
        timings["quantize_s"] = time.perf_counter() - t

        say(f"op coverage on HTP v{npu.htp_arch}")
        cov = qnn.check_coverage(qdq, npu.htp_arch, npu.soc_model)
        say(cov.summary())
        if not cov.whole and not npu.allow_cpu_fallback:
            raise qnn.NpuCoverageError(
                f"not wholly on the NPU: {cov.summary()}; target {target.name} forbids CPU fallback"
            )

        t = time.perf_counter()
        say(f"compiling EPContext binary for HTP v{npu.htp_arch}")
        ctx = out_dir / MODEL_CTX
        if cov.whole:
            binary = qnn.compile_context(qdq, ctx, npu.htp_arch, npu.soc_model)
        else:
            binary = None  # a partial graph has no single context: ship the QDQ model only
        timings["compile_s"] = time.perf_counter() - t

        import onnxruntime as ort

        t = time.perf_counter()
        say(f"reference: fp32 on CPU, {len(eval_feeds)} sentences")
        ref_sess = ort.InferenceSession(str(fp32), providers=["CPUExecutionProvider"])
        ref = _run(ref_sess, eval_feeds)
        timings["fp32_cpu_s"] = time.perf_counter() - t

        t = time.perf_counter()
        run_model = ctx if binary is not None else qdq
        say(f"HTP simulator: {run_model.name}, {len(eval_feeds)} sentences (simulated; no device speed)")
        sess = qnn.create_session(run_model, npu.htp_arch, npu.soc_model, allow_cpu_fallback=not cov.whole)
        got = _run(sess, eval_feeds)
        timings["htp_simulator_s"] = time.perf_counter() - t
        del sess

        acc = compare_embeddings(ref, got)
        failures = []
        if acc["cosine_min"] < npu.min_cosine:
            failures.append(f"cosine_min {acc['cosine_min']:.4f} < {npu.min_cosine}")
        agreement = acc.get("retrieval_top1_agreement", 1.0)
        if agreement < npu.min_retrieval_agreement:
            failures.append(f"retrieval_top1_agreement {agreement:.3f} < {npu.min_retrieval_agreement}")
        if not cov.whole:
            failures.append("not wholly on the NPU")

        shutil.copyfile(spec.model_dir / "tokenizer.json", out_dir / "tokenizer.json")
        files = {"qdq_model": MODEL_QDQ, "tokenizer": "tokenizer.json"}
        if binary is not None:
            files["context_model"] = MODEL_CTX
            files["context_binary"] = binary.name
        config = {
            "task": "sentence-embedding",
            "execution_provider": "QNNExecutionProvider",
            "backend": "htp",
            "htp_arch": npu.htp_arch,
            "soc_model": npu.soc_model,
            "qnn_sdk_version": sdk["qnn_sdk"],
            "onnxruntime_qnn_version": sdk["onnxruntime_qnn"],
            "inputs": {"input_ids": [1, seq_len], "attention_mask": [1, seq_len]},
            "output": {"sentence_embedding": [1, spec.hidden_size]},
            "seq_len": seq_len,
            "pooling": spec.pooling,
            "normalize": spec.normalize,
            "mask_bias": MASK_BIAS,
            "quantization": dataclasses.asdict(QdqConfig(npu.activation_type, npu.weight_type, npu.per_channel)),
            "files": files,
        }
        (out_dir / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")

        metrics: dict[str, Any] = {
            "coverage": cov.to_dict(),
            **acc,
            "eval_truncated": int(truncated),
            "qnn_sdk_version": sdk["qnn_sdk"],
            "onnxruntime_qnn_version": sdk["onnxruntime_qnn"],
            "htp_arch": npu.htp_arch,
            "soc_model": npu.soc_model,
            "seq_len": seq_len,
            "activation_type": npu.activation_type,
            "weight_type": npu.weight_type,
            "per_channel": npu.per_channel,
            "rewrites": rewrites,
            "qdq_model_bytes": qdq.stat().st_size,
            "context_binary_bytes": binary.stat().st_size if binary is not None else None,
            "timings_s": {k: round(v, 2) for k, v in timings.items()},
            "claims": "accuracy and NPU op coverage from the QNN HTP simulator on x86-64; "
            "simulator timings are not device throughput",
            "verdict": "fail" if failures else "pass",
            "verdict_reasons": failures,
        }
        say(
            f"cosine min/mean {acc['cosine_min']:.4f}/{acc['cosine_mean']:.4f}, "
            f"retrieval top-1 agreement {agreement:.3f}: {metrics['verdict']}"
        )
        return metrics
    except EdgepipeError:
        raise
    except MemoryError as e:
        raise EdgepipeError(f"out of memory during the NPU build: {e}") from None
    finally:
        shutil.rmtree(work, ignore_errors=True)
