"""Text generation: greedy or sampled (temperature, top-k, top-p), KV cache carried between steps.

With ``lookup`` or a draft model, :mod:`edgepipe.runtime.speculative` decodes several tokens per
step; its acceptance rule keeps greedy output identical and sampling distributions unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from edgepipe.runtime.lm import LM

if TYPE_CHECKING:
    from edgepipe.runtime.speculative import SpecStats


@dataclass(frozen=True)
class GenerationConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0: greedy
    top_k: int = 0  # 0: off
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # run to max_new_tokens whatever is sampled (benchmarks: a fixed amount of decoding)
    lookup: int = 0  # prompt-lookup decoding: at most this many tokens copied from the text so far per step (0: off)
    draft_tokens: int = 4  # with a draft model: at most this many drafted tokens per step


def distribution(logits: np.ndarray, cfg: GenerationConfig) -> np.ndarray:
    """The probabilities (float64) that sampling draws from: temperature, then top-k, then top-p.
    Only for ``temperature > 0``; greedy is the argmax."""
    z = logits.astype(np.float64) / cfg.temperature
    if cfg.top_k and cfg.top_k < z.size:
        kth = np.partition(z, -cfg.top_k)[-cfg.top_k]
        z = np.where(z < kth, -np.inf, z)
    z -= z.max()
    p = np.exp(z)
    p /= p.sum()
    if cfg.top_p < 1.0:
        order = np.argsort(-p)
        cum = np.cumsum(p[order])
        keep = order[: int(np.searchsorted(cum, cfg.top_p) + 1)]
        mask = np.zeros_like(p)
        mask[keep] = p[keep]
        p = mask / mask.sum()
    return p


def sample_next(logits: np.ndarray, cfg: GenerationConfig, rng: np.random.Generator) -> int:
    """Pick the next token from one row of logits."""
    if cfg.temperature <= 0:
        return int(np.argmax(logits))
    p = distribution(logits, cfg)
    return int(rng.choice(p.size, p=p))


def generate(
    lm: LM, prompt_ids: list[int], cfg: GenerationConfig, *, draft: LM | None = None, stats: SpecStats | None = None
) -> Iterator[int]:
    """Yield new token ids until EOS, ``max_new_tokens`` or the context length.

    ``cfg.lookup`` or ``draft`` (a smaller model of the same tokenizer): speculative decoding
    (:func:`edgepipe.runtime.speculative.generate_speculative`, which fills ``stats``)."""
    if cfg.lookup or draft is not None:
        from edgepipe.runtime.speculative import generate_speculative

        yield from generate_speculative(lm, prompt_ids, cfg, draft=draft, stats=stats)
        return
    rng = np.random.default_rng(cfg.seed)
    limit = max(min(cfg.max_new_tokens, lm.context_length - len(prompt_ids)), 0)
    state = lm.stepper(len(prompt_ids) + limit)
    ids = np.asarray(prompt_ids, dtype=np.int64)
    eos = set() if cfg.ignore_eos else set(lm.eos_token_ids)
    for _ in range(limit):
        logits = state.step(ids, last_only=True)
        token = sample_next(logits[-1], cfg, rng)
        if token in eos:
            return
        yield token
        ids = np.array([token], dtype=np.int64)
