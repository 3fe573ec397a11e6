"""Small helpers shared by the rewrites: producer / consumer maps and constant lookup."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper


def producers(graph: onnx.GraphProto) -> dict[str, onnx.NodeProto]:
    return {out: node for node in graph.node for out in node.output if out}


def consumers(graph: onnx.GraphProto) -> dict[str, list[onnx.NodeProto]]:
    result: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            if name:
                result.setdefault(name, []).append(node)
    return result


def constant_value(graph: onnx.GraphProto, name: str) -> np.ndarray | None:
    """The value of ``name`` if it is an initializer or a ``Constant`` node's output, else None."""
    for init in graph.initializer:
        if init.name == name:
            return numpy_helper.to_array(init)
    for node in graph.node:
        if node.op_type == "Constant" and node.output[0] == name:
            for attr in node.attribute:
                if attr.name == "value":
                    return numpy_helper.to_array(attr.t)
                if attr.name == "value_float":
                    return np.array(attr.f, dtype=np.float32)
    return None


def is_scalar_close(graph: onnx.GraphProto, name: str, value: float, rtol: float = 1e-3) -> bool:
    arr = constant_value(graph, name)
    return arr is not None and arr.size == 1 and bool(np.isclose(float(arr.reshape(())), value, rtol=rtol))


def default_opset(model: onnx.ModelProto) -> int:
    for imp in model.opset_import:
        if imp.domain in ("", "ai.onnx"):
            return imp.version
    return 0
