"""``edgepipe.build``: export -> quantize -> validate -> package, as the target profile says.

Each stage is a small unit with a typed config in and a folder out, cached by a hash of its
inputs (see :mod:`edgepipe.cache`). Nothing is printed here: progress goes to a callback.
"""

from __future__ import annotations

import errno
import json
import logging
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata, resources
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.errors import InputError, StageError
from edgepipe.targets import Target, load_target

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]
EVAL_WINDOW = 512
EVAL_WINDOWS = 16  # the packaged eval text has 13 windows of 512 tokens
CALIB_WINDOWS = 8
MIN_EVAL_TOKENS = 64
QEMU_EVAL_TOKENS = 128


@dataclass(frozen=True)
class BuildResult:
    artifact: Path
    manifest: dict[str, Any]
    passed: bool
    failed_budgets: list[str] = field(default_factory=list)


def _versions() -> dict[str, str]:
    out = {}
    for pkg in ("edgepipe", "onnxruntime", "onnxruntime-genai", "onnx", "transformers", "torch", "numpy", "tokenizers"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "absent"
    return out


def read_text_file(path: Path | None, default: str, what: str) -> tuple[str, str]:
    """Read a calibration / evaluation text; the packaged one when ``path`` is None."""
    if path is None:
        return resources.files("edgepipe.data").joinpath(default).read_text(encoding="utf-8"), f"edgepipe/data/{default}"
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{what} file {path} does not exist; pass an existing UTF-8 text file") from None
    except IsADirectoryError:
        raise InputError(f"{what} file {path} is a folder; pass a UTF-8 text file") from None
    except UnicodeDecodeError:
        raise InputError(f"{what} file {path} is not UTF-8 text; convert it (e.g. iconv -t utf-8)") from None
    except OSError as e:
        raise InputError(f"cannot read {what} file {path}: {e.strerror}; check its permissions") from None
    if not text.strip():
        raise InputError(f"{what} file {path} is empty; pass a file with real text")
    return text, str(path)


def _windows(tokenizer_path: Path, text: str, n: int, what: str, source: str) -> list[np.ndarray]:
    from tokenizers import Tokenizer

    from edgepipe.runtime.evaluate import windows_from_ids

    ids = Tokenizer.from_file(str(tokenizer_path)).encode(text).ids
    if len(ids) < MIN_EVAL_TOKENS:
        raise InputError(f"{what} text {source} has {len(ids)} tokens; it needs at least {MIN_EVAL_TOKENS}")
    window = min(EVAL_WINDOW, len(ids))
    return windows_from_ids(ids, window, n)


def _budget_checks(target: Target, metrics: dict[str, Any], device_throughput: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Check every budget; decode speed only counts when measured on the reference device."""
    b = target.budgets
    acc, thr = metrics.get("accuracy", {}), metrics.get("throughput", {})
    rows = [
        ("max_artifact_mb", b.max_artifact_mb, metrics.get("artifact_mb"), "<="),
        ("max_ram_mb", b.max_ram_mb, thr.get("peak_rss_mb"), "<="),
        ("max_ppl_increase_pct", b.max_ppl_increase_pct, acc.get("ppl_increase_pct"), "<="),
        ("min_top1_agreement", b.min_top1_agreement, acc.get("top1_agreement"), ">="),
        ("min_decode_tok_s", b.min_decode_tok_s, (device_throughput or {}).get("decode_tok_s"), ">="),
    ]
    checks = []
    for name, limit, value, op in rows:
        if limit is None:
            continue
        if value is None:
            note = "not measured on the reference device" if name == "min_decode_tok_s" else "not measured"
            checks.append({"budget": name, "limit": limit, "value": None, "status": "unchecked", "note": note})
            continue
        ok = value <= limit if op == "<=" else value >= limit
        checks.append({"budget": name, "limit": limit, "value": round(float(value), 4), "status": "pass" if ok else "fail"})
    return checks


def _hessian_bytes(config: dict[str, Any]) -> int:
    """Disk that GPTQ's float32 Hessians take while quantizing: one per distinct MatMul input.

    Per layer: the attention input, the attention output and the MLP input (hidden x hidden
    each) and the MLP's inner activation (intermediate x intermediate).
    """
    hidden = int(config.get("hidden_size") or 0)
    inter = int(config.get("intermediate_size") or 4 * hidden)
    layers = int(config.get("num_hidden_layers") or 0)
    return layers * (3 * hidden * hidden + inter * inter) * 4


def host_threads(tgt: Target) -> int:
    """The target's thread count, capped to this host's cores (0 = one per core)."""
    import os

    return tgt.runtime.threads if 0 < tgt.runtime.threads <= (os.cpu_count() or 1) else 0


def _bench_subprocess(artifact: Path, threads: int) -> dict[str, Any]:
    """Throughput and peak RSS in a fresh process, so the build's own memory does not count."""
    cmd = [sys.executable, "-m", "edgepipe.runtime", "bench", str(artifact), "--json", "--threads", str(threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise StageError(f"validate: the benchmark process failed: {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _build_npu(
    tgt: Target,
    out: Path,
    *,
    model: Path | str | None,
    calib: Path | str | None,
    eval_file: Path | str | None = None,
    device: str | None,
    say: Progress,
) -> BuildResult:
    """The Hexagon NPU path: QDQ + EPContext binaries, validated on the HTP simulator.

    The model's ``config.json`` decides the kind: a ``...ForCausalLM`` (and the default model,
    when there is no ``--model``) takes the decoder path (prefill + decode graphs), anything else
    the sentence-embedding encoder path.
    """
    from edgepipe.npu.decoder import is_causal_lm
    from edgepipe.package import publish, staging_dir, write_manifest

    if device and device != "local":
        raise InputError(f"--device {device} is not available for NPU targets; they are validated on the HTP simulator")
    default_model = model is None
    if model is None:
        from edgepipe.models import DEFAULT_MODEL_NAME, default_model_dir

        model_dir = default_model_dir(say)
        model_name = DEFAULT_MODEL_NAME
    else:
        model_dir = Path(model)
        model_name = model_dir.name
    decoder = is_causal_lm(model_dir)
    versions = _versions()
    staging = staging_dir(out)
    try:
        if decoder:
            from edgepipe.npu.decoder import build_decoder_npu

            calib_text, calib_src = read_text_file(Path(calib) if calib else None, "calib.txt", "calibration")
            eval_text, eval_src = read_text_file(Path(eval_file) if eval_file else None, "eval.txt", "eval")
            metrics = build_decoder_npu(model_dir, tgt, staging, calib_text=calib_text, eval_text=eval_text, progress=say)
            metrics["eval"]["source"], metrics["calibration_source"] = eval_src, calib_src
        else:
            from edgepipe.npu import build_npu
            from edgepipe.npu.data import default_calib_text, default_eval_sentences

            calib_text = read_text_file(Path(calib), "", "calibration")[0] if calib else default_calib_text()
            metrics = build_npu(model_dir, tgt, staging, calib_text=calib_text, eval_sentences=default_eval_sentences(), progress=say)
        failed = list(metrics.get("verdict_reasons") or []) if metrics.get("verdict") != "pass" else []
        manifest = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "edgepipe_version": versions["edgepipe"],
            "versions": versions,
            "source_model": {
                "path": str(model_dir.absolute()),
                "name": model_name,
                "kind": "decoder" if decoder else "encoder",
                "default_model": default_model,
            },
            "target": tgt.to_dict(),
            "metrics": metrics,
            "verdict": "pass" if not failed else "fail",
            "failed_budgets": failed,
            "budgets": [],
        }
        if decoder:
            from edgepipe.npu.report import decoder_report

            text = decoder_report(model_name, tgt.name, tgt.npu.htp_arch, metrics, failed)
        else:
            lines = [f"# {model_name} for {tgt.name} (Hexagon HTP v{tgt.npu.htp_arch})", "", f"**Verdict: {manifest['verdict'].upper()}**", ""]
            lines += [f"- {k}: {v}" for k, v in metrics.items() if not isinstance(v, (dict, list))]
            cov = metrics.get("coverage") or {}
            lines += ["", f"NPU coverage: {cov}", "", "Simulator timings say nothing about a phone's speed.", ""]
            text = "\n".join(lines)
        (staging / "report.md").write_text(text, encoding="utf-8")
        manifest = write_manifest(staging, manifest)
        publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return BuildResult(artifact=out, manifest=manifest, passed=not failed, failed_budgets=failed)


def build(
    *,
    target: str | Target,
    out: Path | str,
    model: Path | str | None = None,
    calib: Path | str | None = None,
    eval_file: Path | str | None = None,
    device: str | None = None,
    progress: Progress | None = None,
) -> BuildResult:
    """Build a verified artifact for ``target`` into ``out``. Raises EdgepipeError on bad input."""
    from edgepipe.cache import cached_stage, dir_size, key_of
    from edgepipe.export import export_fp32, inspect_model
    from edgepipe.export.segmented import reference_logits
    from edgepipe.models import DEFAULT_MODEL_NAME, default_model_dir
    from edgepipe.package import check_out_dir, copy_model, publish, staging_dir, write_manifest
    from edgepipe.quantize import plan_from_onnx, quantize, scheme_from_target
    from edgepipe.quantize.calibrate import collect_importance
    from edgepipe.report import render_report
    from edgepipe.runtime.evaluate import reference_arrays, score
    from edgepipe.runtime.model import CausalLM

    say = progress or (lambda msg: None)
    t_start = time.time()
    tgt = target if isinstance(target, Target) else load_target(target)
    out = Path(out).absolute()
    check_out_dir(out)
    if tgt.npu is not None:
        return _build_npu(tgt, out, model=model, calib=calib, eval_file=eval_file, device=device, say=say)
    calib_text, calib_src = read_text_file(Path(calib) if calib else None, "calib.txt", "calibration")
    eval_text, eval_src = read_text_file(Path(eval_file) if eval_file else None, "eval.txt", "eval")
    runner = None
    if device and device != "local":
        from edgepipe.devices import get_runner

        runner = get_runner(device, target=tgt)

    model_dir = Path(model) if model else default_model_dir(say)
    info = inspect_model(model_dir)
    say(f"model {info.architecture}, {info.num_parameters / 1e6:.0f}M parameters")
    from edgepipe.estimate import estimate_for

    est = estimate_for(info, tgt)
    # Refuse up front only what cannot run (RAM). A predicted artifact-size overrun is measured and
    # reported like every other budget: the artifact is built and the verdict says what failed (exit 3).
    if est["peak_ram_mb"] > est["ram_budget_mb"]:
        raise InputError(
            f"{info.path.name} does not fit {tgt.name}: needs about {est['peak_ram_mb']:.0f} MB of RAM, "
            f"the budget is {est['ram_budget_mb']:.0f} MB; pick a smaller model or a larger target"
        )
    versions = _versions()
    timings: dict[str, float] = {}

    # 1. export (fp32 base: the reference for calibration and accuracy)
    t0 = time.time()
    export_key = {"source": info.sha256, "genai": versions["onnxruntime-genai"], "transformers": versions["transformers"], "v": 1}

    def do_export(tmp: Path) -> None:
        export_fp32(info.path, tmp / "model", cache_dir=tmp / "hf-cache", log_file=tmp / "export.log", progress=say)
        shutil.rmtree(tmp / "hf-cache", ignore_errors=True)

    fp32_dir, _ = cached_stage(
        "export",
        export_key,
        do_export,
        need_bytes=int(info.num_parameters * 4 * 1.1),
        # the builder holds the checkpoint in its own dtype and casts one tensor at a time
        # (measured: Granite-2B bf16, 5.07 GB of safetensors -> 6.3 GB peak)
        need_ram_bytes=int(info.num_parameters * 2 * 1.3),
        progress=say,
    )
    fp32_model = fp32_dir / "model"
    timings["export_s"] = round(time.time() - t0, 2)

    # 2. quantize (calibrated, as the target says)
    t0 = time.time()
    qcfg = scheme_from_target(tgt.quantization)
    tok_path = fp32_model / "tokenizer.json"
    calib_windows = _windows(tok_path, calib_text, CALIB_WINDOWS, "calibration", calib_src)
    eval_windows = _windows(tok_path, eval_text, EVAL_WINDOWS, "eval", eval_src)
    threads = host_threads(tgt)

    def do_quantize(tmp: Path) -> dict[str, Any]:
        importance = None
        if qcfg.needs_calibration:
            say("calibrating: activation statistics on the calibration text")
            # Hessians go to disk and come back one at a time: 12 GB of them for a 2.5B model
            importance = collect_importance(
                fp32_model, calib_windows, threads=threads, hessians=plan_from_onnx(fp32_model / "model.onnx", qcfg).hessian_weights(),
                store=tmp / "hessians", progress=say,
            )
        try:
            return quantize(fp32_model, tmp / "model", qcfg, importance=importance, progress=say)
        finally:
            del importance
            shutil.rmtree(tmp / "hessians", ignore_errors=True)

    # v3: Hessians accumulated in float32, piece by piece (edgepipe.export.segmented)
    # v5: the scale search in torch (float64 error expansion: rare ties resolve differently)
    quant_key = {"export": key_of(export_key), "q": qcfg.to_dict(), "calib": key_of({"t": calib_text}), "v": 5}
    hessian_bytes = _hessian_bytes(info.config) if qcfg.needs_hessian else 0
    q_dir, q_info = cached_stage("quantize", quant_key, do_quantize, need_bytes=int(info.num_parameters * 1.5) + hessian_bytes,
                                 need_ram_bytes=int(info.num_parameters * 1.2) + (3 << 30), progress=say)
    q_model = q_dir / "model"
    timings["quantize_s"] = round(time.time() - t0, 2)

    # 2b. optimize: graph-only passes (edgepipe.optimize) on the quantized decoder (the weights are
    # copied unread). The fp32 export stays as exported: it is the reference.
    from edgepipe.optimize import PASSES, optimize_dir

    opt_key = {"quantize": key_of(quant_key), "passes": PASSES}
    o_dir, o_info = cached_stage("optimize", opt_key, lambda tmp: optimize_dir(q_model, tmp / "model"), progress=say)
    q_model = o_dir / "model"

    # 3. validate accuracy on the host: quantized vs fp32 on text that is not the calibration text
    t0 = time.time()
    say(f"validating accuracy on {len(eval_windows)} windows of {len(eval_windows[0])} tokens")
    # the fp32 reference runs a few layers at a time, so it never needs its whole size in RAM
    ref_logits = reference_logits(fp32_model, eval_windows, threads=threads, progress=say)
    q_lm = CausalLM(q_model, threads=threads)
    it = iter(ref_logits)
    acc = score(q_lm.logits, eval_windows, reference_fn=lambda w: next(it), score_from=len(eval_windows[0]) // 2)
    del q_lm
    accuracy = acc.result()
    ref_iter = iter(ref_logits)  # reference_arrays asks for the windows in the order they were scored
    reference = reference_arrays(lambda w: next(ref_iter), eval_windows, acc.top1)
    del ref_logits
    timings["validate_accuracy_s"] = round(time.time() - t0, 2)

    # 4. package into a staging folder, measure speed on it, then publish
    staging = staging_dir(out)
    try:
        copy_model(q_model, staging)
        np.savez_compressed(staging / "reference.npz", **reference)
        artifact_bytes = sum((staging / n).stat().st_size for n in ("model.onnx", "model.onnx.data"))
        base_manifest: dict[str, Any] = {
            "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "edgepipe_version": versions["edgepipe"],
            "versions": versions,
            "source_model": {
                "path": str(info.path),
                "name": info.config.get("_name_or_path") or (DEFAULT_MODEL_NAME if model is None else info.path.name),
                "architecture": info.architecture,
                "parameters": info.num_parameters,
                "sha256": info.sha256,
                "default_model": model is None,
            },
            "target": tgt.to_dict(),
            "quantization": q_info,
            "optimize": o_info,
            "eval": {
                "source": eval_src,
                "windows": len(eval_windows),
                "window_tokens": len(eval_windows[0]),
                "scored_from_position": len(eval_windows[0]) // 2,
                "protocol": "as llama.cpp's perplexity tool: each window's second half is scored",
            },
            "calibration": {"source": calib_src, "windows": len(calib_windows)},
        }
        write_manifest(staging, base_manifest)  # so the device-side code can verify what it runs
        t0 = time.time()
        say("measuring throughput on the host CPU")
        throughput = _bench_subprocess(staging, threads)
        timings["validate_throughput_s"] = round(time.time() - t0, 2)
        metrics: dict[str, Any] = {
            "artifact_mb": round(artifact_bytes / 2**20, 2),
            "artifact_bytes": artifact_bytes,
            "accuracy": {k: (round(v, 6) if isinstance(v, float) else v) for k, v in accuracy.items()},
            "throughput": throughput,
            "measured_by": {
                "accuracy": "host CPU, quantized vs fp32 export, exact full-vocabulary KL",
                "throughput": "host CPU (not the target device): a relative figure, not the board's speed",
            },
            "estimate": est,
        }
        device_throughput = None
        if runner is not None:
            say(f"validating on device {device}")
            # emulated kernels run 200-1000x slower than native: score a short prefix there
            limit = QEMU_EVAL_TOKENS if getattr(runner, "name", "") == "qemu" else None
            device_result = runner.validate(staging, max_tokens=limit, progress=say)
            metrics["device"] = device_result
            if device_result.get("runner") == "ssh" and device_result.get("throughput"):
                device_throughput = device_result["throughput"]
                metrics["measured_by"]["device_throughput"] = f"measured on the device {device}"
        checks = _budget_checks(tgt, metrics, device_throughput)
        failed = [c["budget"] for c in checks if c["status"] == "fail"]
        timings["total_s"] = round(time.time() - t_start, 2)
        metrics["timings"] = timings
        manifest = dict(base_manifest, metrics=metrics, budgets=checks, verdict="pass" if not failed else "fail", failed_budgets=failed)
        (staging / "report.md").write_text(render_report(manifest), encoding="utf-8")
        manifest = write_manifest(staging, manifest)
        publish(staging, out)
    except BaseException as e:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:  # the previous artifact at --out is untouched
            from edgepipe.cache import disk_full

            raise disk_full("package", out.parent, dir_size(q_model) + 2**20) from None
        raise
    say(f"artifact written to {out} ({metrics['artifact_mb']:.1f} MB), verdict: {manifest['verdict']}")
    return BuildResult(artifact=out, manifest=manifest, passed=not failed, failed_budgets=failed)
