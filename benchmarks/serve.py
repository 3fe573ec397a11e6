"""``edgepipe serve`` against ``python -m edgepipe.runtime bench`` on the same artifact and threads.

What the server adds on top of the runtime's own decode loop: HTTP, JSON, SSE framing, a flush per
token, the text decoding of each piece and the client's parsing. The figures compared:

- decode tok/s: bench times 64 single-token steps after the first token; through the server, a
  streamed ``/v1/completions`` request with ``max_tokens = 65`` and ``ignore_eos`` (so the count
  is fixed), timed at the client from the first streamed token to the last;
- time to first token: bench's stepper + prefill of 32 synthetic token ids + argmax; through the
  server, from sending the request to receiving the first token, for 32 ids of real text (sent as
  a token-id prompt, so no tokenization is timed; prefill time does not depend on the ids).

Each figure is the best of 2 requests (bench: best of its 2 repeats); reps interleave A B B A,
the bench in a fresh process each time (as ``edgepipe bench`` runs it), the server started once and warmed up.

    python benchmarks/serve.py --artifact DIR [--threads 2] [--reps 3] [--json]
"""

from __future__ import annotations

import argparse
import http.client
import json
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

DECODE = 64
PROMPT = 32


def prompt_ids(artifact: Path) -> list[int]:
    """32 token ids of real text (the packaged eval text). bench's synthetic ids would cost the
    same prefill, but a model continuing them emits byte fragments that the server (rightly)
    holds back until they form a character, and then a streamed event is no longer one token."""
    from importlib import resources

    from tokenizers import Tokenizer

    text = resources.files("edgepipe.data").joinpath("eval.txt").read_text(encoding="utf-8")
    return Tokenizer.from_file(str(artifact / "tokenizer.json")).encode(text[:4000]).ids[:PROMPT]


def bench_once(artifact: Path, threads: int) -> dict[str, Any]:
    out = subprocess.run([sys.executable, "-m", "edgepipe.runtime", "bench", str(artifact), "--threads", str(threads), "--json"],
                         capture_output=True, text=True, check=True)
    res = json.loads(out.stdout.strip().splitlines()[-1])
    return {"decode_tok_s": res["decode_tok_s"], "ttft_ms": res["ttft_ms"]}


class Server:
    def __init__(self, artifact: Path, threads: int) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "edgepipe.runtime", "serve", str(artifact), "--port", "0", "--threads", str(threads)],
                                     stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            m = re.search(r"serving (\S+) at http://127\.0\.0\.1:(\d+)/", line)
            if m:
                self.model, self.port = m.group(1), int(m.group(2))
                return
        raise SystemExit(f"the server did not start (exit {self.proc.wait()})")

    def stream(self, ids: list[int]) -> dict[str, Any]:
        body = json.dumps({"model": self.model, "prompt": ids, "max_tokens": DECODE + 1, "temperature": 0, "ignore_eos": True,
                           "stream": True, "stream_options": {"include_usage": True}})
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        t0 = time.perf_counter()
        conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        first = last = None
        tokens = events = 0
        for line in resp:
            if not line.startswith(b"data: {"):
                continue
            event = json.loads(line[6:])
            if event.get("usage"):
                tokens = event["usage"]["completion_tokens"]
            elif event["choices"] and event["choices"][0]["text"]:
                last = time.perf_counter()
                first = first or last
                events += 1
        conn.close()
        assert first is not None and last is not None and tokens == DECODE + 1, tokens
        if events != tokens:
            print(f"warning: {tokens} tokens came in {events} events; decode tok/s is approximate", file=sys.stderr)
        return {"decode_tok_s": round((events - 1) / (last - first), 2), "ttft_ms": round((first - t0) * 1000, 2)}

    def best(self, ids: list[int]) -> dict[str, Any]:
        runs = [self.stream(ids) for _ in range(2)]
        return {"decode_tok_s": max(r["decode_tok_s"] for r in runs), "ttft_ms": min(r["ttft_ms"] for r in runs)}

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=60)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    ids = prompt_ids(args.artifact)
    server = Server(args.artifact, args.threads)
    rows: list[dict[str, Any]] = []
    try:
        server.best(ids)  # warm-up
        for rep in range(args.reps):
            for who in ("bench", "serve") if rep % 2 == 0 else ("serve", "bench"):  # A B, then B A: interleaved
                r = bench_once(args.artifact, args.threads) if who == "bench" else server.best(ids)
                rows.append({"rep": rep, "who": who, **r})
                if not args.json:
                    print(f"rep {rep} {who:5s} decode {r['decode_tok_s']:8.2f} tok/s   ttft {r['ttft_ms']:8.2f} ms", flush=True)
    finally:
        server.stop()
    med = {who: {k: statistics.median(r[k] for r in rows if r["who"] == who) for k in ("decode_tok_s", "ttft_ms")} for who in ("bench", "serve")}
    summary = {
        "artifact": str(args.artifact), "threads": args.threads, "reps": args.reps, "rows": rows, "median": med,
        "decode_ratio": round(med["serve"]["decode_tok_s"] / med["bench"]["decode_tok_s"], 4),
        "ttft_diff_ms": round(med["serve"]["ttft_ms"] - med["bench"]["ttft_ms"], 2),
    }
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"median decode: serve {med['serve']['decode_tok_s']:.2f} tok/s, bench {med['bench']['decode_tok_s']:.2f} tok/s, "
              f"ratio {summary['decode_ratio']:.3f}")
        print(f"median TTFT:   serve {med['serve']['ttft_ms']:.2f} ms, bench {med['bench']['ttft_ms']:.2f} ms, "
              f"difference {summary['ttft_diff_ms']:+.2f} ms")
    return 0


if __name__ == "__main__":
    sys.exit(main())
