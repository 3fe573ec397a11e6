"""A matrix plan: models x targets x optional size budgets, read from YAML and checked before any work.

    models:                       # Hugging Face folders (relative paths: from the plan's folder)
      - ./models/granite-2b
      - {path: ./models/smollm2, name: smollm2}
    targets:                      # profile names or .yaml paths; a target may name a device runner
      - x86-avx2
      - {name: raspberrypi5, device: qemu}
    budgets:                      # optional; each cell is built at each (replaces the profile's budget)
      - {bits_per_weight: 5.5}
      - {max_mb: 120}
    calib: ./calib.txt            # optional (default: the packaged texts)
    eval: ./eval.txt
    allow_untrained: false        # random models on purpose (tests, shape benchmarks)
    cache: /shared/edgepipe-cache # optional: the stage cache every node reaches (default: $EDGEPIPE_CACHE)

Every problem is one line naming the plan, the entry and the fix (:class:`~edgepipe.errors.InputError`,
exit 2). The plan is read with the profiles' strict loader: no aliases, no duplicate keys, bounded size.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepipe.errors import InputError

MAX_PLAN_BYTES = 256 << 10
MAX_CELLS = 10_000
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
_TOP = {"models", "targets", "budgets", "calib", "eval", "allow_untrained", "cache"}


@dataclass(frozen=True)
class PlanModel:
    name: str
    path: Path


@dataclass(frozen=True)
class PlanTarget:
    name: str  # the profile name or path as given
    label: str  # its name in cell ids
    device: str | None = None


@dataclass(frozen=True)
class Budget:
    bits_per_weight: float | None = None
    max_mb: float | None = None

    @property
    def label(self) -> str:
        return f"bpw{self.bits_per_weight:g}" if self.bits_per_weight is not None else f"mb{self.max_mb:g}"


@dataclass(frozen=True)
class Cell:
    model: PlanModel
    target: PlanTarget
    budget: Budget | None

    @property
    def id(self) -> str:
        return "--".join([self.model.name, self.target.label] + ([self.budget.label] if self.budget else []))


@dataclass(frozen=True)
class Plan:
    source: Path
    models: tuple[PlanModel, ...]
    targets: tuple[PlanTarget, ...]
    budgets: tuple[Budget, ...] = ()
    calib: Path | None = None
    eval_file: Path | None = None
    allow_untrained: bool = False
    cache: Path | None = None

    def cells(self) -> list[Cell]:
        return [Cell(m, t, b) for m in self.models for t in self.targets for b in (self.budgets or (None,))]


def load_plan(path: Path | str) -> Plan:
    """Read and check a plan file; raise InputError (one line) on the first problem."""
    from edgepipe.targets.loader import read_yaml

    src = Path(path)
    data = read_yaml(src, "matrix plan", MAX_PLAN_BYTES)
    return parse_plan(data, src)


def parse_plan(data: Any, source: Path) -> Plan:
    where = f"matrix plan {source}"
    if not isinstance(data, dict):
        raise InputError(f"{where}: the top level must be a mapping with models and targets; see docs/scaling.md")
    unknown = sorted(set(map(str, data)) - _TOP)
    if unknown:
        raise InputError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(_TOP))}")
    base = source.parent
    models = tuple(_model(v, f"{where}: models[{i}]", base) for i, v in enumerate(_list(data, "models", where, required=True)))
    targets = tuple(_target(v, f"{where}: targets[{i}]") for i, v in enumerate(_list(data, "targets", where, required=True)))
    budgets = tuple(_budget(v, f"{where}: budgets[{i}]") for i, v in enumerate(_list(data, "budgets", where, required=False)))
    _unique([m.name for m in models], f"{where}: models", "give each a distinct name: {path: ..., name: ...}")
    _unique([t.label for t in targets], f"{where}: targets", "list each target once")
    _unique([b.label for b in budgets], f"{where}: budgets", "list each budget once")
    plan = Plan(
        source=source, models=models, targets=targets, budgets=budgets,
        calib=_file(data.get("calib"), f"{where}: calib", base), eval_file=_file(data.get("eval"), f"{where}: eval", base),
        allow_untrained=_flag(data.get("allow_untrained", False), f"{where}: allow_untrained"),
        cache=_cache(data.get("cache"), f"{where}: cache", base),
    )
    if len(plan.cells()) > MAX_CELLS:
        raise InputError(f"{where}: {len(plan.cells())} cells; at most {MAX_CELLS}, split the plan")
    return plan


def _list(data: dict[str, Any], key: str, where: str, *, required: bool) -> list[Any]:
    value = data.get(key)
    if value is None and not required:
        return []
    if not isinstance(value, list) or (required and not value):
        raise InputError(f"{where}: {key} must be a non-empty list" + ("" if required else " (or left out)"))
    return value


def _unique(names: list[str], where: str, fix: str) -> None:
    seen: set[str] = set()
    for n in names:
        if n in seen:
            raise InputError(f"{where}: {n!r} appears twice; {fix}")
        seen.add(n)


def _entry(value: Any, where: str, key: str, allowed: set[str]) -> dict[str, Any]:
    """A list entry given as a plain string (its ``key``) or a mapping with ``key`` and ``allowed`` keys."""
    if isinstance(value, str):
        return {key: value}
    if not isinstance(value, dict):
        raise InputError(f"{where} must be a string or a mapping with {key}, got {type(value).__name__}")
    unknown = sorted(set(map(str, value)) - allowed)
    if unknown:
        raise InputError(f"{where}: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(allowed))}")
    if not isinstance(value.get(key), str) or not value[key]:
        raise InputError(f"{where}: {key} must be a non-empty string")
    return value


def _model(value: Any, where: str, base: Path) -> PlanModel:
    d = _entry(value, where, "path", {"path", "name"})
    path = (base / d["path"]).absolute()
    if not (path / "config.json").is_file():
        raise InputError(f"{where}: {path} is not a Hugging Face model folder (no config.json); fix the path")
    name = d.get("name", path.name)
    if not isinstance(name, str) or not _NAME.match(name):
        raise InputError(f"{where}: name {name!r} must be 1-64 letters, digits, '.', '_' or '-'; give a name: {{path: ..., name: ...}}")
    return PlanModel(name, path)


def _target(value: Any, where: str) -> PlanTarget:
    from edgepipe.errors import TargetError
    from edgepipe.targets import load_target

    d = _entry(value, where, "name", {"name", "device"})
    device = d.get("device")
    if device is not None and (not isinstance(device, str) or not device):
        raise InputError(f"{where}: device must be a runner spec (qemu, qemu:CPU, ssh://user@host)")
    try:
        tgt = load_target(d["name"])
    except TargetError as e:
        raise InputError(f"{where}: {str(e).splitlines()[0]}") from None
    if device is not None:
        from edgepipe.devices import get_runner

        try:
            get_runner(device, target=tgt)  # a bad spec fails now, not in a cell
        except InputError as e:
            raise InputError(f"{where}: {str(e).splitlines()[0]}") from None
    label = tgt.name if _NAME.match(tgt.name) else Path(d["name"]).stem
    return PlanTarget(d["name"], label, device)


def _budget(value: Any, where: str) -> Budget:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = {"bits_per_weight": value}
    if not isinstance(value, dict) or len(value) != 1 or next(iter(value)) not in ("bits_per_weight", "max_mb"):
        raise InputError(f"{where} must be {{bits_per_weight: X}} or {{max_mb: N}}")
    key, number = next(iter(value.items()))
    limit = 64 if key == "bits_per_weight" else 1e7
    if isinstance(number, bool) or not isinstance(number, (int, float)) or not (0 < number < limit):
        raise InputError(f"{where}: {key} must be a number between 0 and {limit:g}, got {number!r}")
    return Budget(**{key: float(number)})


def _file(value: Any, where: str, base: Path) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise InputError(f"{where} must be a path to a UTF-8 text file")
    path = (base / value).absolute()
    if not path.is_file():
        raise InputError(f"{where}: {path} is not a file; fix the path")
    return path


def _flag(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise InputError(f"{where} must be true or false, got {value!r}")
    return value


def _cache(value: Any, where: str, base: Path) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, str) or not value:
        raise InputError(f"{where} must be a folder path")
    if "://" in value:
        raise InputError(f"{where}: {value!r} is a URL; the stage cache is a POSIX folder every node mounts (NFS, CephFS...), "
                         "object storage (fsspec URLs) is not supported")
    return (base / Path(value).expanduser()).absolute()
