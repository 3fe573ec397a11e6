"""The NPU backend: export -> quantize (QDQ) -> compile (EPContext) -> validate (HTP simulator) -> package.

The model's ``config.json`` decides what is built: a ``...ForCausalLM`` (and the default model,
when there is no ``--model``) becomes a decoder (static prefill + decode graphs over a KV cache),
anything else a sentence-embedding encoder (one static graph). Each step is a cached stage
(``edgepipe.npu.decoder`` / ``edgepipe.npu.encoder`` / ``edgepipe.npu.compile``), so a build
killed at minute 90 of 100 resumes in the stage it was in. Budgets are checked by the one checker
(``edgepipe.validate.check_budgets``): coverage per graph when the profile forbids CPU fallback,
accuracy on the simulator, artifact size; RAM stays unchecked (no device process ran).
"""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepipe.errors import InputError, NpuCoverageError, TargetError
from edgepipe.models import ModelSource
from edgepipe.pipeline import BuildRequest, BuildResult
from edgepipe.runtime.kinds import NPU_CONFIG, ArtifactKind
from edgepipe.runtime.manifest import Manifest
from edgepipe.runtime.progress import Progress, silent
from edgepipe.targets import Target
from edgepipe.texts import Text
from edgepipe.validate import Measured

log = logging.getLogger(__name__)

NO_DEVICE_RAM = "the HTP simulator runs no device process; peak RAM is measured on a phone"
NO_TOKENS = "an encoder predicts no tokens"


class NpuBackend:
    def build(self, request: BuildRequest, progress: Progress) -> BuildResult:
        from edgepipe.export.static_llama import is_causal_lm
        from edgepipe.models import resolve_model
        from edgepipe.texts import read_text_file, split_sentences

        if request.device and request.device != "local":
            raise InputError(f"--device {request.device} is not available for NPU targets; they are validated on the HTP simulator")
        model = resolve_model(request.model, progress)
        if is_causal_lm(model.path):
            calib = read_text_file(request.calib, "calib.txt", "calibration")
            evalt = read_text_file(request.eval_file, "eval.txt", "eval")
            return build_decoder(model, request.target, request.out, calib=calib, evalt=evalt, progress=progress,
                                 allow_random_weights=request.allow_random_weights)
        calib = read_text_file(request.calib, "npu_calib.txt", "calibration")
        if request.eval_file is None:
            from edgepipe.npu.data import default_eval_sentences

            sentences, source = default_eval_sentences(), "edgepipe/data/npu_eval.json"
        else:
            evalt = read_text_file(request.eval_file, "", "eval")
            sentences, source = split_sentences(evalt.text), evalt.source
        return build_encoder(model, request.target, request.out, calib=calib, eval_sentences=sentences, eval_source=source, progress=progress,
                             allow_random_weights=request.allow_random_weights)


