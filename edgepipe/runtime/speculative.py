"""Decode several tokens per step: prompt-lookup and draft-model speculative decoding.

A decode step of a small model on a CPU is bound by reading the weights, so feeding the model
``1 + k`` tokens costs little more than feeding it one. Each step here feeds the last token plus
``k`` *draft* tokens and keeps the drafts the model agrees with:

- **prompt lookup**: the drafts are the tokens that followed the latest earlier occurrence of the
  last 3 (else 2) tokens in the prompt or the text generated so far (like transformers'
  ``prompt_lookup_num_tokens`` and llama.cpp's lookup decoding). No second model.
- **draft model**: a smaller artifact of the same tokenizer proposes ``k`` tokens one by one.

The acceptance rule is standard speculative sampling, so greedy output is the plain greedy output
token for token and sampled text has the plain sampling distribution: a draft ``x`` drawn from
``q`` is accepted with probability ``min(1, p(x) / q(x))`` (``p``: the model's distribution after
temperature, top-k and top-p; ``q``: the draft model's, processed the same way); at the first
rejection the token is drawn from ``max(0, p - q)`` normalised. A lookup draft is deterministic
(``q`` is a point mass at ``x``): accepted with probability ``p(x)``, else drawn from ``p``
without ``x``. Greedy is the limit of both: accept while the draft is the argmax.

Back-off: each drafter keeps a decaying estimate of its per-token acceptance and drafts the length
that maximises expected tokens per unit of step cost, or nothing (plain decoding) when no length
pays; switched off, it waits a cooldown that doubles each time before it tries again. The choice
depends on acceptance only (never on timing), so a seed reproduces the same text.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from edgepipe.errors import InputError
from edgepipe.runtime.generate import GenerationConfig, distribution, sample_next
from edgepipe.runtime.lm import LM

# one-token matches are mostly chance: on the benchmark's free-text prompts they cost more verify
# work than they saved (modeled 0.93x at 0.5 step per verified position vs 0.97x without them)
NGRAM_MAX, NGRAM_MIN = 3, 2
# cost of one more position in a step, relative to a one-token step (default model, raspberrypi5
# artifact, 2 threads, load 10: steps of 2, 4, 8 tokens took 1.14x, 1.5x, 2.07x a 1-token step)
VERIFY_COST = 0.15
MIN_GAIN = 1.05  # draft only when the expected tokens per unit of cost beat plain decoding by 5 %
DECAY = 0.8  # weight of the acceptance seen so far against the newest step
PRIOR = (1.6, 2.0)  # accepted, tried: an estimate of 0.8 worth two tokens, where every drafter (re)starts
COOLDOWN, MAX_COOLDOWN = 16, 512  # chances skipped after a drafter switches itself off (doubling)


@dataclass
class SpecStats:
    """What speculative decoding did (filled while the generator runs)."""

    steps: int = 0  # model steps after the prefill
    verify_steps: int = 0  # of which carried drafts
    drafted: int = 0
    accepted: int = 0
    backoffs: int = 0  # times a drafter switched itself off
    off_steps: int = 0  # steps decoded plainly because the drafter was switched off
    tokens: int = 0

    @property
    def acceptance(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0


class Rewindable(Protocol):
    length: int

    def step(self, ids: np.ndarray, *, last_only: bool = ...) -> np.ndarray: ...

    def rewind(self, length: int) -> None: ...


def check_capable(lm: Any, what: str = "the model") -> None:
    """Refuse (one line) a model whose steps cannot take several tokens and be rewound."""
    if not getattr(lm, "multi_token_steps", False):
        raise InputError(
            f"{what} cannot decode several tokens per step (an NPU static decoder runs one token per "
            "decode graph call); run it without --lookup / --draft"
        )


def check_one_drafter(lookup: int, draft: object | None) -> None:
    if lookup and draft is not None:
        raise InputError("--lookup and --draft are two ways of drafting tokens; pass one of them")


def expected_tokens(alpha: float, k: int) -> float:
    """Tokens one step yields with ``k`` drafts, each accepted with probability ``alpha``."""
    return float(k + 1) if alpha >= 1.0 else (1.0 - alpha ** (k + 1)) / (1.0 - alpha)


def best_length(alpha: float, k_max: int, cost: float) -> int:
    """The draft length with the most tokens per unit of cost (a step with ``k`` drafts costs
    ``1 + cost * k``), or 0 when none beats a plain step by ``MIN_GAIN``."""
    best_k, best = 0, MIN_GAIN
    for k in range(1, k_max + 1):
        value = expected_tokens(alpha, k) / (1.0 + cost * k)
        if value > best:
            best_k, best = k, value
    return best_k


class Backoff:
    """Draft length from the acceptance seen so far (see the module doc)."""

    def __init__(self, k_max: int, cost: float, stats: SpecStats) -> None:
        self.k_max, self.cost, self.stats = k_max, cost, stats
        self.acc, self.tried = PRIOR
        self.wait, self.cooldown = 0, COOLDOWN

    @property
    def alpha(self) -> float:
        return self.acc / self.tried

    def length(self) -> int:
        """Drafts to propose now (0: decode this step plainly)."""
        if self.wait > 0:
            self.wait -= 1
            self.stats.off_steps += 1
            return 0
        return best_length(self.alpha, self.k_max, self.cost)

    def update(self, drafted: int, accepted: int) -> None:
        tried = accepted + (1 if accepted < drafted else 0)
        self.acc = DECAY * self.acc + accepted
        self.tried = DECAY * self.tried + tried
        if best_length(self.alpha, self.k_max, self.cost) == 0:
            self.wait, self.cooldown = self.cooldown, min(2 * self.cooldown, MAX_COOLDOWN)
            self.acc, self.tried = PRIOR  # the next try starts afresh
            self.stats.backoffs += 1
        elif self.alpha >= 0.6:
            self.cooldown = COOLDOWN


class Drafter(Protocol):
    def propose(self, seq: list[int], room: int) -> tuple[list[int], list[np.ndarray] | None]:
        """Up to ``room`` drafts to follow ``seq`` and, for sampled drafts, each one's ``q``."""
        ...

    def update(self, seq_len: int, drafted: int, accepted: int) -> None:
        """After a step: ``seq`` had ``seq_len`` tokens when the drafts were proposed."""
        ...


