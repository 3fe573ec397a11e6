"""edgepipe.runtime.weights: the runtime maps the external weights itself and hands them to onnxruntime.

The protobuf reader must agree with onnx's own reading on real artifacts, give up (leaving the file to
onnxruntime) on anything it cannot follow, and never hand onnxruntime bytes outside the data file; a
session made this way must compute what a session loading the file itself computes, and keep working
after the CausalLM that made it is gone.
"""

from __future__ import annotations

import gc
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepipe.runtime.model import CausalLM
from edgepipe.runtime.weights import MappedWeights, external_tensors

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="madvise is Linux's")


def _onnx_view(model_path) -> dict[str, tuple]:
    model = onnx.load(str(model_path), load_external_data=False)
    out = {}
    for t in model.graph.initializer:
        if t.data_location != TensorProto.EXTERNAL:
            continue
        kv = {e.key: e.value for e in t.external_data}
        dtype = helper.tensor_dtype_to_np_dtype(t.data_type)
        out[t.name] = (np.dtype(dtype), tuple(t.dims), kv["location"], int(kv.get("offset", 0)), int(kv["length"]))
    return out


@pytest.mark.parametrize("target", ["x86-avx512", "raspberrypi5"])
def test_reader_agrees_with_onnx_on_built_artifacts(zoo, target):
    art = zoo.artifact("llama", target)[0]
    expected = _onnx_view(art / "model.onnx")
    got = {t.name: (t.dtype, t.shape, t.location, t.offset, t.length) for t in external_tensors(art / "model.onnx")}
    assert expected and got == expected


def _tiny(tmp_path, *, inline: bool = False):
    """y = x @ w (+ b inline): w external; the model saved as onnx saves external data."""
    w = np.arange(64 * 32, dtype=np.float32).reshape(64, 32) / 100
    b = np.ones(32, np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 32])],
        [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)
    path = tmp_path / "model.onnx"
    onnx.save(model, str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=0 if not inline else 1024)
    return path, w, b


def test_small_tensors_stay_inline_and_are_left_to_onnxruntime(tmp_path):
    path, w, _ = _tiny(tmp_path, inline=True)  # b (128 B) under the threshold: stored in model.onnx
    tensors = external_tensors(path)
    assert [t.name for t in tensors] == ["w"]
    weights = MappedWeights.open(path)
    assert weights is not None and set(weights.values) == {"w"}
    assert np.array_equal(weights.values["w"].numpy(), w)


def test_out_of_file_bytes_are_never_mapped(tmp_path):
    path, _, _ = _tiny(tmp_path)
    model = onnx.load(str(path), load_external_data=False)
    for entry in model.graph.initializer[0].external_data:
        if entry.key == "offset":
            entry.value = str(10**9)
    onnx.save(model, str(path))
    assert MappedWeights.open(path) is None  # onnxruntime then loads (and refuses) the file itself


@pytest.mark.parametrize("garbage", [b"\x3a\xff\xff\xff\xff\x0f", b"\x0b\x00", b"\x3a\x05ab"])
def test_unreadable_encodings_are_left_to_onnxruntime(tmp_path, garbage):
    path = tmp_path / "model.onnx"
    path.write_bytes(garbage)
    (tmp_path / "model.onnx.data").write_bytes(b"\0" * 16)
    with pytest.raises(ValueError):
        external_tensors(path)
    assert MappedWeights.open(path) is None


def test_sessions_share_one_mapping_that_outlives_them(zoo, tmp_path):
    """A session made from another's options (``get_session_options()``, as a profiling session is)
    holds onnxruntime's raw pointers to the user initializers: the mapping must outlive the session that
    asked for it, and the numbers must be those of onnxruntime's own loading."""
    art = zoo.artifact("llama", "x86-avx512")[0]
    prompt = zoo.eval_ids(24)
    ref = CausalLM(art, threads=1, release_pages=False).logits(prompt)
    lm = CausalLM(art, threads=1)
    weights = MappedWeights.open(art / "model.onnx")
    assert weights is not None and MappedWeights.open(art / "model.onnx") is weights  # one mapping per file
    assert np.array_equal(lm.logits(prompt), ref)
    options = lm.session.get_session_options()
    options.enable_profiling = True
    options.profile_file_prefix = str(tmp_path / "prof")
    session = ort.InferenceSession(str(art / "model.onnx"), options, providers=["CPUExecutionProvider"])
    feeds = {"input_ids": prompt[None].astype(np.int64), "attention_mask": np.ones((1, len(prompt)), np.int64)}
    feeds.update(zip(lm._past_names, lm.empty_cache(), strict=True))
    del lm
    gc.collect()
    logits = session.run(["logits"], feeds)[0][0]
    assert np.array_equal(logits[-1], ref[-1])


def test_a_replaced_file_gets_a_new_mapping_and_the_old_one_closes_once_unused(tmp_path):
    from edgepipe.runtime import weights as module

    path, w, _ = _tiny(tmp_path)
    first = MappedWeights.open(path)
    assert first is not None and MappedWeights.open(path) is first
    data = path.with_name("model.onnx.data")
    first.sessions = 1  # as if a session still read it
    replaced = tmp_path / "new.data"
    offset = next(t.offset for t in external_tensors(path) if t.name == "w")
    old = data.read_bytes()
    replaced.write_bytes(old[:offset] + (w * 2).tobytes() + old[offset + w.nbytes :])
    replaced.replace(data)  # a rebuilt artifact: a new file under the old name
    second = MappedWeights.open(path)
    assert second is not None and second is not first
    assert np.array_equal(second.values["w"].numpy(), w * 2)
    assert any(v is first for v in module._OPEN.values())  # still in use: kept
    first.sessions = 0
    MappedWeights.open(path)
    assert not any(v is first for v in module._OPEN.values())  # unused and stale: closed