def build_decoder(
    model: ModelSource | Path, target: Target, out: Path, *, calib: Text, evalt: Text, progress: Progress = silent,
    eval_windows: int | None = None, eval_decode_steps: int | None = None, allow_random_weights: bool = False,
) -> BuildResult:
    """The NPU decoder pipeline of a Llama-architecture causal LM, into the artifact ``out``."""
    from edgepipe.cache import key_of
    from edgepipe.export import inspect_model
    from edgepipe.export.inspect import check_weights
    from edgepipe.export.static_llama import pad_token_id, read_decoder_spec, token_ids
    from edgepipe.npu import decoder as dec
    from edgepipe.npu.compile import run_compile
    from edgepipe.package.npu_report import decoder_report
    from edgepipe.quantize.qdq import QdqConfig
    from edgepipe.runtime.static_lm import StaticDecoder
    from edgepipe.validate.sanity import check_reference

    npu, src = _npu_of(target), _source(model)
    steps = dec.EVAL_DECODE_STEPS if eval_decode_steps is None else eval_decode_steps
    spec = read_decoder_spec(src.path)
    if npu.seq_len + steps > npu.context_length:
        raise InputError(f"npu.seq_len {npu.seq_len} + {steps} decode steps exceed npu.context_length {npu.context_length}; raise context_length")
    sdk = _qnn_ready()
    info = inspect_model(src.path)  # the content hash; broken weights refused before the slow export
    check_weights(info)
    host, pad_id = StaticDecoder(spec, npu.seq_len, npu.context_length), pad_token_id(spec.model_dir)
    windows = dec.eval_windows(token_ids(spec.model_dir, evalt.text), npu.seq_len, steps, dec.EVAL_WINDOWS if eval_windows is None else eval_windows)
    versions, ctx, timings = _versions(), _context(progress), _Timings()

    with timings("export_s"):
        fp32 = dec.run_export(spec, dec.ExportConfig(
            info.sha256, npu.seq_len, npu.context_length, npu.per_channel, versions["torch"], versions["transformers"],
        ), ctx, num_parameters=info.num_parameters)
    with timings("quantize_s"):
        qcfg = dec.QuantizeConfig(
            fp32.key, QdqConfig.from_npu(npu), key_of({"t": calib.text}), max(2, npu.calibration_samples // 4), versions["onnxruntime"],
        )
        quant = dec.run_quantize(host, fp32, qcfg, token_ids(spec.model_dir, calib.text), pad_id, ctx)
    with timings("compile_s"):
        comp = run_compile(dec.qdq_graphs(quant), dec.CONTEXT_FILES, _compile_config(quant.key, npu, sdk), ctx)
    with timings("validate_s"):
        vcfg = dec.ValidateConfig(fp32.key, comp.key, key_of({"t": evalt.text}), len(windows), steps)
        validated = dec.run_validate(spec, host, (fp32, quant, comp), windows, pad_id, vcfg, ctx)

    metrics = dec.metrics(npu, sdk, quant, comp, validated, windows)
    metrics["eval"]["source"], metrics["calibration_source"] = evalt.source, calib.source
    acc = metrics["npu_accuracy"]
    metrics["sanity"] = check_reference(acc, int(info.config["vocab_size"]), allow_random_weights=allow_random_weights)
    progress(
        f"top-1 agreement {acc['top1_agreement']:.3f}, perplexity {acc['reference_perplexity']:.2f} -> "
        f"{acc['perplexity']:.2f} ({acc['ppl_increase_pct']:+.2f}%) over {acc['positions']} positions"
    )
    files, section = dec.artifact_files(spec, quant, comp)
    return _package(_Artifact(
        ArtifactKind.NPU_DECODER, src, info.sha256, files, dec.npu_config(spec, npu, sdk, section),
        {**metrics, "timings_s": timings.done(), "stage_timings_s": {**comp.seconds, **validated["seconds"]}},
        Measured(top1_agreement=acc["top1_agreement"], ppl_increase_pct=acc["ppl_increase_pct"], coverage=comp.budget_coverage(),
                 kl_divergence=acc.get("kl_divergence"),
                 unmeasured={"max_ram_mb": NO_DEVICE_RAM}),
        decoder_report, {"quantization": {"scheme": "qdq", **dataclasses.asdict(qcfg.qdq)}, "calibration": {"source": calib.source}},
    ), target, out, versions, progress)


def build_encoder(
    model: ModelSource | Path, target: Target, out: Path, *, calib: Text, eval_sentences: Sequence[str],
    eval_source: str = "eval sentences", progress: Progress = silent, allow_random_weights: bool = False,
) -> BuildResult:
    """The NPU encoder pipeline of a sentence-embedding model, into the artifact ``out``. Its fp32
    export must match PyTorch and be a sentence encoder (``enc.reference_sanity``) unless
    ``allow_random_weights`` (recorded in the manifest); else ModelError (exit 2), before quantizing.

    Raises NpuCoverageError (exit 3) when the graph does not run wholly on the NPU and the profile
    forbids CPU fallback: such an encoder has no artifact a phone could load.
    """
    from edgepipe.cache import key_of
    from edgepipe.export.encoder import read_spec, source_sha256
    from edgepipe.export.inspect import check_encoder_weights
    from edgepipe.npu import encoder as enc
    from edgepipe.npu.compile import run_compile
    from edgepipe.package.npu_report import encoder_report
    from edgepipe.quantize.qdq import QdqConfig
    from edgepipe.runtime.encoder import encode, load_tokenizer

    npu = _npu_of(target)
    if len(eval_sentences) < 3:
        raise InputError("give at least 3 evaluation sentences for the NPU accuracy check")
    src = _source(model)
    spec = read_spec(src.path)
    check_encoder_weights(spec.model_dir)  # broken weights refused before the slow export
    sdk = _qnn_ready()
    if npu.seq_len > spec.max_seq_length:
        log.warning("seq_len %d exceeds the model's max_seq_length %d", npu.seq_len, spec.max_seq_length)
    tok = load_tokenizer(spec.model_dir, npu.seq_len)
    eval_feeds = encode(tok, list(eval_sentences))
    sha, versions, ctx, timings = source_sha256(spec.model_dir), _versions(), _context(progress), _Timings()

    with timings("export_s"):
        fp32 = enc.run_export(spec, enc.ExportConfig(
            sha, npu.seq_len, spec.pooling, spec.normalize, spec.uses_token_type_ids, versions["torch"], versions["transformers"],
        ), ctx)
        sanity = enc.reference_sanity(fp32, tok, allow_random_weights=allow_random_weights)
    with timings("quantize_s"):
        qcfg = enc.QuantizeConfig(fp32.key, QdqConfig.from_npu(npu), key_of({"t": calib.text}), npu.calibration_samples, versions["onnxruntime"])
        quant = enc.run_quantize(fp32, qcfg, calib.text, tok, ctx)
    with timings("compile_s"):
        comp = run_compile({enc.GRAPH: quant.dir / enc.MODEL_QDQ}, {enc.GRAPH: enc.MODEL_CTX}, _compile_config(quant.key, npu, sdk), ctx)
    if not comp.whole and not npu.allow_cpu_fallback:
        raise NpuCoverageError(f"not wholly on the NPU: {comp.summaries[enc.GRAPH]}; target {target.name} forbids CPU fallback")
    with timings("validate_s"):
        vcfg = enc.ValidateConfig(fp32.key, comp.key, key_of({"s": list(eval_sentences)}))
        validated = enc.run_validate((fp32, quant, comp), eval_feeds, vcfg, ctx)

    truncated = sum(int(f["attention_mask"].sum()) >= npu.seq_len for f in eval_feeds)
    metrics = {**enc.metrics(npu, sdk, quant, comp, validated, truncated), "eval_source": eval_source, "calibration_source": calib.source}
    progress(
        f"cosine min/mean {metrics['cosine_min']:.4f}/{metrics['cosine_mean']:.4f}, "
        f"retrieval top-1 agreement {metrics['retrieval_top1_agreement']:.3f}"
    )
    files, section = enc.artifact_files(spec, quant, comp)
    return _package(_Artifact(
        ArtifactKind.NPU_ENCODER, src, sha, files, enc.npu_config(spec, npu, sdk, section),
        {**metrics, "timings_s": timings.done(), "stage_timings_s": {**comp.seconds, **validated["seconds"]}},
        Measured(cosine_min=metrics["cosine_min"], retrieval_top1_agreement=metrics["retrieval_top1_agreement"],
                 coverage=comp.budget_coverage(),
                 unmeasured={"max_ram_mb": NO_DEVICE_RAM, "max_ppl_increase_pct": NO_TOKENS, "min_top1_agreement": NO_TOKENS}),
        encoder_report, {"quantization": {"scheme": "qdq", **dataclasses.asdict(qcfg.qdq)}, "calibration": {"source": calib.source},
                         "sanity": sanity},
    ), target, out, versions, progress)


def _npu_of(target: Target) -> Any:
    if target.npu is None:
        raise TargetError(f"target {target.name!r} has no npu section; choose a snapdragon-* target")
    return target.npu


def _source(model: ModelSource | Path) -> ModelSource:
    return model if isinstance(model, ModelSource) else ModelSource(Path(model), Path(model).name, False)


def _qnn_ready() -> dict[str, str]:
    """The onnxruntime-qnn / QNN SDK versions; fails early, before the slow export, when the EP cannot load."""
    from edgepipe.runtime import qnn

    sdk = qnn.qnn_sdk_info()
    qnn.register()
    return sdk


def _versions() -> dict[str, str]:
    from edgepipe.package import tool_versions

    return tool_versions()


def _context(progress: Progress) -> Any:
    from edgepipe.stage import StageContext

    return StageContext(progress=progress)


def _compile_config(quantize_key: str, npu: Any, sdk: dict[str, str]) -> Any:
    from edgepipe.npu.compile import CompileConfig

    return CompileConfig(quantize_key, npu.htp_arch, npu.soc_model, sdk["onnxruntime_qnn"], sdk["qnn_sdk"])


class _Timings:
    """Wall time of each step of this run (a cached stage takes a moment), and the total."""

    def __init__(self) -> None:
        self.t0 = time.perf_counter()
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        t = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - t, 2)

    def done(self) -> dict[str, float]:
        return {**self.seconds, "total_s": round(time.perf_counter() - self.t0, 2)}


