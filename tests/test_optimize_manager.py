"""The pass manager: passes run in order and report what they did; a failing pass is named with the
passes before it; a pass that does not apply leaves a protobuf byte-identical; external weights are
never read."""

from __future__ import annotations

from typing import ClassVar

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from test_optimize_logits_slice import tiny_head_graph

from edgepipe.optimize import PASSES, decoder_passes, optimize_model
from edgepipe.optimize.logits_slice import INPUT, LogitsSlicePass
from edgepipe.optimize.manager import PassManager, PassReport, apply_to_proto


class _Negate(ir.passes.InPlacePass):
    """Puts a Neg in front of the graph output (a stand-in pass with a visible effect)."""

    name: ClassVar[str] = "negate"

    def call(self, model: ir.Model) -> PassReport:
        out = model.graph.outputs[0]
        neg = ir.node("Neg", [out])
        model.graph.append(neg)
        neg.outputs[0].name, neg.outputs[0].type, neg.outputs[0].shape = out.name + "_neg", out.type, out.shape
        model.graph.outputs[0] = neg.outputs[0]
        return PassReport(model, True, {"negated": out.name})


class _Broken(ir.passes.InPlacePass):
    def requires(self, model: ir.Model) -> None:
        raise ir.passes.PreconditionError("needs something the model lacks")

    def call(self, model: ir.Model) -> PassReport:
        raise AssertionError("not reached")


def _logits(model: onnx.ModelProto, x: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"hidden": x})[0]


def test_passes_run_in_order_and_report_by_name() -> None:
    model = tiny_head_graph()
    x = np.random.default_rng(3).standard_normal((1, 5, 8)).astype(np.float32)
    before = _logits(model, x)
    n_before = len(model.graph.node)
    report = apply_to_proto(PassManager([LogitsSlicePass(), _Negate()]), model)
    assert report.modified
    assert report.details == {
        "logits_slice": {"input": INPUT, "default": 0, "head": "lm_head", "sliced": "normed"},
        "negate": {"negated": "logits"},
    }
    assert [n.op_type for n in model.graph.node] == ["Mul", "Slice", "MatMul", "Neg"] and len(model.graph.node) == n_before + 2
    np.testing.assert_allclose(_logits(model, x), -before, rtol=1e-6, atol=1e-6)


def test_a_failing_pass_is_named_with_the_passes_before_it() -> None:
    model = ir.serde.deserialize_model(tiny_head_graph())
    manager = PassManager([LogitsSlicePass(), _Broken()])
    with pytest.raises(ir.passes.PassError, match=r"pass '_Broken' failed \(after \['logits_slice'\]\)") as info:
        manager(model)
    assert isinstance(info.value.__cause__, ir.passes.PreconditionError)


def test_nothing_applied_leaves_the_proto_byte_identical() -> None:
    model = tiny_head_graph()
    model.graph.output[0].name = "hidden_out"  # no "logits" output: logits_slice does not apply
    model.graph.node[1].output[0] = "hidden_out"
    before = model.SerializeToString()
    report = apply_to_proto(decoder_passes(), model)
    assert not report.modified and report.details == {}
    assert model.SerializeToString() == before


def test_pass_list_is_the_cache_key() -> None:
    """build.py puts PASSES in the optimize stage's cache key: it must name exactly the passes that run."""
    assert decoder_passes().names == tuple(PASSES)


def test_external_weights_are_never_read(tmp_path) -> None:
    """The decoder's passes run on a model loaded without its weights; the data file may be absent."""
    model = tiny_head_graph()
    onnx.save_model(model, str(tmp_path / "model.onnx"), save_as_external_data=True,
                    location="model.onnx.data", size_threshold=0)
    light = onnx.load(str(tmp_path / "model.onnx"), load_external_data=False)
    (tmp_path / "model.onnx.data").rename(tmp_path / "elsewhere.data")
    assert set(optimize_model(light)) == {"logits_slice"}
    refs = {t.name: {e.key: e.value for e in t.external_data} for t in light.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL}
    assert set(refs) == {"lm_head.weight", "norm.weight"} and all(r["location"] == "model.onnx.data" for r in refs.values())
    # with the data back, the rewritten graph computes what the original did
    (tmp_path / "elsewhere.data").rename(tmp_path / "model.onnx.data")
    onnx.save_model(light, str(tmp_path / "opt.onnx"))
    x = np.random.default_rng(4).standard_normal((1, 6, 8)).astype(np.float32)
    full = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"hidden": x})[0]
    got = ort.InferenceSession(str(tmp_path / "opt.onnx"), providers=["CPUExecutionProvider"]).run(None, {"hidden": x})[0]
    np.testing.assert_array_equal(got, full)
