"""The CPU backend: export -> quantize -> optimize -> validate -> package, for onnxruntime's CPU EP.

Each step is a cached stage, so a build killed at any point resumes from the last complete one;
only throughput is measured afresh (it is a measurement of now, on the packaged folder).
"""

from __future__ import annotations

import errno
import time
from pathlib import Path
from typing import Any

from edgepipe.errors import InputError
from edgepipe.pipeline import BuildRequest, BuildResult
from edgepipe.runtime.kinds import ArtifactKind
from edgepipe.runtime.manifest import Manifest
from edgepipe.runtime.progress import Progress
from edgepipe.stage import StageContext

STAGES = ("export", "sensitivity", "quantize", "validate", "package")  # where :meth:`CpuBackend.run` can stop


class CpuBackend:
    def build(self, request: BuildRequest, progress: Progress) -> BuildResult:
        result = self.run(request, progress)
        assert result is not None
        return result

    def run(self, request: BuildRequest, progress: Progress, stop_after: str | None = None) -> BuildResult | None:
        """The build, or its stages up to ``stop_after`` (one of :data:`STAGES` but the last; they land in
        the stage cache and nothing else is written): how ``edgepipe matrix`` runs one stage per task."""
        from edgepipe.cache import key_of
        from edgepipe.export import inspect_model
        from edgepipe.export.inspect import check_weights
        from edgepipe.export.preflight import preflight
        from edgepipe.export.stage import ExportConfig, run_export
        from edgepipe.models import resolve_model
        from edgepipe.package import tool_versions
        from edgepipe.quantize import plan_from_onnx, scheme_from_target
        from edgepipe.quantize.allocate_stage import preflight_budget, run_allocation
        from edgepipe.quantize.stage import QuantizeConfig, run_quantize
        from edgepipe.runtime.threads import resolve_threads
        from edgepipe.texts import EVAL_WINDOWS, calib_window_count, read_text_file, token_windows
        from edgepipe.validate.accuracy import AccuracyConfig, run_accuracy
        from edgepipe.validate.sanity import check_reference

        t_start, tgt = time.time(), request.target
        calib = read_text_file(request.calib, "calib.txt", "calibration")
        evalt = read_text_file(request.eval_file, "eval.txt", "eval")
        runner = _device_runner(request)
        model = resolve_model(request.model, progress)
        pre = preflight(model.path)  # seconds, from config.json: refuse before any heavy work
        pre.raise_if_refused()
        info = inspect_model(model.path, supported={pre.architecture: pre.path})
        progress(f"model {info.architecture}, {info.num_parameters / 1e6:.0f}M parameters; export path {pre.path}: {pre.reason}")
        est = _check_fits(info, tgt, pre)
        check_weights(info)  # every tensor the config implies, of its shape: nothing for transformers to invent
        preflight_budget(info, tgt.quantization)  # an unreachable size budget: exit 2 before any export
        versions = tool_versions()
        ctx = StageContext(progress=progress, threads=resolve_threads(0, tgt.runtime.threads))
        timings: dict[str, float] = {}

        t0 = time.time()
        fp32 = run_export(info, ExportConfig.for_model(info, versions, pre), ctx)
        timings["export_s"] = round(time.time() - t0, 2)
        if stop_after == "export":
            return None

        t0 = time.time()
        tok = fp32.model_dir / "tokenizer.json"
        calib_windows = token_windows(tok, calib, calib_window_count(info.num_parameters), "calibration")
        eval_windows = token_windows(tok, evalt, EVAL_WINDOWS, "eval")
        calib_key = key_of({"t": calib.text, "windows": len(calib_windows)})  # the count depends on the model
        alloc = run_allocation(fp32, tgt.quantization, info, calib_windows, calib_key, ctx)
        if alloc is not None:  # sensitivity + allocation: what a size budget adds to the build
            timings["allocate_s"] = round(time.time() - t0, 2)
            t0 = time.time()
        if stop_after == "sensitivity":
            return None
        scheme = scheme_from_target(tgt.quantization)
        plan = alloc.plan if alloc else plan_from_onnx(fp32.model_dir / "model.onnx", scheme)
        quant = run_quantize(fp32, QuantizeConfig(fp32.key, scheme, calib_key, plan if alloc else None), calib_windows, ctx,
                             num_parameters=info.num_parameters, model_config=info.config)
        timings["quantize_s"] = round(time.time() - t0, 2)
        quant_info = {**quant.info, "matrix_formats": plan.labels(), **({"allocation": alloc.to_dict()} if alloc else {})}

        opt = _optimize(quant, tgt.runtime.kv_cache_dtype, calib_windows, calib_key, ctx)
        if stop_after == "quantize":
            return None

        t0 = time.time()
        score_from = len(eval_windows[0]) // 2
        acc = run_accuracy(fp32.model_dir, opt.model_dir, eval_windows, AccuracyConfig(
            fp32.key, opt.key, key_of({"t": evalt.text}), len(eval_windows), len(eval_windows[0]), score_from,
        ), ctx)
        timings["validate_accuracy_s"] = round(time.time() - t0, 2)
        sanity = check_reference(acc.accuracy, int(info.config["vocab_size"]), allow_random_weights=request.allow_random_weights)
        if stop_after == "validate":
            return None

        base = Manifest(
            kind=ArtifactKind.CPU_DECODER, files={}, created="", edgepipe_version=versions["edgepipe"], versions=versions,
            source_model={
                "path": str(info.path), "name": info.config.get("_name_or_path") or model.name,
                "architecture": info.architecture, "parameters": info.num_parameters, "sha256": info.sha256,
                "default_model": model.default,
            },
            target=tgt.to_dict(),
            provenance={
                "export": fp32.info, "quantization": quant_info, "optimize": opt.info,
                "eval": {
                    "source": evalt.source, "windows": len(eval_windows), "window_tokens": len(eval_windows[0]),
                    "scored_from_position": score_from,
                    "protocol": "as llama.cpp's perplexity tool: each window's second half is scored",
                },
                "calibration": {"source": calib.source, "windows": len(calib_windows)},
                "sanity": sanity,
            },
        )
        metrics = {"accuracy": acc.accuracy, "estimate": est, "measured_by": {
            "accuracy": "host CPU, quantized vs fp32 export, exact full-vocabulary KL",
            "throughput": "host CPU (not the target device): a relative figure, not the board's speed",
        }}
        return _package(request, base, metrics, opt.model_dir, acc.reference_npz, runner, ctx, timings, t_start)


