"""onnxruntime-qnn sessions on the device: plug-in EP registration, HTP session options, sessions.

Why a module of its own: onnxruntime-qnn 2.x is a *plug-in* execution provider. It is registered
once per process from its shared library and then chosen by device (``ort.get_ep_devices()``),
not by name in ``providers=[...]``. On x86-64 Linux its ``libQnnHtp.so`` is the HTP *simulator*:
it tells what the NPU accepts and computes what the NPU would, bit for bit, but its timings say
nothing about a phone.

QNN reports why it rejects a node only in its log (``backendValidateOpConfig() failed for node
`X` of type `LayerNorm` with error code 3110``), so sessions are created with the process's stderr
captured and those lines are matched to the failing nodes (``parse_reasons``). The build's coverage
check and EPContext compile (``edgepipe.npu.qnn``) use the same session options.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import tempfile
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from edgepipe.errors import NpuCoverageError, NpuUnavailableError

log = logging.getLogger(__name__)

EP_NAME = "QNNExecutionProvider"
_lock = threading.Lock()
_registered = False


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

    path = str(onnxruntime_qnn.get_qnn_htp_path())
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


