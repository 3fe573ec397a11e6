"""The BitPlan: its bytes are the artifact's quantized tensors, byte for byte; the plan made from
config.json alone (what estimate uses) equals the one made from the export (what quantize writes); an
edited plan is written as edited; and estimate's artifact size is the plan's."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from conftest import ARCHS, HIDDEN, TIED, VOCAB, load_profile

from edgepipe.errors import InputError, ModelError
from edgepipe.estimate import artifact_size, estimate
from edgepipe.export import inspect_model
from edgepipe.export.genai_builder import SUPPORTED_ARCHITECTURES
from edgepipe.quantize import (
    Format,
    Rtn,
    matrices_from_config,
    matrices_from_onnx,
    plan_from_config,
    plan_from_onnx,
    quantize,
    scheme_from_target,
)
from edgepipe.quantize.allocate_stage import built_plan
from edgepipe.quantize.architectures import ARCHITECTURES
from edgepipe.quantize.blockwise import quantize_matrix
from edgepipe.runtime.model import CausalLM
from edgepipe.targets import load_target

BUILT = ("raspberrypi5", "int8-rtn")  # the artifacts test_quantized_models builds too (shared zoo)
QUANTIZED_OPS = ("MatMulNBits", "GatherBlockQuantized")


@pytest.fixture(params=BUILT)
def target(request) -> str:
    return request.param


def stored_bytes(folder: Path, names: set[str]) -> int:
    """Bytes the named initializers take where they are stored: their span of model.onnx.data, or inline."""
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    total = 0
    for t in model.graph.initializer:
        if t.name not in names:
            continue
        if t.data_location == onnx.TensorProto.EXTERNAL:
            ext = {e.key: e.value for e in t.external_data}
            assert ext["location"] == "model.onnx.data"
            total += int(ext["length"])
        else:
            total += len(t.raw_data) or onnx.numpy_helper.to_array(t).nbytes
    return total


def quantized_weights(folder: Path) -> set[str]:
    """The initializers MatMulNBits and GatherBlockQuantized read (the table's int64 shape is graph, not weight)."""
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: n for n in model.graph.node for o in n.output}
    names = set()
    for node in model.graph.node:
        if node.op_type not in QUANTIZED_OPS:
            continue
        for i in node.input:
            if i in producers and producers[i].op_type == "Reshape":  # the table's flat view
                i = producers[i].input[0]
            if i in inits and inits[i].data_type != onnx.TensorProto.INT64:
                names.add(i)
    return names


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("block", [16, 32, 64, 128])
@pytest.mark.parametrize("K", [64, 80, 33])
def test_format_bytes_are_the_packed_arrays(bits, symmetric, block, K):
    w = np.random.default_rng(K + block).standard_normal((K, 5)).astype(np.float32)
    qb = quantize_matrix(w, bits=bits, block_size=block, symmetric=symmetric, algorithm="rtn")
    packed = qb.data.nbytes + qb.scales.nbytes + (0 if qb.zero_points is None else qb.zero_points.nbytes)
    assert Format(bits, block, symmetric).nbytes(K, 5) == packed
    assert Format(32).nbytes(K, 5) == K * 5 * 4


def test_architecture_table_covers_what_the_exporter_supports():
    assert set(ARCHITECTURES) == set(SUPPORTED_ARCHITECTURES)


@pytest.mark.parametrize("arch", ARCHS)
def test_config_plan_equals_graph_plan(zoo, arch):
    config = json.loads((zoo.model(arch) / "config.json").read_text())
    graph = onnx.load(str(zoo.fp32(arch) / "model.onnx"), load_external_data=False)
    from_config, from_graph = matrices_from_config(config), matrices_from_onnx(graph)
    assert from_config == from_graph
    assert from_graph.tied == TIED[arch] and len(from_graph.matrices) == 5 * 2 + 1 + (not TIED[arch])  # an untied input embedding too
    for name in ("raspberrypi5", "x86-avx2", "x86-avx512"):
        scheme = scheme_from_target(load_target(name).quantization)
        a, b = plan_from_config(config, scheme), plan_from_onnx(graph, scheme)
        assert a == b and a.bytes() == b.bytes() and a.formats() == b.formats(), name