def _optimize(quant: Any, kv_cache_dtype: str, calib_windows: list[Any], calib_key: str, ctx: StageContext) -> Any:
    """The optimize stage, after measuring the cache's ranges on the calibration text when its passes
    need them (an int8 cache's scales: ``edgepipe.optimize.kv_ranges``)."""
    import dataclasses

    from edgepipe.optimize.decoder import NEEDS_KV_RANGES
    from edgepipe.optimize.kv_ranges import KVRangesConfig, has_attention_cache, run_kv_ranges
    from edgepipe.optimize.stage import OptimizeConfig, passes_for, run_optimize

    passes = passes_for(kv_cache_dtype)
    if any(p in NEEDS_KV_RANGES for p in passes) and not has_attention_cache(quant.model_dir):
        ctx.progress("int8 KV cache: this graph has no GroupQueryAttention (a generic export); its cache stays float32")
        passes = {n: v for n, v in passes.items() if n not in NEEDS_KV_RANGES}
    if not any(p in NEEDS_KV_RANGES for p in passes):
        return run_optimize(quant.model_dir, OptimizeConfig(quant.key, passes), ctx)
    ranges = run_kv_ranges(quant.model_dir, calib_windows, KVRangesConfig(quant.key, calib_key), ctx)
    opt = run_optimize(quant.model_dir, OptimizeConfig(quant.key, passes, ranges.key), ctx, ranges.path)
    # the manifest's "optimize" section says where the int8 cache's scales came from
    return dataclasses.replace(opt, info={**opt.info, "kv_ranges": {"key": ranges.key, **ranges.info}})


def _device_runner(request: BuildRequest) -> Any:
    if not request.device or request.device == "local":
        return None
    from edgepipe.devices import get_runner

    return get_runner(request.device, target=request.target)


