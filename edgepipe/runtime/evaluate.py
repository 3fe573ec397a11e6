"""Accuracy of a decoder on token windows, in numpy: perplexity, and agreement with a reference.

Runs on the device too (no torch): the reference may be another model in the same process
(host validation against the fp32 export) or the reference arrays an artifact carries
(``reference.npz``: the fp32 export's top-k log-probs and top-1 tokens, and the host run's top-1
tokens, on the artifact's own evaluation windows).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

TOPK = 16


def windows_from_ids(ids: Sequence[int], window: int, max_windows: int | None = None) -> list[np.ndarray]:
    """Non-overlapping windows of ``window`` tokens (the last partial one dropped unless it is the only one)."""
    arr = np.asarray(ids, dtype=np.int64)
    n = len(arr) // window
    wins = [arr[i * window : (i + 1) * window] for i in range(n)]
    if not wins and len(arr) >= 2:
        wins = [arr]
    return wins[:max_windows] if max_windows else wins


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    out: np.ndarray = x - np.log(np.exp(x).sum(-1, keepdims=True))
    return out


def compare_logits(ref: np.ndarray, got: np.ndarray, targets: np.ndarray) -> dict[str, Any]:
    """Top-1 agreement, perplexities, KL(ref || got) and the largest logit difference of ``got`` vs
    ``ref`` on the same positions; row ``i`` predicts ``targets[i]`` (every row scored)."""
    lr, lg = log_softmax(ref), log_softmax(got)
    idx = np.arange(len(targets))
    nll_r, nll_g = -lr[idx, targets], -lg[idx, targets]
    ppl_r, ppl_g = float(np.exp(nll_r.mean())), float(np.exp(nll_g.mean()))
    kl = float(np.mean(np.sum(np.exp(lr) * (lr - lg), axis=-1)))
    return {
        "positions": int(len(targets)),
        "top1_agreement": float(np.mean(np.argmax(ref, -1) == np.argmax(got, -1))),
        "reference_perplexity": ppl_r,
        "perplexity": ppl_g,
        "ppl_increase_pct": 100.0 * (ppl_g / ppl_r - 1.0),
        "kl_divergence": kl,
        "max_abs_logit_diff": float(np.max(np.abs(ref.astype(np.float64) - got))),
    }


@dataclass
class Accumulator:
    """Sums over scored positions; ``result()`` turns them into the reported figures."""

    tokens: int = 0
    nll: float = 0.0
    ref_nll: float = 0.0
    agree: int = 0
    kl: float = 0.0
    cos: float = 0.0
    host_agree: int = 0
    host_tokens: int = 0
    top1: list[np.ndarray] = field(default_factory=list)

    def result(self) -> dict[str, float | int | None]:
        n = max(self.tokens, 1)
        out: dict[str, float | int | None] = {"eval_tokens": self.tokens, "perplexity": float(np.exp(self.nll / n))}
        if self.ref_nll:
            ref = float(np.exp(self.ref_nll / n))
            out["reference_perplexity"] = ref
            out["ppl_increase_pct"] = 100.0 * (out["perplexity"] / ref - 1.0)  # type: ignore[operator]
            out["top1_agreement"] = self.agree / n
            out["kl_divergence"] = self.kl / n
            if self.cos:
                out["logit_cosine"] = self.cos / n
        if self.host_tokens:
            out["host_top1_agreement"] = self.host_agree / self.host_tokens
        return out


def score(
    logits_fn: Callable[[np.ndarray], np.ndarray],
    windows: Iterable[np.ndarray],
    *,
    reference_fn: Callable[[np.ndarray], np.ndarray] | None = None,
    score_from: int = 0,
    progress: Callable[[str], None] | None = None,
) -> Accumulator:
    """Perplexity of ``logits_fn`` on ``windows``; with ``reference_fn``, exact KL(ref || model),
    top-1 agreement and the reference's perplexity on the same positions.

    Only predictions at positions >= ``score_from`` are scored (llama.cpp's perplexity tool scores
    the second half of each window, so that every scored token has context); ``top1`` keeps every
    position, for the artifact's reference arrays.
    """
    acc = Accumulator()
    for i, win in enumerate(windows):
        targets = win[1:]
        lp = log_softmax(logits_fn(win)[:-1])
        top1 = lp.argmax(-1)
        acc.top1.append(top1.astype(np.int32))
        pos = np.arange(min(score_from, len(targets) - 1), len(targets))
        acc.nll -= float(lp[pos, targets[pos]].sum())
        if reference_fn is not None:
            ref_logits = reference_fn(win)[:-1][pos]
            rlp = log_softmax(ref_logits)
            acc.cos += _cosine_sum(ref_logits, lp[pos])
            acc.ref_nll -= float(rlp[np.arange(len(pos)), targets[pos]].sum())
            acc.agree += int((rlp.argmax(-1) == top1[pos]).sum())
            acc.kl += float((np.exp(rlp) * (rlp - lp[pos])).sum())
        acc.tokens += len(pos)
        if progress:
            progress(f"scored window {i + 1}")
    return acc


def _cosine_sum(a: np.ndarray, b: np.ndarray) -> float:
    """Sum over positions of the cosine similarity of two logit vectors, each centred first.

    Logits are defined up to a constant per position, so centring removes what softmax ignores;
    log-probs differ from logits by exactly such a constant. On random-weight models, whose
    next-token distributions are nearly flat, this says more than top-1 agreement does.
    """
    a = a.astype(np.float64) - a.mean(-1, keepdims=True)
    b = b.astype(np.float64) - b.mean(-1, keepdims=True)
    den = np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1)
    return float((np.einsum("ij,ij->i", a, b) / np.where(den == 0, 1, den)).sum())


def reference_arrays(
    ref_logits_fn: Callable[[np.ndarray], np.ndarray], windows: Sequence[np.ndarray], host_top1: Sequence[np.ndarray]
) -> dict[str, np.ndarray]:
    """What an artifact carries so a device can check itself without the fp32 model."""
    idx, lps, nll = [], [], []
    for win in windows:
        rlp = log_softmax(ref_logits_fn(win)[:-1])
        top = np.argsort(-rlp, axis=-1)[:, :TOPK]
        idx.append(top.astype(np.int32))
        lps.append(np.take_along_axis(rlp, top, -1).astype(np.float32))
        nll.append(-rlp[np.arange(len(win) - 1), win[1:]])
    return {
        "tokens": np.stack(windows).astype(np.int32),
        "ref_topk_idx": np.stack(idx),
        "ref_topk_logp": np.stack(lps),
        "ref_nll": np.stack(nll).astype(np.float32),
        "host_top1": np.stack(host_top1).astype(np.int32),
    }


def score_against_reference(
    logits_fn: Callable[[np.ndarray], np.ndarray],
    ref: dict[str, np.ndarray],
    *,
    max_tokens: int | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, float | int | None]:
    """Device-side check against an artifact's ``reference.npz``.

    KL is computed over the reference's top-k tokens plus one bucket for the rest (a coarsening of
    the distributions, so it can only under-estimate the exact KL); agreement with the host run
    compares this device's top-1 tokens with those the build host computed for the same artifact.
    """
    tokens = ref["tokens"]
    acc = Accumulator()
    kl_sum = 0.0
    for w in range(tokens.shape[0]):
        win = tokens[w].astype(np.int64)
        if max_tokens:
            left = max_tokens - acc.tokens
            if left <= 1:
                break
            win = win[: left + 1]
        n = len(win) - 1
        lp = log_softmax(logits_fn(win)[:-1])
        tgt = win[1:]
        acc.nll -= float(lp[np.arange(n), tgt].sum())
        acc.ref_nll += float(ref["ref_nll"][w, :n].sum())
        top1 = lp.argmax(-1)
        acc.agree += int((top1 == ref["ref_topk_idx"][w, :n, 0]).sum())
        acc.host_agree += int((top1 == ref["host_top1"][w, :n]).sum())
        acc.host_tokens += n
        rl = ref["ref_topk_logp"][w, :n].astype(np.float64)
        ql = np.take_along_axis(lp, ref["ref_topk_idx"][w, :n].astype(np.int64), -1)
        rp, qp = np.exp(rl), np.exp(ql)
        r_rest = np.clip(1 - rp.sum(-1), 1e-12, 1)
        q_rest = np.clip(1 - qp.sum(-1), 1e-12, 1)
        kl_sum += float((rp * (rl - ql)).sum() + (r_rest * (np.log(r_rest) - np.log(q_rest))).sum())
        acc.tokens += n
        if progress:
            progress(f"scored window {w + 1}/{tokens.shape[0]}")
    acc.kl = kl_sum
    out = acc.result()
    if "kl_divergence" in out:
        out["kl_divergence_topk"] = out.pop("kl_divergence")
    return out