@pytest.mark.parametrize(("arch", "target"), [(a, t) for a in ARCHS for t in BUILT] + [("llama", "x86-avx512")])
def test_plan_bytes_are_the_artifacts_quantized_tensors(zoo, arch, target):
    """Byte for byte, MatMulNBits data + fp32 scales + packed zero points (the tied table once); the int4
    and the int8 allocations (raspberrypi5, x86-avx512) and the rounded int8 everywhere (int8-rtn)."""
    art, res = zoo.artifact(arch, target)
    plan = built_plan(zoo.fp32(arch) / "model.onnx", load_profile(target).quantization, res.manifest.to_dict()["quantization"])
    names = quantized_weights(art)
    assert stored_bytes(art, names) == plan.bytes() == res.manifest.to_dict()["quantization"]["bit_plan"]["bytes"]
    assert res.manifest.to_dict()["quantization"]["bit_plan"]["parameters"] == plan.parameters()
    assert res.manifest.to_dict()["quantization"]["matmuls"] == plan.counts()
    if TIED[arch]:  # the lm_head's tensors serve the lookup too: counted once, stored once
        assert plan.shared_table() is not None and plan.shared_table().matrix.K == HIDDEN


def test_an_edited_plan_is_written_as_edited(zoo, tmp_path):
    """What a size allocator does: change single matrices' formats (table included) and quantize that plan."""
    fp32 = zoo.fp32("llama")
    plan = plan_from_onnx(fp32 / "model.onnx", scheme_from_target(load_target("raspberrypi5").quantization))
    down, head = "model.layers.0.mlp.down_proj.MatMul.weight", "lm_head.MatMul.weight"
    edited = plan.replace({down: Rtn(bits=8, block_size=128), head: Rtn(bits=4, block_size=64, symmetric=True)})
    assert edited.formats()[down] == Format(8, 128, False) and edited.bytes() != plan.bytes()
    info = quantize(fp32, tmp_path / "q", edited)
    assert info["bit_plan"]["bytes"] == edited.bytes() == stored_bytes(tmp_path / "q", quantized_weights(tmp_path / "q"))
    model = onnx.load(str(tmp_path / "q" / "model.onnx"), load_external_data=False)
    attrs = {n.input[1] if n.op_type == "MatMulNBits" else n.op_type: {a.name: a.i for a in n.attribute if a.name in ("bits", "block_size")}
             for n in model.graph.node if n.op_type in QUANTIZED_OPS}
    assert attrs[f"{down.removesuffix('.weight')}.weight_Q8"] == {"bits": 8, "block_size": 128}
    assert attrs["GatherBlockQuantized"] == attrs[f"{head.removesuffix('.weight')}.weight_Q4"] == {"bits": 4, "block_size": 64}
    assert f"{head.removesuffix('.weight')}.weight_zp" not in {t.name for t in model.graph.initializer}  # symmetric: no zero points
    ids = zoo.eval_ids(32)
    ref, got = CausalLM(fp32, threads=1).logits(ids), CausalLM(tmp_path / "q", threads=1).logits(ids)
    # a working graph, not an accuracy claim: the Pi scheme without its budget is all int4 RTN here (0.75 measured)
    assert np.isfinite(got).all() and (ref.argmax(-1) == got.argmax(-1)).mean() > 0.6
    with pytest.raises(InputError, match="made for another model"):
        quantize(fp32, tmp_path / "q2", dataclasses.replace(edited, num_layers=3))
    with pytest.raises(InputError, match="the plan has no matrix 'nope'"):
        plan.replace({"nope": Rtn()})


