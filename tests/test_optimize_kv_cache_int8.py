"""The kv_cache_int8 pass and the calibrated ranges it takes: an int8 cache with per-channel scales,
attention float32. onnxruntime runs the graphs before and after; dtypes and numbers are checked
against bounds (an int8 cache is not bit-identical to a float32 one)."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper
from test_optimize_kv_cache_fp16 import HEAD, KV_HEADS, run_two_steps, tiny_attention_graph

from edgepipe.optimize.decoder import pass_versions
from edgepipe.optimize.kv_cache_int8 import KVCacheInt8Pass, scales_from_ranges
from edgepipe.optimize.kv_ranges import KVRangesConfig, load_ranges, run_kv_ranges
from edgepipe.optimize.manager import apply_to_proto
from edgepipe.optimize.stage import OptimizeConfig, passes_for, run_optimize
from edgepipe.runtime.generate import GenerationConfig, generate
from edgepipe.runtime.model import CausalLM
from edgepipe.stage import StageContext, config_parts


def presents(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    """{present name: [kv heads, head] max |value|} of ``model`` over run_two_steps' input."""
    _, cache = run_two_steps(model, np.float32)
    names = [o.name for o in model.graph.output if o.name.startswith("present")]
    return {n: np.abs(c[0]).max(axis=1) for n, c in zip(names, cache, strict=True)}


def test_tiny_graph_int8_cache_per_channel():
    model = tiny_attention_graph()
    ref, ref_cache = run_two_steps(model, np.float32)
    amax = presents(model)
    ops = [n.op_type for n in model.graph.node]
    done = apply_to_proto(KVCacheInt8Pass({k: scales_from_ranges(v) for k, v in amax.items()}), model).details
    onnx.checker.check_model(model, full_check=True)
    assert done == {"dtype": "int8", "quant_type": "PER_CHANNEL", "attention_nodes": 2}
    assert [n.op_type for n in model.graph.node] == ops  # no node added
    kinds = {i.name: i.type.tensor_type.elem_type for i in [*model.graph.input, *model.graph.output]}
    assert {k for k, v in kinds.items() if v == TensorProto.INT8} == {
        f"{p}.{i}.{k}" for p in ("past", "present") for i in range(2) for k in ("key", "value")}
    out, cache = run_two_steps(model, np.int8)
    assert out.dtype == np.float32 and all(c.dtype == np.int8 and c.shape == (1, KV_HEADS, 6, HEAD) for c in cache)
    assert np.abs(out - ref).max() < 0.03 * np.abs(ref).max(), np.abs(out - ref).max() / np.abs(ref).max()
    # the cache dequantized: within a rounding step of each channel's own scale (not the tensor's)
    names = [o.name for o in model.graph.output if o.name.startswith("present")]
    for name, got, want in zip(names, cache, ref_cache, strict=True):
        scale = scales_from_ranges(amax[name])[None, :, None, :]
        err = np.abs(got * scale - want)
        assert (err <= 0.51 * scale + 0.02 * np.abs(want).max()).all()  # layer 0's rounding carried on in layer 1
    assert not apply_to_proto(KVCacheInt8Pass(amax), model).modified, "a second run must change nothing"


def test_scales_are_per_kv_head_and_channel():
    """Channels six orders of magnitude apart each keep their own precision: onnxruntime reads the
    scale as [kv head, channel] (the count it checks, kv heads x head size, fits other layouts too)."""
    model = tiny_attention_graph(layers=1)
    ref_cache = run_two_steps(model, np.float32)[1]
    amax = presents(model)
    # pretend the calibration saw channel c of head h at 10^(h*3 + c%4 - 3) x its true range: every other
    # layout of the same 32 numbers would give some channel a scale far from its own
    weird = {n: a * 10.0 ** (np.arange(KV_HEADS)[:, None] * 3 + np.arange(HEAD)[None, :] % 4 - 3) for n, a in amax.items()}
    for n in weird:
        weird[n] = np.maximum(weird[n], amax[n])  # never below the range: no saturation
    apply_to_proto(KVCacheInt8Pass({k: scales_from_ranges(v) for k, v in weird.items()}), model)
    cache = run_two_steps(model, np.int8)[1]
    names = [o.name for o in model.graph.output if o.name.startswith("present")]
    for name, got, want in zip(names, cache, ref_cache, strict=True):
        scale = scales_from_ranges(weird[name])[None, :, None, :]
        assert (np.abs(got * scale - want) <= 0.51 * scale + 1e-6).all()


