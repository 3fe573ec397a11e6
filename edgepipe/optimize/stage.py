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
    kv_ranges_key: str | None = None  # the kv_ranges stage's key, when a pass needs the cache's ranges

    def to_dict(self) -> dict[str, Any]:
        """The cache key's fields: ``kv_ranges_key`` only when set, so builds without an int8 cache
        keep the keys they had before it existed."""
        extra = {"kv_ranges_key": self.kv_ranges_key} if self.kv_ranges_key is not None else {}
        return {"input_key": self.input_key, "passes": dict(self.passes), **extra}


@dataclass(frozen=True)
class OptimizeResult:
    model_dir: Path
    key: str
    info: dict[str, Any]  # the manifest's "optimize" section


def run_optimize(source_dir: Path, config: OptimizeConfig, ctx: StageContext, kv_ranges: Path | None = None) -> OptimizeResult:
    """``kv_ranges``: the ranges file of the stage ``config.kv_ranges_key`` names (kv_cache_int8 reads it)."""
    from edgepipe.optimize import optimize_dir

    out = run_cached("optimize", config, lambda tmp: optimize_dir(source_dir, tmp / "model", config.passes, kv_ranges), ctx)
    return OptimizeResult(model_dir=out.dir / "model", key=out.key, info=out.info)
