"""The numpy block quantizer: packing, error bounds per algorithm, the MatMulNBits layout as
onnxruntime reads it (a one-MatMul graph through ``edgepipe.quantize.quantize``), and GPTQ."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepipe.quantize import Gptq, Imatrix, MixedPrecision, Rtn, plan_from_onnx, quantize, scheme_from_target
from edgepipe.quantize.blockwise import pack, quantize_matrix, rtn_squared_error, unpack
from edgepipe.quantize.gptq import gptq_matrix


def rel_err(w: np.ndarray, wq: np.ndarray) -> float:
    return float(np.linalg.norm(w - wq) / np.linalg.norm(w))


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("length", [32, 33, 1])
def test_pack_unpack_round_trip(bits, length):
    rng = np.random.default_rng(bits * 100 + length)
    q = rng.integers(0, 1 << bits, size=(3, 5, length), dtype=np.uint8)
    p = pack(q, bits)
    assert p.dtype == np.uint8
    assert p.shape[-1] == (length if bits == 8 else (length + 1) // 2)
    assert (unpack(p, bits)[..., :length] == q).all()
    if bits == 4:
        assert (p[..., 0] == (q[..., 0] | ((q[..., 1] if length > 1 else 0) << 4))).all()  # low nibble first


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("bits,bound", [(4, 0.12), (8, 0.008)])
def test_rtn_error_bounds(bits, bound, symmetric):
    rng = np.random.default_rng(0)
    K, N, block = 256, 96, 32
    w = rng.standard_normal((K, N)).astype(np.float32) * 0.05
    qb = quantize_matrix(w, bits=bits, block_size=block, symmetric=symmetric, algorithm="rtn")
    assert (qb.K, qb.N, qb.bits, qb.block_size) == (K, N, bits, block)
    assert qb.data.shape == (N, K // block, block * bits // 8)
    assert qb.scales.shape == (N, K // block)
    assert (qb.zero_points is None) == symmetric
    wq = qb.dequantize()
    assert wq.shape == w.shape
    e = rel_err(w, wq)
    assert 0 < e < bound, e
    # every element is within one quantization step of its block: half a step of rounding, plus (asymmetric)
    # the zero point's rounding or (symmetric) the clip of the one code the positive side lacks
    step = np.abs(qb.scales).T.repeat(block, axis=0)  # [K, N]
    assert (np.abs(w - wq) <= step * 1.0 + 1e-7).all()
    assert np.median(np.abs(w - wq) / step) < 0.3


def test_mse_and_imatrix_beat_rtn():
    rng = np.random.default_rng(1)
    K, N = 128, 64
    w = rng.standard_normal((K, N)).astype(np.float32)
    w[rng.random((K, N)) < 0.01] *= 8  # a few outliers: clipping pays off
    chan = np.exp(rng.normal(0, 1.5, K)).astype(np.float32)  # very unequal input channels
    x = rng.standard_normal((512, K)).astype(np.float32) * chan
    importance = (x**2).mean(0)
    out = {}
    for alg in ("rtn", "mse", "imatrix"):
        qb = quantize_matrix(w, bits=4, block_size=32, algorithm=alg, importance=importance if alg == "imatrix" else None)
        out[alg] = (rel_err(w, qb.dequantize()), rel_err(x @ w, x @ qb.dequantize()))
    # mse minimises the weight error; imatrix the activation-weighted (= output) error
    assert out["mse"][0] < out["rtn"][0], out  # the search starts from rtn: never worse, here better
    assert out["imatrix"][1] < out["mse"][1] * 0.95, out
    assert out["imatrix"][1] < out["rtn"][1] * 0.9, out
    assert out["imatrix"][1] < 0.2, out


@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("per_row_importance", [False, True])
def test_torch_scale_search_matches_numpy(symmetric, per_row_importance):
    """The torch search expands the weighted error instead of forming residuals: it must pick the
    same scales and zero points as the numpy reference, up to float rounding of the refit."""
    from edgepipe.quantize.blockwise import _err, _mse, _mse_numpy

    rng = np.random.default_rng(7)
    w = rng.standard_normal((300, 6, 32)).astype(np.float32)  # 300 rows: several chunks of rows
    w[rng.random(w.shape) < 0.01] *= 6
    imp = np.exp(rng.normal(0, 1, (300 if per_row_importance else 1, 6, 32))).astype(np.float32)
    s_np, z_np = _mse_numpy(w, imp, 4, symmetric)
    s_t, z_t = _mse(w, imp, 4, symmetric)
    assert s_t.dtype == np.float32 and s_t.shape == s_np.shape == (300, 6)
    assert (z_t == z_np).mean() > 0.995
    assert np.allclose(s_t, s_np, rtol=1e-4, atol=1e-7) or (np.isclose(s_t, s_np, rtol=1e-4).mean() > 0.995)
    e_np, e_t = _err(w, imp, s_np, z_np, 15), _err(w, imp, s_t, z_t, 15)
    assert abs(e_t.sum() / e_np.sum() - 1) < 1e-4
    s_rtn, z_rtn = _rtn_for_test(w, symmetric)
    assert e_t.sum() < _err(w, imp, s_rtn, z_rtn, 15).sum()  # the search improves on rtn


def _rtn_for_test(w, symmetric):
    from edgepipe.quantize.blockwise import _rtn

    return _rtn(w, 4, symmetric)


def test_gptq_weights_are_the_4_bit_matrices(tmp_path):
    """Calibration computes Hessians only for what GPTQ quantizes: 8-bit matrices (eight_bit_ops)
    and the embedding table are rounded to nearest and need none."""
    rng = np.random.default_rng(3)
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 64])
    nodes, inits, prev = [], [], "x"
    for layer in range(3):
        for op in ("qkv_proj", "down_proj"):
            wname = f"model.layers.{layer}.attn.{op}.MatMul.weight"
            inits.append(numpy_helper.from_array(rng.standard_normal((64, 64)).astype(np.float32), wname))
            out = f"{op}{layer}"
            nodes.append(helper.make_node("MatMul", [prev, wname], [out]))
            prev = out
    y = helper.make_tensor_value_info(prev, TensorProto.FLOAT, [1, 64])
    model = helper.make_model(helper.make_graph(nodes, "g", [x], [y], inits))
    onnx.save(model, tmp_path / "model.onnx")
    cfg = MixedPrecision(default=Gptq(bits=4, block_size=32), eight_bit=Rtn(bits=8, block_size=32), eight_bit_ops=("down_proj@0-1", "qkv_proj@2"))
    got = plan_from_onnx(tmp_path / "model.onnx", cfg).hessian_weights()
    assert got == {"model.layers.0.attn.qkv_proj.MatMul.weight", "model.layers.1.attn.qkv_proj.MatMul.weight",
                   "model.layers.2.attn.down_proj.MatMul.weight"}
    assert plan_from_onnx(tmp_path / "model.onnx", Rtn(bits=4, block_size=32)).hessian_weights() == set()


@pytest.mark.parametrize(
    ("bits", "block", "symmetric", "K"), [(4, 32, False, 576), (4, 128, False, 160), (4, 16, True, 100), (8, 64, False, 576), (8, 128, True, 300)]
)
def test_the_allocator_s_squared_error_is_the_packed_round_trip_s(bits, block, symmetric, K):
    """rtn_squared_error (the sensitivity pass, no packing) equals quantize -> dequantize exactly,
    padded blocks included, with an outlier in one block."""
    rng = np.random.default_rng(K + bits)
    w = (rng.standard_normal((K, 48)) * 0.05).astype(np.float32)
    w[3, 5] = 0.9
    packed = np.square(w - quantize_matrix(w, bits=bits, block_size=block, symmetric=symmetric, algorithm="rtn").dequantize())
    lean = rtn_squared_error(np.ascontiguousarray(w.T), bits, block, symmetric)
    assert lean.shape == (48, K) and np.array_equal(lean.T, packed)


def test_padding_when_k_is_not_a_block_multiple():
    rng = np.random.default_rng(2)
    w = rng.standard_normal((80, 16)).astype(np.float32)
    qb = quantize_matrix(w, bits=4, block_size=32, algorithm="mse")
    assert qb.data.shape == (16, 3, 16) and qb.dequantize().shape == (80, 16)
    assert rel_err(w, qb.dequantize()) < 0.12


def test_bad_arguments():
    with pytest.raises(ValueError):
        quantize_matrix(np.zeros(8, np.float32))
    with pytest.raises(ValueError):
        quantize_matrix(np.zeros((32, 4), np.float32), bits=3)
    with pytest.raises(ValueError):
        quantize_matrix(np.zeros((32, 4), np.float32), algorithm="nope")


def one_matmul_model(folder: Path, w: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    K, N = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "layers.0.mlp.proj.weight"], ["y"], name="mm")],
        "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "seq", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "seq", N])],
        [numpy_helper.from_array(w, "layers.0.mlp.proj.weight")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(folder / "model.onnx"))
    (folder / "genai_config.json").write_text("{}")  # copied along like any side file
    return folder


def run(folder: Path, x: np.ndarray) -> np.ndarray:
    return ort.InferenceSession(str(folder / "model.onnx"), providers=["CPUExecutionProvider"]).run(["y"], {"x": x})[0]


@pytest.mark.parametrize(
    "bits,symmetric,K,level",
    [(4, False, 128, 0), (4, True, 96, 0), (8, False, 128, 0), (4, False, 80, 0), (4, False, 128, 4)],
)
def test_one_matmul_graph_through_onnxruntime(tmp_path, bits, symmetric, K, level):
    rng = np.random.default_rng(K + bits)
    N = 48
    w = (rng.standard_normal((K, N)) * 0.1).astype(np.float32)
    x = rng.standard_normal((2, 5, K)).astype(np.float32)
    src = one_matmul_model(tmp_path / "fp32", w)
    y_fp32 = run(src, x)
    np.testing.assert_allclose(y_fp32, x @ w, atol=1e-4)

    cfg = Rtn(bits=bits, block_size=32, symmetric=symmetric, accuracy_level=level)
    info = quantize(src, tmp_path / "q", cfg)
    assert info["matmuls"] == {"int4": int(bits == 4), "int8": int(bits == 8), "fp32": 0}
    q = onnx.load(str(tmp_path / "q" / "model.onnx"))
    ops = Counter(n.op_type for n in q.graph.node)
    assert ops == {"MatMulNBits": 1}
    assert [i.name for i in q.graph.initializer if i.name == "layers.0.mlp.proj.weight"] == []
    assert (tmp_path / "q" / "genai_config.json").is_file()
    y_q = run(tmp_path / "q", x)

    # onnxruntime reads our packed layout as we meant it: its output is x @ dequantize(w)
    qb = quantize_matrix(w, bits=bits, block_size=32, symmetric=symmetric, algorithm="rtn")
    y_deq = x @ qb.dequantize()
    if level == 0:  # fp32 compute: only summation order differs
        np.testing.assert_allclose(y_q, y_deq, atol=2e-5 * np.abs(y_deq).max() + 1e-5)
    else:  # int8 activations: a further small error
        assert rel_err(y_deq, y_q) < 0.02
    # and close to the float graph within the quantization error
    assert rel_err(y_fp32, y_q) < (0.15 if bits == 4 else 0.01)
    assert rel_err(y_fp32, y_q) > 0


def test_tied_embedding_becomes_gather_block_quantized(tmp_path):
    """Transpose(lm_head.weight) -> Gather plus MatMul(lm_head.weight): one quantized table, two ops."""
    rng = np.random.default_rng(3)
    V, H = 100, 64
    table = (rng.standard_normal((H, V)) * 0.1).astype(np.float32)  # the builder stores lm_head as [H, V]
    nodes = [
        helper.make_node("Transpose", ["lm_head.weight"], ["emb_table"], perm=[1, 0], name="t"),
        helper.make_node("Gather", ["emb_table", "ids"], ["emb"], axis=0, name="embed"),
        helper.make_node("MatMul", ["emb", "lm_head.weight"], ["y"], name="lm_head"),
    ]
    graph = helper.make_graph(
        nodes, "tied",
        [helper.make_tensor_value_info("ids", TensorProto.INT64, ["b", "s"])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "s", V]),
         helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["b", "s", H])],
        [numpy_helper.from_array(table, "lm_head.weight")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    (tmp_path / "fp32").mkdir()
    onnx.save(model, str(tmp_path / "fp32" / "model.onnx"))
    info = quantize(tmp_path / "fp32", tmp_path / "q", MixedPrecision(default=Imatrix(bits=4, accuracy_level=0), table=Rtn(bits=8, accuracy_level=0)))
    assert info["embedding"] == "int8 (shared with lm_head)"
    q = onnx.load(str(tmp_path / "q" / "model.onnx"))
    ops = Counter(n.op_type for n in q.graph.node)
    assert ops["GatherBlockQuantized"] == 1 and ops["MatMulNBits"] == 1
    assert ops["Gather"] == ops["Transpose"] == ops["MatMul"] == 0
    assert not [i for i in q.graph.initializer if i.data_type == TensorProto.FLOAT and sorted(i.dims) == [H, V]]
    ids = rng.integers(0, V, size=(1, 7)).astype(np.int64)
    sess = ort.InferenceSession(str(tmp_path / "q" / "model.onnx"), providers=["CPUExecutionProvider"])
    y, emb = sess.run(["y", "emb"], {"ids": ids})
    deq = quantize_matrix(table, bits=8, block_size=32, algorithm="rtn").dequantize()  # [H, V]
    np.testing.assert_allclose(emb[0], deq.T[ids[0]], atol=1e-6)
    np.testing.assert_allclose(emb[0], table.T[ids[0]], atol=0.01 * np.abs(table).max())
    np.testing.assert_allclose(y, emb @ deq, atol=1e-4)


def test_gptq_lowers_output_error_on_correlated_activations():
    rng = np.random.default_rng(4)
    K, N, T = 128, 64, 2048
    # correlated inputs: a few latent factors mixed into all channels, plus noise
    z = rng.standard_normal((T, 8)).astype(np.float32)
    x = z @ rng.standard_normal((8, K)).astype(np.float32) + 0.1 * rng.standard_normal((T, K)).astype(np.float32)
    w = (rng.standard_normal((K, N)) * 0.05).astype(np.float32)
    hessian = (x.T.astype(np.float64) @ x) / T
    y = x @ w
    e_rtn = rel_err(y, x @ quantize_matrix(w, bits=4, algorithm="rtn").dequantize())
    e_imx = rel_err(y, x @ quantize_matrix(w, bits=4, algorithm="imatrix", importance=np.diag(hessian)).dequantize())
    qb = gptq_matrix(w, hessian, bits=4, block_size=32)
    assert qb.data.shape == (N, K // 32, 16) and qb.zero_points is not None
    e_gptq = rel_err(y, x @ qb.dequantize())
    assert e_gptq < 0.6 * e_rtn, (e_gptq, e_rtn)
    assert e_gptq < e_imx, (e_gptq, e_imx)
    # GPTQ trades weight error for output error: the weights themselves move further
    assert rel_err(w, qb.dequantize()) > rel_err(w, quantize_matrix(w, bits=4, algorithm="rtn").dequantize())


def test_eight_bit_matrices_get_their_own_block(tmp_path):
    """``eight_bit_block_size``: 8-bit matrices in blocks of 64 (fewer scales), 4-bit ones stay at 32."""
    rng = np.random.default_rng(5)
    K, N = 128, 48  # up: [K, N] at 4 bits; down: [N, N] at 8 bits (48 rows: one block of 64, padded)
    ws = [(rng.standard_normal((K, N)) * 0.1).astype(np.float32) for _ in range(2)]
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"]
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", names[0]], ["h"]), helper.make_node("MatMul", ["h", names[1]], ["y"])],
        "two",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["t", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["t", N])],
        [numpy_helper.from_array(ws[0], names[0]), numpy_helper.from_array(ws[1][:N], names[1]),
         # as onnxruntime-genai names the final norm: one past the last layer, which "last" must not count
         numpy_helper.from_array(np.ones(N, dtype=np.float32), "model.layers.1.final_norm_layernorm.weight")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    (tmp_path / "fp32").mkdir()
    onnx.save(model, str(tmp_path / "fp32" / "model.onnx"))
    cfg = MixedPrecision(
        default=Rtn(bits=4, block_size=32, accuracy_level=0), eight_bit=Rtn(bits=8, block_size=64, accuracy_level=0), eight_bit_ops=("down_proj@last",)
    )
    info = quantize(tmp_path / "fp32", tmp_path / "q", cfg)
    assert info["matmuls"] == {"int4": 1, "int8": 1, "fp32": 0}
    q = onnx.load(str(tmp_path / "q" / "model.onnx"))
    attrs = {n.input[1]: {a.name: a.i for a in n.attribute if a.name in ("bits", "block_size")} for n in q.graph.node}
    assert attrs == {
        "model.layers.0.mlp.up_proj.weight_Q4": {"bits": 4, "block_size": 32},
        "model.layers.0.mlp.down_proj.weight_Q8": {"bits": 8, "block_size": 64},
    }
    scales = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer if t.name.endswith("scales")}
    assert scales["model.layers.0.mlp.down_proj.weight_scales"].shape == (N, 1)
    assert scales["model.layers.0.mlp.up_proj.weight_scales"].shape == (N, K // 32)
    # 8-bit matrix bytes: N * (64 data + 4 scale + 1 zero point) instead of N * 2 * (32 + 4 + 1) at block 32
    q8 = quantize_matrix(ws[1][:N], bits=8, block_size=64, algorithm="rtn")
    assert q8.data.nbytes + q8.scales.nbytes + q8.zero_points.nbytes == N * 69
    x = rng.standard_normal((5, K)).astype(np.float32)
    (y,) = ort.InferenceSession(str(tmp_path / "q" / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    q4 = quantize_matrix(ws[0], bits=4, block_size=32, algorithm="rtn")
    y_deq = (x @ q4.dequantize()) @ q8.dequantize()
    np.testing.assert_allclose(y, y_deq, atol=2e-5 * np.abs(y_deq).max() + 1e-5)


def test_eight_bit_block_size_in_the_profile_schema():
    from edgepipe.errors import TargetError
    from edgepipe.targets import load_target, parse_target

    t = load_target("raspberrypi5")
    assert scheme_from_target(t.quantization).eight_bit.block_size == t.quantization.eight_bit_block_size
    data = t.to_dict()
    data["quantization"]["eight_bit_block_size"] = 48
    with pytest.raises(TargetError, match="eight_bit_block_size is 48; use 16, 32, 64, 128 or 256"):
        parse_target(data)
