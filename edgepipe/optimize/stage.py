"""The optimize stage: graph-only passes on the quantized decoder (the weights are copied unread).

The fp32 export is never optimized: it stays as exported, the reference for accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from edgepipe.stage import StageContext, run_cached


def _passes() -> dict[str, int]:
    from edgepipe.optimize import PASSES

    return dict(PASSES)


def passes_for(kv_cache_dtype: str) -> dict[str, int]:
    """The passes (and versions) of a build whose profile keeps its KV cache in ``kv_cache_dtype``."""
    from edgepipe.optimize.decoder import pass_versions

    return pass_versions(kv_cache_dtype)


@dataclass(frozen=True)
class OptimizeConfig:
    VERSION = 1

    input_key: str  # the quantize stage's key
    passes: dict[str, int] = field(default_factory=_passes)  # pass name -> version, in the order they run


@dataclass(frozen=True)
class OptimizeResult:
    model_dir: Path
    key: str
    info: dict[str, Any]  # the manifest's "optimize" section


def run_optimize(source_dir: Path, config: OptimizeConfig, ctx: StageContext) -> OptimizeResult:
    from edgepipe.optimize import optimize_dir

    out = run_cached("optimize", config, lambda tmp: optimize_dir(source_dir, tmp / "model", config.passes), ctx)
    return OptimizeResult(model_dir=out.dir / "model", key=out.key, info=out.info)