class LookupDrafter:
    """Drafts copied from the text so far: what followed the latest earlier occurrence of its last
    ``NGRAM_MAX`` .. ``NGRAM_MIN`` tokens (one back-off per n-gram size: 2-token matches are
    more often chance than 3-token ones)."""

    def __init__(self, prompt: list[int], k_max: int, stats: SpecStats) -> None:
        self.seq: list[int] = []
        self.index: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(NGRAM_MIN, NGRAM_MAX + 1)}
        self.backoff = {n: Backoff(k_max, VERIFY_COST, stats) for n in self.index}
        self._used = NGRAM_MAX
        self._extend(prompt)

    def _extend(self, tokens: list[int]) -> None:
        seq = self.seq
        for t in tokens:
            seq.append(t)
            i = len(seq) - 1  # the n-grams ending just before position i continue at i
            for n, table in self.index.items():
                if i >= n:
                    table[tuple(seq[i - n : i])] = i

    def propose(self, seq: list[int], room: int) -> tuple[list[int], list[np.ndarray] | None]:
        self._extend(seq[len(self.seq) :])
        for n in range(NGRAM_MAX, NGRAM_MIN - 1, -1):
            if len(seq) <= n:
                continue
            at = self.index[n].get(tuple(seq[-n:]))
            if at is None:
                continue
            self._used = n
            k = min(self.backoff[n].length(), room)
            return seq[at : at + k], None  # the longest match decides, even when its back-off says 0
        return [], None

    def update(self, seq_len: int, drafted: int, accepted: int) -> None:
        if drafted:
            self.backoff[self._used].update(drafted, accepted)


class ModelDrafter:
    """Drafts from a smaller model of the same tokenizer, one token per draft step; its cache
    follows the accepted text (rewound past rejected drafts, caught up in one step)."""

    def __init__(self, draft: LM, total: int, cfg: GenerationConfig, rng: np.random.Generator, cost: float, stats: SpecStats) -> None:
        self.capacity = min(total, draft.context_length)
        self.state: Rewindable = draft.stepper(self.capacity)  # type: ignore[assignment]
        self.cfg, self.rng = cfg, rng
        self.backoff = Backoff(cfg.draft_tokens, cost, stats)

    def _pick(self, logits: np.ndarray, qs: list[np.ndarray]) -> int:
        if self.cfg.temperature <= 0:
            return int(np.argmax(logits))
        q = distribution(logits, self.cfg)
        qs.append(q)
        return int(self.rng.choice(q.size, p=q))

    def propose(self, seq: list[int], room: int) -> tuple[list[int], list[np.ndarray] | None]:
        k = min(self.backoff.length(), room, self.capacity - len(seq) + 1)
        if k <= 0:
            return [], None
        qs: list[np.ndarray] = []
        logits = self.state.step(np.asarray(seq[self.state.length :], dtype=np.int64), last_only=True)[-1]
        drafts = [self._pick(logits, qs)]
        while len(drafts) < k:
            logits = self.state.step(np.asarray(drafts[-1:], dtype=np.int64), last_only=True)[-1]
            drafts.append(self._pick(logits, qs))
        return drafts, (qs if self.cfg.temperature > 0 else None)

    def update(self, seq_len: int, drafted: int, accepted: int) -> None:
        if drafted:
            self.backoff.update(drafted, accepted)
            # the cache holds seq and the first drafted - 1 drafts: keep those that were accepted
            self.state.rewind(min(self.state.length, seq_len + accepted))


