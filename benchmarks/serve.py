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
        [--llama-server BIN --llama-bench BIN --gguf MODEL.gguf]

With ``--llama-server``, llama.cpp's server gets the same measurement against its own ``llama-bench``
(decode: tg64; time to first token: the pp32 time) on the GGUF given (the issue asks for Q4_K_M of
the same weights: ``llama-quantize f32.gguf Q4_K_M.gguf Q4_K_M``, as ``vs_llamacpp.py`` makes it),
streamed from ``POST /completion`` with the same 32 token ids, ``n_predict`` 65, ``ignore_eos``.
The benchmarks' cached llama.cpp build leaves the server out (``benchmarks/llamacpp.py``); build it
from the same sdist with ``-DLLAMA_BUILD_SERVER=ON`` and ``--target llama-server``.
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


class LlamaServer:
    """``llama-server`` on a GGUF, on loopback, streamed completions of token ids."""

    def __init__(self, binary: Path, gguf: Path, threads: int) -> None:
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port = int(sock.getsockname()[1])
        self.proc = subprocess.Popen([str(binary), "-m", str(gguf), "-t", str(threads), "--host", "127.0.0.1", "--port", str(self.port),
                                      "-c", "2048", "-np", "1", "--no-webui"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            try:
                conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=5)
                conn.request("GET", "/health")
                if conn.getresponse().status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.5)
        raise SystemExit("llama-server did not become healthy")

    def stream(self, ids: list[int]) -> dict[str, Any]:
        body = json.dumps({"prompt": ids, "n_predict": DECODE + 1, "temperature": 0, "ignore_eos": True, "stream": True, "cache_prompt": False})
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=600)
        t0 = time.perf_counter()
        conn.request("POST", "/completion", body=body, headers={"Content-Type": "application/json"})
        resp = conn.getresponse()
        stamps = []
        for line in resp:
            if line.startswith(b"data: {") and not json.loads(line[6:]).get("stop"):
                stamps.append(time.perf_counter())
        conn.close()
        return {"decode_tok_s": round((len(stamps) - 1) / (stamps[-1] - stamps[0]), 2), "ttft_ms": round((stamps[0] - t0) * 1000, 2)}

    best = Server.best
    stop = Server.stop


def llama_bench_once(binary: Path, gguf: Path, threads: int) -> dict[str, Any]:
    out = subprocess.run([str(binary), "-m", str(gguf), "-p", str(PROMPT), "-n", str(DECODE), "-t", str(threads), "-r", "2", "-o", "json"],
                         capture_output=True, text=True, check=True)
    rows = json.loads(out.stdout)
    pp = next(float(r["avg_ts"]) for r in rows if r["n_gen"] == 0)
    tg = next(float(r["avg_ts"]) for r in rows if r["n_prompt"] == 0)
    return {"decode_tok_s": round(tg, 2), "ttft_ms": round(1000 * PROMPT / pp, 2)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", action="store_true")
    p.add_argument("--llama-server", type=Path, help="llama.cpp's llama-server binary: measure it too")
    p.add_argument("--llama-bench", type=Path, help="llama.cpp's llama-bench binary (with --llama-server)")
    p.add_argument("--gguf", type=Path, help="the GGUF llama.cpp serves (with --llama-server)")
    args = p.parse_args(argv)
    if args.llama_server and not (args.llama_bench and args.gguf):
        p.error("--llama-server needs --llama-bench and --gguf")
    ids = prompt_ids(args.artifact)
    engines = {"edgepipe": (lambda: Server(args.artifact, args.threads), lambda: bench_once(args.artifact, args.threads))}
    if args.llama_server:
        engines["llama.cpp"] = (lambda: LlamaServer(args.llama_server, args.gguf, args.threads),
                                lambda: llama_bench_once(args.llama_bench, args.gguf, args.threads))
    summary: dict[str, Any] = {"artifact": str(args.artifact), "threads": args.threads, "reps": args.reps}
    for engine, (start, bench) in engines.items():
        summary[engine] = _measure(engine, start, bench, ids, args.reps, quiet=args.json)
    if args.json:
        print(json.dumps(summary))
    return 0


def _measure(engine: str, start: Any, bench: Any, ids: list[int], reps: int, *, quiet: bool) -> dict[str, Any]:
    """One engine's server against its own bench, reps interleaved A B, B A."""
    server = start()
    rows: list[dict[str, Any]] = []
    try:
        server.best(ids)  # warm-up
        for rep in range(reps):
            for who in ("bench", "serve") if rep % 2 == 0 else ("serve", "bench"):
                r = bench() if who == "bench" else server.best(ids)
                rows.append({"rep": rep, "who": who, **r})
                if not quiet:
                    print(f"{engine} rep {rep} {who:5s} decode {r['decode_tok_s']:8.2f} tok/s   ttft {r['ttft_ms']:8.2f} ms", flush=True)
    finally:
        server.stop()
    med = {who: {k: statistics.median(r[k] for r in rows if r["who"] == who) for k in ("decode_tok_s", "ttft_ms")} for who in ("bench", "serve")}
    out = {"rows": rows, "median": med, "decode_ratio": round(med["serve"]["decode_tok_s"] / med["bench"]["decode_tok_s"], 4),
           "ttft_diff_ms": round(med["serve"]["ttft_ms"] - med["bench"]["ttft_ms"], 2)}
    if not quiet:
        print(f"{engine} median decode: serve {med['serve']['decode_tok_s']:.2f} tok/s, bench {med['bench']['decode_tok_s']:.2f} tok/s, "
              f"ratio {out['decode_ratio']:.3f}; median TTFT: serve {med['serve']['ttft_ms']:.2f} ms, bench {med['bench']['ttft_ms']:.2f} ms, "
              f"difference {out['ttft_diff_ms']:+.2f} ms", flush=True)
    return out


if __name__ == "__main__":
    sys.exit(main())
