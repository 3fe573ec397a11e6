"""The export stage: a Hugging Face folder -> the fp32 ONNX decoder (the reference for everything after).

Keyed by the source model's content hash, the exporter's versions and the export path the
preflight chose (:mod:`edgepipe.export.preflight`), so the same checkpoint is exported once for
every target, budget and build that uses it. The stage records which exporter ran and why (the
manifest's ``provenance.export``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepipe.estimate import stage_ram_bytes
from edgepipe.export.genai_builder import export_fp32
from edgepipe.export.inspect import ModelInfo
from edgepipe.export.preflight import BUILDER, GENERIC
from edgepipe.stage import StageContext, run_cached


@dataclass(frozen=True)
class ExportConfig:
    VERSION = 3  # 2: path-aware (builder / generic); 3: the builder's export cross-checked against transformers

    source_sha256: str
    genai_version: str
    transformers_version: str
    path: str = BUILDER  # preflight.BUILDER or preflight.GENERIC
    reason: str = ""  # why that path (recorded, part of the key only through ``path``'s rule)
    torch_version: str = ""

    @classmethod
    def for_model(cls, info: ModelInfo, versions: Mapping[str, str] | None = None, pre: Any = None) -> ExportConfig:
        """The config ``edgepipe build`` exports ``info``'s model with (the installed exporter's
        versions unless ``versions`` are given; the export path ``pre``, a preflight, chose), so that
        any caller shares the build's cache entry."""
        if versions is None:
            from edgepipe.package import tool_versions

            versions = tool_versions()
        if pre is None:
            from edgepipe.export.preflight import preflight

            pre = preflight(info.path)
        return cls(info.sha256, versions["onnxruntime-genai"], versions["transformers"], pre.path, pre.reason, versions.get("torch", ""))


@dataclass(frozen=True)
class ExportResult:
    model_dir: Path  # model.onnx + model.onnx.data + genai_config.json + tokenizer files
    key: str
    info: dict[str, Any] = field(default_factory=dict)  # exporter, reason, normalisations, fp32 check


def _builder(info: ModelInfo, tmp: Path, ctx: StageContext) -> dict[str, Any]:
    from edgepipe.export.normalize import normalized_folder

    src, rows = normalized_folder(info.path, tmp)
    export_fp32(src, tmp / "model", cache_dir=tmp / "hf-cache", log_file=tmp / "export.log", progress=ctx.progress)
    shutil.rmtree(tmp / "hf-cache", ignore_errors=True)
    if src != info.path:
        shutil.rmtree(src, ignore_errors=True)
    from edgepipe.export.crosscheck import crosscheck

    ctx.progress("cross-checking the fp32 export against transformers")
    record = crosscheck(info.path, tmp / "model", tmp, vocab_size=int(info.config["vocab_size"]),
                        num_parameters=info.num_parameters, threads=ctx.threads)
    (tmp / "torch_logits.npy").unlink(missing_ok=True)
    return {"exporter": "onnxruntime-genai builder", "normalized": rows, "crosscheck": record}


def run_export(info: ModelInfo, config: ExportConfig, ctx: StageContext) -> ExportResult:
    def produce(tmp: Path) -> dict[str, Any]:
        if config.path == GENERIC:
            from edgepipe.export.generic import export_generic

            done = export_generic(info.path, tmp / "model", progress=ctx.progress)
        else:
            done = _builder(info, tmp, ctx)
        done = {**done, "path": config.path, "reason": config.reason}
        (tmp / "export.json").write_text(json.dumps(done, indent=2), encoding="utf-8")
        return done

    out = run_cached(
        "export", config, produce, ctx,
        need_bytes=int(info.num_parameters * 4 * 1.1),
        need_ram_bytes=stage_ram_bytes(info.num_parameters, config.path)["export"],
    )
    recorded = out.info or _read_info(out.dir)
    return ExportResult(model_dir=out.dir / "model", key=out.key, info=recorded)


def _read_info(folder: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads((folder / "export.json").read_text(encoding="utf-8"))
        return data
    except (OSError, ValueError):
        return {}
