"""What to quantize with: one frozen config per algorithm, and the mixed-precision scheme of a decoder.

torchao's shape: ``quantize(src, dst, Gptq(bits=4, block_size=32))`` -- the config's *type* picks the
handler that quantizes a matrix (:mod:`edgepipe.quantize.handlers`) and its fields are everything that
handler needs, so adding an algorithm is a new config class plus one handler, not a new branch in a
string switch. A decoder gets a :class:`MixedPrecision` scheme: a ``default`` config for the transformer
matrices, an ``eight_bit`` config for the matrices its rules name and a ``table`` config for the
embedding / lm_head table. Which matrix ends up with which config is the :class:`~edgepipe.quantize.bitplan.BitPlan`.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
from typing import Any, ClassVar

from edgepipe.errors import InputError

__all__ = [
    "BLOCK_SIZES", "FP32", "Format", "Gptq", "Imatrix", "MixedPrecision", "Mse", "Rtn", "WeightOnlyConfig",
    "allowed_formats", "as_scheme", "config_for_format", "layer_matches", "scheme_from_target",
]

BLOCK_SIZES = (16, 32, 64, 128, 256)  # what MatMulNBits / GatherBlockQuantized accept (powers of two >= 16)


@dataclass(frozen=True)
class Format:
    """How one matrix is stored: ``bits`` (4 or 8: MatMulNBits; 32: left in fp32), in blocks of
    ``block_size`` along K, a packed zero point per block unless ``symmetric``.

    This is all that decides a matrix's bytes, so it is what a size allocator chooses between.
    """

    bits: int
    block_size: int = 32
    symmetric: bool = False

    def __post_init__(self) -> None:
        if self.bits not in (4, 8, 32):
            raise InputError(f"a weight format has 4, 8 or 32 bits, not {self.bits}")
        if self.bits != 32 and self.block_size not in BLOCK_SIZES:
            raise InputError(f"block_size is {self.block_size}; use one of {', '.join(map(str, BLOCK_SIZES))}")

    def nbytes(self, K: int, N: int) -> int:
        """Bytes of a [K, N] weight as :func:`~edgepipe.quantize.blockwise.quantize_matrix` packs it
        (K padded to whole blocks): data, an fp32 scale per block, packed zero points if asymmetric."""
        if self.bits == 32:
            return K * N * 4
        blocks = -(-K // self.block_size)
        data = N * blocks * (self.block_size * self.bits // 8)
        scales = N * blocks * 4
        zero_points = 0 if self.symmetric else N * -(-blocks * self.bits // 8)
        return data + scales + zero_points

    @property
    def bits_per_weight(self) -> float:
        """Storage per weight when K is a multiple of the block."""
        if self.bits == 32:
            return 32.0
        return self.bits + 32.0 / self.block_size + (0.0 if self.symmetric else self.bits / self.block_size)

    @property
    def label(self) -> str:
        if self.bits == 32:
            return "fp32"
        return f"int{self.bits}/b{self.block_size}/{'sym' if self.symmetric else 'asym'}"

    @classmethod
    def parse(cls, label: str) -> Format:
        """The inverse of :attr:`label` ("int4/b32/asym", "int8/b64/sym", "fp32"): how a profile names
        the formats its size allocator may choose between."""
        m = _LABEL_RE.fullmatch(label.strip()) if isinstance(label, str) else None
        if m is None:
            raise InputError(f"weight format {label!r} is not int4/bBLOCK/sym|asym, int8/bBLOCK/sym|asym or fp32 (e.g. int4/b32/asym)")
        if m.group(0) == "fp32":
            return FP32
        return cls(int(m.group("bits")), int(m.group("block")), m.group("sym") == "sym")


FP32 = Format(32)
_LABEL_RE = re.compile(r"fp32|int(?P<bits>[48])/b(?P<block>\d{1,4})/(?P<sym>sym|asym)")


@dataclass(frozen=True)
class WeightOnlyConfig:
    """What every weight-only algorithm shares: the storage format and MatMulNBits' ``accuracy_level``
    (the activations' precision in the kernel: 4 = int8 activations, 0 = as the input)."""

    bits: int = 4
    block_size: int = 32
    symmetric: bool = False
    accuracy_level: int = 4

    algorithm: ClassVar[str] = ""
    needs_calibration: ClassVar[bool] = False  # activation statistics from calibration text
    needs_hessian: ClassVar[bool] = False  # each input's x^T x as well (costly: only for the matrices that use it)

    def __post_init__(self) -> None:
        if self.bits not in (4, 8):
            raise InputError(f"{type(self).__name__}: bits must be 4 or 8, got {self.bits}")
        if self.block_size not in BLOCK_SIZES:
            raise InputError(f"{type(self).__name__}: block_size is {self.block_size}; use one of {', '.join(map(str, BLOCK_SIZES))}")
        if self.accuracy_level not in range(5):
            raise InputError(f"{type(self).__name__}: accuracy_level must be 0-4, got {self.accuracy_level}")

    @property
    def format(self) -> Format:
        return Format(self.bits, self.block_size, self.symmetric)

    def with_block(self, block_size: int) -> WeightOnlyConfig:
        return dataclasses.replace(self, block_size=block_size)

    def to_dict(self) -> dict[str, Any]:
        return {"type": self.algorithm, **dataclasses.asdict(self)}


@dataclass(frozen=True)
class Rtn(WeightOnlyConfig):
    """Round to nearest on each block's range (symmetric: absmax, as llama.cpp's Q4_0 / Q8_0)."""

    algorithm: ClassVar[str] = "rtn"


@dataclass(frozen=True)
class Mse(WeightOnlyConfig):
    """Per block, the clipping range of least squared weight error among ``steps`` shrinks of the full
    range, then a least-squares refit of the scale. No calibration."""

    steps: int = 12
    algorithm: ClassVar[str] = "mse"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.steps < 1:
            raise InputError(f"{type(self).__name__}: steps must be at least 1, got {self.steps}")


@dataclass(frozen=True)
class Imatrix(Mse):
    """:class:`Mse` with the squared error weighted by each input channel's mean square activation
    (llama.cpp's imatrix): the error that reaches the output. Without statistics it is :class:`Mse`."""

    algorithm: ClassVar[str] = "imatrix"
    needs_calibration: ClassVar[bool] = True


@dataclass(frozen=True)
class Gptq(WeightOnlyConfig):
    """GPTQ: rounding error pushed onto the input channels not yet quantized through the inverse
    Hessian of the calibration activations, ``damp`` x its mean diagonal added first; ``act_order``
    takes the channels by decreasing Hessian diagonal. Falls back to :class:`Imatrix` for a matrix
    without a Hessian or with K not a multiple of the block."""

    damp: float = 0.01
    act_order: bool = True
    algorithm: ClassVar[str] = "gptq"
    needs_calibration: ClassVar[bool] = True
    needs_hessian: ClassVar[bool] = True

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 < self.damp < 1:
            raise InputError(f"Gptq: damp must be between 0 and 1, got {self.damp}")


ALGORITHMS: dict[str, type[WeightOnlyConfig]] = {cls.algorithm: cls for cls in (Rtn, Mse, Imatrix, Gptq)}


def layer_matches(spec: str, layer: int, num_layers: int) -> bool:
    """``spec`` is "first", "last", "first:N", "last:N", "N" or "A-B" (inclusive); a comma joins several."""
    return any(_part_matches(part.strip(), layer, num_layers) for part in spec.split(","))


def _part_matches(part: str, layer: int, num_layers: int) -> bool:
    if part == "first":
        return layer == 0
    if part == "last":
        return layer == num_layers - 1
    where, _, count = part.partition(":")
    if count.isdigit() and where in ("first", "last"):
        return layer < int(count) if where == "first" else layer >= num_layers - int(count)
    lo, _, hi = part.partition("-")
    return lo.isdigit() and (hi.isdigit() or not hi) and int(lo) <= layer <= int(hi or lo)


@dataclass(frozen=True)
class MixedPrecision:
    """Configs per kind of matrix in a decoder.

    ``default`` quantizes every weight MatMul (None: leave them fp32), except those that
    ``eight_bit_layers`` ("first", "last:2", "0-3", ...) or ``eight_bit_ops`` ("down_proj" everywhere,
    "qkv_proj@1-28" in those layers) name, which get ``eight_bit``; ``table`` quantizes the lm_head
    matrix, which a tied model's embedding lookup shares (None: fp32). The table's block is the
    largest of (its block, 128, 64, 32, 16) that divides the hidden size, so the lookup can read it.
    """

    default: WeightOnlyConfig | None = None
    table: WeightOnlyConfig | None = None
    eight_bit: WeightOnlyConfig | None = None
    eight_bit_layers: tuple[str, ...] = ()
    eight_bit_ops: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name in ("default", "table", "eight_bit"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, WeightOnlyConfig):
                raise InputError(f"MixedPrecision.{name} must be a weight-only config (Rtn, Mse, Imatrix, Gptq) or None, got {value!r}")
        if (self.eight_bit_layers or self.eight_bit_ops) and self.eight_bit is None:
            raise InputError("MixedPrecision: eight_bit_layers / eight_bit_ops need an eight_bit config")
        if self.eight_bit is not None and self.eight_bit.bits != 8:
            raise InputError(f"MixedPrecision.eight_bit must have 8 bits, got {self.eight_bit.bits}")

    @property
    def configs(self) -> tuple[WeightOnlyConfig, ...]:
        return tuple(c for c in (self.default, self.table, self.eight_bit) if c is not None)

    @property
    def needs_calibration(self) -> bool:
        return any(c.needs_calibration for c in self.configs)

    @property
    def needs_hessian(self) -> bool:
        return any(c.needs_hessian for c in self.configs)

    @property
    def algorithm(self) -> str:
        """The algorithm of the 4-bit matrices (an all-8-bit scheme: its body's)."""
        four = [c for c in (self.default, self.table) if c is not None and c.bits == 4]
        return (four or list(self.configs) or [Rtn()])[0].algorithm

    @property
    def eight_bit_algorithm(self) -> str:
        """The algorithm of the 8-bit matrices (a profile's ``eight_bit_algorithm``)."""
        eight = [c for c in (self.eight_bit, self.default, self.table) if c is not None and c.bits == 8]
        return (eight or [Rtn()])[0].algorithm

    def config_for(self, name: str, layer: int | None, num_layers: int, is_table: bool) -> WeightOnlyConfig | None:
        """The config of one matrix (None: fp32), before the table's block is fitted to the hidden size."""
        if is_table:
            return self.table
        if self.default is None:
            return None
        if self.eight_bit is not None and self._names_eight_bit(name, layer, num_layers):
            return self.eight_bit
        return self.default

    def names_eight_bit(self, name: str, layer: int | None, num_layers: int) -> bool:
        """Whether ``eight_bit_layers`` / ``eight_bit_ops`` name this matrix (an allocator leaves it at 8 bits)."""
        return self._names_eight_bit(name, layer, num_layers)

    def _names_eight_bit(self, name: str, layer: int | None, num_layers: int) -> bool:
        if layer is not None and any(layer_matches(s, layer, num_layers) for s in self.eight_bit_layers):
            return True
        for spec in self.eight_bit_ops:
            op, _, where = spec.partition("@")
            if op in name and (not where or (layer is not None and layer_matches(where, layer, num_layers))):
                return True
        return False

    def to_dict(self) -> dict[str, Any]:
        """Everything that decides the quantized tensors (a stage cache key)."""
        return {
            "default": self.default.to_dict() if self.default else None,
            "table": self.table.to_dict() if self.table else None,
            "eight_bit": self.eight_bit.to_dict() if self.eight_bit else None,
            "eight_bit_layers": list(self.eight_bit_layers),
            "eight_bit_ops": list(self.eight_bit_ops),
        }

    def as_profile(self) -> dict[str, Any]:
        """The scheme in the fields of a profile's ``quantization`` section (the manifest's record).

        Exact for a scheme :func:`scheme_from_target` made; for others a summary (per-config
        algorithm parameters and a table algorithm unlike the default's are not expressible there).
        """
        ref = self.default or self.table or Rtn()
        return {
            "bits": self.default.bits if self.default else 32,
            "block_size": ref.block_size,
            "symmetric": ref.symmetric,
            "accuracy_level": ref.accuracy_level,
            "algorithm": self.algorithm,
            "embedding_bits": self.table.bits if self.table else 32,
            "embedding_block_size": self.table.block_size if self.table else None,
            "eight_bit_layers": list(self.eight_bit_layers),
            "eight_bit_ops": list(self.eight_bit_ops),
            "eight_bit_block_size": self.eight_bit.block_size if self.eight_bit else None,
            "eight_bit_algorithm": self.eight_bit_algorithm,
            # an 8-bit config without rules is a size allocator's choice: the formats it chose between
            "formats": [c.format.label for c in (self.default, self.eight_bit) if c is not None]
            if self.eight_bit and not (self.eight_bit_layers or self.eight_bit_ops) else [],
        }


def as_scheme(config: WeightOnlyConfig | MixedPrecision) -> MixedPrecision:
    """A scheme as is; a lone algorithm config quantizes every matrix with itself, the table included."""
    if isinstance(config, MixedPrecision):
        return config
    if isinstance(config, WeightOnlyConfig):
        return MixedPrecision(default=config, table=config)
    raise InputError(f"expected a weight-only config or a MixedPrecision scheme, not {type(config).__name__}")


def scheme_from_target(q: Any) -> MixedPrecision:
    """The scheme of a target profile's ``quantization`` section (:class:`edgepipe.targets.Quantization`).

    The profile's ``algorithm`` quantizes the 4-bit matrices; 8-bit ones are quantized by
    ``eight_bit_algorithm`` (rounded to nearest unless it says otherwise: beside 4-bit matrices their
    error is small either way), in blocks of ``eight_bit_block_size`` -- an 8-bit block needs no fine
    scales: at 64 each weight costs 8.6 instead of 9.25 bits.
    """
    four_bit, eight_bit = _algorithm(q.algorithm), _algorithm(q.eight_bit_algorithm)
    eight = eight_bit(bits=8, block_size=q.eight_bit_block_size or q.block_size, symmetric=q.symmetric, accuracy_level=q.accuracy_level)

    def at(bits: int, block_size: int) -> WeightOnlyConfig | None:
        if bits == 32:
            return None
        if bits == 8:
            return eight.with_block(block_size)
        return four_bit(bits=4, block_size=block_size, symmetric=q.symmetric, accuracy_level=q.accuracy_level)

    # a size budget's allocator may choose 8 bits for any matrix: the scheme carries the 8-bit config then too
    rules = bool(q.eight_bit_layers or q.eight_bit_ops or q.formats) or q.bits_per_weight is not None or q.max_mb is not None
    return MixedPrecision(
        default=at(q.bits, eight.block_size if q.bits == 8 else q.block_size),
        table=at(q.embedding_bits, q.embedding_block_size or q.block_size),
        eight_bit=eight if rules else None,
        eight_bit_layers=tuple(q.eight_bit_layers),
        eight_bit_ops=tuple(q.eight_bit_ops),
    )


def _algorithm(name: str) -> type[WeightOnlyConfig]:
    try:
        return ALGORITHMS[name]
    except KeyError:
        raise InputError(f"unknown quantization algorithm {name!r}; use one of {', '.join(ALGORITHMS)}") from None


def config_for_format(fmt: Format, q: Any) -> WeightOnlyConfig | None:
    """The config that stores a matrix in ``fmt`` under a profile's ``quantization`` section ``q``: 4-bit
    matrices with the profile's ``algorithm``, 8-bit ones with its ``eight_bit_algorithm`` (as
    :func:`scheme_from_target` does), fp32 as None. What the size allocator turns its chosen formats into."""
    if fmt.bits == 32:
        return None
    algorithm = _algorithm(q.algorithm if fmt.bits == 4 else q.eight_bit_algorithm)
    return algorithm(bits=fmt.bits, block_size=fmt.block_size, symmetric=fmt.symmetric, accuracy_level=q.accuracy_level)


def allowed_formats(q: Any) -> tuple[Format, ...]:
    """The formats a profile's size allocator chooses between: its ``formats``, or else its 4-bit
    format and its 8-bit one (``eight_bit_block_size``), cheapest first."""
    if q.formats:
        fmts = {Format.parse(label) for label in q.formats}
    else:
        eight = Format(8, q.eight_bit_block_size or q.block_size, q.symmetric)
        fmts = {eight} if q.bits == 8 else {Format(4, q.block_size, q.symmetric), eight}
    return tuple(sorted(fmts, key=lambda f: (f.bits_per_weight, f.label)))
