"""Throughput on this device: prefill and decode tok/s, time to first token, peak RSS.

One bench per model family, chosen by the artifact's kind (``kinds.REGISTRY``): a dynamic CPU
decoder is timed on the path ``generate()`` takes; a static NPU decoder's prefill is always its
fixed-length graph.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from edgepipe.runtime.facts import peak_rss_mb
from edgepipe.runtime.model import CausalLM
from edgepipe.runtime.static_lm import StaticCausalLM


def bench_decoder(lm: CausalLM, *, prompt_tokens: int = 256, decode_tokens: int = 64, repeats: int = 2) -> dict[str, Any]:
    """Prefill tok/s, decode tok/s, time to first token and peak RSS of this process.

    Token ids are a fixed synthetic sequence: speed does not depend on the text. Each figure is
    the best of ``repeats`` runs after one warm-up.
    """
    vocab = lm.spec.vocab_size
    ids = (np.arange(prompt_tokens, dtype=np.int64) * 7919 + 13) % max(vocab - 1, 1) + 1
    short = ids[:32]
    lm.stepper(8).step(short[:8], last_only=True)  # warm-up: allocations, prepacking
    prefill, ttft, decode = [], [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        lm.stepper(prompt_tokens).step(ids, last_only=True)  # as generation: its stepper, the last logits only
        prefill.append(prompt_tokens / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        state = lm.stepper(len(short) + decode_tokens)  # what generate() does
        nxt = int(np.argmax(state.step(short, last_only=True)[-1]))
        ttft.append((time.perf_counter() - t0) * 1000)
        t0 = time.perf_counter()
        for _ in range(decode_tokens):
            nxt = int(np.argmax(state.step(np.array([nxt]), last_only=True)[-1]))
        decode.append(decode_tokens / (time.perf_counter() - t0))
    return {
        "prefill_tokens": prompt_tokens,
        "prefill_tok_s": round(max(prefill), 2),
        "decode_tokens": decode_tokens,
        "decode_tok_s": round(max(decode), 2),
        "ttft_ms": round(min(ttft), 2),
        "ttft_prompt_tokens": len(short),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "threads": lm.session.get_session_options().intra_op_num_threads,
        "repeats": repeats,
    }


def bench_static(lm: StaticCausalLM, *, decode_tokens: int = 16, repeats: int = 2) -> dict[str, Any]:
    """``bench`` for a static-graph artifact: one full prefill graph run (its fixed length, however
    short the prompt) and single-token decode steps, on whatever backend ``lm`` runs. On the x86
    HTP simulator these figures say nothing about a phone."""
    spec = lm.spec
    decode_tokens = max(1, min(decode_tokens, spec.context_length - spec.seq_len))
    ids = (np.arange(spec.seq_len, dtype=np.int64) * 7919 + 13) % max(lm.vocab_size - 1, 1) + 1
    prefill, decode = [], []
    for _ in range(repeats):
        state = lm.stepper(spec.seq_len + decode_tokens)
        t0 = time.perf_counter()
        nxt = int(np.argmax(state.step(ids)[-1]))
        prefill.append(spec.seq_len / (time.perf_counter() - t0))
        t0 = time.perf_counter()
        for _ in range(decode_tokens):
            nxt = int(np.argmax(state.step(np.array([nxt]))[-1]))
        decode.append(decode_tokens / (time.perf_counter() - t0))
    return {
        "backend": lm.backend,
        "prefill_tokens": spec.seq_len,
        "prefill_tok_s": round(max(prefill), 2),
        "decode_tokens": decode_tokens,
        "decode_tok_s": round(max(decode), 2),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "repeats": repeats,
        "note": "the first decode step of each repeat includes opening the decode session"
        if lm.backend == "htp" else "QDQ graphs on the CPU execution provider",
    }


