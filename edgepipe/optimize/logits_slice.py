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
from typing import Any

logger = logging.getLogger(__name__)

INPUT = "logits_start"
LOGITS = "logits"
_HEAD_OPS = ("MatMul", "MatMulNBits", "Gemm")
# ops that act on each position alone, which a model may put between the head and the output
_POINTWISE = ("Div", "Mul", "Tanh", "Cast", "Add", "Sub", "Softcap", "Identity")
_MAX_WALK = 8


def _find_head(graph: Any, initializers: set[str]) -> tuple[Any, list[Any]] | None:
    """The lm_head node producing ``logits`` and the nodes between it and the output."""
    producer = {o: n for n in graph.node for o in n.output}
    # the builder writes scalars such as Granite's 1/logits_scaling as Constant nodes
    constants = initializers | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    node = producer.get(LOGITS)
    path: list[Any] = []
    for _ in range(_MAX_WALK):
        if node is None:
            return None
        if node.op_type in _HEAD_OPS and len(node.input) > 1 and node.input[1] in initializers:
            return node, path
        if node.op_type not in _POINTWISE:
            return None
        dynamic = [i for i in node.input if i and i not in constants and i in producer]
        if len(dynamic) != 1:
            return None
        path.append(node)
        node = producer.get(dynamic[0])
    return None


def slice_logits(model: Any) -> dict[str, Any] | None:
    """Insert the ``logits_start`` slice in ``model`` (an onnx.ModelProto, changed in place).

    Returns what was inserted, or None when the graph already has it or has no recognisable lm_head
    (then the graph is left untouched and callers simply get full-sequence logits).
    """
    import numpy as np
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    if any(i.name == INPUT for i in graph.input):
        logger.info("logits_slice: the graph already has %s", INPUT)
        return None
    if not any(o.name == LOGITS for o in graph.output):
        logger.warning("logits_slice: no graph output named %r; not applied", LOGITS)
        return None
    inits = {t.name for t in graph.initializer}
    found = _find_head(graph, inits)
    if found is None:
        logger.warning("logits_slice: no MatMul lm_head with a constant weight feeds %r; not applied", LOGITS)
        return None
    head, path = found
    hidden = head.input[0]
    sliced = f"{hidden}/logits_slice"
    ends, axes = "logits_slice/ends", "logits_slice/axes"
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([0], dtype=np.int64), INPUT),
            numpy_helper.from_array(np.array([np.iinfo(np.int64).max], dtype=np.int64), ends),
            numpy_helper.from_array(np.array([1], dtype=np.int64), axes),
        ]
    )
    graph.input.append(helper.make_tensor_value_info(INPUT, TensorProto.INT64, [1]))
    node = helper.make_node("Slice", [hidden, INPUT, ends, axes], [sliced], name="/lm_head/logits_slice")
    head.input[0] = sliced
    # keep the node list topologically sorted: the slice goes right before the head
    nodes = list(graph.node)
    idx = next(i for i, n in enumerate(nodes) if n is head)
    nodes.insert(idx, node)
    del graph.node[:]
    graph.node.extend(nodes)
    # the sequence axis of everything after the slice is no longer the input's length
    changed = {o for n in [head, *path] for o in n.output}
    kept = [v for v in graph.value_info if v.name not in changed]
    del graph.value_info[:]
    graph.value_info.extend(kept)
    for out in graph.output:
        if out.name == LOGITS and len(out.type.tensor_type.shape.dim) == 3:
            out.type.tensor_type.shape.dim[1].dim_param = "logits_length"
    return {"input": INPUT, "default": 0, "head": head.name, "sliced": hidden}
