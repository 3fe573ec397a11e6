"""onnxruntime-qnn plumbing: plug-in EP registration, HTP sessions, op coverage, EPContext compile.

Why a module of its own: onnxruntime-qnn 2.x is a *plug-in* execution provider. It is registered
once per process from its shared library and then chosen by device (``ort.get_ep_devices()``),
not by name in ``providers=[...]``. On x86-64 Linux its ``libQnnHtp.so`` is the HTP *simulator*:
it tells what the NPU accepts and computes what the NPU would, bit for bit, but its timings say
nothing about a phone.

QNN reports why it rejects a node only in its log (``backendValidateOpConfig() failed for node
`X` of type `LayerNorm` with error code 3110``), so the coverage check captures the process's
stderr while the session is created and matches those lines to the nodes left on the CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import tempfile
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgepipe.errors import EdgepipeError, InputError

log = logging.getLogger(__name__)

EP_NAME = "QNNExecutionProvider"
_lock = threading.Lock()
_registered = False


class NpuUnavailableError(InputError):
    """onnxruntime-qnn is not installed or its HTP backend cannot be loaded."""


class NpuCoverageError(EdgepipeError):
    """The model does not run wholly on the NPU and the target forbids CPU fallback."""

    exit_code = 3


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
            first = {}
            for r in self.rejected:
                first.setdefault(r.op_type, r.reason)
            text += "; on the CPU: " + ", ".join(f"{n}x {t} ({first[t]})" for t, n in by_type.most_common())
        return text


def qdq_quantize(
    pre: Path, out: Path, feeds: list[Any], cfg: Any, *, stride: int | None = None, external_data: bool | None = None
) -> None:
    """QDQ-quantize the QNN-preprocessed model ``pre`` into ``out``, calibrated on ``feeds``.

    ``cfg`` gives activation / weight types and per-channel; ``stride=1`` computes MinMax ranges
    run by run and merges them (the reader serves feeds in ranges, which strided calibration asks
    for and plain calibration never does); ``external_data`` overrides where weights are written.
    """
    from onnxruntime.quantization import CalibrationDataReader, QuantType, quantize
    from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.set_range(0, len(feeds))

        def __len__(self) -> int:
            return len(feeds)

        def set_range(self, start_index: int, end_index: int) -> None:
            self._it = iter(feeds[start_index:end_index])

        def get_next(self) -> Any:
            return next(self._it, None)

    types = {"uint8": QuantType.QUInt8, "uint16": QuantType.QUInt16, "int8": QuantType.QInt8}
    qcfg = get_qnn_qdq_config(
        str(pre),
        Reader(),
        activation_type=types[cfg.activation_type],
        weight_type=types[cfg.weight_type],
        per_channel=cfg.per_channel,
        **({"stride": stride} if stride is not None else {}),
    )
    if external_data is not None:
        qcfg.use_external_data_format = external_data
    quantize(str(pre), str(out), qcfg)


def qnn_sdk_info() -> dict[str, str]:
    """Versions of the onnxruntime-qnn wheel and the QNN SDK it bundles."""
    try:
        from onnxruntime_qnn import build_and_package_info as info
    except ImportError as e:
        raise NpuUnavailableError(
            f"onnxruntime-qnn is not installed ({e}); install the NPU extra: pip install 'edgepipe[npu]'"
        ) from None
    return {"onnxruntime_qnn": str(info.__version__), "qnn_sdk": str(getattr(info, "qnn_version", "unknown"))}


def register() -> Any:
    """Register the QNN plug-in EP once per process and return the HTP ``OrtEpDevice``."""
    global _registered
    import onnxruntime as ort

    try:
        import onnxruntime_qnn
    except ImportError as e:
        raise NpuUnavailableError(
            f"onnxruntime-qnn is not installed ({e}); install the NPU extra: pip install 'edgepipe[npu]'"
        ) from None
    with _lock:
        if not _registered:
            try:
                ort.register_execution_provider_library(EP_NAME, onnxruntime_qnn.get_library_path())
            except Exception as e:  # already registered by someone else in this process is fine
                if "already" not in str(e).lower():
                    raise NpuUnavailableError(f"cannot register the QNN execution provider: {e}") from None
            _registered = True
    devices = [d for d in ort.get_ep_devices() if d.ep_name == EP_NAME]
    if not devices:
        raise NpuUnavailableError("onnxruntime-qnn registered but offers no device; check the onnxruntime version")
    npu = [d for d in devices if str(d.device.type).endswith("NPU")]
    return (npu or devices)[0]


def htp_backend_path() -> str:
    import onnxruntime_qnn

    path = onnxruntime_qnn.get_qnn_htp_path()
    if not Path(path).is_file():
        raise NpuUnavailableError(f"QNN HTP backend {path} is missing; reinstall onnxruntime-qnn")
    return path


def provider_options(htp_arch: int, soc_model: int | None = None) -> dict[str, str]:
    opts = {"backend_path": htp_backend_path(), "htp_arch": str(htp_arch)}
    if soc_model is not None:
        opts["soc_model"] = str(soc_model)
    return opts


def session_options(
    htp_arch: int,
    soc_model: int | None = None,
    *,
    allow_cpu_fallback: bool = False,
    record_assignment: bool = False,
    config: dict[str, str] | None = None,
) -> Any:
    import onnxruntime as ort

    device = register()
    so = ort.SessionOptions()
    so.log_severity_level = 2  # QNN's reasons for rejecting a node are warnings
    so.add_provider_for_devices([device], provider_options(htp_arch, soc_model))
    so.add_session_config_entry("session.disable_cpu_ep_fallback", "0" if allow_cpu_fallback else "1")
    if record_assignment:
        so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    for key, value in (config or {}).items():
        so.add_session_config_entry(key, value)
    return so


def create_session(
    model: Path,
    htp_arch: int,
    soc_model: int | None = None,
    *,
    allow_cpu_fallback: bool = False,
) -> Any:
    """An inference session on the (simulated) HTP. Without fallback every node must go to QNN,
    otherwise session creation fails: that is how 'wholly on the NPU' is enforced at run time.

    onnxruntime's Python wrapper retries a failed run on the CPU EP (printing to stdout); that is
    switched off, so an HTP failure is an error, never a silent CPU result. Keep one HTP session
    alive at a time: with two live sessions the simulator fails at run time (QNN error 1100).
    """
    import onnxruntime as ort

    so = session_options(htp_arch, soc_model, allow_cpu_fallback=allow_cpu_fallback)
    with capture_stderr() as captured:
        try:
            sess = ort.InferenceSession(str(model), so)
        except Exception as e:
            detail = _reasons_text(captured.text())
            raise NpuCoverageError(
                f"{model.name} cannot run wholly on HTP v{htp_arch}: {e}{detail}"
            ) from None
    sess.disable_fallback()
    return sess


class _Captured:
    def __init__(self) -> None:
        self._text = ""

    def text(self) -> str:
        return self._text


@contextlib.contextmanager
def capture_stderr() -> Iterator[_Captured]:
    """Capture file descriptor 2 (where onnxruntime's C++ logger writes) and echo it to the log."""
    captured = _Captured()
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        saved = os.dup(2)
        try:
            os.dup2(tmp.fileno(), 2)
            yield captured
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            captured._text = tmp.read().decode("utf-8", "replace")
            captured._text = re.sub(r"\x1b\[[0-9;]*m", "", captured._text)
            for line in captured._text.splitlines():
                if line.strip():
                    log.debug("ort: %s", line.strip())


_FAILED_NODE = re.compile(r"failed for node `([^`]*)` of type `([^`]*)` with error code (\d+)")
_WARN_LINE = re.compile(r"\[[WE]:onnxruntime:[^\]]*\] (.*)")


def parse_reasons(text: str) -> dict[str, str]:
    """Map node name -> QNN's reason from captured log text."""
    reasons: dict[str, str] = {}
    for line in text.splitlines():
        m = _FAILED_NODE.search(line)
        if m:
            reasons[m.group(1)] = (
                f"QNN backendValidateOpConfig rejected it as {m.group(2)} (error code {m.group(3)})"
            )
            continue
        w = _WARN_LINE.search(line)
        if w and "node" in w.group(1).lower() and "`" in w.group(1):
            names = re.findall(r"`([^`]*)`", w.group(1))
            if names:
                reasons.setdefault(names[0], w.group(1).strip())
    return reasons


def _reasons_text(text: str) -> str:
    reasons = parse_reasons(text)
    if not reasons:
        return ""
    items = list(reasons.items())[:5]
    more = f" (+{len(reasons) - 5} more)" if len(reasons) > 5 else ""
    return "; QNN: " + "; ".join(f"{n}: {r}" for n, r in items) + more


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
