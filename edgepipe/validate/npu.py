"""Scoring NPU graphs: quantized graphs on the HTP simulator against the fp32 graphs on the CPU.

Decoders are scored teacher-forced through the same host loop a device runs
(:class:`edgepipe.runtime.static_lm.StaticDecoder`): the first ``seq_len`` tokens of each window
through the prefill graph, the rest one by one through the decode graph with the KV cache, every
position compared (:func:`edgepipe.runtime.evaluate.compare_logits`). Encoders are scored by the
cosine of each sentence's embeddings and by nearest-neighbour agreement. The simulator's timings
are recorded, and say nothing about a phone's speed.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.runtime.evaluate import compare_logits

Runner = Callable[[dict[str, np.ndarray]], list[np.ndarray]]


def cpu_session(path: Path) -> Any:
    """One-thread onnxruntime CPU session: the fp32 reference, deterministic run to run."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def _runner(sess: Any, names: list[str]) -> Runner:
    def run(feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        result: list[np.ndarray] = sess.run(names, feeds)
        return result

    return run


def evaluate_windows(
    host: Any,
    prefill_model: Path,
    decode_model: Path,
    windows: list[np.ndarray],
    pad_id: int,
    make_session: Callable[[Path], Any],
) -> tuple[list[np.ndarray], dict[str, float]]:
    """Teacher-forced logits for each window; prefill for all windows first, then decode, so only
    one session is alive at a time (the HTP simulator fails with two). Returns per-phase timings."""
    from edgepipe.export.static_llama import io_names

    spec = host.spec
    pre_names, dec_names = io_names(spec, "prefill")[1], io_names(spec, "decode")[1]
    t = time.perf_counter()
    sess = make_session(prefill_model)
    t_load = time.perf_counter() - t
    t = time.perf_counter()
    firsts = [host.teacher_forced(_runner(sess, pre_names), None, w, pad_id) for w in windows]
    t_pre = time.perf_counter() - t
    del sess
    t = time.perf_counter()
    sess = make_session(decode_model)
    t_load += time.perf_counter() - t
    t = time.perf_counter()
    results = []
    steps = 0
    for w, (logits, cache) in zip(windows, firsts, strict=True):
        full, _ = host.teacher_forced(lambda f: [], _runner(sess, dec_names), w, pad_id, cache=cache, prefill_logits=logits)
        steps += len(w) - min(host.seq_len, len(w))
        results.append(full)
    t_dec = time.perf_counter() - t
    del sess
    return results, {
        "session_load_s": t_load,
        "prefill_s_per_run": t_pre / max(1, len(windows)),
        "decode_s_per_token": t_dec / max(1, steps),
    }


def _rounded(d: dict[str, Any]) -> dict[str, Any]:
    return {k: (round(v, 6) if isinstance(v, float) else v) for k, v in d.items()}


def score_decoder(ref: list[np.ndarray], got: list[np.ndarray], windows: list[np.ndarray], seq_len: int) -> dict[str, Any]:
    """``compare_logits`` over every position of every window (its last row predicts past the
    window and is dropped), and per phase: positions scored by the prefill graph, by the decode graph."""
    targets = np.concatenate([w[1:] for w in windows])
    acc = _rounded(compare_logits(np.concatenate([x[:-1] for x in ref]), np.concatenate([x[:-1] for x in got]), targets))
    win = len(windows[0])
    by_phase = {}
    for phase, sl in (("prefill", slice(0, seq_len - 1)), ("decode", slice(seq_len - 1, win - 1))):
        r = np.concatenate([x[sl] for x in ref])
        if len(r):
            figures = compare_logits(r, np.concatenate([x[sl] for x in got]), np.concatenate([w[1:][sl] for w in windows]))
            by_phase[phase] = {k: v for k, v in figures.items() if k != "max_abs_logit_diff"}
    return {**acc, "by_phase": by_phase}


def sanity_figures(reference: np.ndarray, static: np.ndarray, window: np.ndarray) -> dict[str, Any]:
    """The fp32 static graphs against the transformers model on one window: an export bug (a wrong
    mask, rotary sign, cache slot) shows here, before any quantization is blamed."""
    figures = compare_logits(reference, static, np.asarray(window[1:].tolist() + [0]))
    return _rounded({k: figures[k] for k in ("positions", "top1_agreement", "max_abs_logit_diff", "kl_divergence")})


def run_embeddings(sess: Any, feeds: list[dict[str, np.ndarray]]) -> np.ndarray:
    """One embedding per feed (the encoder graph is batch 1), stacked."""
    return np.concatenate([sess.run(None, f)[0] for f in feeds], axis=0).astype(np.float32)


def compare_embeddings(ref: np.ndarray, got: np.ndarray) -> dict[str, Any]:
    """Cosine per sentence and nearest-neighbour (retrieval) agreement between two embedding sets.

    Retrieval: each sentence queries all the others; the top-1 neighbour under the NPU
    embeddings must be the fp32 one. ``retrieval_top5_overlap`` is the mean share of the fp32
    top-5 found in the NPU top-5.
    """

    def unit(x: np.ndarray) -> np.ndarray:
        out: np.ndarray = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return out

    r, g = unit(ref.astype(np.float64)), unit(got.astype(np.float64))
    cos = np.sum(r * g, axis=1)
    n = len(r)
    metrics: dict[str, Any] = {"cosine_min": float(cos.min()), "cosine_mean": float(cos.mean()), "eval_sentences": n}
    if n >= 3:
        sr, sg = r @ r.T, g @ g.T
        np.fill_diagonal(sr, -np.inf)
        np.fill_diagonal(sg, -np.inf)
        top1 = np.mean(np.argmax(sr, axis=1) == np.argmax(sg, axis=1))
        k = min(5, n - 1)
        tr, tg = np.argsort(-sr, axis=1)[:, :k], np.argsort(-sg, axis=1)[:, :k]
        overlap = np.mean([len(set(a) & set(b)) / k for a, b in zip(tr, tg, strict=False)])
        metrics["retrieval_top1_agreement"] = float(top1)
        metrics["retrieval_top5_overlap"] = float(overlap)
    return metrics
