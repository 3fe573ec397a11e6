"""The quantize API's shape: one frozen config per algorithm, handlers looked up by config type, the
profile's quantization section as a MixedPrecision scheme, and the user errors of bad configs."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from edgepipe.errors import InputError, TargetError
from edgepipe.quantize import (
    Format,
    Gptq,
    Imatrix,
    MixedPrecision,
    Mse,
    Rtn,
    WeightOnlyConfig,
    layer_matches,
    quantize,
    scheme_from_target,
)
from edgepipe.quantize.blockwise import QuantizedBlocks, quantize_matrix
from edgepipe.quantize.configs import config_for_format
from edgepipe.quantize.gptq import gptq_matrix
from edgepipe.quantize.handlers import HANDLERS, WeightStats, quantize_weight
from edgepipe.targets import Quantization, list_targets, load_target, parse_target


def same_blocks(a: QuantizedBlocks, b: QuantizedBlocks) -> bool:
    zp_same = (a.zero_points is None and b.zero_points is None) or (
        a.zero_points is not None and b.zero_points is not None and np.array_equal(a.zero_points, b.zero_points)
    )
    return np.array_equal(a.data, b.data) and np.array_equal(a.scales, b.scales) and zp_same and (a.bits, a.block_size) == (b.bits, b.block_size)


@pytest.fixture(scope="module")
def calibrated():
    """A weight with outliers, unequal input channels and the statistics calibration would give."""
    rng = np.random.default_rng(11)
    K, N, T = 128, 48, 1024
    w = rng.standard_normal((K, N)).astype(np.float32) * 0.05
    w[rng.random((K, N)) < 0.02] *= 6
    x = rng.standard_normal((T, 8)).astype(np.float32) @ rng.standard_normal((8, K)).astype(np.float32)
    x = (x + 0.1 * rng.standard_normal((T, K))).astype(np.float32) * np.exp(rng.normal(0, 1, K)).astype(np.float32)
    stats = {"w": (x**2).mean(0), "w@H": (x.T.astype(np.float64) @ x) / T}
    return w, stats


def test_every_algorithm_has_a_handler_keyed_by_its_config_type():
    assert set(HANDLERS) == {Rtn, Mse, Imatrix, Gptq}
    assert [c.algorithm for c in (Rtn, Mse, Imatrix, Gptq)] == ["rtn", "mse", "imatrix", "gptq"]
    assert [c.needs_calibration for c in (Rtn, Mse, Imatrix, Gptq)] == [False, False, True, True]
    assert [c.needs_hessian for c in (Rtn, Mse, Imatrix, Gptq)] == [False, False, False, True]


def test_each_config_runs_its_algorithm_with_its_fields(calibrated):
    w, source = calibrated
    stats = WeightStats(source, "w")
    imp, hessian = source["w"], source["w@H"]
    cases = [
        (Rtn(bits=4, block_size=32, symmetric=True), quantize_matrix(w, bits=4, block_size=32, symmetric=True, algorithm="rtn")),
        (Mse(bits=4, block_size=64, steps=5), quantize_matrix(w, bits=4, block_size=64, algorithm="mse", steps=5)),
        (Imatrix(bits=4, block_size=32), quantize_matrix(w, bits=4, block_size=32, algorithm="imatrix", importance=imp)),
        (Gptq(bits=4, block_size=32, damp=0.05, act_order=False), gptq_matrix(w, hessian, bits=4, block_size=32, damp=0.05, act_order=False)),
        (Gptq(bits=8, block_size=16, symmetric=True), gptq_matrix(w, hessian, bits=8, block_size=16, symmetric=True)),
    ]
    for cfg, want in cases:
        assert same_blocks(quantize_weight(cfg, w, stats), want), cfg
    # the search's steps reach it, and importance changes the result (not silently dropped)
    assert not same_blocks(quantize_weight(Mse(steps=1), w, stats), quantize_weight(Mse(steps=12), w, stats))
    assert not same_blocks(quantize_weight(Imatrix(), w, stats), quantize_weight(Mse(), w, stats))


def test_gptq_without_a_hessian_or_whole_blocks_falls_back_to_the_weighted_search(calibrated):
    w, source = calibrated
    no_h = WeightStats({"w": source["w"]}, "w")
    assert same_blocks(quantize_weight(Gptq(bits=4), w, no_h), quantize_matrix(w, bits=4, algorithm="imatrix", importance=source["w"]))
    w80 = w[:80]  # K=80: blocks of 32 straddle the end, GPTQ's static groups need whole blocks
    src80 = {"w": source["w"][:80], "w@H": source["w@H"][:80, :80]}
    got = quantize_weight(Gptq(bits=4, block_size=32), w80, WeightStats(src80, "w"))
    assert same_blocks(got, quantize_matrix(w80, bits=4, block_size=32, algorithm="imatrix", importance=src80["w"]))


def one_matmul(folder: Path, w: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    K, N = w.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "model.layers.0.mlp.up_proj.weight"], ["y"], name="mm")], "one",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["t", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["t", N])],
        [numpy_helper.from_array(w, "model.layers.0.mlp.up_proj.weight")],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 9
    onnx.save(model, str(folder / "model.onnx"))
    return folder


def test_a_new_config_type_reaches_quantize_through_its_handler(tmp_path, monkeypatch):
    """torchao's extension point: a config class plus a handler in the table, no change to quantize."""

    @dataclass(frozen=True)
    class Halved(WeightOnlyConfig):  # rounds w / 2: visibly not what any built-in handler writes
        algorithm: ClassVar[str] = "halved"

    seen = []

    def halved(cfg: Halved, w: np.ndarray, stats: WeightStats) -> QuantizedBlocks:
        seen.append(stats.name)
        return quantize_matrix(w / 2, bits=cfg.bits, block_size=cfg.block_size, symmetric=cfg.symmetric, algorithm="rtn")

    monkeypatch.setitem(HANDLERS, Halved, halved)
    rng = np.random.default_rng(5)
    w = (rng.standard_normal((64, 24)) * 0.1).astype(np.float32)
    info = quantize(one_matmul(tmp_path / "fp32", w), tmp_path / "q", Halved(bits=8, accuracy_level=0))
    assert seen == ["model.layers.0.mlp.up_proj.weight"]
    assert info["matmuls"] == {"int4": 0, "int8": 1, "fp32": 0} and info["algorithm_used"] == "halved"
    x = rng.standard_normal((3, 64)).astype(np.float32)
    (y,) = ort.InferenceSession(str(tmp_path / "q" / "model.onnx"), providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(y, x @ (w / 2), atol=0.01 * np.abs(x @ w).max())


def test_quantize_refuses_what_is_not_a_config(tmp_path):
    src = one_matmul(tmp_path / "fp32", np.ones((32, 4), np.float32))
    with pytest.raises(InputError, match="quantize takes a weight-only config, a MixedPrecision scheme or a BitPlan, not str"):
        quantize(src, tmp_path / "q", "rtn")  # type: ignore[arg-type]

    @dataclass(frozen=True)
    class Unhandled(WeightOnlyConfig):
        algorithm: ClassVar[str] = "unhandled"

    with pytest.raises(InputError, match="no quantizer handles Unhandled"):
        quantize(src, tmp_path / "q", Unhandled())


@pytest.mark.parametrize(
    "make,message",
    [
        (lambda: Rtn(bits=3), "bits must be 4 or 8"),
        (lambda: Imatrix(block_size=48), "block_size is 48"),
        (lambda: Gptq(accuracy_level=7), "accuracy_level must be 0-4"),
        (lambda: Gptq(damp=0.0), "damp must be between 0 and 1"),
        (lambda: Mse(steps=0), "steps must be at least 1"),
        (lambda: MixedPrecision(default=Rtn(), eight_bit_ops=("down_proj",)), "need an eight_bit config"),
        (lambda: MixedPrecision(default=Rtn(), eight_bit=Rtn(bits=4)), "eight_bit must have 8 bits"),
        (lambda: MixedPrecision(default="rtn"), "must be a weight-only config"),
        (lambda: Format(bits=2), "4, 8 or 32 bits"),
        (lambda: scheme_from_target(dataclasses.replace(Quantization(), algorithm="awq")), "unknown quantization algorithm 'awq'"),
    ],
)
def test_bad_configs_are_user_errors(make, message):
    with pytest.raises(InputError, match=message):
        make()


def test_configs_are_frozen():
    with pytest.raises(dataclasses.FrozenInstanceError):
        Gptq().bits = 8  # type: ignore[misc]


@pytest.mark.parametrize("name", list_targets())
def test_every_profile_becomes_a_scheme_and_the_manifest_record_rebuilds_it(name):
    q = load_target(name).quantization
    scheme = scheme_from_target(q)
    record = scheme.as_profile()
    assert scheme_from_target(Quantization(**{k: tuple(v) if isinstance(v, list) else v for k, v in record.items()})) == scheme
    # the keys report.py reads keep the profile's values
    assert (record["bits"], record["block_size"], record["symmetric"], record["accuracy_level"], record["embedding_bits"]) == (
        q.bits, q.block_size, q.symmetric, q.accuracy_level, q.embedding_bits
    )
    four = 4 in (q.bits, q.embedding_bits)
    assert record["algorithm"] == (q.algorithm if four else q.eight_bit_algorithm)
    assert record["eight_bit_algorithm"] == q.eight_bit_algorithm
    calibrated = ("imatrix", "gptq")
    assert scheme.needs_calibration == ((q.algorithm in calibrated and four) or q.eight_bit_algorithm in calibrated)


def test_the_shipped_profiles_schemes():
    pi = scheme_from_target(load_target("raspberrypi5").quantization)
    assert pi.default == Gptq(bits=4, block_size=32, symmetric=False, accuracy_level=4)
    assert pi.table == pi.default  # the int4 table is GPTQ'd like the body
    assert pi.eight_bit == Rtn(bits=8, block_size=64, accuracy_level=4)  # 8-bit blocks: rounded, blocks of 64
    assert pi.needs_calibration and pi.needs_hessian and pi.algorithm == "gptq"
    # x86-avx512: int8 formats only, chosen per matrix within 8.9 bits/weight, every one GPTQ'd (the table too)
    q512 = load_target("x86-avx512").quantization
    avx512 = scheme_from_target(q512)
    gptq8 = Gptq(bits=8, block_size=32, accuracy_level=4)
    assert avx512 == MixedPrecision(default=gptq8, table=gptq8, eight_bit=gptq8)
    assert avx512.needs_calibration and avx512.needs_hessian
    assert q512.bits_per_weight == 8.9 and q512.sensitivity == "fisher" and {f.split("/")[0] for f in q512.formats} == {"int8"}
    assert config_for_format(Format(8, 128, True), q512) == Gptq(bits=8, block_size=128, symmetric=True, accuracy_level=4)
    # x86-avx2: the Pi scheme (GPTQ, an int4 table) and a size budget over int4 / int8 formats chosen per matrix
    avx2 = load_target("x86-avx2").quantization
    assert scheme_from_target(avx2) == pi and avx2.embedding_bits == 4 and avx2.sensitivity == "fisher"
    assert avx2.bits_per_weight == 6.12 and {f.split("/")[0] for f in avx2.formats} == {"int4", "int8"}
    # a profile that sets eight_bit_block_size on an all-8-bit body gives the body that block
    q8 = scheme_from_target(Quantization(bits=8, eight_bit_block_size=64, embedding_bits=8))
    assert q8.default == Rtn(bits=8, block_size=64) and q8.table == Rtn(bits=8, block_size=32) and q8.eight_bit is None


def test_eight_bit_algorithm_quantizes_every_8_bit_matrix_and_defaults_to_rounding():
    """A profile's ``eight_bit_algorithm`` reaches the 8-bit body, table and pinned matrices and the formats
    an allocator picks (config_for_format); without it 8-bit matrices are rounded to nearest."""
    q8 = Quantization(bits=8, block_size=64, algorithm="gptq", eight_bit_algorithm="gptq", embedding_bits=8)
    s8 = scheme_from_target(q8)
    assert s8.default == Gptq(bits=8, block_size=64) and s8.table == s8.default and s8.needs_hessian
    assert config_for_format(Format(8, 128, True), q8) == Gptq(bits=8, block_size=128, symmetric=True)
    pi = Quantization(bits=4, algorithm="gptq", eight_bit_ops=("down_proj",), eight_bit_block_size=64)
    assert scheme_from_target(pi).eight_bit == Rtn(bits=8, block_size=64)
    assert config_for_format(Format(8, 64), pi) == Rtn(bits=8, block_size=64)
    assert config_for_format(Format(4, 64), pi) == Gptq(bits=4, block_size=64)
    assert scheme_from_target(dataclasses.replace(pi, eight_bit_algorithm="mse")).eight_bit == Mse(bits=8, block_size=64)
    # in a profile file: read like `algorithm`, an unknown name refused in one line
    data = load_target("x86-avx512").to_dict()
    data["quantization"]["eight_bit_algorithm"] = "gptq"
    assert scheme_from_target(parse_target(data).quantization).default == Gptq(bits=8, block_size=32)
    data["quantization"]["eight_bit_algorithm"] = "awq"
    with pytest.raises(TargetError, match="eight_bit_algorithm"):
        parse_target(data)


def test_mixed_precision_assigns_each_matrix_its_config():
    scheme = MixedPrecision(
        default=Gptq(), table=Rtn(bits=8), eight_bit=Rtn(bits=8, block_size=64), eight_bit_layers=("first",), eight_bit_ops=("down_proj@last", "o_proj")
    )
    name = "model.layers.{}.{}.MatMul.weight".format
    assert scheme.config_for(name(0, "mlp.up_proj"), 0, 4, False) == scheme.eight_bit  # the first layer
    assert scheme.config_for(name(3, "mlp.down_proj"), 3, 4, False) == scheme.eight_bit  # down_proj in the last
    assert scheme.config_for(name(2, "mlp.down_proj"), 2, 4, False) == scheme.default
    assert scheme.config_for(name(2, "attn.o_proj"), 2, 4, False) == scheme.eight_bit  # o_proj everywhere
    assert scheme.config_for("lm_head.MatMul.weight", None, 4, True) == scheme.table
    assert MixedPrecision(table=Rtn(bits=8)).config_for(name(1, "mlp.up_proj"), 1, 4, False) is None  # default None: fp32


@pytest.mark.parametrize(
    "spec,layers",
    [("first", [0]), ("last", [5]), ("first:2", [0, 1]), ("last:2", [4, 5]), ("3", [3]), ("1-3", [1, 2, 3]), ("0, 4-5", [0, 4, 5]), ("x", [])],
)
def test_layer_specs(spec, layers):
    assert [i for i in range(6) if layer_matches(spec, i, 6)] == layers
