"""One model, one generation at a time, a bounded first-come-first-served queue in front of it.

Generations are not batched: the runtime's decoder steps one sequence, and on a 2-4 core board a
second sequence would halve the speed of the first rather than add throughput. Requests wait in
arrival order; when ``max_queue`` are already waiting, the next one is refused at once (503 with
``Retry-After``) instead of holding a connection open for minutes. Text comes from
:func:`edgepipe.runtime.generate.generate` and :func:`edgepipe.runtime.artifact.decode_pieces`,
the same code ``edgepipe run`` uses, so the same prompt and seed give the same text.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Generator, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from edgepipe.runtime.artifact import decode_pieces
from edgepipe.runtime.generate import GenerationConfig, generate
from edgepipe.runtime.lm import LM
from edgepipe.runtime.serve.api import ApiError, CompletionRequest
from edgepipe.runtime.serve.chat import ChatTemplate
from edgepipe.runtime.serve.metrics import Metrics

Gone = Callable[[], bool]  # "has the client hung up?", asked between tokens


@dataclass(frozen=True)
class Job:
    """A checked request, tokenized: ``limit`` new tokens at most (``max_tokens`` or the context's rest)."""

    request: CompletionRequest
    prompt_ids: tuple[int, ...]
    limit: int
    received: float


@dataclass(frozen=True)
class Finish:
    """The end of a generation. ``reason``: ``stop`` (EOS or a stop string), ``length``,
    ``cancelled`` (the client hung up) or ``shutdown`` (SIGTERM cut it)."""

    reason: str
    prompt_tokens: int
    completion_tokens: int


class StopScanner:
    """Cuts the text at the first stop string, across piece boundaries: text that could still
    become a stop string is held back until the next piece decides."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(stops)
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """(text safe to send, whether a stop string was reached)."""
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[: min(hits)], ""
            return out, True
        keep = next((k for k in range(len(self.pending), 0, -1) if any(s.startswith(self.pending[-k:]) for s in self.stops)), 0)
        cut = len(self.pending) - keep
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


@dataclass
class _Stats:
    n: int = 0
    reason: str = "length"
    first: float | None = None
    last: float | None = None


class Engine:
    def __init__(self, lm: LM, tokenizer: Any, template: ChatTemplate, model_id: str, *, max_queue: int, lookup: int = 0) -> None:
        self.lm = lm
        self.lookup = lookup  # prompt-lookup decoding (edgepipe.runtime.speculative); 0: off
        self.tokenizer = tokenizer
        self.template = template
        self.model_id = model_id
        self.max_queue = max_queue
        self.metrics = Metrics(self.queue_depth)
        self._cond = threading.Condition()
        self._waiting: deque[object] = deque()
        self._running = False
        self._draining = False
        self._mean_s = 1.0  # running mean of generation time: the Retry-After estimate

    def queue_depth(self) -> int:
        return len(self._waiting)

    @property
    def draining(self) -> bool:
        return self._draining

    def prepare(self, req: CompletionRequest) -> Job:
        """Render and tokenize; a prompt that leaves no room in the context is a 400 naming the limit."""
        received = time.perf_counter()
        if req.prompt_ids:
            ids = list(req.prompt_ids)
        else:
            text = self.template.render(req.messages) if req.chat else req.prompt
            ids = self.tokenizer.encode(text, add_special_tokens=not req.chat).ids  # a template writes its own BOS
        if not ids:
            raise ApiError(400, "the prompt is empty after tokenization", param="messages" if req.chat else "prompt")
        ctx = self.lm.context_length
        if len(ids) >= ctx:
            raise ApiError(400, f"the prompt is {len(ids)} tokens; this model's context length is {ctx} tokens (prompt and completion together)",
                           param="messages" if req.chat else "prompt", code="context_length_exceeded")
        room = ctx - len(ids)
        limit = room if req.max_tokens is None else min(req.max_tokens, room)
        return Job(request=req, prompt_ids=tuple(ids), limit=limit, received=received)

    def _refuse_if_full(self) -> None:
        if self._draining:
            raise ApiError(503, "the server is shutting down", type_="server_error", headers={"Retry-After": "10"})
        if (self._running or self._waiting) and len(self._waiting) >= self.max_queue:
            wait = max(1, math.ceil((len(self._waiting) + 1) * self._mean_s))
            raise ApiError(503, f"the queue is full ({self.max_queue} waiting); retry in {wait} s", type_="server_error",
                           code="queue_full", headers={"Retry-After": str(wait)})

    @contextmanager
    def turn(self, gone: Gone) -> Iterator[None]:
        """Wait for the model in arrival order (503 at once when the queue is full); hold it inside."""
        ticket = object()
        with self._cond:
            self._refuse_if_full()
            self._waiting.append(ticket)
            try:
                while self._running or self._waiting[0] is not ticket:
                    if self._draining:
                        raise ApiError(503, "the server is shutting down", type_="server_error", headers={"Retry-After": "10"})
                    if gone():
                        raise ConnectionAbortedError("the client hung up while queued")
                    self._cond.wait(0.1)
            finally:
                self._waiting.remove(ticket)
                self._cond.notify_all()
            self._running = True
        start = time.perf_counter()
        try:
            yield
        finally:
            with self._cond:
                self._running = False
                self._mean_s = 0.8 * self._mean_s + 0.2 * (time.perf_counter() - start)
                self._cond.notify_all()

    def _tokens(self, job: Job, gone: Gone, stats: _Stats) -> Iterator[int]:
        req = job.request
        cfg = GenerationConfig(max_new_tokens=job.limit, temperature=req.temperature, top_p=req.top_p, seed=req.seed,
                               ignore_eos=req.ignore_eos, lookup=self.lookup)
        for token in generate(self.lm, list(job.prompt_ids), cfg):
            if self._draining or gone():
                stats.reason = "shutdown" if self._draining else "cancelled"
                return
            stats.last = time.perf_counter()
            stats.first = stats.first or stats.last
            stats.n += 1
            yield token
        stats.reason = "length" if stats.n >= job.limit else "stop"

    def run(self, job: Job, gone: Gone) -> Generator[str | Finish, None, None]:
        """Text pieces, then one :class:`Finish`. Call inside :meth:`turn`. Closing the iterator
        (the client went away) stops the generation at once."""
        stats = _Stats()
        scanner = StopScanner(job.request.stop)
        pieces = decode_pieces(self.tokenizer, self._tokens(job, gone, stats))
        try:
            for piece in pieces:
                text, hit = scanner.feed(piece)
                if text:
                    yield text
                if hit:
                    stats.reason = "stop"
                    break
            else:
                if stats.reason in ("stop", "length") and (rest := scanner.flush()):
                    yield rest
        except GeneratorExit:  # the caller stopped reading: its write to the client failed
            stats.reason = "cancelled"
            raise
        finally:
            pieces.close()
            self._record(job, stats)
        yield Finish(stats.reason, len(job.prompt_ids), stats.n)

    def _record(self, job: Job, s: _Stats) -> None:
        ttft = s.first - job.received if s.first is not None else None
        tok_s = (s.n - 1) / (s.last - s.first) if s.first is not None and s.last is not None and s.n > 1 and s.last > s.first else None
        self.metrics.generation(s.reason, len(job.prompt_ids), s.n, ttft, tok_s)

    def drain(self) -> None:
        """Refuse new and queued requests; the running generation stops at its next token."""
        with self._cond:
            self._draining = True
            self._cond.notify_all()
