"""edgepipe: an edge deployment and quantization compiler for small open LLMs.

Public API (names resolve on first use, so that ``import edgepipe.runtime`` on a device loads
nothing of the build toolchain)::

    import edgepipe
    result = edgepipe.build(target="raspberrypi5", out="dist/smollm2-rpi")
    table = edgepipe.run_matrix("plan.yaml", out="dist/matrix", ray="auto")  # models x targets x budgets
    manifest = edgepipe.verify_artifact("dist/smollm2-rpi")
"""

from __future__ import annotations

import importlib
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

_LAZY = {
    "build": "edgepipe.pipeline",
    "search": "edgepipe.search",
    "run_matrix": "edgepipe.matrix",
    "MatrixResult": "edgepipe.matrix",
    "load_plan": "edgepipe.matrix",
    "SearchResult": "edgepipe.search",
    "BuildRequest": "edgepipe.pipeline",
    "BuildResult": "edgepipe.pipeline",
    "Target": "edgepipe.targets",
    "list_targets": "edgepipe.targets",
    "load_target": "edgepipe.targets",
    "estimate_for": "edgepipe.estimate",
    "inspect_model": "edgepipe.export",
    "get_runner": "edgepipe.devices",
    "ArtifactKind": "edgepipe.runtime.kinds",
    "Manifest": "edgepipe.runtime.manifest",
    "read_manifest": "edgepipe.runtime.manifest",
    "verify_artifact": "edgepipe.runtime.manifest",
    "package_oci": "edgepipe.package.oci",
    "OciImage": "edgepipe.package.oci",
    "open_artifact": "edgepipe.runtime.artifact",
    "GenerationConfig": "edgepipe.runtime.generate",
    "generate": "edgepipe.runtime.generate",
    "keygen": "edgepipe.package.signing",
    "sign_artifact": "edgepipe.package.signing",
    "deploy": "edgepipe.devices.deploy",
    "rollback": "edgepipe.devices.deploy",
    "deployments": "edgepipe.devices.deploy",
}

__all__ = [
    "ArtifactError",
    "DeviceError",
    "EdgepipeError",
    "InputError",
    "ModelError",
    "StageError",
    "TargetError",
    *sorted(_LAZY),
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'edgepipe' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value
