"""Qualcomm Hexagon NPU (HTP) path: QDQ + EPContext artifacts through onnxruntime-qnn.

Public entry point: :func:`build_npu`. Heavy imports (torch, onnxruntime-qnn) happen inside
the functions, so importing this package costs nothing on a machine without them.
"""

from __future__ import annotations

from edgepipe.npu.encoder import build_npu
from edgepipe.npu.qnn import Coverage, NpuCoverageError, NpuUnavailableError

__all__ = ["Coverage", "NpuCoverageError", "NpuUnavailableError", "build_npu"]