def test_pass_leaves_graphs_it_cannot_convert_alone():
    model = tiny_attention_graph(layers=2)
    amax = presents(model)
    missing = dict(amax)
    del missing["present.1.value"]
    wrong_heads = {k: np.ones((KV_HEADS + 1, HEAD)) for k in amax}
    wrong_width = {k: np.ones((KV_HEADS, HEAD // 2)) for k in amax}
    for scales in (missing, wrong_heads, wrong_width):
        m = tiny_attention_graph(layers=2)
        m.graph.output[1].type.tensor_type.shape.dim[3].dim_value = HEAD  # a static head size to check against
        before = m.SerializeToString()
        assert not apply_to_proto(KVCacheInt8Pass(scales), m).modified
        assert m.SerializeToString() == before
    quantized = tiny_attention_graph(layers=1)
    quantized.graph.node[1].attribute.append(helper.make_attribute("k_quant_type", "PER_TENSOR"))
    before = quantized.SerializeToString()
    assert not apply_to_proto(KVCacheInt8Pass(amax), quantized).modified
    assert quantized.SerializeToString() == before


def test_inputs_after_the_scales_keep_their_places():
    """onnxruntime's schema has inputs after k/v_scale (q/k norm weights at 14, 15): they must not move."""
    model = tiny_attention_graph(layers=1)
    amax = presents(model)
    gqa = model.graph.node[1]
    gqa.input.extend(["", "", "", "", "", "cos_cache", "sin_cache"])  # inputs 9-13 empty, stand-ins at 14 and 15
    ir_model = ir.serde.deserialize_model(model)
    assert KVCacheInt8Pass(amax)(ir_model).modified
    node = next(n for n in ir_model.graph if n.op_type == "GroupQueryAttention")
    assert [v.name if v is not None else "" for v in node.inputs[12:]] == [
        "present.0.key/scale", "present.0.value/scale", "cos_cache", "sin_cache"]


def test_postcondition_rejects_a_bad_scale():
    model = ir.serde.deserialize_model(tiny_attention_graph(layers=1))
    scales = {k: scales_from_ranges(v) for k, v in presents(tiny_attention_graph(layers=1)).items()}
    assert KVCacheInt8Pass(scales)(model).modified
    KVCacheInt8Pass(scales).ensures(model)
    gqa = next(n for n in model.graph if n.op_type == "GroupQueryAttention")
    gqa.inputs[12].const_value = ir.tensor(-np.ones((KV_HEADS, HEAD), np.float32))
    with pytest.raises(ir.passes.PostconditionError, match="positive"):
        KVCacheInt8Pass(scales).ensures(model)
    gqa.outputs[1].dtype = ir.DataType.FLOAT
    with pytest.raises(ir.passes.PostconditionError, match="int8"):
        KVCacheInt8Pass(scales).ensures(model)


def test_scales_from_ranges_floor_and_margin():
    amax = np.array([[2.0, 0.0, 127.0]])
    s = scales_from_ranges(amax, margin=1.0)
    assert s.dtype == np.float32 and s[0, 0] == pytest.approx(2 / 127) and s[0, 2] == pytest.approx(1.0)
    assert 0 < s[0, 1] <= 127 * 1e-3 / 127  # a channel never seen non-zero still gets a positive scale
    assert scales_from_ranges(amax, margin=2.0)[0, 0] == pytest.approx(4 / 127)


def test_profile_setting_and_cache_keys():
    assert list(passes_for("int8")) == ["logits_slice", "kv_cache_int8"] == list(pass_versions("int8"))
    # builds without an int8 cache keep the optimize stage's key of before kv_ranges_key existed
    assert config_parts("optimize", OptimizeConfig("k"))["config"] == {
        "type": "OptimizeConfig", "fields": {"input_key": "k", "passes": {"logits_slice": 2}}}
    a = config_parts("optimize", OptimizeConfig("k", passes_for("int8"), "r1"))
    assert a != config_parts("optimize", OptimizeConfig("k", passes_for("int8"), "r2"))  # other ranges, other graph


def test_profile_field_and_estimate(zoo):
    import dataclasses

    from edgepipe.estimate import estimate_model
    from edgepipe.targets.loader import load_target

    rpi5 = load_target("raspberrypi5")
    assert rpi5.runtime.kv_cache_dtype == "float32"  # no shipped profile turns it on
    sizes = {}
    for dtype in ("float32", "float16", "int8"):
        target = dataclasses.replace(rpi5, runtime=dataclasses.replace(rpi5.runtime, kv_cache_dtype=dtype))
        assert target.to_dict()["runtime"]["kv_cache_dtype"] == dtype
        sizes[dtype] = estimate_model(zoo.model("llama"), target)["kv_cache_mb"]
    assert sizes["float32"] > 0 and sizes["int8"] == pytest.approx(sizes["float32"] / 4, abs=0.1)
    assert sizes["float16"] == pytest.approx(sizes["float32"] / 2, abs=0.1)


def test_tiny_llama_int8_cache_runs_and_stays_close(zoo, tmp_path):
    src = zoo.fp32("llama")
    ctx = StageContext(threads=1)
    calib = [zoo.eval_ids(64, offset=300 + 64 * i) for i in range(3)]
    ranges = run_kv_ranges(src, calib, KVRangesConfig(f"test-{tmp_path.name}", "calib"), ctx)
    amax = load_ranges(ranges.path)
    ref = CausalLM(src, threads=1)
    assert len(amax) == 2 * ref.spec.num_layers and all(a.shape == (ref.spec.num_kv_heads, ref.spec.head_size) for a in amax.values())
    assert ranges.info["windows"] == 3 and ranges.info["key_max"] > 0
    opt = run_optimize(src, OptimizeConfig(f"test-{tmp_path.name}", passes_for("int8"), ranges.key), ctx, ranges.path)
    assert opt.info["passes"]["kv_cache_int8"]["attention_nodes"] == ref.spec.num_layers
    q = CausalLM(opt.model_dir, threads=1)
    assert ref.kv_dtype == np.float32 and q.kv_dtype == np.int8

    ids = zoo.eval_ids(48, offset=7)  # held out from the calibration windows
    full, got = ref.logits(ids), q.logits(ids)
    lp, lq = (x - np.logaddexp.reduce(x, axis=-1, keepdims=True) for x in (full, got))
    kl = float((np.exp(lp) * (lp - lq)).sum(-1).mean())
    assert kl < 0.01, kl
    # the KV stepper (in-place int8 buffers, chunked prefill) agrees with a whole-sequence run of the graph
    q.prefill_chunk = 8
    st = q.stepper(len(ids))
    st.step(ids[:30], last_only=True)
    np.testing.assert_allclose(st.step(ids[30:31])[0], got[30], atol=1e-3 * np.abs(got).max(), rtol=0)
    st.rewind(20)  # speculative decoding's rewind: the next step overwrites positions 20..
    np.testing.assert_allclose(st.step(ids[20:21])[0], got[20], atol=1e-3 * np.abs(got).max(), rtol=0)
    greedy = GenerationConfig(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    text = list(generate(q, ids[:12].tolist(), greedy))
    want = list(generate(ref, ids[:12].tolist(), greedy))
    assert len(text) == 16
    assert sum(a == b for a, b in zip(text, want, strict=True)) >= 12, (text, want)


@pytest.fixture(scope="module")
def int8_artifact(zoo, tmp_path_factory):
    """The tiny Llama built for raspberrypi5 with ``runtime.kv_cache_dtype: int8`` (every stage before
    kv_ranges shared with the plain raspberrypi5 build), and that build."""
    import dataclasses

    from edgepipe.pipeline import build
    from edgepipe.targets.loader import load_target

    _, plain = zoo.artifact("llama", "raspberrypi5")
    rpi5 = load_target("raspberrypi5")
    target = dataclasses.replace(rpi5, runtime=dataclasses.replace(rpi5.runtime, kv_cache_dtype="int8"))
    out = tmp_path_factory.mktemp("kv8") / "art"
    res = build(target=target, out=out, model=zoo.model("llama"))
    return out, res, plain


@pytest.mark.slow  # two tiny builds: 7 min at load 14 (the fixture)
def test_int8_cache_artifact_end_to_end(int8_artifact):
    """run, lookup and draft decoding, bench and serve on an artifact whose cache is int8; its build's
    validation against the fp32 export stays within a bound of the float32-cache artifact's."""
    import json
    import sys

    from click.testing import CliRunner
    from serve_support import ask_server

    from edgepipe.cli import main
    art, res, plain = int8_artifact
    assert CausalLM(art, threads=1).kv_dtype == np.int8
    m = res.manifest
    assert m.provenance["optimize"]["passes"]["kv_cache_int8"]["dtype"] == "int8"
    assert m.provenance["optimize"]["kv_ranges"]["windows"] > 0  # where the scales came from
    acc, ref_acc = m.metrics["accuracy"], plain.manifest.metrics["accuracy"]
    assert acc["kl_divergence"] < ref_acc["kl_divergence"] + 0.01, (acc, ref_acc)
    assert "kv_cache_int8" not in plain.manifest.provenance["optimize"]["passes"]
    assert m.metrics["throughput"]["decode_tok_s"] > 0

    def cli(*args):
        return CliRunner().invoke(main, [str(a) for a in args])

    prompt = "She was the youngest of the two daughters of a most"
    greedy = cli("run", art, "--prompt", prompt, "--max-new-tokens", "24")
    assert greedy.exit_code == 0 and greedy.output.strip(), greedy.output
    for extra in (["--lookup"], ["--draft", art, "--draft-tokens", "2"]):  # the same tokens as plain greedy
        res2 = cli("run", art, "--prompt", prompt, "--max-new-tokens", "24", *extra)
        assert res2.exit_code == 0 and res2.output == greedy.output, (extra, res2.output)
    bench = cli("bench", art, "--json")
    assert bench.exit_code == 0, bench.output
    assert json.loads(bench.output)["decode_tok_s"] > 0
    got = ask_server([sys.executable, "-m", "edgepipe.runtime", "serve", str(art), "--port", "0"], prompt)
    assert got["completion"] and got["chat_status"] == 200, got
    assert got["completion"] in greedy.output, (got, greedy.output)


def test_only_graphs_with_attention_nodes_are_calibrated(tmp_path):
    """A build asks for the cache's ranges only when the graph keeps its cache in GroupQueryAttention
    (the generic exporter's graphs do not: nothing to convert, so no pass over the calibration text)."""
    from edgepipe.optimize.kv_ranges import has_attention_cache

    with_gqa, plain = tmp_path / "gqa", tmp_path / "plain"
    with_gqa.mkdir()
    plain.mkdir()
    onnx.save(tiny_attention_graph(layers=1), str(with_gqa / "model.onnx"))
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])
    y = helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])
    graph = helper.make_graph([helper.make_node("Softmax", ["x"], ["y"])], "g", [x], [y])
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(plain / "model.onnx"))
    assert has_attention_cache(with_gqa) and not has_attention_cache(plain)
