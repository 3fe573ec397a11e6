"""The build's side of onnxruntime-qnn: op coverage of a QDQ graph and its EPContext compile.

Sessions themselves (plug-in EP registration, HTP options, stderr capture of QNN's reasons) live in
:mod:`edgepipe.runtime.qnn`, which a phone runs too; this module adds what only a build does.
"""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from pathlib import Path
from typing import Any

from edgepipe.errors import EdgepipeError, NpuCoverageError
from edgepipe.runtime.qnn import EP_NAME, _reasons_text, capture_stderr, parse_reasons, session_options

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Rejected:
    """One node QNN left to the CPU, with the reason QNN logged (or a generic one)."""

    name: str
    op_type: str
    reason: str


@dataclasses.dataclass(frozen=True)
class Coverage:
    """How much of a model the HTP takes. Counts are of the session graph (after ORT's own
    optimizations, e.g. duplicated DequantizeLinear nodes), which is what actually runs."""

    npu_nodes: int
    total_nodes: int
    partitions: int
    rejected: tuple[Rejected, ...]

    @property
    def whole(self) -> bool:
        return self.npu_nodes == self.total_nodes and self.total_nodes > 0

    @property
    def fraction(self) -> float:
        return self.npu_nodes / self.total_nodes if self.total_nodes else 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "npu_nodes": self.npu_nodes,
            "total_nodes": self.total_nodes,
            "fraction": round(self.fraction, 6),
            "npu_partitions": self.partitions,
            "whole_graph_on_npu": self.whole,
            "cpu_nodes": [dataclasses.asdict(r) for r in self.rejected],
            "cpu_op_types": dict(Counter(r.op_type for r in self.rejected)),
        }

    def summary(self) -> str:
        text = f"{self.npu_nodes}/{self.total_nodes} nodes on the NPU in {self.partitions} partition(s)"
        if self.rejected:
            by_type = Counter(r.op_type for r in self.rejected)
            first: dict[str, str] = {}
            for r in self.rejected:
                first.setdefault(r.op_type, r.reason)
            text += "; on the CPU: " + ", ".join(f"{n}x {t} ({first[t]})" for t, n in by_type.most_common())
        return text


def check_coverage(model: Path, htp_arch: int, soc_model: int | None = None) -> Coverage:
    """Partition ``model`` with CPU fallback allowed and report which nodes the HTP takes.

    ORT puts a trailing DequantizeLinear on the CPU when fallback is allowed although QNN can
    take it; so the strict session (fallback disabled) is tried first, and only if it fails is
    the lenient partition used to say what falls back and why.
    """
    import onnxruntime as ort

    so = session_options(htp_arch, soc_model, allow_cpu_fallback=False, record_assignment=True)
    with capture_stderr():
        try:
            sess = ort.InferenceSession(str(model), so)
        except Exception:
            sess = None
    if sess is not None:
        cov = _coverage_of(sess, {})
        if cov.whole:
            return cov
    so = session_options(htp_arch, soc_model, allow_cpu_fallback=True, record_assignment=True)
    with capture_stderr() as captured:
        sess = ort.InferenceSession(str(model), so)
    return _coverage_of(sess, parse_reasons(captured.text()))


def _coverage_of(sess: Any, reasons: dict[str, str]) -> Coverage:
    npu = total = parts = 0
    rejected = []
    for sub in sess.get_provider_graph_assignment_info():
        nodes = sub.get_nodes()
        total += len(nodes)
        if sub.ep_name == EP_NAME:
            npu += len(nodes)
            parts += 1
            continue
        for node in nodes:
            reason = reasons.get(node.name)
            if reason is None:
                reason = (
                    "left to the CPU when its neighbours were partitioned (a lone Q/DQ node)"
                    if node.op_type in ("QuantizeLinear", "DequantizeLinear")
                    else "not supported by QNN HTP for these types/attributes (no reason logged)"
                )
            rejected.append(Rejected(node.name, node.op_type, reason))
    return Coverage(npu, total, parts, tuple(rejected))


def compile_context(
    qdq_model: Path, out_model: Path, htp_arch: int, soc_model: int | None = None
) -> Path:
    """Compile ``qdq_model`` ahead of time into an EPContext model + QNN context binary.

    Why: on the phone, building the HTP graph from the QDQ model takes seconds at every start;
    the context binary is the finished graph for one HTP generation. The binary is a separate
    file (embed mode 0) so that its size and hash show in the manifest. Returns the binary path.
    """
    import onnxruntime as ort

    out_model.parent.mkdir(parents=True, exist_ok=True)
    so = session_options(
        htp_arch,
        soc_model,
        config={
            "ep.context_enable": "1",
            "ep.context_file_path": str(out_model),
            "ep.context_embed_mode": "0",
        },
    )
    with capture_stderr() as captured:
        try:
            ort.InferenceSession(str(qdq_model), so)
        except Exception as e:
            raise NpuCoverageError(
                f"EPContext compile for HTP v{htp_arch} failed: {e}{_reasons_text(captured.text())}"
            ) from None
    if not out_model.is_file():
        raise EdgepipeError(f"EPContext compile wrote no {out_model.name}; QNN log: {captured.text()[-500:]}")
    import onnx

    ctx = onnx.load(str(out_model), load_external_data=False)
    bins = []
    for node in ctx.graph.node:
        if node.op_type == "EPContext":
            for attr in node.attribute:
                if attr.name == "ep_cache_context":
                    bins.append(out_model.parent / attr.s.decode())
    if len(bins) != 1 or not bins[0].is_file():
        raise EdgepipeError(f"EPContext model {out_model.name} should reference one context binary, found {bins}")
    return bins[0]