def verify(logits: np.ndarray, drafts: list[int], qs: list[np.ndarray] | None, cfg: GenerationConfig, rng: np.random.Generator) -> tuple[int, int]:
    """(drafts accepted, the token after them) from the model's logits ``[len(drafts) + 1, V]``."""
    for j, x in enumerate(drafts):
        if cfg.temperature <= 0:
            y = int(np.argmax(logits[j]))
            if y != x:
                return j, y
            continue
        p = distribution(logits[j], cfg)
        qx = 1.0 if qs is None else float(qs[j][x])
        if rng.random() * qx < p[x]:  # accepted with probability min(1, p(x) / q(x))
            continue
        if qs is None:
            residual = p.copy()
            residual[x] = 0.0
        else:
            residual = np.maximum(p - qs[j], 0.0)
        total = residual.sum()
        return j, int(rng.choice(p.size, p=residual / total if total > 0 else p))
    return len(drafts), sample_next(logits[len(drafts)], cfg, rng)


def weight_bytes(lm: Any) -> float:
    """Bytes of a model's weights, for the cost of a draft step relative to a model step."""
    return float(getattr(lm, "weight_bytes", 0) or 0)


def _drafter(lm: LM, prompt: list[int], cfg: GenerationConfig, draft: LM | None, total: int,
             rng: np.random.Generator, stats: SpecStats) -> Drafter:
    if draft is None:
        return LookupDrafter(prompt, cfg.lookup, stats)
    check_capable(draft, "the draft model")
    if draft.vocab_size != lm.vocab_size:
        raise InputError(f"the draft model's vocabulary ({draft.vocab_size}) is not the model's ({lm.vocab_size}); "
                         "pass a draft artifact built with the same tokenizer")
    big, small = weight_bytes(lm), weight_bytes(draft)
    ratio = small / big if big > 0 and small > 0 else 1.0
    return ModelDrafter(draft, total, cfg, rng, VERIFY_COST + ratio, stats)


def generate_speculative(
    lm: LM, prompt_ids: list[int], cfg: GenerationConfig, *, draft: LM | None = None, stats: SpecStats | None = None
) -> Iterator[int]:
    """:func:`edgepipe.runtime.generate.generate` with drafts (lookup, or ``draft``): the same EOS,
    ``max_new_tokens`` and context limits, the same greedy tokens, the same sampling distribution."""
    check_capable(lm)
    check_one_drafter(cfg.lookup, draft)
    stats = stats if stats is not None else SpecStats()
    rng = np.random.default_rng(cfg.seed)
    limit = max(min(cfg.max_new_tokens, lm.context_length - len(prompt_ids)), 0)
    if limit == 0:
        return
    total = len(prompt_ids) + limit
    drafter = _drafter(lm, list(prompt_ids), cfg, draft, total, rng, stats)
    state: Rewindable = lm.stepper(total)  # type: ignore[assignment]
    eos = set() if cfg.ignore_eos else set(lm.eos_token_ids)
    seq = list(prompt_ids)
    token = sample_next(state.step(np.asarray(seq, dtype=np.int64), last_only=True)[-1], cfg, rng)
    new = 0
    while token not in eos:
        yield token
        seq.append(token)
        new += 1
        stats.tokens += 1
        if new >= limit:
            break
        drafts, qs = drafter.propose(seq, limit - new - 1)
        start = state.length
        logits = state.step(np.asarray([token, *drafts], dtype=np.int64), last_only=not drafts)
        stats.steps += 1
        accepted, token = verify(logits, drafts, qs, cfg, rng)
        if drafts:
            stats.verify_steps += 1
            stats.drafted += len(drafts)
            stats.accepted += accepted
            state.rewind(start + 1 + accepted)
        drafter.update(len(seq), len(drafts), accepted)
        for x in drafts[:accepted]:
            if x in eos:
                return
            yield x
            seq.append(x)
            new += 1
            stats.tokens += 1
