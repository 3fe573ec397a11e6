"""The interface every text-generating artifact's model implements, whatever runs it.

A CPU decoder (one dynamic graph with a KV cache, :class:`edgepipe.runtime.model.CausalLM`) and a
static NPU decoder (a fixed-length prefill graph and a one-token decode graph with a host-side
cache, :class:`edgepipe.runtime.static_lm.StaticCausalLM`) differ in everything but this: a
stepper whose first ``step`` is the prefill and whose later steps append tokens, and whole-window
logits for scoring. Generation, evaluation, validation and the benchmarks use only this.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np


class Stepper(Protocol):
    """One sequence being decoded. The first ``step`` is the prefill (the prompt); each later
    call appends ``ids`` (usually one token). Returns logits ``[n, vocab]`` (``last_only``: the
    last position's ``[1, vocab]``), which may be a view of the stepper's own buffer that the next
    ``step`` overwrites: copy them to keep them."""

    def step(self, ids: np.ndarray, *, last_only: bool = ...) -> np.ndarray: ...


@runtime_checkable
class LM(Protocol):
    @property
    def context_length(self) -> int:
        """Most positions one sequence may hold (prompt + generated)."""
        ...

    @property
    def eos_token_ids(self) -> tuple[int, ...]: ...

    @property
    def vocab_size(self) -> int: ...

    def stepper(self, total: int) -> Stepper:
        """A fresh sequence with room for ``total`` positions (refused beyond ``context_length``)."""
        ...

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Logits ``[len(ids), vocab]`` of one window from an empty cache (what scoring takes)."""
        ...
