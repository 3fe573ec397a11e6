"""Backends: which stages a target's artifact is made of. The target selects one.

- ``cpu``: a dynamic decoder for onnxruntime's CPU execution provider (MatMulNBits weights).
- ``npu``: static QDQ graphs and EPContext binaries for the Hexagon NPU (targets with ``npu:``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

from edgepipe.targets import Target

if TYPE_CHECKING:
    from edgepipe.pipeline import BuildRequest, BuildResult
    from edgepipe.runtime.progress import Progress


class Backend(Protocol):
    def build(self, request: BuildRequest, progress: Progress) -> BuildResult: ...


def backend_for(target: Target) -> Backend:
    """The backend of the target's execution provider (the profile schema ties QNN to an ``npu:`` section)."""
    if target.runtime.execution_provider == "QNNExecutionProvider":
        from edgepipe.backends.npu import NpuBackend

        return NpuBackend()
    from edgepipe.backends.cpu import CpuBackend

    return CpuBackend()
