"""The NPU decoder's stages: export -> quantize -> compile -> validate, each cached.

A Llama-architecture causal LM becomes two static graphs (``edgepipe.export.static_llama``):
prefill and decode over a fixed KV cache. Each stage is keyed by what decides its output, inputs
by their keys (``edgepipe.stage``), so a build killed in QNN's graph preparation or in the
simulator resumes there: export by the model's content and the static shapes, quantize by the
export, the one :class:`~edgepipe.quantize.qdq.QdqConfig` and the calibration text, compile
(``edgepipe.npu.compile``) by the quantized graphs and the HTP, validate by the compiled graphs
and the eval windows. The backend (``edgepipe.backends.npu``) composes them and packages.
"""

from __future__ import annotations

import dataclasses
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.errors import InputError
from edgepipe.npu.compile import Compiled
from edgepipe.quantize.qdq import QdqConfig
from edgepipe.stage import StageContext, StageOutput, run_cached

QDQ_FILES = {"prefill": "prefill.qdq.onnx", "decode": "decode.qdq.onnx"}
CONTEXT_FILES = {"prefill": "prefill_ctx.onnx", "decode": "decode_ctx.onnx"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja")
# How many eval windows and decode steps the simulator scores by default: each window costs one
# prefill run (P positions) plus ``EVAL_DECODE_STEPS`` decode runs, and the HTP simulator runs the
# default model's decode step in seconds (measured: see README), so more would make a build take
# hours. Callers can ask for more.
EVAL_WINDOWS = 2
EVAL_DECODE_STEPS = 6


def fp32_graphs(export: StageOutput) -> dict[str, Path]:
    return {mode: export.dir / f"{mode}.fp32.onnx" for mode in QDQ_FILES}


def qdq_graphs(quant: StageOutput) -> dict[str, Path]:
    return {mode: quant.dir / name for mode, name in QDQ_FILES.items()}


def eval_windows(eval_ids: np.ndarray, seq_len: int, decode_steps: int, count: int) -> list[np.ndarray]:
    """Up to ``count`` windows of ``seq_len + decode_steps`` tokens spread over the eval text."""
    if count < 1 or decode_steps < 0:
        raise InputError("the NPU decoder evaluation needs at least one window and zero or more decode steps")
    win = seq_len + decode_steps
    if len(eval_ids) < win:
        raise InputError(f"the eval text has {len(eval_ids)} tokens; the decoder check needs at least {win}")
    starts = np.linspace(0, len(eval_ids) - win, min(count, len(eval_ids) // win)).astype(int)
    return [eval_ids[s : s + win] for s in starts]


@dataclass(frozen=True)
class ExportConfig:
    VERSION = 1

    source_sha256: str
    seq_len: int
    context_length: int
    linear_as_conv: bool
    torch_version: str
    transformers_version: str


def run_export(spec: Any, config: ExportConfig, ctx: StageContext, *, num_parameters: int) -> StageOutput:
    """The fp32 prefill and decode graphs (``prefill.fp32.onnx`` / ``decode.fp32.onnx``)."""
    from edgepipe.export.static_llama import export_static

    def produce(tmp: Path) -> None:
        ctx.progress(
            f"exporting fp32 prefill (1x{config.seq_len}) and decode (1 token, KV cache {config.context_length}) graphs"
        )
        export_static(spec, config.seq_len, config.context_length, tmp, linear_as_conv=config.linear_as_conv)

    # each graph carries every weight in fp32; torch holds the model and the traced copy
    return run_cached(
        "npu-export", config, produce, ctx, need_bytes=int(num_parameters * 8 * 1.1), need_ram_bytes=int(num_parameters * 12)
    )


@dataclass(frozen=True)
class QuantizeConfig:
    VERSION = 1

    export_key: str
    qdq: QdqConfig
    calib_key: str  # hash of the calibration text
    calibration_windows: int
    onnxruntime_version: str


def run_quantize(
    host: Any, export: StageOutput, config: QuantizeConfig, calib_ids: np.ndarray, pad_id: int, ctx: StageContext
) -> StageOutput:
    """Both graphs QDQ-quantized, calibrated on prefill windows and decode steps of the calibration text."""
    from edgepipe.quantize.qdq import decoder_calibration_feeds, quantize_decoder_graph

    def produce(tmp: Path) -> dict[str, Any]:
        n = config.calibration_windows
        ctx.progress(f"calibration feeds: {n} prefill windows and {2 * n} decode steps of the calibration text")
        fp32 = fp32_graphs(export)
        feeds = dict(zip(QDQ_FILES, decoder_calibration_feeds(host, fp32, calib_ids, n, pad_id), strict=True))
        for mode, name in QDQ_FILES.items():
            ctx.progress(f"QDQ {mode}: {config.qdq.describe()}, {len(feeds[mode])} calibration runs")
            quantize_decoder_graph(fp32[mode], tmp / name, feeds[mode], config.qdq, tmp / "work")
        shutil.rmtree(tmp / "work", ignore_errors=True)
        return {"calibration_runs": {mode: len(f) for mode, f in feeds.items()}}

    return run_cached("npu-quantize", config, produce, ctx)


@dataclass(frozen=True)
class ValidateConfig:
    VERSION = 1

    reference_key: str  # the fp32 graphs (npu-export)
    model_key: str  # the compiled graphs (npu-compile, which names the quantized ones)
    eval_key: str  # hash of the eval text
    windows: int
    decode_steps: int


def run_validate(
    spec: Any, host: Any, graphs: tuple[StageOutput, StageOutput, Compiled], windows: list[np.ndarray], pad_id: int,
    config: ValidateConfig, ctx: StageContext,
) -> dict[str, Any]:
    """The fp32 graphs on the CPU (checked against transformers on the first window), then the
    quantized graphs on the HTP simulator, every position of every window compared."""
    from edgepipe.export.static_llama import hf_logits, load_hf
    from edgepipe.validate.npu import cpu_session, evaluate_windows, sanity_figures, score_decoder

    export, quant, comp = graphs
    fp32, qdq = fp32_graphs(export), qdq_graphs(quant)

    def htp_session(path: Path) -> Any:
        return comp.htp_session("prefill" if path == qdq["prefill"] else "decode", path)

    def produce(tmp: Path) -> dict[str, Any]:
        t = time.perf_counter()
        ctx.progress(f"reference: fp32 static graphs on the CPU, {len(windows)} eval windows x {len(windows[0])} tokens")
        ref, ref_t = evaluate_windows(host, fp32["prefill"], fp32["decode"], windows, pad_id, cpu_session)
        ctx.progress("sanity: fp32 static graphs vs the transformers model on the first eval window")
        sanity = sanity_figures(hf_logits(load_hf(spec), windows[0]), ref[0], windows[0])
        seconds = {"fp32_cpu_s": round(time.perf_counter() - t, 2)}
        t = time.perf_counter()
        ctx.progress(
            f"HTP simulator: {len(windows)} prefill runs + {len(windows) * config.decode_steps} decode steps "
            "(simulated; says nothing about device speed)"
        )
        got, sim_t = evaluate_windows(host, qdq["prefill"], qdq["decode"], windows, pad_id, htp_session)
        seconds["htp_simulator_s"] = round(time.perf_counter() - t, 2)
        return {
            "npu_accuracy": score_decoder(ref, got, windows, host.seq_len),
            "fp32_static_vs_transformers": sanity,
            "simulator_speed": {k: round(v, 3) for k, v in sim_t.items()},
            "fp32_cpu_speed": {k: round(v, 3) for k, v in ref_t.items()},
            "seconds": seconds,
        }

    return run_cached("npu-validate", config, produce, ctx).info


def linear_layers(per_channel: bool) -> str:
    return "1x1 Conv (per-channel weights)" if per_channel else "MatMul (per-tensor weights)"


def artifact_files(spec: Any, quant: StageOutput, comp: Compiled) -> tuple[list[Path], dict[str, Any]]:
    """The files an artifact ships (QDQ graphs, context models and binaries, tokenizer) and the
    ``files`` section of its ``npu_config.json``."""
    paths = [quant.dir / name for name in QDQ_FILES.values()]
    files: dict[str, Any] = {f"{mode}_qdq": name for mode, name in QDQ_FILES.items()}
    for mode, name in comp.context_models.items():
        paths += [comp.dir / name, comp.dir / comp.binaries[mode]]
        files[f"{mode}_context_model"], files[f"{mode}_context_binary"] = name, comp.binaries[mode]
    tokenizer = [spec.model_dir / n for n in TOKENIZER_FILES if (spec.model_dir / n).is_file()]
    files["tokenizer"] = [p.name for p in tokenizer]
    return paths + tokenizer, files


def npu_config(spec: Any, npu: Any, sdk: dict[str, str], files: dict[str, Any]) -> dict[str, Any]:
    """``npu_config.json``: what the device's host loop (``edgepipe.runtime.static_lm``) needs."""
    from edgepipe.export.static_llama import eos_token_ids, io_names, pad_token_id
    from edgepipe.runtime.static_lm import MASK_BIAS

    pre_in, pre_out = io_names(spec, "prefill")
    dec_in = io_names(spec, "decode")[0]
    return {
        "task": "causal-lm", "execution_provider": "QNNExecutionProvider", "backend": "htp",
        "htp_arch": npu.htp_arch, "soc_model": npu.soc_model,
        "qnn_sdk_version": sdk["qnn_sdk"], "onnxruntime_qnn_version": sdk["onnxruntime_qnn"],
        "seq_len": npu.seq_len, "context_length": npu.context_length,
        "pad_token_id": pad_token_id(spec.model_dir), "eos_token_ids": eos_token_ids(spec.model_dir),
        "rope_theta": spec.rope_theta, "head_dim": spec.head_dim, "layers": spec.layers, "kv_heads": spec.kv_heads,
        "mask_bias": MASK_BIAS, "sin_sign": "first half negated (rotate-half folded into sin)",
        "prefill": {"inputs": pre_in, "outputs": pre_out},
        "decode": {"inputs": dec_in[:4] + ["past_key_i", "past_value_i"], "outputs": ["logits", "key_i", "value_i"]},
        "quantization": dataclasses.asdict(QdqConfig.from_npu(npu)),
        "linear_layers": linear_layers(npu.per_channel),
        "files": files,
    }


def metrics(
    npu: Any, sdk: dict[str, str], quant: StageOutput, comp: Compiled, validated: dict[str, Any], windows: list[np.ndarray]
) -> dict[str, Any]:
    """The manifest's metrics of an NPU decoder (``report.md`` and the CLI summary read them)."""
    acc = validated["npu_accuracy"]
    decode_steps = len(windows[0]) - npu.seq_len
    return {
        "task": "causal-lm",
        "coverage": comp.coverage,
        "whole_model_on_npu": comp.whole,
        "npu_accuracy": acc,
        "fp32_static_vs_transformers": validated["fp32_static_vs_transformers"],
        "eval": {
            "windows": len(windows),
            "window_tokens": len(windows[0]),
            "prefill_positions_per_window": npu.seq_len - 1,
            "decode_steps_per_window": decode_steps,
            "scored_positions": acc["positions"],
            "protocol": "teacher-forced: the first seq_len tokens through the prefill graph, the rest "
            "one by one through the decode graph with the KV cache; every position scored",
        },
        "simulator_speed": validated["simulator_speed"],
        "fp32_cpu_speed": validated["fp32_cpu_speed"],
        "qnn_sdk_version": sdk["qnn_sdk"],
        "onnxruntime_qnn_version": sdk["onnxruntime_qnn"],
        "htp_arch": npu.htp_arch,
        "soc_model": npu.soc_model,
        "seq_len": npu.seq_len,
        "context_length": npu.context_length,
        "activation_type": npu.activation_type,
        "weight_type": npu.weight_type,
        "per_channel": npu.per_channel,
        "linear_layers": linear_layers(npu.per_channel),
        "qdq_model_bytes": {m: p.stat().st_size for m, p in qdq_graphs(quant).items()},
        "context_binary_bytes": {m: (comp.dir / b).stat().st_size for m, b in comp.binaries.items()},
        "claims": "accuracy and NPU op coverage from the QNN HTP simulator on x86-64 against the fp32 static "
        "graphs on the CPU; simulator timings are not device throughput",
    }
