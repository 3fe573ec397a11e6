"""The backend a target selects, by its execution provider."""

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
