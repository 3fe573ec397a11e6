"""The compile stage of both NPU kinds: op coverage of each QDQ graph, then its EPContext binary.

Keyed by the quantize stage's key, the HTP generation and SoC, and the QNN SDK that prepares the
graphs: QNN's graph preparation is the slow part of an NPU build (13 minutes for SmolLM2's prefill
graph on 2 cores), so a resumed build must not repeat it. Incomplete coverage is recorded, never
raised here: whether it fails the build is the profile's call (``allow_cpu_fallback``), made by
the budget checker. A graph not wholly on the NPU gets no context binary (there is no single one):
the artifact ships its QDQ model alone.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepipe.stage import StageContext, StageOutput, run_cached
from edgepipe.validate import Coverage as BudgetCoverage


@dataclass(frozen=True)
class CompileConfig:
    VERSION = 1

    quantize_key: str
    htp_arch: int
    soc_model: int | None
    onnxruntime_qnn: str
    qnn_sdk: str


@dataclass(frozen=True)
class Compiled:
    """Coverage per graph (``Coverage.to_dict`` form) and, for graphs wholly on the NPU, the
    EPContext model's name (its binary beside it) in ``dir``."""

    dir: Path
    key: str
    htp_arch: int
    soc_model: int | None
    coverage: dict[str, dict[str, Any]]
    context_models: dict[str, str]
    binaries: dict[str, str]
    summaries: dict[str, str]  # Coverage.summary(): what runs where, with QNN's reasons
    seconds: dict[str, float]

    @property
    def whole(self) -> bool:
        return all(c["whole_graph_on_npu"] for c in self.coverage.values())

    def budget_coverage(self) -> dict[str, BudgetCoverage]:
        return {g: BudgetCoverage(c["npu_nodes"], c["total_nodes"]) for g, c in self.coverage.items()}

    def htp_session(self, graph: str, qdq_model: Path) -> Any:
        """A simulator session of ``graph``: its context binary when it has one, else its QDQ model
        with the CPU fallback the coverage check found it needs."""
        from edgepipe.runtime.qnn import create_session

        name = self.context_models.get(graph)
        model = self.dir / name if name else qdq_model
        return create_session(model, self.htp_arch, self.soc_model, allow_cpu_fallback=not self.coverage[graph]["whole_graph_on_npu"])


def run_compile(qdq: Mapping[str, Path], context_names: Mapping[str, str], config: CompileConfig, ctx: StageContext) -> Compiled:
    """Coverage of each graph of ``qdq`` (graph name -> QDQ model) and the context binaries of those
    wholly on the NPU, named by ``context_names``."""

    def produce(tmp: Path) -> dict[str, Any]:
        from edgepipe.npu import qnn

        info: dict[str, Any] = {"coverage": {}, "context_models": {}, "binaries": {}, "summaries": {}, "seconds": {}}
        for graph, model in qdq.items():
            t = time.perf_counter()
            ctx.progress(f"op coverage of the {graph} graph on HTP v{config.htp_arch}")
            cov = qnn.check_coverage(model, config.htp_arch, config.soc_model)
            ctx.progress(f"{graph}: {cov.summary()}")
            info["coverage"][graph], info["summaries"][graph] = cov.to_dict(), cov.summary()
            info["seconds"][f"coverage_{graph}_s"] = round(time.perf_counter() - t, 2)
            if not cov.whole:
                continue  # a partial graph has no single context binary: ship its QDQ model only
            t = time.perf_counter()
            ctx.progress(f"compiling the {graph} EPContext binary for HTP v{config.htp_arch}")
            binary = qnn.compile_context(model, tmp / context_names[graph], config.htp_arch, config.soc_model)
            info["context_models"][graph], info["binaries"][graph] = context_names[graph], binary.name
            info["seconds"][f"compile_{graph}_s"] = round(time.perf_counter() - t, 2)
        return info

    out: StageOutput = run_cached("npu-compile", config, produce, ctx)

    def in_order(d: dict[str, Any]) -> dict[str, Any]:  # the cache stores JSON with sorted keys
        return {g: d[g] for g in qdq if g in d}

    i = out.info
    return Compiled(
        out.dir, out.key, config.htp_arch, config.soc_model,
        in_order(i["coverage"]), in_order(i["context_models"]), in_order(i["binaries"]), in_order(i["summaries"]), i["seconds"],
    )