def _check_fits(info: Any, tgt: Any, pre: Any) -> dict[str, Any]:
    """Refuse up front only what cannot run (RAM). A predicted artifact-size overrun is measured and
    reported like every other budget: the artifact is built and the verdict says what failed (exit 3)."""
    from edgepipe.estimate import estimate_for

    est = estimate_for(info, tgt, pre)
    if est["peak_ram_mb"] > est["ram_budget_mb"]:
        raise InputError(
            f"{info.path.name} does not fit {tgt.name}: needs about {est['peak_ram_mb']:.0f} MB of RAM, "
            f"the budget is {est['ram_budget_mb']:.0f} MB; pick a smaller model or a larger target"
        )
    return est


def _package(
    request: BuildRequest, base: Manifest, metrics: dict[str, Any], model_dir: Path, reference_npz: Path,
    runner: Any, ctx: StageContext, timings: dict[str, float], t_start: float,
) -> BuildResult:
    """Assemble the folder, measure throughput on it (and on the device), check budgets, publish."""
    import dataclasses
    import shutil

    from edgepipe.cache import dir_size, disk_full
    from edgepipe.package import copy_files, now_utc, publish, staged, write_manifest
    from edgepipe.package.plots import FORMAT_MAP, format_map
    from edgepipe.package.report import render_report
    from edgepipe.validate import Measured, check_budgets, failed
    from edgepipe.validate.throughput import bench_subprocess

    out = request.out
    try:
        with staged(out) as staging:
            copy_files(model_dir, staging)
            shutil.copyfile(reference_npz, staging / reference_npz.name)
            size = sum((staging / n).stat().st_size for n in ("model.onnx", "model.onnx.data"))
            base = write_manifest(staging, dataclasses.replace(base, created=now_utc()))  # the bench verifies what it runs
            t0 = time.time()
            ctx.progress("measuring throughput on the host CPU")
            metrics = {"artifact_mb": round(size / 2**20, 2), "artifact_bytes": size, **metrics,
                       "throughput": bench_subprocess(staging, ctx.threads)}
            timings["validate_throughput_s"] = round(time.time() - t0, 2)
            device_tps = _validate_on_device(request, runner, staging, metrics, ctx)
            acc, thr = metrics["accuracy"], metrics["throughput"]
            checks = check_budgets(request.target, Measured(
                artifact_mb=metrics["artifact_mb"], peak_rss_mb=thr.get("peak_rss_mb"), ppl_increase_pct=acc.get("ppl_increase_pct"),
                top1_agreement=acc.get("top1_agreement"), device_decode_tok_s=device_tps, kl_divergence=acc.get("kl_divergence"),
            ))
            timings["total_s"] = round(time.time() - t_start, 2)
            names = failed(checks)
            manifest = dataclasses.replace(
                base, metrics={**metrics, "timings": timings}, budgets=tuple(checks),
                verdict="fail" if names else "pass", failed_budgets=tuple(names),
            )
            drawn = format_map(manifest.provenance.get("quantization", {}).get("matrix_formats", {}), staging / FORMAT_MAP)
            (staging / "report.md").write_text(render_report(manifest.to_dict(), (FORMAT_MAP,) if drawn else ()), encoding="utf-8")
            manifest = write_manifest(staging, manifest)
            publish(staging, out)
    except OSError as e:
        if e.errno == errno.ENOSPC:  # the previous artifact at --out is untouched
            raise disk_full("package", out.parent, dir_size(model_dir) + 2**20) from None
        raise
    ctx.progress(f"artifact written to {out} ({metrics['artifact_mb']:.1f} MB), verdict: {manifest.verdict}")
    return BuildResult(artifact=out, manifest=manifest, passed=not names, failed_budgets=names)


def _validate_on_device(request: BuildRequest, runner: Any, staging: Path, metrics: dict[str, Any], ctx: StageContext) -> float | None:
    """Run the device runner on the staged artifact; return decode tok/s when the device's speed counts."""
    if runner is None:
        return None
    ctx.progress(f"validating on device {request.device}")
    result = runner.validate(staging, max_tokens=runner.build_eval_tokens, progress=ctx.progress)
    metrics["device"] = result
    if runner.claims.on_board and result.get("throughput"):
        metrics["measured_by"]["device_throughput"] = f"measured on the device {request.device}"
        tps: float | None = result["throughput"].get("decode_tok_s")
        return tps
    return None
