"""Which matrix gets which config: the BitPlan, and the two ways to list a model's matrices.

The plan is made twice for a build and must come out the same: ``estimate`` makes it from
``config.json`` alone, before any export (:mod:`edgepipe.quantize.architectures`), to predict the
artifact's size; ``quantize`` makes it from the exported graph and writes exactly it. Its
:meth:`BitPlan.bytes` counts the tensors as they are stored, so a size allocator can choose
formats per matrix against a budget and know the artifact's size without quantizing anything.
"""

from __future__ import annotations

import functools
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.errors import InputError
from edgepipe.quantize.calibrate import weight_matmuls
from edgepipe.quantize.configs import FP32, Format, MixedPrecision, WeightOnlyConfig, as_scheme

__all__ = [
    "EMBEDDING", "BitPlan", "Matrix", "ModelMatrices", "PlannedMatrix", "lookup_tables", "matrices_from_onnx", "plan_from_onnx", "table_block",
]

LAYER_RE = re.compile(r"layers\.(\d+)\.")
LM_HEAD = "lm_head"  # the table matrix: onnxruntime-genai's builder names it lm_head.MatMul.weight (builders/base.py make_lm_head)
EMBEDDING = "model.embed_tokens.weight"  # an untied input embedding, as the builder names it (builders/base.py make_embedding)


def layer_of(name: str) -> int | None:
    m = LAYER_RE.search(name)
    return int(m.group(1)) if m else None


@dataclass(frozen=True)
class Matrix:
    """A weight MatMul of the export: its initializer's name and shape [K, N].

    ``lookup``: an untied input embedding instead, which the export reads row by row with a Gather
    (stored [vocab, hidden]). It is listed transposed, K = hidden and N = vocab, as the lm_head
    table is: then its blocks run along each row, as GatherBlockQuantized reads them, and every
    format counts its bytes as for a matrix.
    """

    name: str
    K: int
    N: int
    lookup: bool = False

    @property
    def layer(self) -> int | None:
        return layer_of(self.name)

    @property
    def is_table(self) -> bool:
        """The lm_head matrix (a tied model's input embedding too)."""
        return LM_HEAD in self.name and not self.lookup

    @property
    def vocab_table(self) -> bool:
        """A [hidden, vocab] table (the lm_head or an untied input embedding): it takes the profile's
        table config (``embedding_bits``), in blocks that divide the hidden size."""
        return self.is_table or self.lookup

    def oriented(self, w: np.ndarray) -> np.ndarray:
        """The stored initializer as this matrix's [K, N] (an input embedding's transpose)."""
        return w.T if self.lookup else w


@dataclass(frozen=True)
class ModelMatrices:
    """Every weight matrix of a decoder export, its number of layers, and whether the lm_head
    matrix is also the input embedding (a tied model: one table serves both)."""

    matrices: tuple[Matrix, ...]
    num_layers: int
    tied: bool

    def __post_init__(self) -> None:
        object.__setattr__(self, "matrices", tuple(sorted(self.matrices, key=lambda m: m.name)))


@dataclass(frozen=True)
class PlannedMatrix:
    matrix: Matrix
    config: WeightOnlyConfig | None  # None: left in fp32

    @property
    def format(self) -> Format:
        return self.config.format if self.config is not None else FP32

    @property
    def nbytes(self) -> int:
        return self.format.nbytes(self.matrix.K, self.matrix.N)


def table_block(hidden: int, block: int) -> int:
    """The table's block: GatherBlockQuantized needs whole blocks per embedding row."""
    return next((b for b in (block, 128, 64, 32, 16) if hidden % b == 0), block)


def fitted_table_config(m: Matrix, cfg: WeightOnlyConfig | None) -> WeightOnlyConfig | None:
    """``cfg`` as a table stores it: blocks that divide the hidden size (:func:`table_block`). An input
    embedding whose rows no block divides stays fp32 (None): only GatherBlockQuantized reads it."""
    if cfg is None or not m.vocab_table:
        return cfg
    cfg = cfg.with_block(table_block(m.K, cfg.block_size))
    return None if m.lookup and m.K % cfg.block_size else cfg


