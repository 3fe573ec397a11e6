"""Each HTP rewrite on a tiny graph: node counts change and onnxruntime gives the same outputs."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepipe.npu.rewrites import fuse_erf_gelu, layernorm_weights_to_uint8


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


def _const(name: str, value: float) -> onnx.TensorProto:
    return numpy_helper.from_array(np.array(value, dtype=np.float32), name)


def _erf_gelu_model(opset: int, half_first: bool, use_mul: bool) -> onnx.ModelProto:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8])
    inits = [_const("sqrt2", math.sqrt(2.0)), _const("inv_sqrt2", 1 / math.sqrt(2.0)),
             _const("one", 1.0), _const("half", 0.5)]
    nodes = [helper.make_node("Relu", ["x"], ["h"])]  # the GELU input is an inner value
    if use_mul:
        nodes.append(helper.make_node("Mul", ["h", "inv_sqrt2"], ["a"]))
    else:
        nodes.append(helper.make_node("Div", ["h", "sqrt2"], ["a"]))
    nodes += [helper.make_node("Erf", ["a"], ["e"]), helper.make_node("Add", ["one", "e"], ["p"])]
    if half_first:
        nodes += [helper.make_node("Mul", ["h", "half"], ["hh"]), helper.make_node("Mul", ["hh", "p"], ["g"])]
    else:
        nodes += [helper.make_node("Mul", ["h", "p"], ["hp"]), helper.make_node("Mul", ["hp", "half"], ["g"])]
    nodes.append(helper.make_node("Neg", ["g"], ["y"]))
    graph = helper.make_graph(nodes, "gelu", [x], [y], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


@pytest.mark.parametrize("opset", [17, 20])
@pytest.mark.parametrize("half_first", [False, True])
@pytest.mark.parametrize("use_mul", [False, True])
def test_fuse_erf_gelu(opset: int, half_first: bool, use_mul: bool) -> None:
    model = _erf_gelu_model(opset, half_first, use_mul)
    feeds = {"x": np.random.default_rng(0).normal(0, 2, (2, 8)).astype(np.float32)}
    before = _run(model, feeds)[0]
    n_before = len(model.graph.node)
    assert fuse_erf_gelu(model) == 1
    onnx.checker.check_model(model)
    ops = [n.op_type for n in model.graph.node]
    assert ops == ["Relu", "Gelu", "Neg"] and len(ops) == n_before - 4
    assert [o.version for o in model.opset_import if o.domain in ("", "ai.onnx")] == [20]
    np.testing.assert_allclose(_run(model, feeds)[0], before, rtol=1e-5, atol=1e-6)
    assert fuse_erf_gelu(model) == 0  # idempotent


def test_fuse_erf_gelu_leaves_other_erf_alone() -> None:
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [4])
    model = helper.make_model(
        helper.make_graph([helper.make_node("Erf", ["x"], ["y"])], "erf", [x], [y]),
        opset_imports=[helper.make_opsetid("", 20)],
    )
    assert fuse_erf_gelu(model) == 0
    assert [n.op_type for n in model.graph.node] == ["Erf"]


def _qdq_layernorm_model(shared: bool) -> onnx.ModelProto:
    rng = np.random.default_rng(1)
    gamma = rng.normal(1.0, 0.3, 16).astype(np.float32)
    scale = np.float32(np.abs(gamma).max() / 127)
    q = np.clip(np.round(gamma / scale), -127, 127).astype(np.int8)
    inits = [
        numpy_helper.from_array(q, "gamma_q"),
        numpy_helper.from_array(np.array(scale, np.float32), "gamma_scale"),
        numpy_helper.from_array(np.array(0, np.int8), "gamma_zp"),
        numpy_helper.from_array(rng.normal(0, 0.1, 16).astype(np.float32), "beta"),
    ]
    nodes = [
        helper.make_node("DequantizeLinear", ["gamma_q", "gamma_scale", "gamma_zp"], ["gamma"], name="dq_gamma"),
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["ln"], name="ln0", axis=-1),
    ]
    outputs = [helper.make_tensor_value_info("ln", TensorProto.FLOAT, [3, 16])]
    if shared:
        nodes.append(helper.make_node("Mul", ["ln", "gamma"], ["scaled"], name="mul_gamma"))
        outputs.append(helper.make_tensor_value_info("scaled", TensorProto.FLOAT, [3, 16]))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [3, 16])
    graph = helper.make_graph(nodes, "ln", [x], outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)], ir_version=10)


def _dq_types(model: onnx.ModelProto) -> list[int]:
    inits = {i.name: i.data_type for i in model.graph.initializer}
    return sorted(inits[n.input[0]] for n in model.graph.node if n.op_type == "DequantizeLinear")


@pytest.mark.parametrize("shared", [False, True])
def test_layernorm_weights_to_uint8(shared: bool) -> None:
    model = _qdq_layernorm_model(shared)
    feeds = {"x": np.random.default_rng(2).normal(0, 1, (3, 16)).astype(np.float32)}
    before = _run(model, feeds)
    n_before = len(model.graph.node)
    assert _dq_types(model) == [TensorProto.INT8]
    assert layernorm_weights_to_uint8(model) == 1
    onnx.checker.check_model(model)
    ln = next(n for n in model.graph.node if n.op_type == "LayerNormalization")
    dq = next(n for n in model.graph.node if ln.input[1] in n.output)
    inits = {i.name: i for i in model.graph.initializer}
    assert inits[dq.input[0]].data_type == TensorProto.UINT8
    assert int(numpy_helper.to_array(inits[dq.input[2]])) == 128
    if shared:  # the Mul keeps the int8 DQ; the LayerNorm gets its own uint8 copy
        assert len(model.graph.node) == n_before + 1
        assert _dq_types(model) == sorted([TensorProto.INT8, TensorProto.UINT8])
    else:
        assert len(model.graph.node) == n_before
        assert _dq_types(model) == [TensorProto.UINT8]
        assert "gamma_q" not in inits  # the int8 original is gone
    for a, b in zip(_run(model, feeds), before, strict=False):
        np.testing.assert_array_equal(a, b)  # exact: same real values
    assert layernorm_weights_to_uint8(model) == 0
