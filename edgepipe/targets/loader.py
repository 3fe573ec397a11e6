"""Reading target profiles: YAML (``targets/<name>.yaml``, shipped in the wheel) validated against
the schema. Unknown keys are rejected at every level so that a typo in a profile is an error, not a
silently ignored setting. Plain Python + PyYAML, so a device can read a profile without the toolchain.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from edgepipe.errors import InputError, TargetError, cannot_read
from edgepipe.targets.schema import SCHEMA_VERSION, Target


def _union(tp: Any, value: Any, where: str) -> Any:
    args = get_args(tp)
    if value is None and type(None) in args:
        return None
    errors = []
    for arg in args:
        if arg is type(None):
            continue
        try:
            return _coerce(arg, value, where)
        except TargetError as e:
            errors.append(str(e))
    raise TargetError(errors[0] if errors else f"{where}: bad value {value!r}")


def _literal(tp: Any, value: Any, where: str) -> Any:
    allowed = get_args(tp)
    # bool is an int subclass; never let True stand for 1
    if isinstance(value, bool) or value not in allowed:
        raise TargetError(f"{where} is {value!r}; allowed values: {', '.join(map(repr, allowed))}")
    return value


def _tuple(tp: Any, value: Any, where: str) -> Any:
    if not isinstance(value, list):
        raise TargetError(f"{where} must be a list, got {type(value).__name__}")
    (item,) = get_args(tp)[:1]
    return tuple(_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))


def _bool(value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise TargetError(f"{where} must be true or false, got {value!r}")
    return value


def _int(value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not (0 <= value <= 1 << 20):
        raise TargetError(f"{where} must be an integer between 0 and {1 << 20}, got {value!r}")
    return value


def _float(value: Any, where: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value < 1e9):
        raise TargetError(f"{where} must be a number between 0 and 1e9, got {value!r}")
    return float(value)


def _str(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value or len(value) > 500:
        raise TargetError(f"{where} must be a non-empty string, got {value!r}")
    return value


_GENERIC = {Union: _union, types.UnionType: _union, Literal: _literal, tuple: _tuple}
_SCALAR = {bool: _bool, int: _int, float: _float, str: _str}


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in the dataclass's own form."""
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    generic = _GENERIC.get(get_origin(tp))
    if generic is not None:
        return generic(tp, value, where)
    if tp in _SCALAR:
        return _SCALAR[tp](value, where)
    raise TypeError(f"unsupported schema type {tp!r}")  # a bug in the schema, not user input


def _build(cls: type, data: Any, where: str) -> Any:
    if not isinstance(data, dict):
        raise TargetError(f"{where} must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(str(k) for k in data if k not in fields)
    if unknown:
        raise TargetError(
            f"{where}: unknown key {unknown[0]!r}; allowed keys: {', '.join(fields)}"
        )
    kwargs = {}
    for name, field in fields.items():
        if name not in data:
            if field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING:
                raise TargetError(f"{where}: missing required key {name!r}")
            continue
        kwargs[name] = _coerce(hints[name], data[name], f"{where}.{name}")
    return cls(**kwargs)


def parse_target(data: Any, source: str = "target") -> Target:
    """Validate a profile mapping (as read from YAML) into a :class:`Target`."""
    if isinstance(data, dict) and "schema_version" in data:
        data = dict(data)
        version = data.pop("schema_version")
        if version != SCHEMA_VERSION:
            raise TargetError(f"{source}: schema_version {version!r} is not supported (expected {SCHEMA_VERSION})")
    if isinstance(data, dict) and "device_runner" in data:
        raise TargetError(f"{source}: device_runner is no longer a profile key (nothing read it); delete it and pass --device to build or validate")
    target = _build(Target, data, source)
    q = target.quantization
    for key in ("block_size", "embedding_block_size", "eight_bit_block_size"):
        v = getattr(q, key)
        if v is not None and v not in (16, 32, 64, 128, 256):
            raise TargetError(f"{source}.quantization.{key} is {v}; use 16, 32, 64, 128 or 256")
    _check_size_budget(q, source)
    _check_kernel_time(q, source)
    qnn = target.runtime.execution_provider == "QNNExecutionProvider"
    if target.npu is not None and not qnn:
        raise TargetError(f"{source}: a profile with an npu section needs runtime.execution_provider: QNNExecutionProvider")
    if qnn and target.npu is None:
        raise TargetError(f"{source}: runtime.execution_provider QNNExecutionProvider needs an npu section (htp_arch, ...); add one")
    return target


def _check_size_budget(q: Any, source: str) -> None:
    """What a size budget needs that no model changes: parseable formats, one budget, and bits per weight
    that at least the cheapest allowed format stores (the build checks the model's own smallest size)."""
    from edgepipe.errors import InputError
    from edgepipe.quantize.configs import allowed_formats

    where = f"{source}.quantization"
    try:
        fmts = allowed_formats(q)
    except InputError as e:
        raise TargetError(f"{where}.formats: {e}") from None
    if q.bits_per_weight is not None and q.max_mb is not None:
        raise TargetError(f"{where}: give one size budget, bits_per_weight or max_mb, not both")
    if q.formats and q.bits_per_weight is None and q.max_mb is None:
        raise TargetError(f"{where}.formats needs a size budget (bits_per_weight or max_mb) to choose between them")
    if q.bits_per_weight is not None and q.bits_per_weight < fmts[0].bits_per_weight:
        raise TargetError(
            f"{where}.bits_per_weight {q.bits_per_weight} cannot be met: the smallest reachable is "
            f"{fmts[0].bits_per_weight:.3f} bits/weight ({fmts[0].label} everywhere)"
        )


def _check_kernel_time(q: Any, source: str) -> None:
    """A time budget needs a size budget to allocate within and a measured time for the base format and
    every allowed one; times are positive and named once."""
    from edgepipe.quantize.configs import Format, allowed_formats

    where = f"{source}.quantization"
    seen: set[str] = set()
    for i, row in enumerate(q.kernel_time):
        try:
            label = Format.parse(row.format).label
        except InputError as e:
            raise TargetError(f"{where}.kernel_time[{i}].format: {e}") from None
        if label in seen:
            raise TargetError(f"{where}.kernel_time names {label} twice; keep one row per format")
        seen.add(label)
        if row.decode <= 0 or (row.prefill is not None and row.prefill <= 0):
            raise TargetError(f"{where}.kernel_time[{i}] ({label}): times are positive ratios to the base format")
    if q.max_decode_time is None:
        return
    if q.max_decode_time <= 0:
        raise TargetError(f"{where}.max_decode_time must be a positive fraction of the base format's decode time")
    if q.bits_per_weight is None and q.max_mb is None:
        raise TargetError(f"{where}.max_decode_time needs a size budget (bits_per_weight or max_mb) to allocate within")
    needed = [Format(q.bits, q.block_size, q.symmetric).label, *(f.label for f in allowed_formats(q))]
    missing = [label for label in needed if label not in seen]
    if missing:
        raise TargetError(f"{where}.max_decode_time needs kernel_time for the base and every allowed format; add a row for {missing[0]}")


def targets_dir() -> Path:
    """Where the shipped profiles are: inside the wheel, or ``targets/`` of a source checkout."""
    env = os.environ.get("EDGEPIPE_TARGETS_DIR")
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "_targets", here.parent / "targets"):
        if candidate.is_dir():
            return candidate
    raise TargetError("no target profiles found; reinstall edgepipe (`pip install edgepipe`)")


