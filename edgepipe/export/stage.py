"""The export stage: a Hugging Face folder -> the fp32 ONNX decoder (the reference for everything after).

Keyed by the source model's content hash and the exporter's versions, so the same checkpoint is
exported once for every target, budget and build that uses it.
"""

from __future__ import annotations

import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from edgepipe.export.genai_builder import export_fp32
from edgepipe.export.inspect import ModelInfo
from edgepipe.stage import StageContext, run_cached


@dataclass(frozen=True)
class ExportConfig:
    VERSION = 2  # 2: the export is cross-checked against transformers (``edgepipe.export.crosscheck``)

    source_sha256: str
    genai_version: str
    transformers_version: str

    @classmethod
    def for_model(cls, info: ModelInfo, versions: Mapping[str, str] | None = None) -> ExportConfig:
        """The config ``edgepipe build`` exports ``info``'s model with (the installed exporter's
        versions unless ``versions`` are given), so that any caller shares the build's cache entry."""
        if versions is None:
            from edgepipe.package import tool_versions

            versions = tool_versions()
        return cls(info.sha256, versions["onnxruntime-genai"], versions["transformers"])


@dataclass(frozen=True)
class ExportResult:
    model_dir: Path  # model.onnx + model.onnx.data + genai_config.json + tokenizer files
    key: str


def run_export(info: ModelInfo, config: ExportConfig, ctx: StageContext) -> ExportResult:
    def produce(tmp: Path) -> dict[str, object]:
        from edgepipe.export.crosscheck import crosscheck

        export_fp32(info.path, tmp / "model", cache_dir=tmp / "hf-cache", log_file=tmp / "export.log", progress=ctx.progress)
        shutil.rmtree(tmp / "hf-cache", ignore_errors=True)
        ctx.progress("cross-checking the fp32 export against transformers")
        record = crosscheck(info.path, tmp / "model", tmp, vocab_size=int(info.config["vocab_size"]),
                            num_parameters=info.num_parameters, threads=ctx.threads)
        (tmp / "torch_logits.npy").unlink(missing_ok=True)
        return {"crosscheck": record}

    out = run_cached(
        "export", config, produce, ctx,
        need_bytes=int(info.num_parameters * 4 * 1.1),
        # the builder holds the checkpoint in its own dtype and casts one tensor at a time
        # (measured: Granite-2B bf16, 5.07 GB of safetensors -> 6.3 GB peak)
        need_ram_bytes=int(info.num_parameters * 2 * 1.3),
    )
    return ExportResult(model_dir=out.dir / "model", key=out.key)
