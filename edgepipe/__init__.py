"""edgepipe: an edge deployment and quantization compiler for small open LLMs.

Public API (heavy dependencies are imported lazily, inside the functions that need them)::

    import edgepipe
    result = edgepipe.build(target="raspberrypi5", out="dist/smollm2-rpi")
"""

from __future__ import annotations

from typing import Any

from edgepipe.errors import (
    ArtifactError,
    DeviceError,
    EdgepipeError,
    InputError,
    ModelError,
    StageError,
    TargetError,
)
from edgepipe.targets import Target, list_targets, load_target

__all__ = [
    "ArtifactError",
    "DeviceError",
    "EdgepipeError",
    "InputError",
    "ModelError",
    "StageError",
    "Target",
    "TargetError",
    "build",
    "list_targets",
    "load_target",
]


def build(**kwargs: Any):
    """See :func:`edgepipe.build.build`."""
    from edgepipe.build import build as _build

    return _build(**kwargs)
