"""The kv_cache_fp16 pass: attention in float16 with a float16 cache, every other activation float32.
onnxruntime runs the graph before and after; node counts, dtypes and numbers are checked."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepipe.optimize import optimize_dir
from edgepipe.optimize.decoder import pass_versions
from edgepipe.optimize.kv_cache_fp16 import KVCacheFp16Pass
from edgepipe.optimize.manager import apply_to_proto
from edgepipe.optimize.stage import OptimizeConfig, passes_for
from edgepipe.runtime.generate import GenerationConfig, generate
from edgepipe.runtime.model import CausalLM

HEADS, KV_HEADS, HEAD = 4, 2, 16
WIDTH = (HEADS + 2 * KV_HEADS) * HEAD


def tiny_attention_graph(layers: int = 2) -> onnx.ModelProto:
    """``layers`` GroupQueryAttention nodes as the builder writes them (packed q/k/v from a MatMul,
    rotary tables as initializers shared by all layers, past/present as graph inputs/outputs),
    each followed by an output projection; the last one's output is the graph's ``out``."""
    rng = np.random.default_rng(0)
    pos = np.arange(64)[:, None] / (10000 ** (np.arange(HEAD // 2) / (HEAD // 2)))[None]
    inits = [numpy_helper.from_array(np.cos(pos).astype(np.float32), "cos_cache"),
             numpy_helper.from_array(np.sin(pos).astype(np.float32), "sin_cache")]
    inputs = [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", WIDTH]),
              helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, [1]),
              helper.make_tensor_value_info("total_seq_len", TensorProto.INT32, [])]
    outputs, nodes, hidden = [], [], "x"
    for i in range(layers):
        inits += [numpy_helper.from_array(rng.standard_normal((WIDTH, WIDTH)).astype(np.float32) * 0.3, f"qkv.{i}"),
                  numpy_helper.from_array(rng.standard_normal((HEADS * HEAD, WIDTH)).astype(np.float32) * 0.3, f"o.{i}")]
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(f"past.{i}.{kind}", TensorProto.FLOAT, [1, KV_HEADS, "p", HEAD]))
            outputs.append(helper.make_tensor_value_info(f"present.{i}.{kind}", TensorProto.FLOAT, [1, KV_HEADS, "t", HEAD]))
        nodes += [
            helper.make_node("MatMul", [hidden, f"qkv.{i}"], [f"qkv_out.{i}"], name=f"qkv_proj.{i}"),
            helper.make_node(
                "GroupQueryAttention",
                [f"qkv_out.{i}", "", "", f"past.{i}.key", f"past.{i}.value", "seqlens_k", "total_seq_len", "cos_cache", "sin_cache"],
                [f"attn.{i}", f"present.{i}.key", f"present.{i}.value"],
                name=f"gqa.{i}", domain="com.microsoft", num_heads=HEADS, kv_num_heads=KV_HEADS, do_rotary=1, scale=0.25,
            ),
            helper.make_node("MatMul", [f"attn.{i}", f"o.{i}"], [f"h.{i}" if i < layers - 1 else "out"], name=f"o_proj.{i}"),
        ]
        hidden = f"h.{i}"
    outputs.insert(0, helper.make_tensor_value_info("out", TensorProto.FLOAT, [1, "s", WIDTH]))
    graph = helper.make_graph(nodes, "attn", inputs, outputs, inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)], ir_version=8)


def run_two_steps(model: onnx.ModelProto, kv: type) -> tuple[np.ndarray, list[np.ndarray]]:
    """A 5-token prompt from an empty cache, then one token after it: (both outputs, the last presents)."""
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((1, 6, WIDTH)).astype(np.float32)
    layers = sum(n.op_type == "GroupQueryAttention" for n in model.graph.node)
    names = [f"past.{i}.{k}" for i in range(layers) for k in ("key", "value")]
    outs = [o.name for o in sess.get_outputs()]
    cache = [np.zeros((1, KV_HEADS, 0, HEAD), dtype=kv) for _ in names]
    rows = []
    for lo, hi in ((0, 5), (5, 6)):
        feeds = {"x": x[:, lo:hi], "seqlens_k": np.array([hi - 1], np.int32), "total_seq_len": np.array(hi, np.int32)}
        res = sess.run(outs, {**feeds, **dict(zip(names, cache, strict=True))})
        rows.append(res[0])
        cache = res[1:]
    return np.concatenate(rows, axis=1), cache


def test_tiny_graph_runs_attention_in_fp16_with_fp32_activations():
    model = tiny_attention_graph()
    ref, ref_cache = run_two_steps(model, np.float32)
    ops = [n.op_type for n in model.graph.node]
    done = apply_to_proto(KVCacheFp16Pass(), model).details
    onnx.checker.check_model(model, full_check=True)
    # one cast per distinct float input (2 packed q/k/v, cos and sin shared by both layers), one back per layer
    assert done == {"dtype": "float16", "attention_nodes": 2, "input_casts": 4}
    new_ops = [n.op_type for n in model.graph.node]
    assert len(new_ops) == len(ops) + 6 and new_ops.count("Cast") == 6
    assert [n.op_type for n in model.graph.node if n.op_type != "Cast"] == ops  # nothing else moved or changed
    kinds = {i.name: i.type.tensor_type.elem_type for i in [*model.graph.input, *model.graph.output]}
    assert {k: v for k, v in kinds.items() if k.startswith(("past", "present"))} == dict.fromkeys(
        [f"{p}.{i}.{k}" for p in ("past", "present") for i in range(2) for k in ("key", "value")], TensorProto.FLOAT16)
    assert kinds["x"] == kinds["out"] == TensorProto.FLOAT
    out, cache = run_two_steps(model, np.float16)
    assert out.dtype == np.float32 and all(c.dtype == np.float16 and c.shape == (1, KV_HEADS, 6, HEAD) for c in cache)
    scale = np.abs(ref).max()
    assert np.abs(out - ref).max() < 3e-3 * scale, np.abs(out - ref).max() / scale
    for got, want in zip(cache, ref_cache, strict=True):  # the float32 cache, rounded (and layer 0's rounding carried on)
        assert np.abs(got.astype(np.float32) - want).max() < 3e-3 * np.abs(want).max()
    assert not apply_to_proto(KVCacheFp16Pass(), model).modified, "a second run must change nothing"


def test_pass_leaves_graphs_it_cannot_convert_alone():
    no_attention = helper.make_model(helper.make_graph(
        [helper.make_node("Relu", ["a"], ["b"])], "g",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, [2])], [helper.make_tensor_value_info("b", TensorProto.FLOAT, [2])],
    ))
    quantized = tiny_attention_graph(layers=1)
    quantized.graph.node[1].attribute.append(helper.make_attribute("k_quant_type", "PER_TENSOR"))
    internal_cache = tiny_attention_graph(layers=1)  # present consumed inside the graph, not a graph output
    internal_cache.graph.node.append(helper.make_node("Identity", ["present.0.key"], ["copy"]))
    del internal_cache.graph.output[1]
    for model in (no_attention, quantized, internal_cache):
        before = model.SerializeToString()
        assert not apply_to_proto(KVCacheFp16Pass(), model).modified
        assert model.SerializeToString() == before


def test_postcondition_rejects_a_node_with_mixed_dtypes():
    model = ir.serde.deserialize_model(tiny_attention_graph(layers=1))
    assert KVCacheFp16Pass()(model).modified
    KVCacheFp16Pass().ensures(model)
    gqa = next(n for n in model.graph if n.op_type == "GroupQueryAttention")
    gqa.outputs[1].dtype = ir.DataType.FLOAT  # a present the kernel would not write
    with pytest.raises(ir.passes.PostconditionError, match="gqa.0"):
        KVCacheFp16Pass().ensures(model)


def test_profile_setting_picks_the_passes_and_keeps_default_cache_keys():
    from edgepipe.stage import config_parts

    assert passes_for("float32") == pass_versions() == {"logits_slice": 2}
    assert list(passes_for("float16")) == ["logits_slice", "kv_cache_fp16"]
    # builds that do not ask for it keep the optimize stage's key (and every key after it)
    assert config_parts("optimize", OptimizeConfig("k", passes_for("float32"))) == config_parts("optimize", OptimizeConfig("k"))
    assert config_parts("optimize", OptimizeConfig("k", passes_for("float16"))) != config_parts("optimize", OptimizeConfig("k"))


def test_tiny_llama_fp16_cache_same_greedy_tokens(zoo, tmp_path):
    src = zoo.fp32("llama")
    out = tmp_path / "fp16kv"
    info = optimize_dir(src, out, passes_for("float16"))
    assert info["versions"] == {"logits_slice": 2, "kv_cache_fp16": 1}
    assert info["passes"]["kv_cache_fp16"]["dtype"] == "float16"
    a = onnx.load(str(src / "model.onnx"), load_external_data=False)
    b = onnx.load(str(out / "model.onnx"), load_external_data=False)
    layers = sum(n.op_type == "GroupQueryAttention" for n in a.graph.node)
    assert info["passes"]["kv_cache_fp16"]["attention_nodes"] == layers > 0
    casts = sum(n.op_type == "Cast" for n in b.graph.node) - sum(n.op_type == "Cast" for n in a.graph.node)
    # one Slice (logits_slice); per layer a cast of its q/k/v and of its output; the rotary tables once each
    assert len(b.graph.node) - len(a.graph.node) == 1 + casts and casts == 2 * layers + 2

    ref, half = CausalLM(src, threads=1), CausalLM(out, threads=1)
    assert ref.kv_dtype == np.float32 and half.kv_dtype == np.float16
    ids = zoo.eval_ids(40, offset=7)
    full = ref.logits(ids)
    got = half.logits(ids)
    assert np.abs(got - full).max() < 0.02 * np.abs(full).max()
    # the KV stepper (in-place float16 buffers) agrees with a whole-sequence run of the same graph
    st = half.stepper(len(ids))
    st.step(ids[:30], last_only=True)
    np.testing.assert_allclose(st.step(ids[30:31])[0], got[30], atol=1e-3 * np.abs(got).max(), rtol=0)
    prompt = ids[:12]
    greedy = GenerationConfig(max_new_tokens=16, temperature=0.0, ignore_eos=True)
    want = list(generate(ref, prompt.tolist(), greedy))
    assert len(want) == 16
    assert list(generate(half, prompt.tolist(), greedy)) == want


def test_profile_field_is_schema_checked():
    import dataclasses

    import yaml

    from edgepipe.errors import TargetError
    from edgepipe.targets.loader import parse_target, targets_dir

    data = yaml.safe_load((targets_dir() / "raspberrypi5.yaml").read_text())
    assert parse_target(data).runtime.kv_cache_dtype == "float32"  # no shipped profile turns it on
    data["runtime"]["kv_cache_dtype"] = "float16"
    target = parse_target(data)
    assert target.runtime.kv_cache_dtype == "float16" and target.to_dict()["runtime"]["kv_cache_dtype"] == "float16"
    assert dataclasses.replace(target.runtime, kv_cache_dtype="float32") != target.runtime
    data["runtime"]["kv_cache_dtype"] = "bfloat16"
    with pytest.raises(TargetError, match="kv_cache_dtype"):
        parse_target(data)
