"""``GET /metrics``: counters, gauges and histograms in the Prometheus text format (0.0.4).

Written here rather than taken from ``prometheus_client``: a dozen series do not justify another
package on the device, and the text format is small and stable.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
TOK_S_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 50.0, 75.0, 100.0, 150.0, 250.0, 500.0, 1000.0)


@dataclass
class Histogram:
    buckets: Sequence[float]
    counts: list[int] = field(default_factory=list)
    total: float = 0.0
    n: int = 0

    def __post_init__(self) -> None:
        self.counts = [0] * len(self.buckets)

    def observe(self, v: float) -> None:
        self.n += 1
        self.total += v
        for i, b in enumerate(self.buckets):
            if v <= b:
                self.counts[i] += 1

    def lines(self, name: str) -> list[str]:
        out = [f'{name}_bucket{{le="{b:g}"}} {c}' for b, c in zip(self.buckets, self.counts, strict=True)]
        return out + [f'{name}_bucket{{le="+Inf"}} {self.n}', f"{name}_sum {self.total:.6f}", f"{name}_count {self.n}"]


class Metrics:
    """All series of one server; every update takes the lock (handlers run in many threads)."""

    def __init__(self, queue_depth: Callable[[], int]) -> None:
        self._lock = threading.Lock()
        self._queue_depth = queue_depth
        self.requests: dict[tuple[str, int], int] = {}
        self.finished: dict[str, int] = {}
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.decode = Histogram(TOK_S_BUCKETS)

    def request(self, endpoint: str, status: int) -> None:
        with self._lock:
            self.requests[(endpoint, status)] = self.requests.get((endpoint, status), 0) + 1

    def generation(self, reason: str, prompt_tokens: int, completion_tokens: int, ttft_s: float | None, decode_tok_s: float | None) -> None:
        with self._lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1
            self.prompt_tokens += prompt_tokens
            self.completion_tokens += completion_tokens
            if ttft_s is not None:
                self.ttft.observe(ttft_s)
            if decode_tok_s is not None:
                self.decode.observe(decode_tok_s)

    def render(self) -> str:
        with self._lock:
            lines = ["# HELP edgepipe_requests_total HTTP requests answered, by endpoint and status.", "# TYPE edgepipe_requests_total counter"]
            lines += [f'edgepipe_requests_total{{endpoint="{e}",status="{s}"}} {n}' for (e, s), n in sorted(self.requests.items())]
            lines += ["# HELP edgepipe_generations_total Generations ended, by reason (stop, length, cancelled, shutdown).",
                      "# TYPE edgepipe_generations_total counter"]
            lines += [f'edgepipe_generations_total{{reason="{r}"}} {n}' for r, n in sorted(self.finished.items())]
            lines += [
                "# HELP edgepipe_prompt_tokens_total Prompt tokens prefilled.", "# TYPE edgepipe_prompt_tokens_total counter",
                f"edgepipe_prompt_tokens_total {self.prompt_tokens}",
                "# HELP edgepipe_completion_tokens_total Tokens generated.", "# TYPE edgepipe_completion_tokens_total counter",
                f"edgepipe_completion_tokens_total {self.completion_tokens}",
                "# HELP edgepipe_queue_depth Requests waiting for the model.", "# TYPE edgepipe_queue_depth gauge",
                f"edgepipe_queue_depth {self._queue_depth()}",
                "# HELP edgepipe_ttft_seconds Time from request received to first generated token.", "# TYPE edgepipe_ttft_seconds histogram",
                *self.ttft.lines("edgepipe_ttft_seconds"),
                "# HELP edgepipe_decode_tokens_per_second Decode speed of each generation after its first token.",
                "# TYPE edgepipe_decode_tokens_per_second histogram",
                *self.decode.lines("edgepipe_decode_tokens_per_second"),
            ]
        return "\n".join(lines) + "\n"
