"""What kinds of artifact exist, and the one registry that says how each is loaded and summarised.

An artifact's kind is written once, by packaging, into ``manifest.json`` (``kind``), and read
here: no other code decides what an artifact is by looking at its files. Each kind names its
loader (a model behind :class:`edgepipe.runtime.lm.LM`, or an embedder), the bench that fits it,
whether it carries reference logits for a device self-check, and the lines the CLI prints after a
build. Loaders are imported lazily, so reading a manifest costs no onnxruntime import.

Schema version 1 manifests had no kind (``kind`` was the constant ``"edgepipe-artifact"``);
:func:`legacy_kind` derives it the way version-1 readers did, once, while upgrading them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any

from edgepipe.errors import ArtifactError

NPU_CONFIG = "npu_config.json"  # what an NPU artifact's host loop / encoder reads: graphs, shapes, HTP


class ArtifactKind(str, Enum):
    """What an artifact folder holds, and so what can run it."""

    CPU_DECODER = "cpu-decoder"  # one dynamic decoder graph (onnxruntime-genai layout), MatMulNBits weights
    NPU_DECODER = "npu-decoder"  # static prefill + decode graphs (QDQ, EPContext binaries) for the Hexagon HTP
    NPU_ENCODER = "npu-encoder"  # one static sentence-embedding graph (QDQ, EPContext binary) for the Hexagon HTP

    def __str__(self) -> str:
        return self.value


Summary = Callable[[Mapping[str, Any]], list[str]]


@dataclass(frozen=True)
class KindSpec:
    """How the runtime and the CLI treat one kind of artifact.

    ``loader`` / ``bench`` are ``"module:function"`` names inside ``edgepipe.runtime``, imported on use.
    ``generates``: the model produces text (``run``, ``bench``, ``validate`` apply); an encoder does not.
    ``has_reference``: the artifact carries ``reference.npz`` (fp32 top-k log-probs) for a self-check.
    """

    kind: ArtifactKind
    description: str
    loader: str
    bench: str | None
    generates: bool
    has_reference: bool
    summary: Summary

    def load(self, root: Path, *, threads: int) -> Any:
        return _resolve(self.loader)(root, threads=threads)

    def run_bench(self, model: Any) -> dict[str, Any]:
        if self.bench is None:
            raise ArtifactError(f"a {self.kind} artifact has no throughput benchmark; {self.description}")
        result: dict[str, Any] = _resolve(self.bench)(model)
        return result


def _resolve(name: str) -> Callable[..., Any]:
    module, _, attr = name.partition(":")
    fn: Callable[..., Any] = getattr(importlib.import_module(f"edgepipe.runtime.{module}"), attr)
    return fn


def _verdict_line(m: Mapping[str, Any]) -> str:
    failed = m.get("failed_budgets") or []
    return f"{str(m.get('verdict', '?')).upper()}" + (f" (failed: {', '.join(failed)})" if failed else "")


def _cpu_summary(m: Mapping[str, Any]) -> list[str]:
    met = m.get("metrics") or {}
    acc, thr = met.get("accuracy") or {}, met.get("throughput") or {}
    return [
        _verdict_line(m),
        f"  perplexity {acc['reference_perplexity']:.2f} -> {acc['perplexity']:.2f} ({acc['ppl_increase_pct']:+.2f}%), "
        f"top-1 agreement {acc['top1_agreement']:.3f}, KL {acc['kl_divergence']:.4f}",
        f"  {met['artifact_mb']:.1f} MB, prefill {thr['prefill_tok_s']:.0f} tok/s, decode {thr['decode_tok_s']:.1f} tok/s, "
        f"TTFT {thr['ttft_ms']:.0f} ms, peak RSS {thr['peak_rss_mb']:.0f} MB (host CPU)",
    ]


def _npu_decoder_summary(m: Mapping[str, Any]) -> list[str]:
    met = m.get("metrics") or {}
    lines = [_verdict_line(m)]
    for graph, cov in (met.get("coverage") or {}).items():
        lines.append(f"  NPU coverage {graph}: {cov['npu_nodes']}/{cov['total_nodes']} nodes, CPU ops {cov['cpu_op_types'] or 'none'}")
    acc = met.get("npu_accuracy") or {}
    lines.append(
        f"  HTP simulator vs fp32, {acc['positions']} positions: top-1 agreement {acc['top1_agreement']:.3f}, "
        f"perplexity {acc['reference_perplexity']:.2f} -> {acc['perplexity']:.2f} ({acc['ppl_increase_pct']:+.2f}%)"
    )
    return lines


def _npu_encoder_summary(m: Mapping[str, Any]) -> list[str]:
    met = m.get("metrics") or {}
    cov = met.get("coverage") or {}
    return [
        _verdict_line(m),
        f"  NPU coverage {cov.get('npu_nodes')}/{cov.get('total_nodes')} nodes, cosine min {met.get('cosine_min')}, "
        f"mean {met.get('cosine_mean')}, retrieval top-1 agreement {met.get('retrieval_top1_agreement')}",
    ]


REGISTRY: dict[ArtifactKind, KindSpec] = {
    ArtifactKind.CPU_DECODER: KindSpec(
        ArtifactKind.CPU_DECODER, "a decoder for onnxruntime's CPU execution provider",
        loader="model:CausalLM", bench="bench:bench_decoder", generates=True, has_reference=True, summary=_cpu_summary,
    ),
    ArtifactKind.NPU_DECODER: KindSpec(
        ArtifactKind.NPU_DECODER, "static prefill + decode graphs for the Hexagon NPU (HTP, or their QDQ graphs on the CPU)",
        loader="static_lm:StaticCausalLM", bench="bench:bench_static", generates=True, has_reference=False,
        summary=_npu_decoder_summary,
    ),
    ArtifactKind.NPU_ENCODER: KindSpec(
        ArtifactKind.NPU_ENCODER, "a sentence-embedding encoder: it embeds text and generates none",
        loader="encoder:SentenceEncoder", bench=None, generates=False, has_reference=False, summary=_npu_encoder_summary,
    ),
}


def spec_of(kind: ArtifactKind) -> KindSpec:
    return REGISTRY[kind]


def parse_kind(value: Any, where: str) -> ArtifactKind:
    try:
        return ArtifactKind(value)
    except ValueError:
        known = ", ".join(k.value for k in ArtifactKind)
        raise ArtifactError(f"{where}: unknown artifact kind {value!r} (known: {known}); upgrade edgepipe or rebuild") from None


def legacy_kind(root: Path, data: Mapping[str, Any]) -> ArtifactKind:
    """The kind of a schema-1 artifact, as schema-1 readers told it: an NPU folder has
    ``npu_config.json`` (a decoder's metrics say ``task: causal-lm``), anything else is a CPU decoder."""
    files = data.get("files") or {}
    if NPU_CONFIG not in files:
        return ArtifactKind.CPU_DECODER
    metrics = data.get("metrics")
    task = metrics.get("task") if isinstance(metrics, Mapping) else None
    return ArtifactKind.NPU_DECODER if task == "causal-lm" else ArtifactKind.NPU_ENCODER
