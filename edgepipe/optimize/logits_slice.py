"""Compute logits only for the positions a caller asks for.

The exported decoder applies the lm_head to every position of its input: for a 512-token prompt of
a 49152-word vocabulary that is a [512, 49152] float32 output (100 MB) and, on a small model, about
a fifth of the prefill FLOPs, while generation only ever reads the last row. This pass inserts a
``Slice`` on the hidden states right before the lm_head, starting at a new graph input
``logits_start`` (int64 [1]) along the sequence axis. The input has an initializer of the same name
holding 0: in ONNX that is an overridable default, so callers that do not feed it (accuracy
validation, calibration, onnxruntime-genai) still get the logits of every position, while the
runtime's generation and prefill benchmark feed -1 (the last position only).

The slice goes after the final norm (a per-position op, so slicing after it is exact) and before
the head's MatMul / MatMulNBits, walking back from the ``logits`` output through per-position ops
a model may apply after the head (a soft-cap's Div / Tanh / Mul, a Cast).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import onnx_ir as ir

from edgepipe.optimize.manager import PassReport, apply_to_proto

if TYPE_CHECKING:
    import onnx

logger = logging.getLogger(__name__)

__all__ = ["INPUT", "LOGITS", "LogitsSlicePass", "slice_logits"]

INPUT = "logits_start"
LOGITS = "logits"
SLICE_NODE = "/lm_head/logits_slice"  # the runtime's profile test looks the kernel up by this name
_HEAD_OPS = ("MatMul", "MatMulNBits", "Gemm")
# ops that act on each position alone, which a model may put between the head and the output
_POINTWISE = ("Div", "Mul", "Tanh", "Cast", "Add", "Sub", "Softcap", "Identity")
_MAX_WALK = 8


def _is_constant(value: ir.Value) -> bool:
    # the builder writes scalars such as Granite's 1/logits_scaling as Constant nodes
    producer = value.producer()
    return value.is_initializer() or (producer is not None and producer.op_type == "Constant")


def _is_head(node: ir.Node) -> bool:
    """A MatMul-like node of a hidden state by an initializer weight."""
    if node.op_type not in _HEAD_OPS or len(node.inputs) < 2 or node.inputs[0] is None:
        return False
    weight = node.inputs[1]
    return weight is not None and weight.is_initializer()


def _find_head(graph: ir.Graph) -> tuple[ir.Node, list[ir.Node]] | None:
    """The lm_head node producing ``logits`` and the nodes between it and the output."""
    output = next((o for o in graph.outputs if o.name == LOGITS), None)
    node = output.producer() if output is not None else None
    path: list[ir.Node] = []
    for _ in range(_MAX_WALK):
        if node is None:
            return None
        if _is_head(node):
            return node, path
        if node.op_type not in _POINTWISE:
            return None
        dynamic = [v for v in node.inputs if v is not None and not _is_constant(v) and v.producer() is not None]
        if len(dynamic) != 1:
            return None
        path.append(node)
        node = dynamic[0].producer()
    return None


def _initializer(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.val(name, ir.DataType.from_numpy(array.dtype), array.shape, const_value=ir.tensor(array, name=name))
    graph.register_initializer(value)
    return value


def _forget_shapes(head: ir.Node, path: list[ir.Node]) -> None:
    """The sequence axis of everything after the slice is no longer the input's length."""
    for value in (v for n in [head, *path] for v in n.outputs):
        if not value.is_graph_output():
            value.type, value.shape = None, None  # no stale value_info
        elif value.shape is not None and value.shape.rank() == 3:
            dims = list(value.shape.dims)
            value.shape = ir.Shape([dims[0], "logits_length", dims[2]])


class LogitsSlicePass(ir.passes.InPlacePass):
    """Insert ``Slice(hidden, logits_start, INT64_MAX, axes=[1])`` before the lm_head.

    Needs: a graph output named ``logits`` produced by a MatMul / MatMulNBits / Gemm with an
    initializer weight, possibly through a few per-position ops. Otherwise (or when the graph
    already has ``logits_start``) it changes nothing and says why in the log.
    Changes: one ``Slice`` node, the ``logits_start`` input with its default initializer (0) and
    two constant initializers; the ``logits`` output's second axis becomes ``logits_length``.
    Tensors are never read, so the pass runs on a model whose weights stay in external data.
    """

    name: ClassVar[str] = "logits_slice"

    def call(self, model: ir.Model) -> PassReport:
        graph = model.graph
        if any(i.name == INPUT for i in graph.inputs):
            logger.info("logits_slice: the graph already has %s", INPUT)
            return PassReport(model, False)
        if not any(o.name == LOGITS for o in graph.outputs):
            logger.warning("logits_slice: no graph output named %r; not applied", LOGITS)
            return PassReport(model, False)
        found = _find_head(graph)
        if found is None:
            logger.warning("logits_slice: no MatMul lm_head with a constant weight feeds %r; not applied", LOGITS)
            return PassReport(model, False)
        head, path = found
        hidden = head.inputs[0]
        if hidden is None:  # _is_head checked it; this tells the type checker
            return PassReport(model, False)
        start = _initializer(graph, INPUT, np.array([0], dtype=np.int64))
        graph.inputs.append(start)
        ends = _initializer(graph, "logits_slice/ends", np.array([np.iinfo(np.int64).max], dtype=np.int64))
        axes = _initializer(graph, "logits_slice/axes", np.array([1], dtype=np.int64))
        sliced = ir.val(f"{hidden.name}/logits_slice")
        # inserted right before the head, so the node list stays topologically sorted
        graph.insert_before(head, ir.node("Slice", [hidden, start, ends, axes], outputs=[sliced], name=SLICE_NODE))
        head.replace_input_with(0, sliced)
        _forget_shapes(head, path)
        return PassReport(model, True, {"input": INPUT, "default": 0, "head": head.name, "sliced": hidden.name})

    def ensures(self, model: ir.Model) -> None:
        """Callers that do not feed ``logits_start`` must still get every position: the slice starts
        at a graph input whose initializer default is 0."""
        node = next((n for n in model.graph if n.name == SLICE_NODE), None)
        start = node.inputs[1] if node is not None else None
        if start is None:
            return
        if not (start.is_graph_input() and start.const_value is not None and start.const_value.numpy().tolist() == [0]):
            raise ir.passes.PostconditionError(f"the slice starts at {start.name!r}, not at graph input {INPUT} with default 0")


def slice_logits(model: onnx.ModelProto) -> dict[str, Any] | None:
    """Insert the ``logits_start`` slice in ``model`` (an onnx.ModelProto, changed in place).

    Returns what was inserted, or None when the graph already has it or has no recognisable lm_head
    (then the graph is left untouched and callers simply get full-sequence logits).
    """
    report = apply_to_proto(LogitsSlicePass(), model)
    return dict(report.details) if report.modified else None
