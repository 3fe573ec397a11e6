"""The contract every build stage keeps: a frozen config in, a typed result out, cached.

A stage is a function ``run(config, *inputs, ctx) -> Result``. ``config`` is a frozen dataclass
that holds everything that decides the output, inputs included by their cache keys (never by
their folders, which are themselves named by keys); the stage cache (:mod:`edgepipe.cache`)
stores the output under a hash of the stage name and that config, so a build killed between
stages resumes from the last complete one, and a change to any setting rebuilds exactly what it
affects. Every backend (CPU, NPU) composes its pipeline from such stages (``edgepipe.backends``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from edgepipe.runtime.progress import Progress, silent


@dataclass(frozen=True)
class StageContext:
    """What every stage is handed besides its config: where to report and how many threads to use."""

    progress: Progress = silent
    threads: int = 0


class StageConfig(Protocol):
    """A frozen dataclass. ``VERSION`` is bumped when the stage's output changes for the same config."""

    VERSION: int


@dataclass(frozen=True)
class StageOutput:
    """A complete stage cache entry: its folder, its key and the info the stage recorded."""

    dir: Path
    key: str
    info: dict[str, Any]


def _plain(value: Any) -> Any:
    """A config value as JSON-able data that names its type: two configs of different types with the
    same fields (say ``Mse(steps=12)`` and ``Imatrix(steps=12)``) must not share a key."""
    if hasattr(value, "to_dict"):
        return {"type": type(value).__name__, "fields": value.to_dict()}
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {"type": type(value).__name__, "fields": {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    return value


def config_parts(stage: str, config: Any) -> dict[str, Any]:
    """The cache key's inputs: the stage's name, its config's fields (typed) and version."""
    if not dataclasses.is_dataclass(config) or isinstance(config, type):
        raise TypeError(f"a stage config is a dataclass instance, got {config!r}")  # a bug, not user input
    return {"stage": stage, "config": _plain(config), "v": getattr(config, "VERSION", 1)}


def run_cached(
    stage: str,
    config: Any,
    produce: Callable[[Path], dict[str, Any] | None],
    ctx: StageContext,
    *,
    need_bytes: int | None = None,
    need_ram_bytes: int | None = None,
) -> StageOutput:
    """The stage's folder for ``config``, made by ``produce(tmp)`` unless a complete entry exists."""
    from edgepipe.cache import cached_stage, key_of

    parts = config_parts(stage, config)
    path, info = cached_stage(stage, parts, produce, need_bytes=need_bytes, need_ram_bytes=need_ram_bytes, progress=ctx.progress)
    return StageOutput(dir=path, key=key_of(parts), info=info)
