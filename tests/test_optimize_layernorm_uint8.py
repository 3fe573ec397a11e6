"""The LayerNorm uint8 weight pass on tiny QDQ graphs: the DequantizeLinear feeding the scale becomes
uint8, node counts change as expected and onnxruntime gives exactly the same outputs."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepipe.optimize.layernorm_uint8 import LayerNormUint8, layernorm_weights_to_uint8


def _run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, feeds)


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


def _feeds() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(2).normal(0, 1, (3, 16)).astype(np.float32)}


@pytest.mark.parametrize("shared", [False, True])
def test_layernorm_weights_to_uint8(shared: bool) -> None:
    model = _qdq_layernorm_model(shared)
    feeds = _feeds()
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


def test_float_scale_is_left_alone() -> None:
    """A LayerNorm with a plain float scale is not a site: the model stays byte-identical."""
    model = _qdq_layernorm_model(shared=False)
    float_model = onnx.ModelProto()
    float_model.CopyFrom(model)
    del float_model.graph.node[0]  # gamma becomes a float initializer
    float_model.graph.initializer.append(numpy_helper.from_array(np.ones(16, np.float32), "gamma"))
    before = float_model.SerializeToString()
    assert layernorm_weights_to_uint8(float_model) == 0
    assert float_model.SerializeToString() == before


def test_pass_reports_and_ensures_on_an_ir_model() -> None:
    """Run as an onnx-ir pass: the report counts the sites and the postcondition holds after it."""
    model = ir.serde.deserialize_model(_qdq_layernorm_model(shared=True))
    with pytest.raises(ir.passes.PostconditionError, match="ln0"):
        LayerNormUint8().ensures(model)  # before the pass: an int8 LayerNorm scale
    result = LayerNormUint8()(model)
    assert result.modified and result.details == {"count": 1}
    LayerNormUint8().ensures(model)
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    ops = [n.op_type for n in proto.graph.node]
    assert ops.count("DequantizeLinear") == 2 and ops.count("LayerNormalization") == 1
