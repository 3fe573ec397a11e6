"""The NPU encoder's stages: export -> quantize -> compile -> validate, each cached.

A sentence-embedding encoder becomes one static graph (``edgepipe.export.encoder``); its QDQ
graph is calibrated on passages of the calibration text (``edgepipe.quantize.qdq``), compiled
for the HTP (``edgepipe.npu.compile``) and scored on the simulator against the fp32 graph on the
CPU (``edgepipe.validate.npu``). Keys as the decoder's (``edgepipe.npu.decoder``).
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepipe.npu.compile import Compiled
from edgepipe.quantize.qdq import QdqConfig
from edgepipe.stage import StageContext, StageOutput, run_cached

FP32 = "model.fp32.onnx"
MODEL_QDQ = "model.qdq.onnx"
MODEL_CTX = "model_ctx.onnx"
GRAPH = "model"  # the one graph's name in coverage and budgets (npu_coverage_model)


@dataclass(frozen=True)
class ExportConfig:
    VERSION = 2  # 2: loading checked, the export cross-checked against PyTorch (recorded in the info)

    source_sha256: str
    seq_len: int
    pooling: str
    normalize: bool
    uses_token_type_ids: bool
    torch_version: str
    transformers_version: str


def run_export(spec: Any, config: ExportConfig, ctx: StageContext) -> StageOutput:
    """The fp32 encoder + pooling (+ normalisation) graph, ``model.fp32.onnx``."""
    from edgepipe.export.encoder import export_encoder

    def produce(tmp: Path) -> dict[str, Any]:
        ctx.progress(f"exporting fp32 encoder (static 1x{config.seq_len}, {config.pooling} pooling)")
        return {"crosscheck": export_encoder(spec, config.seq_len, tmp / FP32)}

    return run_cached("npu-export", config, produce, ctx)


def reference_sanity(export: StageOutput, tokenizer: Any, *, allow_random_weights: bool) -> dict[str, Any]:
    """The fp32 graph must be a sentence encoder before the NPU graph is compared with it: the
    shipped semantic-search set (``edgepipe/data/npu_eval.json``) through it on the CPU, judged by
    :func:`edgepipe.validate.sanity.check_encoder_reference`. Returns the manifest's record."""
    from edgepipe.npu.data import eval_set
    from edgepipe.runtime.encoder import encode
    from edgepipe.validate.npu import cpu_session, run_embeddings
    from edgepipe.validate.sanity import check_encoder_reference

    data = eval_set()
    sess = cpu_session(export.dir / FP32)
    queries, documents = (run_embeddings(sess, encode(tokenizer, list(data[k]))) for k in ("queries", "documents"))
    record = check_encoder_reference(queries, documents, allow_random_weights=allow_random_weights)
    return {**record, "eval_set": "edgepipe/data/npu_eval.json", "export_crosscheck": export.info.get("crosscheck")}


@dataclass(frozen=True)
class QuantizeConfig:
    VERSION = 1

    export_key: str
    qdq: QdqConfig
    calib_key: str  # hash of the calibration text
    calibration_samples: int
    onnxruntime_version: str


def run_quantize(export: StageOutput, config: QuantizeConfig, calib_text: str, tokenizer: Any, ctx: StageContext) -> StageOutput:
    """The QDQ graph (Erf-GELU fused, LayerNorm weights uint8), calibrated on passages of the text."""
    from edgepipe.quantize.qdq import calibration_passages, quantize_encoder_graph
    from edgepipe.runtime.encoder import encode

    def produce(tmp: Path) -> dict[str, Any]:
        feeds = encode(tokenizer, calibration_passages(calib_text, config.calibration_samples))
        ctx.progress(f"QDQ quantization: {config.qdq.describe()}, {len(feeds)} calibration passages")
        rewrites = quantize_encoder_graph(export.dir / FP32, tmp / MODEL_QDQ, feeds, config.qdq, tmp / "work")
        shutil.rmtree(tmp / "work", ignore_errors=True)
        return {"rewrites": rewrites}

    return run_cached("npu-quantize", config, produce, ctx)


@dataclass(frozen=True)
class ValidateConfig:
    VERSION = 1

    reference_key: str  # the fp32 graph (npu-export)
    model_key: str  # the compiled graph (npu-compile, which names the quantized one)
    eval_key: str  # hash of the eval sentences


