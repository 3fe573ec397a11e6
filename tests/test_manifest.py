"""The artifact's manifest and report, and the artifact in onnxruntime-genai's own generator."""

from __future__ import annotations

import hashlib
import json
import re

import numpy as np
import pytest

from edgepipe.export import inspect_model
from edgepipe.runtime.generate import GenerationConfig, generate
from edgepipe.runtime.manifest import verify_artifact
from edgepipe.runtime.model import CausalLM
from edgepipe.targets import load_target


@pytest.fixture(scope="module")
def built(zoo):
    art, res = zoo.artifact("llama", "x86-avx2")
    return art, json.loads((art / "manifest.json").read_text())


def test_every_file_listed_with_sha256_and_size(built):
    art, m = built
    on_disk = sorted(p.relative_to(art).as_posix() for p in art.rglob("*") if p.is_file() and p.name != "manifest.json")
    assert sorted(m["files"]) == on_disk
    for rel, entry in m["files"].items():
        data = (art / rel).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}, rel
    assert {"model.onnx", "model.onnx.data", "genai_config.json", "tokenizer.json", "reference.npz", "report.md"} <= set(m["files"])
    assert m["format"] == "edgepipe-artifact" and m["kind"] == "cpu-decoder" and m["schema_version"] == 2
    assert verify_artifact(art).to_dict()["files"] == m["files"]


def test_provenance(built, zoo):
    art, m = built
    for pkg in ("edgepipe", "onnxruntime", "onnxruntime-genai", "onnx", "transformers", "torch", "numpy", "tokenizers"):
        assert re.match(r"^\d+\.\d+", m["versions"][pkg]), (pkg, m["versions"][pkg])
    src = m["source_model"]
    info = inspect_model(zoo.model("llama"))
    assert src["sha256"] == info.sha256 and len(src["sha256"]) == 64
    assert src["architecture"] == "LlamaForCausalLM" and src["parameters"] == info.num_parameters
    assert src["default_model"] is False
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$", m["created"])


def test_target_and_quantization(built):
    _, m = built
    tgt = load_target("x86-avx2")
    assert m["target"] == tgt.to_dict()
    cfg = m["quantization"]["config"]
    q = tgt.quantization
    assert (cfg["bits"], cfg["block_size"], cfg["symmetric"], cfg["algorithm"], cfg["embedding_bits"]) == (
        q.bits, q.block_size, q.symmetric, q.algorithm, q.embedding_bits
    )
    assert m["quantization"]["algorithm_used"] == q.algorithm  # gptq: calibration ran
    assert m["calibration"]["windows"] > 0 and m["calibration"]["source"] == "edgepipe/data/calib.txt"
    assert m["eval"]["source"] == "edgepipe/data/eval.txt" and 1 <= m["eval"]["windows"] <= 16 and m["eval"]["window_tokens"] == 512
    assert m["eval"]["scored_from_position"] == 256


def test_metrics_and_verdict(built):
    art, m = built
    met = m["metrics"]
    acc, thr = met["accuracy"], met["throughput"]
    assert acc["eval_tokens"] == m["eval"]["windows"] * (511 - 256)  # second half of each window
    assert 1 < acc["reference_perplexity"] < 200 and 1 < acc["perplexity"] < 200
    assert abs(acc["ppl_increase_pct"] - 100 * (acc["perplexity"] / acc["reference_perplexity"] - 1)) < 1e-3
    assert 0.9 < acc["top1_agreement"] <= 1 and 0 < acc["kl_divergence"] < 0.01
    assert thr["prefill_tok_s"] > 0 and thr["decode_tok_s"] > 0 and 20 < thr["peak_rss_mb"] < 1000
    size = (art / "model.onnx").stat().st_size + (art / "model.onnx.data").stat().st_size
    assert met["artifact_bytes"] == size and met["artifact_mb"] == round(size / 2**20, 2)
    assert met["estimate"]["fits"] is True
    assert m["verdict"] == "pass" and m["failed_budgets"] == []
    names = [b["budget"] for b in m["budgets"]]
    # x86-avx2 sets no speed budget; the absolute KL budget (issue 18) comes last
    assert names == ["max_artifact_mb", "max_ram_mb", "max_ppl_increase_pct", "min_top1_agreement", "max_kl_divergence"]
    for b in m["budgets"]:
        assert b["status"] == "pass" and b["value"] is not None
        assert b["value"] <= b["limit"] if b["budget"].startswith("max_") else b["value"] >= b["limit"]
    assert set(met["timings"]) >= {"export_s", "quantize_s", "validate_accuracy_s", "validate_throughput_s", "total_s"}


def test_reference_arrays(built):
    art, m = built
    with np.load(art / "reference.npz") as z:
        ref = {k: z[k] for k in z.files}
    n = m["eval"]["windows"]
    assert ref["tokens"].shape == (n, 512)
    assert ref["ref_topk_idx"].shape[:2] == (n, 511)
    # the stored host top-1 tokens are what this artifact predicts now
    lm = CausalLM(art, threads=1)
    assert (lm.logits(ref["tokens"][0])[:-1].argmax(-1) == ref["host_top1"][0]).mean() > 0.99


def test_report_mentions_budgets(built):
    art, m = built
    report = (art / "report.md").read_text()
    assert "## Budgets" in report and "**Verdict: PASS**" in report
    for b in m["budgets"]:
        assert f"| {b['budget']} |" in report
    assert "x86-avx2" in report and "LlamaForCausalLM" in report


@pytest.mark.parametrize("target", ["x86-avx2", "raspberrypi5"])
def test_onnxruntime_genai_loads_and_generates(zoo, target):
    og = pytest.importorskip("onnxruntime_genai")
    art = zoo.artifact("llama", target)[0]
    model = og.Model(str(art))
    prompt = zoo.eval_ids(10, offset=123).tolist()
    params = og.GeneratorParams(model)
    params.set_search_options(max_length=len(prompt) + 12, do_sample=False)
    gen = og.Generator(model, params)
    gen.append_tokens(np.array([prompt], dtype=np.int32))
    toks = []
    while not gen.is_done():
        gen.generate_next_token()
        toks.append(int(gen.get_next_tokens()[0]))
    assert len(toks) == 12 and all(0 <= t < 384 for t in toks)
    # the same greedy tokens as our own runtime on the same artifact
    ours = list(generate(CausalLM(art, threads=1), prompt, GenerationConfig(max_new_tokens=12)))
    assert toks == ours
    # and its tokenizer reads the artifact's tokenizer.json
    tok = og.Tokenizer(model)
    assert list(tok.encode("It was a truth")) == zoo_encode(zoo, "It was a truth")


def zoo_encode(zoo, text: str) -> list[int]:
    from tokenizers import Tokenizer

    return Tokenizer.from_file(str(zoo.tokenizer / "tokenizer.json")).encode(text).ids