MAX_PROFILE_BYTES = 1 << 20  # a profile is a page of settings


def _strict_loader(what: str = "target profile") -> Any:
    """PyYAML's safe loader without aliases (``*name``: nested ones expand exponentially, the "billion
    laughs") and with duplicate keys refused (the second would silently win)."""
    import yaml

    class StrictLoader(yaml.SafeLoader):
        def compose_node(self, parent: Any, index: Any) -> Any:
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise yaml.constructor.ConstructorError(None, None, f"aliases (*name) are not allowed in a {what}", mark)
            return super().compose_node(parent, index)

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if isinstance(key, (list, dict)) or key in seen:
                    raise yaml.constructor.ConstructorError(None, None, f"duplicate or unhashable key {str(key)[:60]!r}", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep)

    return StrictLoader


def _read_yaml(path: Path) -> Any:
    return read_yaml(path, "target profile", MAX_PROFILE_BYTES, TargetError)


def read_yaml(path: Path, what: str, max_bytes: int, error: type[InputError] = InputError) -> Any:
    """A small YAML file of ours (a profile, a matrix plan) through the strict loader, bounded in size;
    every problem is one ``error`` naming ``what`` and the file."""
    import yaml

    try:
        if path.stat().st_size > max_bytes:
            raise error(f"{what} {path} is over {max_bytes >> 10} KB; not a {what}, fix the file")
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise error(cannot_read(what, path, e)) from None
    except UnicodeDecodeError as e:
        raise error(f"cannot read {what} {path}: {e}; fix or remove the file") from None
    try:
        return yaml.load(text, Loader=_strict_loader(what))  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise error(f"{what} {path} is nested too deeply; fix the file") from None
    except yaml.YAMLError as e:
        line = str(e).replace("\n", " ")
        raise error(f"{what} {path} is not valid YAML ({line}); fix the file") from None


def list_targets() -> list[str]:
    return sorted(p.stem for p in targets_dir().glob("*.yaml"))


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long for the filesystem, a NUL byte
        return False


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def load_target(name_or_path: str, _seen: tuple[str, ...] = ()) -> Target:
    """Load a shipped profile by name (``raspberrypi5``) or a profile file by path.

    An alias profile (``alias_of: raspberrypi5``) resolves to the profile it names, keeping
    its own name so that the manifest records what the user asked for.
    """
    if not isinstance(name_or_path, str):
        raise TargetError(f"a target is a profile name or a .yaml path, got {type(name_or_path).__name__}")
    path = Path(name_or_path)
    if name_or_path.endswith((".yaml", ".yml")) or _is_file(path):
        if not _is_file(path):
            there = _exists(path)
            raise TargetError(f"target profile file {name_or_path[:200]} "
                              + ("is not a regular file (a folder, a pipe or a device); pass a profile .yaml file" if there else "does not exist"))
    else:
        path = targets_dir() / f"{name_or_path}.yaml"
        if not _is_file(path):
            names = ", ".join(list_targets())
            raise TargetError(f"unknown target {name_or_path[:100]!r}; choose one of: {names}")
    if str(path.resolve()) in _seen or len(_seen) > 8:
        raise TargetError(f"{path}: alias_of forms a cycle ({' -> '.join(Path(p).name for p in _seen)} -> {path.name})")
    data = _read_yaml(path)
    if isinstance(data, dict) and set(data) <= {"name", "alias_of", "description", "schema_version"} and data.get("alias_of"):
        alias = data["alias_of"]
        if not isinstance(alias, str) or alias == path.stem:
            raise TargetError(f"{path}: alias_of must name another target")
        base = load_target(alias, _seen + (str(path.resolve()),))
        return dataclasses.replace(base, name=str(data.get("name", path.stem)), alias_of=base.name)
    return parse_target(data, source=path.name)
