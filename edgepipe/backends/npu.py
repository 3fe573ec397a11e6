"""The NPU backend: QDQ graphs + EPContext binaries for the Hexagon HTP, validated on its simulator.

The model's ``config.json`` decides what is built: a ``...ForCausalLM`` (and the default model,
when there is no ``--model``) takes the decoder path (prefill + decode graphs), anything else the
sentence-embedding encoder path.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from edgepipe.errors import InputError
from edgepipe.pipeline import BuildRequest, BuildResult
from edgepipe.runtime.kinds import ArtifactKind
from edgepipe.runtime.manifest import Manifest
from edgepipe.runtime.progress import Progress


class NpuBackend:
    def build(self, request: BuildRequest, progress: Progress) -> BuildResult:
        from edgepipe.models import resolve_model
        from edgepipe.npu.decoder import is_causal_lm
        from edgepipe.package import now_utc, publish, staged, tool_versions, write_manifest

        tgt = request.target
        if request.device and request.device != "local":
            raise InputError(f"--device {request.device} is not available for NPU targets; they are validated on the HTP simulator")
        model = resolve_model(request.model, progress)
        decoder = is_causal_lm(model.path)
        versions = tool_versions()
        with staged(request.out) as staging:
            metrics, report = (_decoder if decoder else _encoder)(request, model, staging, progress)
            failed = list(metrics.get("verdict_reasons") or []) if metrics.get("verdict") != "pass" else []
            manifest = Manifest(
                kind=ArtifactKind.NPU_DECODER if decoder else ArtifactKind.NPU_ENCODER, files={},
                created=now_utc(), edgepipe_version=versions["edgepipe"], versions=versions,
                source_model={"path": str(model.path.absolute()), "name": model.name, "default_model": model.default},
                target=tgt.to_dict(), metrics=metrics, verdict="pass" if not failed else "fail", failed_budgets=tuple(failed),
            )
            (staging / "report.md").write_text(report(manifest, failed), encoding="utf-8")
            manifest = write_manifest(staging, manifest)
            publish(staging, request.out)
        return BuildResult(artifact=request.out, manifest=dataclasses.replace(manifest), passed=not failed, failed_budgets=failed)


def _decoder(request: BuildRequest, model: Any, staging: Any, progress: Progress) -> tuple[dict[str, Any], Any]:
    from edgepipe.npu.decoder import build_decoder_npu
    from edgepipe.npu.report import decoder_report
    from edgepipe.texts import read_text_file

    calib = read_text_file(request.calib, "calib.txt", "calibration")
    evalt = read_text_file(request.eval_file, "eval.txt", "eval")
    metrics = build_decoder_npu(model.path, request.target, staging, calib_text=calib.text, eval_text=evalt.text, progress=progress)
    metrics["eval"]["source"], metrics["calibration_source"] = evalt.source, calib.source
    npu = request.target.npu

    def report(m: Manifest, failed: list[str]) -> str:
        return decoder_report(model.name, request.target.name, npu.htp_arch if npu else 0, dict(m.metrics), failed)

    return metrics, report


def _encoder(request: BuildRequest, model: Any, staging: Any, progress: Progress) -> tuple[dict[str, Any], Any]:
    from edgepipe.npu import build_npu
    from edgepipe.npu.data import default_calib_text, default_eval_sentences
    from edgepipe.texts import read_text_file

    calib_text = read_text_file(request.calib, "", "calibration").text if request.calib else default_calib_text()
    metrics = build_npu(model.path, request.target, staging, calib_text=calib_text, eval_sentences=default_eval_sentences(), progress=progress)
    npu = request.target.npu

    def report(m: Manifest, failed: list[str]) -> str:
        lines = [f"# {model.name} for {request.target.name} (Hexagon HTP v{npu.htp_arch if npu else 0})", "",
                 f"**Verdict: {m.verdict.upper()}**", ""]
        lines += [f"- {k}: {v}" for k, v in m.metrics.items() if not isinstance(v, (dict, list))]
        lines += ["", f"NPU coverage: {m.metrics.get('coverage') or {}}", "", "Simulator timings say nothing about a phone's speed.", ""]
        return "\n".join(lines)

    return metrics, report
