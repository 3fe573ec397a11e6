"""The logits_slice pass: one Slice and one defaulted input more, the same logits by default, only the
last position's (and no full-sequence logits buffer) when the runtime asks for it."""

from __future__ import annotations

import json

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepipe.optimize import optimize_dir, optimize_model
from edgepipe.optimize.logits_slice import INPUT, LogitsSlicePass, slice_logits
from edgepipe.runtime.model import CausalLM


def tiny_head_graph(softcap: bool = False, scale_node: bool = False) -> onnx.ModelProto:
    """hidden [1, S, 8] -> norm stand-in (Mul) -> lm_head MatMul [8, 16] (-> soft-cap) -> logits.

    ``scale_node``: the head's output times a scalar from a Constant node (Granite's 1/logits_scaling
    as the onnxruntime-genai builder writes it)."""
    rng = np.random.default_rng(0)
    inits = [
        numpy_helper.from_array(rng.standard_normal((8, 16)).astype(np.float32), "lm_head.weight"),
        numpy_helper.from_array(np.full(8, 0.5, dtype=np.float32), "norm.weight"),
    ]
    nodes = [
        helper.make_node("Mul", ["hidden", "norm.weight"], ["normed"], name="norm"),
        helper.make_node("MatMul", ["normed", "lm_head.weight"], ["head_out" if softcap else "logits"], name="lm_head"),
    ]
    if softcap:
        inits.append(numpy_helper.from_array(np.array(3.0, dtype=np.float32), "cap"))
        nodes += [
            helper.make_node("Div", ["head_out", "cap"], ["d"], name="cap_div"),
            helper.make_node("Tanh", ["d"], ["t"], name="cap_tanh"),
            helper.make_node("Mul", ["t", "cap"], ["logits"], name="cap_mul"),
        ]
    if scale_node:
        nodes[-1].output[0] = "unscaled"
        nodes += [
            helper.make_node("Constant", [], ["scale"], value=numpy_helper.from_array(np.array(0.125, dtype=np.float32))),
            helper.make_node("Mul", ["unscaled", "scale"], ["logits"], name="logits_scale"),
        ]
    graph = helper.make_graph(
        nodes,
        "head",
        [helper.make_tensor_value_info("hidden", TensorProto.FLOAT, [1, "sequence_length", 8])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, [1, "sequence_length", 16])],
        inits,
        value_info=[helper.make_tensor_value_info("head_out", TensorProto.FLOAT, [1, "sequence_length", 16])] if softcap else [],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def test_slice_on_tiny_graph_keeps_default_and_slices_on_request():
    for softcap, scale_node in ((False, False), (True, False), (False, True)):
        model = tiny_head_graph(softcap, scale_node)
        x = np.random.default_rng(1).standard_normal((1, 7, 8)).astype(np.float32)
        full = session(model).run(["logits"], {"hidden": x})[0]
        n_before = len(model.graph.node)
        done = slice_logits(model)
        onnx.checker.check_model(model, full_check=True)
        assert done == {"input": INPUT, "default": 0, "head": "lm_head", "sliced": "normed"}
        ops = [n.op_type for n in model.graph.node]
        assert len(ops) == n_before + 1 and ops.count("Slice") == 1
        assert ops.index("Slice") == ops.index("MatMul") - 1  # still topologically sorted
        assert [i.name for i in model.graph.input] == ["hidden", INPUT]
        assert model.graph.output[0].type.tensor_type.shape.dim[1].dim_param == "logits_length"
        assert "head_out" not in {v.name for v in model.graph.value_info}
        sess = session(model)
        assert [i.name for i in sess.get_overridable_initializers()] == [INPUT]
        np.testing.assert_array_equal(sess.run(["logits"], {"hidden": x})[0], full)  # default 0: every position
        last = sess.run(["logits"], {"hidden": x, INPUT: np.array([-1], dtype=np.int64)})[0]
        assert last.shape == (1, 1, 16)
        np.testing.assert_array_equal(last, full[:, -1:])
        tail = sess.run(["logits"], {"hidden": x, INPUT: np.array([4], dtype=np.int64)})[0]
        np.testing.assert_array_equal(tail, full[:, 4:])
        assert slice_logits(model) is None, "a second run must not insert another slice"


def test_pass_leaves_a_graph_without_lm_head_alone():
    model = tiny_head_graph()
    model.graph.node[1].op_type = "Add"  # not a head any more
    before = model.SerializeToString()
    assert optimize_model(model) == {}
    assert model.SerializeToString() == before