def run_validate(
    graphs: tuple[StageOutput, StageOutput, Compiled], eval_feeds: list[dict[str, Any]], config: ValidateConfig, ctx: StageContext
) -> dict[str, Any]:
    """Embeddings of the eval sentences: fp32 on the CPU against the QDQ graph on the HTP simulator."""
    from edgepipe.validate.npu import compare_embeddings, cpu_session, run_embeddings

    export, quant, comp = graphs

    def produce(tmp: Path) -> dict[str, Any]:
        t = time.perf_counter()
        ctx.progress(f"reference: fp32 on CPU, {len(eval_feeds)} sentences")
        ref = run_embeddings(cpu_session(export.dir / FP32), eval_feeds)
        seconds = {"fp32_cpu_s": round(time.perf_counter() - t, 2)}
        t = time.perf_counter()
        ctx.progress(f"HTP simulator: {len(eval_feeds)} sentences (simulated; no device speed)")
        sess = comp.htp_session(GRAPH, quant.dir / MODEL_QDQ)
        got = run_embeddings(sess, eval_feeds)
        del sess
        seconds["htp_simulator_s"] = round(time.perf_counter() - t, 2)
        return {"accuracy": compare_embeddings(ref, got), "seconds": seconds}

    return run_cached("npu-validate", config, produce, ctx).info


def artifact_files(spec: Any, quant: StageOutput, comp: Compiled) -> tuple[list[Path], dict[str, Any]]:
    """The files an artifact ships and the ``files`` section of its ``npu_config.json``."""
    paths = [quant.dir / MODEL_QDQ, spec.model_dir / "tokenizer.json"]
    files = {"qdq_model": MODEL_QDQ, "tokenizer": "tokenizer.json"}
    if GRAPH in comp.context_models:
        paths += [comp.dir / MODEL_CTX, comp.dir / comp.binaries[GRAPH]]
        files["context_model"], files["context_binary"] = MODEL_CTX, comp.binaries[GRAPH]
    return paths, files


def npu_config(spec: Any, npu: Any, sdk: dict[str, str], files: dict[str, Any]) -> dict[str, Any]:
    """``npu_config.json``: what the device's encoder (``edgepipe.runtime.encoder``) needs."""
    from edgepipe.export.encoder import MASK_BIAS

    return {
        "task": "sentence-embedding", "execution_provider": "QNNExecutionProvider", "backend": "htp",
        "htp_arch": npu.htp_arch, "soc_model": npu.soc_model,
        "qnn_sdk_version": sdk["qnn_sdk"], "onnxruntime_qnn_version": sdk["onnxruntime_qnn"],
        "inputs": {"input_ids": [1, npu.seq_len], "attention_mask": [1, npu.seq_len]},
        "output": {"sentence_embedding": [1, spec.hidden_size]},
        "seq_len": npu.seq_len, "pooling": spec.pooling, "normalize": spec.normalize, "mask_bias": MASK_BIAS,
        "quantization": dataclasses.asdict(QdqConfig.from_npu(npu)),
        "files": files,
    }


def metrics(
    npu: Any, sdk: dict[str, str], quant: StageOutput, comp: Compiled, validated: dict[str, Any], eval_truncated: int
) -> dict[str, Any]:
    """The manifest's metrics of an NPU encoder (``report.md`` and the CLI summary read them)."""
    binary = comp.binaries.get(GRAPH)
    return {
        "coverage": comp.coverage[GRAPH],
        **validated["accuracy"],
        "eval_truncated": eval_truncated,
        "qnn_sdk_version": sdk["qnn_sdk"],
        "onnxruntime_qnn_version": sdk["onnxruntime_qnn"],
        "htp_arch": npu.htp_arch,
        "soc_model": npu.soc_model,
        "seq_len": npu.seq_len,
        "activation_type": npu.activation_type,
        "weight_type": npu.weight_type,
        "per_channel": npu.per_channel,
        "rewrites": quant.info["rewrites"],
        "qdq_model_bytes": (quant.dir / MODEL_QDQ).stat().st_size,
        "context_binary_bytes": (comp.dir / binary).stat().st_size if binary else None,
        "claims": "accuracy and NPU op coverage from the QNN HTP simulator on x86-64; "
        "simulator timings are not device throughput",
    }