@dataclass(frozen=True)
class BitPlan:
    """Per matrix (sorted by name), the config that quantizes it; ``tied`` as in :class:`ModelMatrices`.

    ``scheme`` is what the plan was made from (the manifest records it); a plan may then be edited
    per matrix with :meth:`replace` (what a size allocator does) and handed to ``quantize`` as is.
    """

    entries: tuple[PlannedMatrix, ...]
    num_layers: int
    tied: bool
    scheme: MixedPrecision

    @classmethod
    def build(cls, scheme: MixedPrecision, model: ModelMatrices) -> BitPlan:
        entries = []
        for m in model.matrices:
            cfg = scheme.config_for(m.name, m.layer, model.num_layers, m.vocab_table)
            entries.append(PlannedMatrix(m, fitted_table_config(m, cfg)))
        return cls(tuple(entries), model.num_layers, model.tied, scheme)

    def __iter__(self) -> Iterator[PlannedMatrix]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, name: str) -> PlannedMatrix:
        return self._by_name[name]

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    @functools.cached_property
    def _by_name(self) -> dict[str, PlannedMatrix]:
        return {e.matrix.name: e for e in self.entries}

    @property
    def matrices(self) -> ModelMatrices:
        return ModelMatrices(tuple(e.matrix for e in self.entries), self.num_layers, self.tied)

    def formats(self) -> dict[str, Format]:
        return {e.matrix.name: e.format for e in self.entries}

    def labels(self) -> dict[str, str]:
        """Matrix -> format label ("int4/b32/asym"): the manifest's ``matrix_formats``."""
        return {e.matrix.name: e.format.label for e in self.entries}

    def replace(self, configs: Mapping[str, WeightOnlyConfig | None]) -> BitPlan:
        """This plan with the named matrices' configs replaced. A tied table whose block does not divide its
        rows keeps an fp32 copy for the lookup (:meth:`bytes` counts it)."""
        unknown = sorted(set(configs) - {e.matrix.name for e in self.entries})
        if unknown:
            raise InputError(f"the plan has no matrix {unknown[0]!r}")
        entries = tuple(PlannedMatrix(e.matrix, configs.get(e.matrix.name, e.config)) for e in self.entries)
        return BitPlan(entries, self.num_layers, self.tied, self.scheme)

    @property
    def table(self) -> PlannedMatrix | None:
        """The lm_head matrix (a tied model's embedding table too)."""
        return next((e for e in self.entries if e.matrix.is_table), None)

    @property
    def embedding(self) -> PlannedMatrix | None:
        """An untied model's input embedding (its own table, read by a Gather)."""
        return next((e for e in self.entries if e.matrix.lookup), None)

    def shared_table(self) -> PlannedMatrix | None:
        """The quantized table GatherBlockQuantized reads for a tied model, if it can (whole blocks per row)."""
        table = self.table
        if not self.tied or table is None or table.config is None or table.matrix.K % table.config.block_size:
            return None
        return table

    def bytes(self) -> int:
        """Bytes of every matrix as the artifact stores it: MatMulNBits data, scales and zero points
        (the shared table once), fp32 matrices at 4 bytes a weight, and the fp32 copy a tied table
        keeps for the lookup when it cannot be shared."""
        total = sum(e.nbytes for e in self.entries)
        table = self.table
        if self.tied and table is not None and table.config is not None and self.shared_table() is None:
            total += table.matrix.K * table.matrix.N * 4
        return total

    def parameters(self) -> int:
        return sum(e.matrix.K * e.matrix.N for e in self.entries)

    def hessian_weights(self) -> frozenset[str]:
        """The matrices whose algorithm needs its input's Hessian (what calibration must collect)."""
        return frozenset(e.matrix.name for e in self.entries if e.config is not None and e.config.needs_hessian)

    def counts(self) -> dict[str, int]:
        """Matrices per bit width, as the manifest's ``matmuls`` (an input embedding is no MatMul: its
        format is the manifest's ``embedding``)."""
        bits = Counter(e.format.bits for e in self.entries if not e.matrix.lookup)
        return {"int4": bits[4], "int8": bits[8], "fp32": bits[32]}

    def summary(self) -> dict[str, Any]:
        formats = Counter(e.format.label for e in self.entries)
        return {"bytes": self.bytes(), "parameters": self.parameters(), "formats": dict(sorted(formats.items()))}

    def to_dict(self) -> dict[str, Any]:
        """Every matrix's config (a stage cache key for an edited plan)."""
        return {
            "scheme": self.scheme.to_dict(),
            "tied": self.tied,
            "matrices": {e.matrix.name: [e.matrix.K, e.matrix.N, e.config.to_dict() if e.config else None] for e in self.entries},
        }


def gathered_tables(model: Any) -> dict[str, Any]:
    """Weight name -> the Gather that looks rows up in its transpose: ``Transpose(W) -> Gather``,
    how the builder exports a tied embedding (builders/base.py make_embedding_lookup)."""
    graph = model.graph
    inits = {t.name for t in graph.initializer}
    producers = {o: n for n in graph.node for o in n.output}
    out = {}
    for node in graph.node:
        if node.op_type != "Gather" or node.input[0] in inits:
            continue
        producer = producers.get(node.input[0])
        if producer is not None and producer.op_type == "Transpose" and producer.input[0] in inits:
            out[producer.input[0]] = node
    return out


def lookup_tables(model: Any) -> dict[str, Any]:
    """Weight name -> the Gather that looks the token ids up in it directly: an untied input
    embedding, a 2-D initializer [vocab, hidden] indexed by the ``input_ids`` input (not a position
    table, which other indices read)."""
    graph = model.graph
    inits = {t.name: t for t in graph.initializer}
    return {
        node.input[0]: node for node in graph.node
        if node.op_type == "Gather" and node.input[0] in inits and len(inits[node.input[0]].dims) == 2 and node.input[1] == "input_ids"
        and not any(a.name == "axis" and a.i != 0 for a in node.attribute)
    }


def num_layers(model: Any) -> int:
    """Transformer layers = those with weight matrices: onnxruntime-genai's builder names the final
    norm "layers.<N>", which would make "last" one past the real last layer."""
    layers = {layer for t in model.graph.initializer if len(t.dims) == 2 and (layer := layer_of(t.name)) is not None}
    return max(layers) + 1 if layers else 0


def matrices_from_onnx(model: Any) -> ModelMatrices:
    """The matrices of an exported graph (a ModelProto, loaded without its external data)."""
    inits = {t.name: t for t in model.graph.initializer}
    names = weight_matmuls(model)
    matrices = tuple(Matrix(n, int(inits[n].dims[0]), int(inits[n].dims[1])) for n in names)
    tables = gathered_tables(model)
    tied = any(m.is_table and m.name in tables for m in matrices)
    lookups = tuple(Matrix(n, int(inits[n].dims[1]), int(inits[n].dims[0]), lookup=True) for n in lookup_tables(model))
    return ModelMatrices(matrices + lookups, num_layers(model), tied)


def plan_from_onnx(model: Any, scheme: MixedPrecision | WeightOnlyConfig) -> BitPlan:
    """The plan for the ONNX model at ``model`` (a path or a ModelProto)."""
    if isinstance(model, (str, Path)):
        import onnx

        model = onnx.load(str(model), load_external_data=False)
    return BitPlan.build(as_scheme(scheme), matrices_from_onnx(model))
