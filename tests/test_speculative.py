"""Decoding several tokens per step (``edgepipe.runtime.speculative``): prompt lookup and a draft
model give plain greedy's tokens and plain sampling's distribution, stop where plain decoding
stops, back off on text that does not repeat, and are wired into ``run``, the device entry point
and ``serve`` with the argument contract's ranges."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from edgepipe.cli import main
from edgepipe.errors import InputError
from edgepipe.runtime.generate import GenerationConfig, distribution, generate
from edgepipe.runtime.model import CausalLM
from edgepipe.runtime.speculative import COOLDOWN, Backoff, SpecStats, best_length, check_capable


def repeating_prompt(zoo, n: int = 24) -> list[int]:
    """Eval text, then its start again: a continuation that quotes the prompt."""
    ids = zoo.eval_ids(n, offset=300).tolist()
    return ids + ids[: n // 3]


def run_both(lm, prompt, cfg, lookup=0, draft=None):
    plain = list(generate(lm, prompt, cfg))
    stats = SpecStats()
    fast = list(generate(lm, prompt, GenerationConfig(**{**cfg.__dict__, "lookup": lookup}), stats=stats, draft=draft))
    return plain, fast, stats


@pytest.mark.parametrize("which", ["fp32", "int4"])
def test_lookup_greedy_equals_plain_greedy(zoo, llama_artifact, which):
    lm = CausalLM(zoo.fp32("llama") if which == "fp32" else llama_artifact, threads=1)
    prompt = repeating_prompt(zoo)
    plain, fast, stats = run_both(lm, prompt, GenerationConfig(max_new_tokens=60), lookup=6)
    assert fast == plain and len(plain) == 60
    assert stats.verify_steps > 0 and stats.accepted > 0, stats
    assert stats.steps < len(plain) - 1, "no step emitted more than one token"


def test_draft_greedy_equals_plain_greedy(zoo, llama_artifact):
    """fp32 tiny Llama verified against its own int4 artifact as the draft (a fifth of its bytes)."""
    lm = CausalLM(zoo.fp32("llama"), threads=1)
    draft = CausalLM(llama_artifact, threads=1)
    for prompt in (repeating_prompt(zoo), zoo.eval_ids(16, offset=700).tolist()):
        plain, fast, stats = run_both(lm, prompt, GenerationConfig(max_new_tokens=48), draft=draft)
        assert fast == plain
        assert stats.drafted > 0 and stats.acceptance > 0.5, stats
    # both stop spinning when a run returns: the idle one's workers would take the cores from the
    # other (draft decoding was slower than plain; benchmarks/RESULTS.md)
    for m in (lm, draft):
        assert m.session.get_session_options().get_session_config_entry("session.force_spinning_stop") == "1"


@pytest.mark.slow  # the torch.onnx export takes minutes on a loaded machine
def test_concat_cache_rewinds(zoo, tmp_path):
    """A generic (torch.onnx) export grows its cache by concatenation: rewinding slices it."""
    from test_any_causal_lm import tiny_model

    from edgepipe.export.generic import export_generic

    export_generic(tiny_model("gpt2", zoo), tmp_path / "model")
    lm = CausalLM(tmp_path / "model", threads=1)
    plain, fast, stats = run_both(lm, repeating_prompt(zoo), GenerationConfig(max_new_tokens=40), lookup=5)
    assert fast == plain and stats.verify_steps > 0


def test_eos_and_context_stop_where_plain_stops(zoo):
    lm = CausalLM(zoo.fp32("llama"), threads=1)
    prompt = repeating_prompt(zoo)
    greedy = list(generate(lm, prompt, GenerationConfig(max_new_tokens=12)))
    eos = greedy[5]  # inside a run of accepted drafts, most likely
    lm.spec = type(lm.spec)(**{**lm.spec.__dict__, "eos_token_ids": (eos,)})
    for cfg in (GenerationConfig(max_new_tokens=12, lookup=8), GenerationConfig(max_new_tokens=12, lookup=8, ignore_eos=True)):
        assert list(generate(lm, prompt, cfg)) == list(generate(lm, prompt, GenerationConfig(**{**cfg.__dict__, "lookup": 0})))
    lm.spec = type(lm.spec)(**{**lm.spec.__dict__, "eos_token_ids": (), "context_length": len(prompt) + 7})
    for n in (1, 2, 7, 50):
        out = list(generate(lm, prompt, GenerationConfig(max_new_tokens=n, lookup=8)))
        assert out == greedy[: min(n, 7)]


def _pairs(lm, prompt, cfg, n, draft=None, stats=None):
    """The first two tokens of ``n`` seeded generations of three (the second one can be a verified draft)."""
    return Counter(
        tuple(generate(lm, prompt, GenerationConfig(**{**cfg.__dict__, "seed": s}), draft=draft, stats=stats))[:2] for s in range(n)
    )


def _exact_pairs(lm, prompt, cfg) -> dict[tuple[int, ...], float]:
    """The exact distribution of the first two sampled tokens (first tokens covering 99.9 %)."""
    p1 = distribution(lm.logits(np.array(prompt))[-1], cfg)
    out: dict[tuple[int, ...], float] = {}
    for t in np.argsort(-p1)[: int(np.searchsorted(np.cumsum(np.sort(p1)[::-1]), 0.999)) + 1]:
        p2 = distribution(lm.logits(np.array([*prompt, int(t)]))[-1], cfg)
        out.update({(int(t), int(u)): float(p1[t] * p2[u]) for u in np.flatnonzero(p2 > 1e-6)})
    return out


def _tv(counts: Counter, exact: dict[tuple[int, ...], float]) -> float:
    n = sum(counts.values())
    keys = set(counts) | set(exact)
    return 0.5 * sum(abs(counts.get(k, 0) / n - exact.get(k, 0.0)) for k in keys)


def test_acceptance_rule_keeps_the_distribution():
    """The rule alone, on fixed logits: the token a one-draft step emits is distributed as the
    processed ``p`` (temperature, top-k, top-p), whether the draft came from ``q`` or is fixed."""
    from edgepipe.runtime.speculative import verify

    rng = np.random.default_rng(0)
    gen = np.random.default_rng(1)
    lp, lq = gen.normal(0, 1.5, size=(2, 8))
    for cfg in (GenerationConfig(temperature=1.0), GenerationConfig(temperature=0.7, top_k=5, top_p=0.9)):
        p, q = distribution(lp, cfg), distribution(lq, cfg)
        n = 3000
        for fixed in (None, int(np.argmax(q)), int(np.argmin(p))):
            counts = np.zeros(8)
            for _ in range(n):
                x = fixed if fixed is not None else int(rng.choice(8, p=q))
                accepted, nxt = verify(np.stack([lp, lp]), [x], None if fixed is not None else [q], cfg, rng)
                counts[x if accepted else nxt] += 1
            assert 0.5 * np.abs(counts / n - p).sum() < 0.045, (cfg, fixed, counts / n, p)  # sampling noise ~0.015


def test_sampling_keeps_the_distribution(zoo, llama_artifact):
    """Seeded sampling of the first two new tokens, 400 times: lookup drafts (a point-mass q) and a
    draft model of another architecture (the tiny Qwen2 verifies the tiny Llama's int4 artifact, a
    quarter of its bytes: a q far from p) stay as close to the exact joint
    distribution as plain sampling is (total variation), with top-k and top-p in both p and q."""
    lm = CausalLM(zoo.fp32("qwen2"), threads=1)
    draft = CausalLM(llama_artifact, threads=1)
    x = zoo.eval_ids(12, offset=300).tolist()
    prompt = x + list(generate(lm, x, GenerationConfig(max_new_tokens=6))) + x  # lookup drafts the model's own continuation
    n = 400
    # the tiny models are nearly uniform at temperature 1 (top token ~4 %); at 0.3 the top token has ~1/3
    for cfg in (GenerationConfig(max_new_tokens=3, temperature=0.3), GenerationConfig(max_new_tokens=3, temperature=0.4, top_k=10, top_p=0.8)):
        exact = _exact_pairs(lm, prompt, cfg)
        plain = _tv(_pairs(lm, prompt, cfg, n), exact)
        for lookup, d in ((4, None),) if cfg.top_k else ((0, draft),):
            stats = SpecStats()
            tv = _tv(_pairs(lm, prompt, GenerationConfig(**{**cfg.__dict__, "lookup": lookup}), n, draft=d, stats=stats), exact)
            spec = {"lookup": lookup, "draft": d is not None}
            assert stats.drafted > n // 4, (spec, stats)  # the second token was drafted often
            assert 0 < stats.accepted < stats.drafted, stats  # both outcomes of the acceptance rule ran
            assert tv < max(0.12, 1.5 * plain), (spec, cfg, tv, plain)


def test_seeded_sampling_reproduces(zoo):
    lm = CausalLM(zoo.fp32("llama"), threads=1)
    cfg = GenerationConfig(max_new_tokens=30, temperature=1.2, seed=3, lookup=6)
    prompt = repeating_prompt(zoo)
    assert list(generate(lm, prompt, cfg)) == list(generate(lm, prompt, cfg))


def test_backoff_switches_lookup_off_on_text_without_repeats(zoo):
    """Sampled text of a tiny model hardly repeats its prompt: 2-token matches are chance, their
    drafts get rejected, and the drafter switches itself off."""
    lm = CausalLM(zoo.fp32("llama"), threads=1)
    stats = SpecStats()
    prompt = zoo.eval_ids(40, offset=1200).tolist()
    out = list(generate(lm, prompt, GenerationConfig(max_new_tokens=300, temperature=1.5, seed=11, ignore_eos=True, lookup=8), stats=stats))
    assert len(out) == 300
    assert stats.backoffs >= 1 and stats.off_steps > 0, stats
    assert stats.verify_steps < 0.5 * stats.steps, stats


def test_backoff_rule():
    stats = SpecStats()
    b = Backoff(8, 0.15, stats)
    assert b.length() > 0
    while stats.backoffs == 0:
        b.update(b.length(), 0)
    assert [b.length() for _ in range(COOLDOWN)] == [0] * COOLDOWN and stats.off_steps == COOLDOWN
    assert b.length() > 0  # tries again, then waits twice as long after the next failure
    while stats.backoffs == 1:
        b.update(max(b.length(), 1), 0)
    assert b.wait == 2 * COOLDOWN
    assert best_length(0.95, 8, 0.15) >= 4 and best_length(0.05, 8, 0.15) == 0


def test_npu_static_decoder_is_refused_by_capability():
    from edgepipe.runtime.static_lm import StaticCausalLM

    with pytest.raises(InputError, match="cannot decode several tokens per step"):
        check_capable(StaticCausalLM)
    check_capable(CausalLM)


# ---------------------------------------------------------------------------------------- entry points


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_run_with_lookup_and_draft_prints_plain_greedy_text(llama_artifact):
    prompt = "She was the youngest of the two daughters of a most"
    plain = cli("run", llama_artifact, "--prompt", prompt, "--max-new-tokens", "24")
    assert plain.exit_code == 0, plain.output
    for extra in (["--lookup"], ["--lookup", "3"], ["--draft", llama_artifact, "--draft-tokens", "2"]):
        res = cli("run", llama_artifact, "--prompt", prompt, "--max-new-tokens", "24", *extra)
        assert res.exit_code == 0 and res.output == plain.output, (extra, res.output)


def test_device_entry_point_with_lookup(llama_artifact, capsys):
    from edgepipe.runtime.__main__ import main as device_main

    argv = ["run", str(llama_artifact), "--prompt", "It was", "--max-new-tokens", "12"]
    assert device_main(argv) == 0
    plain = capsys.readouterr().out
    assert device_main([*argv, "--lookup"]) == 0 and capsys.readouterr().out == plain
    assert device_main([*argv, "--lookup", "99"]) == 2
    assert capsys.readouterr().err.strip().splitlines() == ["error: --lookup 99 is not in the range 0..32"]


def _other_tokenizer(artifact: Path, out: Path) -> Path:
    shutil.copytree(artifact, out)
    doc = json.loads((out / "tokenizer.json").read_text())
    vocab = doc["model"]["vocab"]
    a, b = sorted(vocab)[10:12]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (out / "tokenizer.json").write_text(json.dumps(doc))
    return out


@pytest.mark.parametrize(
    "extra, words",
    [
        (["--lookup", "33"], "--lookup 33 is not in the range 0..32"),
        (["--lookup", "many"], "--lookup 'many' is not a whole number"),
        (["--lookup", "3.5"], "--lookup '3.5' is not a whole number"),
        (["--draft-tokens", "0"], "--draft-tokens 0 is not in the range 1..32"),
        (["--draft", "OTHER"], "has another tokenizer than"),
        (["--draft", "OTHER", "--lookup"], "pass one of them"),
    ],
)
def test_bad_speculative_flags_are_one_line_exit_2(llama_artifact, tmp_path, extra, words):
    if "OTHER" in extra:
        extra = [str(_other_tokenizer(llama_artifact, tmp_path / "other")) if e == "OTHER" else e for e in extra]
    res = cli("run", llama_artifact, "--prompt", "x", *extra)
    assert res.exit_code == 2, res.output
    lines = res.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], res.output


def test_serve_engine_with_lookup_gives_the_plain_text(llama_artifact):
    from edgepipe.runtime.artifact import load_tokenizer
    from edgepipe.runtime.serve import ServeConfig, serve
    from edgepipe.runtime.serve.api import CompletionRequest
    from edgepipe.runtime.serve.chat import ChatTemplate
    from edgepipe.runtime.serve.engine import Engine, Finish

    lm = CausalLM(llama_artifact, threads=1)
    tok = load_tokenizer(llama_artifact)
    req = CompletionRequest(model="m", chat=False, prompt="It was the best of times, it was the", max_tokens=30, temperature=0.0)
    texts = []
    for lookup in (0, 8):
        engine = Engine(lm, tok, ChatTemplate.from_artifact(llama_artifact), "m", max_queue=1, lookup=lookup)
        out = list(engine.run(engine.prepare(req), lambda: False))
        assert isinstance(out[-1], Finish)
        texts.append("".join(p for p in out if isinstance(p, str)))
    assert texts[0] == texts[1] and texts[0]
    with pytest.raises(InputError, match="--lookup 40 is not in the range"):
        serve(ServeConfig(llama_artifact, lookup=40), print)