def test_pass_ensures_the_default_keeps_every_position():
    """As an onnx-ir pass: it reports what it did, and its postcondition rejects a slice whose start
    is not the defaulted graph input (callers that do not feed it would lose logits)."""
    model = ir.serde.deserialize_model(tiny_head_graph(softcap=True))
    result = LogitsSlicePass()(model)
    assert result.modified and result.details["input"] == INPUT
    assert [n.op_type for n in model.graph] == ["Mul", "Slice", "MatMul", "Div", "Tanh", "Mul"]
    LogitsSlicePass().ensures(model)
    model.graph.initializers[INPUT].const_value = ir.tensor(np.array([3], dtype=np.int64))
    with pytest.raises(ir.passes.PostconditionError, match="default 0"):
        LogitsSlicePass().ensures(model)
    model.graph.initializers[INPUT].const_value = ir.tensor(np.array([0], dtype=np.int64))
    assert not LogitsSlicePass()(model).modified  # already sliced


def test_optimize_dir_on_tiny_llama_last_logits_equal_full_pass(zoo, tmp_path):
    src = zoo.fp32("llama")
    out = tmp_path / "opt"
    info = optimize_dir(src, out)
    assert set(info["passes"]) == {"logits_slice"}
    # copied, never hard-linked: onnx refuses external data with several links
    assert (out / "model.onnx.data").stat().st_nlink == 1 == (src / "model.onnx.data").stat().st_nlink
    assert (out / "model.onnx.data").read_bytes() == (src / "model.onnx.data").read_bytes()
    assert json.loads((out / "genai_config.json").read_text()) == json.loads((src / "genai_config.json").read_text())
    a, b = onnx.load(str(src / "model.onnx"), load_external_data=False), onnx.load(str(out / "model.onnx"), load_external_data=False)
    assert len(b.graph.node) == len(a.graph.node) + 1
    assert sum(n.op_type == "Slice" for n in b.graph.node) == sum(n.op_type == "Slice" for n in a.graph.node) + 1

    ref, opt = CausalLM(src, threads=1), CausalLM(out, threads=1)
    assert not ref.can_slice_logits and opt.can_slice_logits
    ids = zoo.eval_ids(24, offset=5)
    full = ref.logits(ids)
    np.testing.assert_allclose(opt.logits(ids), full, atol=1e-5, rtol=0)  # validation still sees every position
    last, cache = opt.forward(ids[None], opt.empty_cache(), last_only=True)
    assert last.shape == (1, 1, full.shape[-1])
    np.testing.assert_allclose(last[0, 0], full[-1], atol=1e-5, rtol=0)
    # old artifacts: last_only is honoured by slicing the full output
    old_last, _ = ref.forward(ids[None], ref.empty_cache(), last_only=True)
    np.testing.assert_allclose(old_last, last, atol=1e-5, rtol=0)
    # the KV stepper: a last-only prompt, then full single steps, then a multi-token full step
    st = opt.stepper(len(ids))
    p = st.step(ids[:10], last_only=True)
    assert p.shape == (1, full.shape[-1])
    np.testing.assert_allclose(p[0], full[9], atol=1e-5, rtol=0)
    np.testing.assert_allclose(st.step(ids[10:11])[0], full[10], atol=1e-5, rtol=0)
    rest = st.step(ids[11:])  # logits_start must be re-bound to 0 after a last-only step
    assert rest.shape == (len(ids) - 11, full.shape[-1])
    np.testing.assert_allclose(rest, full[11:], atol=1e-5, rtol=0)


def test_last_only_prefill_never_materialises_full_logits(zoo, tmp_path):
    """The memory the pass saves: onnxruntime's profiler lists the lm_head's output shape."""
    out = tmp_path / "opt"
    optimize_dir(zoo.fp32("llama"), out)
    lm = CausalLM(out, threads=1)
    so = lm.session.get_session_options()
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "prof")
    sess = ort.InferenceSession(str(out / "model.onnx"), so, providers=["CPUExecutionProvider"])
    lm.session = sess
    ids = zoo.eval_ids(32, offset=3)
    lm.forward(ids[None], lm.empty_cache(), last_only=True)
    events = json.loads(open(sess.end_profiling()).read())
    head = [e for e in events if e.get("cat") == "Node" and e["name"].startswith("/lm_head/") and e["name"].endswith("_kernel_time")]
    assert head, "no lm_head kernel in the profile"
    vocab = lm.spec.vocab_size
    for e in head:
        shapes = [list(d.values())[0] for d in e["args"]["output_type_shape"]]
        assert all(s[1] == 1 for s in shapes if len(s) == 3), shapes  # [1, 1, vocab], not [1, 32, vocab]
        assert any(s == [1, 1, vocab] for s in shapes) or e["name"].startswith("/lm_head/logits_slice")
