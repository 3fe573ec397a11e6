"""The Erf-GELU -> Gelu rewrite rules on tiny graphs: node counts change and onnxruntime gives the same outputs."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepipe.optimize.gelu_fusion import ErfGeluFusion, erf_gelu_rules, fuse_erf_gelu


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


def _feeds() -> dict[str, np.ndarray]:
    return {"x": np.random.default_rng(0).normal(0, 2, (2, 8)).astype(np.float32)}


@pytest.mark.parametrize("opset", [17, 20])
@pytest.mark.parametrize("half_first", [False, True])
@pytest.mark.parametrize("use_mul", [False, True])
def test_fuse_erf_gelu(opset: int, half_first: bool, use_mul: bool) -> None:
    model = _erf_gelu_model(opset, half_first, use_mul)
    feeds = _feeds()
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


def test_swapped_inputs_constant_nodes_and_rounded_sqrt2() -> None:
    """Every Add / Mul the other way round, the constants as [1]-shaped ``Constant`` nodes, sqrt 2
    written to four digits (as some exporters do): still one Gelu, the constants gone with it."""
    model = _erf_gelu_model(20, half_first=False, use_mul=False)
    del model.graph.initializer[:]
    constants = [
        helper.make_node("Constant", [], [name], value=numpy_helper.from_array(np.array([v], np.float32)))
        for name, v in (("sqrt2", 1.4142), ("one", 1.0), ("half", 0.5))
    ]
    nodes = list(model.graph.node)
    for n in nodes:
        if n.op_type in ("Add", "Mul"):
            n.input[0], n.input[1] = n.input[1], n.input[0]
    del model.graph.node[:]
    model.graph.node.extend(constants + nodes)
    feeds = _feeds()
    before = _run(model, feeds)[0]
    assert fuse_erf_gelu(model) == 1
    onnx.checker.check_model(model, full_check=True)
    assert [n.op_type for n in model.graph.node] == ["Relu", "Gelu", "Neg"]
    np.testing.assert_allclose(_run(model, feeds)[0], before, rtol=1e-4, atol=1e-5)


def test_wrong_constants_or_a_shared_inner_value_are_not_fused() -> None:
    """x / 2 is not GELU; an Erf whose output another node also reads cannot be removed."""
    model = _erf_gelu_model(20, half_first=False, use_mul=False)
    next(t for t in model.graph.initializer if t.name == "sqrt2").CopyFrom(_const("sqrt2", 2.0))
    before = model.SerializeToString()
    assert fuse_erf_gelu(model) == 0
    assert model.SerializeToString() == before

    model = _erf_gelu_model(20, half_first=False, use_mul=False)
    model.graph.output.append(helper.make_tensor_value_info("e", TensorProto.FLOAT, [2, 8]))
    feeds = _feeds()
    before_out = _run(model, feeds)
    assert fuse_erf_gelu(model) == 0
    assert "Gelu" not in {n.op_type for n in model.graph.node}
    for a, b in zip(_run(model, feeds), before_out, strict=True):
        np.testing.assert_array_equal(a, b)


def test_pass_needs_opset_20_and_rules_apply_to_an_ir_model() -> None:
    """The pass declares what it needs (Gelu exists from opset 20); the rule set alone works on onnx-ir."""
    with pytest.raises(ir.passes.PreconditionError, match="opset 20"):
        ErfGeluFusion()(ir.serde.deserialize_model(_erf_gelu_model(17, half_first=True, use_mul=True)))

    model = ir.serde.deserialize_model(_erf_gelu_model(20, half_first=True, use_mul=True))
    assert erf_gelu_rules().apply_to_model(model) == 1
    assert [n.op_type for n in model.graph] == ["Relu", "Gelu", "Neg"]
    result = ErfGeluFusion()(model)
    assert not result.modified and result.details == {"count": 0}