Report = Callable[[str, str, int, dict[str, Any], list[Any]], str]


@dataclass(frozen=True)
class _Artifact:
    """What packaging needs of a finished NPU pipeline."""

    kind: ArtifactKind
    source: ModelSource
    sha256: str
    files: list[Path]
    npu_config: dict[str, Any]
    metrics: dict[str, Any]
    measured: Measured  # all but the artifact's size, measured here
    report: Report
    provenance: dict[str, Any]


def _package(art: _Artifact, target: Target, out: Path, versions: dict[str, str], progress: Progress) -> BuildResult:
    """Assemble the folder beside ``out``, check every budget, write report and manifest, publish."""
    import shutil

    from edgepipe.cache import dir_size, disk_full
    from edgepipe.package import now_utc, publish, staged, write_manifest
    from edgepipe.validate import check_budgets, failed

    try:
        with staged(out) as staging:
            for path in art.files:
                shutil.copyfile(path, staging / path.name)
            (staging / NPU_CONFIG).write_text(json.dumps(art.npu_config, indent=2) + "\n", encoding="utf-8")
            size = dir_size(staging)
            metrics = {"artifact_mb": round(size / 2**20, 2), "artifact_bytes": size, **art.metrics}
            checks = check_budgets(target, dataclasses.replace(art.measured, artifact_mb=metrics["artifact_mb"]))
            names = failed(checks)
            manifest = Manifest(
                kind=art.kind, files={}, created=now_utc(), edgepipe_version=versions["edgepipe"], versions=versions,
                source_model={"path": str(art.source.path.absolute()), "name": art.source.name, "default_model": art.source.default,
                              "sha256": art.sha256},
                target=target.to_dict(), metrics=metrics, budgets=tuple(checks), verdict="fail" if names else "pass",
                failed_budgets=tuple(names), provenance=art.provenance,
            )
            htp_arch = target.npu.htp_arch if target.npu else 0
            (staging / "report.md").write_text(art.report(art.source.name, target.name, htp_arch, metrics, checks), encoding="utf-8")
            manifest = write_manifest(staging, manifest)
            publish(staging, out)
    except OSError as e:
        if e.errno == errno.ENOSPC:  # the previous artifact at --out is untouched
            raise disk_full("package", out.parent, sum(p.stat().st_size for p in art.files) + 2**20) from None
        raise
    progress(f"artifact written to {out} ({metrics['artifact_mb']:.1f} MB), verdict: {manifest.verdict}")
    return BuildResult(artifact=out, manifest=manifest, passed=not names, failed_budgets=names)