def test_config_enumeration_reads_the_builders_dimensions():
    """Qwen3-0.6B's shape: head_dim 128 x 16 heads is wider than hidden 1024 (q is not hidden)."""
    config = {
        "architectures": ["Qwen3ForCausalLM"], "hidden_size": 1024, "intermediate_size": 3072, "num_attention_heads": 16,
        "num_key_value_heads": 8, "head_dim": 128, "num_hidden_layers": 28, "vocab_size": 151936, "tie_word_embeddings": True,
    }
    m = {x.name: (x.K, x.N) for x in matrices_from_config(config).matrices}
    assert len(m) == 28 * 5 + 1
    assert m["model.layers.27.attn.qkv_proj.MatMul.weight"] == (1024, (16 + 2 * 8) * 128)
    assert m["model.layers.0.attn.o_proj.MatMul.weight"] == (2048, 1024)
    assert m["model.layers.3.mlp.down_proj.MatMul.weight"] == (3072, 1024)
    assert m["lm_head.MatMul.weight"] == (1024, 151936)
    gemma = {"architectures": ["GemmaForCausalLM"], "hidden_size": 64, "intermediate_size": 96, "num_attention_heads": 2, "num_hidden_layers": 1, "vocab_size": 10}
    assert matrices_from_config(gemma).tied  # GemmaConfig ties when config.json does not say
    phi = dict(gemma, architectures=["PhiForCausalLM"])
    assert [x.name for x in matrices_from_config(phi).matrices][-2:] == ["model.layers.0.mlp.fc1.MatMul.weight", "model.layers.0.mlp.fc2.MatMul.weight"]
    with pytest.raises(ModelError, match="architecture GPT2LMHeadModel is not one edgepipe exports"):
        matrices_from_config(dict(gemma, architectures=["GPT2LMHeadModel"]))
    with pytest.raises(ModelError, match="config.json gives no hidden_size"):
        matrices_from_config({k: v for k, v in gemma.items() if k != "hidden_size"})


def test_estimate_counts_every_weight_byte_of_the_artifact(zoo, arch, target):
    """estimate's size before export = the built artifact's initializers (the graph itself excluded):
    the plan's matrices (an untied input table among them), everything else fp32 (norms, biases), the rotary caches."""
    info = inspect_model(zoo.model(arch))
    tgt = load_profile(target)
    size = artifact_size(info.config, info.num_parameters, tgt)
    art, _ = zoo.artifact(arch, target)
    model = onnx.load(str(art / "model.onnx"), load_external_data=False)
    # int64 initializers are graph, not weights: the table's shape for GatherBlockQuantized, the optimize passes' indices
    weights = stored_bytes(art, {t.name for t in model.graph.initializer if t.data_type != onnx.TensorProto.INT64})
    if tgt.quantization.bits_per_weight is None:
        assert weights == size.total, (weights, size)
    else:  # sized at the budget, which the allocation fills to within a matrix's upgrade and never exceeds
        assert 0.97 * size.total <= weights <= size.total, (weights, size)
    assert size.fp32 == (info.num_parameters - size_params(info.config, tgt)) * 4
    assert size.fp32 < VOCAB * HIDDEN * 4  # every table is quantized, an untied input embedding too
    est = estimate(info.config, info.num_parameters, tgt)
    assert est["artifact_mb"] == round(size.total / 2**20, 1)
    files = sum((art / f).stat().st_size for f in ("model.onnx", "model.onnx.data"))
    assert size.total < files < size.total + 64 * 1024  # the rest is the graph: nodes, names, attributes


def size_params(config: dict, tgt) -> int:
    return plan_from_config(config, scheme_from_target(tgt.quantization)).parameters()


def test_estimate_figures_follow_the_plan(zoo):
    info = inspect_model(zoo.model("llama"))
    pi, avx512 = load_target("raspberrypi5"), load_target("x86-avx512")
    e4, e8 = estimate(info.config, info.num_parameters, pi), estimate(info.config, info.num_parameters, avx512)
    assert e4["bits_per_weight"] == 5.125 and e8["bits_per_weight"] == 9.25  # the default format: 4 or 8 + scale + zero point
    s4 = artifact_size(info.config, info.num_parameters, pi)
    # decode reads every weight once per token: all of the artifact but the rotary caches, plus one row
    assert s4.per_token == s4.matrices + s4.fp32 + HIDDEN * 4
    assert e4["decode_tok_s"] == round(pi.cpu.mem_bandwidth_gbps * 1e9 / s4.per_token, 1)
    assert artifact_size(info.config, info.num_parameters, pi).total < artifact_size(info.config, info.num_parameters, avx512).total
