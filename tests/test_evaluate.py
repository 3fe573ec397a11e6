"""The accuracy figures of edgepipe.runtime.evaluate.score on hand-made logits: identical or
shifted logits agree perfectly, unrelated ones do not, and the numbers are the textbook ones."""

from __future__ import annotations

import numpy as np

from edgepipe.runtime.evaluate import score


def _fixed(table: np.ndarray):
    return lambda win: table[: len(win)]


def test_identical_and_shifted_logits_agree_perfectly():
    rng = np.random.default_rng(0)
    ref = rng.normal(size=(9, 50)).astype(np.float32)
    win = rng.integers(0, 50, 9)
    same = score(_fixed(ref), [win], reference_fn=_fixed(ref)).result()
    assert same["kl_divergence"] < 1e-12 and same["top1_agreement"] == 1.0
    assert abs(same["logit_cosine"] - 1.0) < 1e-9 and abs(same["ppl_increase_pct"]) < 1e-9
    shifted = score(_fixed(ref + 7.5), [win], reference_fn=_fixed(ref)).result()  # softmax ignores a shift
    assert shifted["kl_divergence"] < 1e-9 and abs(shifted["logit_cosine"] - 1.0) < 1e-9


def test_unrelated_and_negated_logits():
    rng = np.random.default_rng(1)
    ref = rng.normal(size=(65, 400))
    win = rng.integers(0, 400, 65)
    other = score(_fixed(rng.normal(size=(65, 400))), [win], reference_fn=_fixed(ref)).result()
    assert abs(other["logit_cosine"]) < 0.05 and other["kl_divergence"] > 0.5 and other["top1_agreement"] < 0.1
    neg = score(_fixed(-ref), [win], reference_fn=_fixed(ref)).result()
    assert abs(neg["logit_cosine"] + 1.0) < 1e-9


def test_kl_matches_the_definition_on_the_scored_positions():
    rng = np.random.default_rng(2)
    ref, got = rng.normal(size=(11, 30)), rng.normal(size=(11, 30))
    win = rng.integers(0, 30, 11)
    res = score(_fixed(got), [win], reference_fn=_fixed(ref), score_from=4).result()

    def lsm(x):
        x = x - x.max(-1, keepdims=True)
        return x - np.log(np.exp(x).sum(-1, keepdims=True))

    p, q = lsm(ref[4:10]), lsm(got[4:10])
    assert res["eval_tokens"] == 6
    assert abs(res["kl_divergence"] - float((np.exp(p) * (p - q)).sum(-1).mean())) < 1e-9
