"""Target profiles: data (``targets/<name>.yaml``) validated by a frozen schema.

Unknown keys are rejected at every level so that a typo in a profile is an error, not a
silently ignored setting. The loader is plain Python + PyYAML so that a device can read a
profile without the build toolchain.
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

from edgepipe.errors import TargetError

__all__ = [
    "Budgets",
    "Cpu",
    "Npu",
    "Quantization",
    "RuntimeOptions",
    "Target",
    "list_targets",
    "load_target",
    "parse_target",
    "targets_dir",
]

SCHEMA_VERSION = 1


@dataclasses.dataclass(frozen=True)
class Cpu:
    """CPU / ISA facts of the device. ``qemu_cpu`` is the model qemu emulates for it."""

    arch: Literal["x86_64", "aarch64"]
    model: str
    isa: tuple[str, ...] = ()
    cores: int = 4
    ram_gb: float = 8.0
    mem_bandwidth_gbps: float = 10.0  # sustained read bandwidth, for decode-speed estimates
    gops: float = 50.0  # sustained int8 GOP/s over all cores, for prefill estimates
    qemu_cpu: str | None = None


@dataclasses.dataclass(frozen=True)
class Quantization:
    """How weights are stored. ``bits`` applies to every transformer MatMul except the
    layers named in ``eight_bit_layers``; the tied embedding / lm_head table has its own bits."""

    bits: Literal[4, 8, 32] = 4
    block_size: int = 32
    symmetric: bool = False
    accuracy_level: Literal[0, 1, 2, 3, 4] = 4
    algorithm: Literal["rtn", "mse", "imatrix", "gptq"] = "imatrix"
    embedding_bits: Literal[4, 8, 32] = 8
    embedding_block_size: int | None = None  # default: block_size
    eight_bit_layers: tuple[str, ...] = ()  # whole layers: "first", "last", "3", "0-3"
    eight_bit_ops: tuple[str, ...] = ()  # "down_proj" everywhere, or "down_proj@0-3,26-29" in those layers
    eight_bit_block_size: int | None = None  # block of the 8-bit matrices (default: block_size)


@dataclasses.dataclass(frozen=True)
class RuntimeOptions:
    execution_provider: Literal["CPUExecutionProvider", "QNNExecutionProvider"] = "CPUExecutionProvider"
    threads: int = 0  # 0: one per physical core
    context_length: int = 2048


@dataclasses.dataclass(frozen=True)
class Budgets:
    """What an artifact must meet to ship. ``None`` means unchecked."""

    max_ram_mb: float | None = None
    max_artifact_mb: float | None = None
    max_ppl_increase_pct: float | None = None
    min_top1_agreement: float | None = None
    min_decode_tok_s: float | None = None  # on the reference device, checked only there


@dataclasses.dataclass(frozen=True)
class Npu:
    """A Qualcomm Hexagon NPU (HTP) and the QDQ scheme it is given (used by ``edgepipe.npu``).

    The HTP runs only static shapes, so ``seq_len`` fixes the encoder's sequence length (and a
    decoder's prefill length); ``context_length`` is a decoder's fixed KV-cache capacity.
    ``soc_model`` is QNN's SoC id (e.g. 57 = SM8650), passed to the compiler when known.
    """

    htp_arch: Literal[68, 69, 73, 75, 79, 81]
    soc_model: int | None = None
    activation_type: Literal["uint8", "uint16"] = "uint16"
    weight_type: Literal["int8", "uint8"] = "int8"
    per_channel: bool = True
    seq_len: int = 128
    context_length: int = 256
    allow_cpu_fallback: bool = False
    min_cosine: float = 0.99  # every eval sentence: cosine(NPU, fp32 CPU) at least this
    min_retrieval_agreement: float = 0.9  # nearest-neighbour top-1 agreement with fp32
    calibration_samples: int = 64


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    description: str
    cpu: Cpu
    quantization: Quantization
    runtime: RuntimeOptions
    budgets: Budgets
    device_runner: Literal["local", "qemu", "ssh"] = "local"
    alias_of: str | None = None
    npu: Npu | None = None

    def to_dict(self) -> dict[str, Any]:
        return _to_plain(dataclasses.asdict(self))


def _to_plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {k: _to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_to_plain(v) for v in obj]
    return obj


def _coerce(tp: Any, value: Any, where: str) -> Any:
    """Check ``value`` against the annotation ``tp``; return it in the dataclass's own form."""
    origin = get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, where)
    if origin in (Union, types.UnionType):
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
    if origin is Literal:
        allowed = get_args(tp)
        # bool is an int subclass; never let True stand for 1
        if isinstance(value, bool) or value not in allowed:
            raise TargetError(f"{where} is {value!r}; allowed values: {', '.join(map(repr, allowed))}")
        return value
    if origin is tuple:
        if not isinstance(value, list):
            raise TargetError(f"{where} must be a list, got {type(value).__name__}")
        (item,) = get_args(tp)[:1]
        return tuple(_coerce(item, v, f"{where}[{i}]") for i, v in enumerate(value))
    if tp is bool:
        if not isinstance(value, bool):
            raise TargetError(f"{where} must be true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int) or not (0 <= value <= 1 << 20):
            raise TargetError(f"{where} must be an integer between 0 and {1 << 20}, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not (0 <= value < 1e9):
            raise TargetError(f"{where} must be a number between 0 and 1e9, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str) or not value or len(value) > 500:
            raise TargetError(f"{where} must be a non-empty string, got {value!r}")
        return value
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
    target = _build(Target, data, source)
    q = target.quantization
    for key in ("block_size", "embedding_block_size", "eight_bit_block_size"):
        v = getattr(q, key)
        if v is not None and v not in (16, 32, 64, 128, 256):
            raise TargetError(f"{source}.quantization.{key} is {v}; use 16, 32, 64, 128 or 256")
    if target.npu is not None and target.runtime.execution_provider != "QNNExecutionProvider":
        raise TargetError(f"{source}: a profile with an npu section needs runtime.execution_provider: QNNExecutionProvider")
    return target


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


def _read_yaml(path: Path) -> Any:
    import yaml

    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise TargetError(f"cannot read target profile {path}: {e}; fix or remove the file") from None
    try:
        return yaml.safe_load(text)
    except RecursionError:
        raise TargetError(f"target profile {path} is nested too deeply; fix the file") from None
    except yaml.YAMLError as e:
        line = str(e).replace("\n", " ")
        raise TargetError(f"target profile {path} is not valid YAML ({line}); fix the file") from None


def list_targets() -> list[str]:
    return sorted(p.stem for p in targets_dir().glob("*.yaml"))


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except (OSError, ValueError):  # a name too long for the filesystem, a NUL byte
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
            raise TargetError(f"target profile file {name_or_path[:200]} does not exist")
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
