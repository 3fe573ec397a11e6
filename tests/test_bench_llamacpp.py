"""benchmarks/vs_llamacpp.py (and its parts, benchmarks/vs_*.py): the parts whose errors would silently skew the comparison.

* the reader of llama-perplexity's ``--kl-divergence-base`` file (fast, no llama.cpp needed);
* with the cached llama.cpp build (``python benchmarks/llamacpp.py`` makes it; skipped otherwise,
  and marked slow): a tiny random Llama with the default model's tokenizer goes through llama.cpp's
  converter and ``llama-perplexity``; the tokens llama.cpp scored must be the ones edgepipe's
  tokenizer gives for the same text, and the log-probs it stored must match the HF model's.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import isa, llamacpp, vs_edgepipe_side, vs_llama_side, vs_llamacpp, vs_report, vs_speed  # noqa: E402
from benchmarks.llamacpp import LLAMA_CPP_PYTHON_VERSION, cached_llamacpp  # noqa: E402

# conftest points EDGEPIPE_CACHE at a temp dir: look for the build (and the converted default
# model) where a developer made them too
_HOME_CACHE = Path.home() / ".cache" / "edgepipe"


def _find_llamacpp():
    for root in (None, _HOME_CACHE / "llamacpp" / LLAMA_CPP_PYTHON_VERSION):
        found = cached_llamacpp(root=root)
        if found:
            return found
    return None


def _default_model_folder() -> Path:
    done = sorted(_HOME_CACHE.glob("models/smollm2-135m-instruct-*/.complete"))
    if done:
        return done[-1].parent
    from edgepipe.models import default_model_dir

    return default_model_dir()  # converts once into the test cache


# /proc/cpuinfo flags of three x86 kinds (trimmed to what matters)
EPYC_AVX2 = "flags\t\t: fpu sse sse2 ssse3 sse4_1 sse4_2 avx f16c fma bmi1 bmi2 avx2 sha_ni clzero\n"
SAPPHIRE_RAPIDS = ("flags\t\t: sse4_2 avx f16c fma bmi2 avx2 avx512f avx512dq avx512cd avx512bw avx512vl avx512_vnni "
                   "avx512vbmi avx512_bf16 avx_vnni amx_tile amx_int8 amx_bf16\n")
ALDER_LAKE = "flags\t\t: sse4_2 avx f16c fma bmi2 avx2 avx_vnni\n"
PINNED_BEFORE = [  # what the build pinned before the flags came from the host
    "-DGGML_NATIVE=OFF", "-DGGML_AVX=ON", "-DGGML_AVX2=ON", "-DGGML_AVX512=ON", "-DGGML_AVX512_VNNI=ON",
    "-DGGML_FMA=ON", "-DGGML_F16C=ON", "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_AMX_BF16=OFF",
]


def test_cmake_flags_follow_the_host_cpu():
    avx2 = isa.isa_flags(isa.cpu_flags(EPYC_AVX2))
    assert avx2 == {"SSE42", "AVX", "AVX2", "BMI2", "FMA", "F16C"}
    flags = isa.isa_cmake_flags(avx2)
    assert "-DGGML_AVX512=OFF" in flags and "-DGGML_AVX512_VNNI=OFF" in flags and "-DGGML_AVX2=ON" in flags
    assert not any("AMX" in f and f.endswith("=ON") for f in (*llamacpp.CMAKE_FLAGS, *flags))
    spr = isa.isa_flags(isa.cpu_flags(SAPPHIRE_RAPIDS))
    assert {"AVX512", "AVX512_VNNI"} <= spr and "AVX_VNNI" not in spr  # the AVX-512 kernels take precedence
    assert "AVX_VNNI" in isa.isa_flags(isa.cpu_flags(ALDER_LAKE))
    # the instruction set names the folder and is read back from a marker's flags, older markers too
    assert isa.isa_tag(avx2) == "avx2" and isa.isa_tag(spr) == "avx512vnni"
    assert isa.isa_of_cmake_flags(isa.isa_cmake_flags(avx2)) == avx2
    assert isa.isa_of_cmake_flags(PINNED_BEFORE) == spr
    assert isa.isa_flags(isa.cpu_flags("processor: 0\n")) == frozenset()


def test_a_build_for_another_instruction_set_is_not_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("EDGEPIPE_CACHE", str(tmp_path))
    monkeypatch.delenv("EDGEPIPE_LLAMACPP", raising=False)
    avx2 = isa.isa_flags(isa.cpu_flags(EPYC_AVX2))
    avx512 = isa.isa_flags(isa.cpu_flags(SAPPHIRE_RAPIDS))
    assert llamacpp.cache_dir(isa=avx2) != llamacpp.cache_dir(isa=avx512)
    # a complete-looking build made with the AVX-512 flags, in the folder of builds made before the ISA named it
    root = tmp_path / "llamacpp" / LLAMA_CPP_PYTHON_VERSION
    p = llamacpp._paths(root, LLAMA_CPP_PYTHON_VERSION)
    for f in (p.quantize, p.bench, p.perplexity, p.convert, p.pydeps / ".complete"):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("")
    (root / ".complete").write_text(json.dumps({"commit": "test", "cmake_flags": [*llamacpp.CMAKE_FLAGS, *PINNED_BEFORE]}))
    assert cached_llamacpp(isa=avx512) is not None
    assert cached_llamacpp(isa=avx2) is None
    assert cached_llamacpp(root=root, isa=avx2) is None


def _write_kld_base(path: Path, n_ctx: int, tokens: np.ndarray, logits: np.ndarray) -> None:
    """The writer side of llama-perplexity's logits file, as perplexity.cpp does it."""
    n_chunk, n_pos, n_vocab = logits.shape
    nv = 2 * ((n_vocab + 1) // 2) + 4
    with open(path, "wb") as f:
        f.write(b"_logits_")
        f.write(np.uint32(n_ctx).tobytes())
        f.write(np.array([n_vocab, n_chunk], np.int32).tobytes())
        f.write(tokens.astype(np.int32).tobytes())
        for c in range(n_chunk):
            for p in range(n_pos):
                x = logits[c, p].astype(np.float32)
                mx = x.max()
                mn = max(x.min(), mx - 16)
                lse = np.log(np.exp(x - mx).astype(np.float64).sum())
                rec = np.zeros(nv, np.uint16)
                scale = np.float32((mx - mn) / 65535.0)
                rec[:4] = np.array([scale, mn - mx - lse], np.float32).view(np.uint16)
                rec[4 : 4 + n_vocab] = np.where(x > mn, np.rint((x - mn) / scale), 0).astype(np.uint16)
                f.write(rec.tobytes())


def test_read_kld_base_round_trip(tmp_path):
    rng = np.random.default_rng(0)
    n_ctx, n_chunk, n_vocab = 16, 2, 33  # odd vocab: the record is padded to an even length
    n_pos = n_ctx - 1 - n_ctx // 2
    tokens = rng.integers(0, n_vocab, size=(n_chunk, n_ctx))
    logits = rng.normal(0, 3, size=(n_chunk, n_pos, n_vocab)).astype(np.float32)
    _write_kld_base(tmp_path / "base.bin", n_ctx, tokens, logits)
    got_ctx, got_tokens, lp = vs_llama_side.read_kld_base(tmp_path / "base.bin")
    assert got_ctx == n_ctx
    np.testing.assert_array_equal(got_tokens, tokens)
    want = vs_edgepipe_side._log_softmax(logits)
    kept = want > want.max(-1, keepdims=True) - 15  # below 16 nats under the top, llama.cpp stores the floor
    np.testing.assert_allclose(lp[kept], want[kept], atol=2e-3)
    assert (lp[~kept] <= want.max(-1, keepdims=True).repeat(want.shape[-1], -1)[~kept] - 14).all()


def test_read_kld_base_rejects_other_files(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"not a logits file")
    with pytest.raises(ValueError, match="not a llama-perplexity logits file"):
        vs_llama_side.read_kld_base(tmp_path / "x.bin")


@pytest.mark.slow
def test_llamacpp_tokens_and_logprobs_match_edgepipe(tmp_path):
    lc = _find_llamacpp()
    if lc is None:
        pytest.skip(
            "no cached llama.cpp build: run `python benchmarks/llamacpp.py` first (~40 min on 2 shared cores)"
        )
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from edgepipe.errors import InputError

    try:
        src = _default_model_folder()
    except InputError as e:
        pytest.skip(str(e))
    # a tiny random Llama that keeps the default model's tokenizer (and so its GGUF tokenizer metadata)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
    )
    model_dir = tmp_path / "tiny"
    model_dir.mkdir()
    (model_dir / "config.json").write_text(json.dumps(cfg))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (src / name).is_file():
            (model_dir / name).write_bytes((src / name).read_bytes())
    torch.manual_seed(0)
    config = transformers.AutoConfig.from_pretrained(model_dir)
    hf = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.normal_(0, 0.5)  # large enough that the distributions are far from uniform
    hf.save_pretrained(model_dir)

    gguf = tmp_path / "tiny-f32.gguf"
    r = subprocess.run(
        lc.convert_cmd(model_dir, gguf, "f32"), env=lc.convert_env(), capture_output=True, text=True
    )
    assert r.returncode == 0, r.stderr[-2000:]
    text = (ROOT / "edgepipe" / "data" / "eval.txt").read_text()
    base = tmp_path / "base.bin"
    n_ctx = 64
    r = subprocess.run(
        [
            str(lc.perplexity),
            "-m",
            str(gguf),
            "-f",
            str(ROOT / "edgepipe" / "data" / "eval.txt"),
            "-c",
            str(n_ctx),
            "-b",
            str(n_ctx),
            "-t",
            "2",
            "--chunks",
            "3",
            "--kl-divergence-base",
            str(base),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    got_ctx, tokens, lp = vs_llama_side.read_kld_base(base)
    assert got_ctx == n_ctx and tokens.shape == (3, n_ctx)

    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(model_dir / "tokenizer.json")).encode(text).ids
    # same tokens, no BOS inserted (the SmolLM2 GGUF says add_bos_token = false)
    np.testing.assert_array_equal(tokens.reshape(-1), np.asarray(ids[: 3 * n_ctx]))
    with torch.no_grad():
        logits = hf(torch.from_numpy(tokens)).logits.numpy()
    want = vs_edgepipe_side._log_softmax(logits[:, n_ctx // 2 : n_ctx - 1])
    top = want > want.max(-1, keepdims=True) - 12  # llama.cpp floors log-probs 16 nats below the top
    # the stored values are rounded to 1/65535 of the kept range; the rest is float32 arithmetic
    # of two engines on large random activations
    diff = np.abs(lp[top] - want[top])
    assert diff.mean() < 2e-3 and diff.max() < 0.1, (diff.mean(), diff.max())
    assert (lp.argmax(-1) == want.argmax(-1)).mean() > 0.99


def test_tables_name_the_cpu_and_its_flags():
    facts = vs_report.machine_facts()
    assert facts["cpu_model"] and set(facts["cpu_flags"]) <= set(isa.RELEVANT_CPU_FLAGS)
    lines = vs_report.machine_lines({"machine": facts, "llamacpp": {"llama_cpp": "b1", "isa": ["AVX", "AVX2"]}})
    assert lines[0].startswith(f"CPU: {facts['cpu_model']}") and " ".join(facts["cpu_flags"]) in lines[0]
    assert lines[1] == "llama.cpp b1 built with: AVX AVX2"


def test_running_means_of_a_log_without_its_summary():
    """llama-perplexity --kl-divergence sometimes exits 0 without its summary: the last chunk's running
    means stand in, marked as such (an unparsable log gives None, never a number)."""
    log = """kl_divergence: computing over 45 chunks, n_ctx=512, batch_size=512, n_seq=1
chunk             PPL               ln(PPL(Q)/PPL(base))          KL Divergence              Δp RMS            Same top p
   1     254.8171 ±   34.8921       0.00191 ±    0.00132       0.00048 ±    0.00004     0.287 ±  0.033 %    97.647 ±  0.951 %
  44     314.6260 ±    9.0838       0.00138 ±    0.00033       0.00049 ±    0.00001     0.292 ±  0.018 %    97.701 ±  0.142 %
"""
    got = vs_llama_side.running_means(log)
    assert got["chunks"] == 44 and got["from_running_means"] is True
    assert got["kl_divergence"] == 0.00049 and got["perplexity"] == 314.626
    assert abs(got["top1_agreement"] - 0.97701) < 1e-9 and abs(got["ppl_increase_pct"] - 0.138095) < 1e-4
    assert vs_llama_side.running_means("no rows here")["kl_divergence"] is None


def test_size_matched_artifacts_are_timed_next_to_their_quant(tmp_path):
    """An ``--artifact int4@Q4_0=DIR`` is timed in the interleaved loop right after Q4_0 (each label once),
    so equal-size pairs get speed ratios; an unknown label is a usage error, not a silently untimed folder."""
    argv = ["--artifact", f"int4@Q4_0={tmp_path}", "--artifact", f"int4={tmp_path}", "--artifact", f"int8={tmp_path}"]
    args = vs_llamacpp._parse_args(argv)
    arts = {a.split("=")[0]: tmp_path for a in args.artifact}
    ggufs = {q: tmp_path / f"{q}.gguf" for q in vs_llama_side.QUANTS}
    names = [n for n, _ in vs_speed._speed_order(args, None, ggufs, arts, 2)]
    assert names == [
        "Q8_0", "int8", "int8 (no spinning)", "Q8_0 (OMP passive)",
        "Q4_0", "int4", "int4 (no spinning)", "int4@Q4_0", "int4@Q4_0 (no spinning)", "Q4_0 (OMP passive)",
        "Q4_K_M", "Q4_K_M (OMP passive)",
    ]
    one = vs_llamacpp._parse_args([*argv, "--speed-quants", "Q4_0", "--no-passive"])
    assert [n for n, _ in vs_speed._speed_order(one, None, ggufs, arts, 2)] == ["Q4_0", "int4", "int4@Q4_0"]
    with pytest.raises(SystemExit):
        vs_llamacpp._parse_args(["--artifact", f"int4@Q5={tmp_path}"])


@pytest.mark.parametrize("target", ["x86-avx2", "raspberrypi5"])
def test_rtn_profile_is_the_target_without_calibration_or_size_budget(tmp_path, target):
    """``--int4-target rtn:NAME``: the shipped profile with round-to-nearest and one format for every matrix
    (its own bits / block size; the Pi's table stays int4), loadable as a target."""
    import edgepipe

    shipped = edgepipe.load_target(target).to_dict()
    got = edgepipe.load_target(str(vs_edgepipe_side.rtn_profile(tmp_path, target))).to_dict()
    q, q0 = got["quantization"], shipped["quantization"]
    assert got["name"] == f"{target}-rtn" and q["algorithm"] == "rtn"
    assert q["bits_per_weight"] is None and q["max_mb"] is None and not q["formats"] and not q["eight_bit_ops"]
    for key in ("bits", "block_size", "symmetric", "embedding_bits", "accuracy_level"):
        assert q[key] == q0[key], key
    assert got["budgets"] == shipped["budgets"] and got["cpu"] == shipped["cpu"]
    for fmt, block, sym in (("b128sym", 128, True), ("b64asym", 64, False)):
        other = edgepipe.load_target(str(vs_edgepipe_side.rtn_profile(tmp_path, f"{target}:{fmt}"))).to_dict()
        assert other["name"] == f"{target}-rtn-{fmt}" and other["quantization"]["algorithm"] == "rtn"
        assert (other["quantization"]["block_size"], other["quantization"]["symmetric"]) == (block, sym)


def test_random_shapes_have_their_sources_parameter_counts():
    """The random models' shapes give their sources' published counts: Qwen2.5-0.5B 494M (0.36B outside
    the tied table), Llama-3.2-1B 1.24B, Granite 3.x 2B 2.53B; issue 6's Llama 709M. Built on the meta device:
    no memory, no time."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from benchmarks.random_models import SHAPES

    expect = {
        "qwen2.5-0.5b": (494_032_768, 151936), "llama3.2-1b": (1_235_814_400, 128256), "llama-709m": (708_880_384, 49152),
        "granite3-2b": (2_533_531_648, 49155),
    }
    assert set(expect) == set(SHAPES)
    for name, (cls, shape, source) in SHAPES.items():
        cfg = getattr(transformers, cls)(**{**shape, "vocab_size": shape["vocab_size"] or 49152})
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(cfg)
        n = sum(p.numel() for p in model.parameters())
        assert (n, cfg.vocab_size) == expect[name], (name, n)
        assert source


def test_an_avx512_host_masked_as_avx2_builds_and_reports_avx2():
    """``--isa avx2``: llama.cpp's options are an AVX2-only EPYC's, and the tables say it was masked."""
    spr = isa.cpu_flags(SAPPHIRE_RAPIDS)
    assert isa.isa_flags(isa.masked_flags(spr, "avx2")) == isa.isa_flags(isa.cpu_flags(EPYC_AVX2))
    assert isa.masked_flags(spr, "host") == spr
    facts = vs_report.machine_facts("avx2")
    assert not any(f.startswith(("avx512", "amx")) or f == "avx_vnni" for f in facts["cpu_flags"]), facts
    assert "as an AVX2-only CPU (CPUID masked" in vs_report.machine_lines({"machine": facts})[0]


@pytest.mark.skipif("cpuid_fault" not in isa.cpu_flags(), reason="no CPUID faulting on this CPU / hypervisor")
@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler to build the CPUID mask")
def test_the_cpuid_mask_hides_avx512_from_numpy_and_keeps_onnxruntime_s_numbers(tmp_path):
    """Under the mask numpy finds AVX2 and no AVX-512 (the check the benchmark runs first), and an
    onnxruntime MatMul run under it gives the unmasked run's numbers (other kernels, same maths)."""
    if not {"avx512f", "avx2"} <= isa.cpu_flags():
        pytest.skip("needs an AVX-512 host to hide AVX-512 from")
    found = isa.check("avx2")
    assert found["AVX2"] and found["FMA3"] and not found["AVX512F"]
    code = (
        "import numpy as np, onnxruntime as ort, onnx; from onnx import helper as h, TensorProto as T; "
        "w = np.random.default_rng(0).standard_normal((64, 96)).astype(np.float32); "
        "g = h.make_graph([h.make_node('MatMul', ['x', 'w'], ['y'])], 'g', [h.make_tensor_value_info('x', T.FLOAT, [4, 64])], "
        "[h.make_tensor_value_info('y', T.FLOAT, [4, 96])], [onnx.numpy_helper.from_array(w, 'w')]); "
        "s = ort.InferenceSession(h.make_model(g, opset_imports=[h.make_opsetid('', 17)], ir_version=10).SerializeToString()); "
        "x = np.random.default_rng(1).standard_normal((4, 64)).astype(np.float32); "
        "print(float(s.run(None, {'x': x})[0].astype(np.float64).sum()))"
    )
    runs = [subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=isa.env_for(kind), check=True) for kind in isa.ISAS]
    host, avx2 = (float(r.stdout.strip()) for r in runs)
    assert abs(host - avx2) < 1e-3 * max(1.0, abs(host))
