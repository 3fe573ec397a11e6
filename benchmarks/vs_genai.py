"""edgepipe's runtime against onnxruntime-genai's generator, on the same artifact and machine.

Both engines run the very same ``model.onnx`` + ``model.onnx.data`` (edgepipe artifacts keep the
builder's ``genai_config.json``), with the same thread count, interleaved A B B A per rep, each in
a fresh process under ``/usr/bin/time -v``. What differs is only the host loop:

- edgepipe: ``CausalLM``'s KV stepper (preallocated cache, IO binding, ``logits_start = -1`` so the
  lm_head runs on the last position only), timed as in ``vs_llamacpp.py``;
- onnxruntime-genai: ``og.Generator`` (``append_tokens`` for the prompt, ``generate_next_token``
  for each new token; greedy, ``min_length = max_length`` so EOS cannot stop it early). A
  ``generate_next_token`` runs the model on the token picked before it, then picks, and the first one
  after ``append_tokens`` runs nothing: it is called once before the decode is timed, so both engines'
  timed tokens are one model run each (before, genai's tg128 was 127 runs). genai does
  not feed ``logits_start``, so its prefill computes every position's logits, as it does on the
  builder's own graphs.

    python benchmarks/vs_genai.py --artifact DIR [--threads 2] [--reps 3]

With no ``--artifact`` it builds the default model for ``raspberrypi5`` into the stage cache.
Prints one line per run, then the medians and the ratios edgepipe / genai.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as python benchmarks/vs_genai.py: the repo root on sys.path, for `benchmarks.*`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
# the same edgepipe timing code as vs_llamacpp.py (benchmarks/vs_speed.py)
from benchmarks.vs_speed import PP, TG, edgepipe_speed, time_v

GENAI_SPEED_CODE = r"""
import json, sys, time
import numpy as np
import onnxruntime_genai as og
from edgepipe.runtime.facts import peak_rss_mb
art, threads, pps, tg = sys.argv[1], int(sys.argv[2]), [int(x) for x in sys.argv[3].split(",")], int(sys.argv[4])
cfg = og.Config(art)
cfg.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads, "inter_op_num_threads": 1}}}}))
model = og.Model(cfg)
vocab = json.load(open(art + "/genai_config.json"))["model"]["vocab_size"]
ids = (np.arange(max(pps), dtype=np.int32) * 7919 + 13) % max(vocab - 1, 1) + 1   # as device.bench
def gen(total):
    p = og.GeneratorParams(model)
    p.set_search_options(max_length=total, min_length=total, do_sample=False)
    return og.Generator(model, p)
def prefill(n):
    g = gen(n + 1)
    t0 = time.perf_counter()
    g.append_tokens(ids[:n])
    return n / (time.perf_counter() - t0)
def decode(n):
    g = gen(n + 3)
    g.append_tokens(ids[:1])
    g.generate_next_token()   # picks from append_tokens' logits, no model run: as edgepipe's untimed first argmax
    t0 = time.perf_counter()
    for _ in range(n):
        g.generate_next_token()
    return n / (time.perf_counter() - t0)
for p in pps:   # warm-up once per shape
    prefill(p)
decode(4)
out = {f"pp{p}": prefill(p) for p in pps}
out[f"tg{tg}"] = decode(tg)
out["vmhwm_mb"] = peak_rss_mb()
print(json.dumps(out))
"""


def genai_speed(art: Path, threads: int) -> dict[str, float]:
    out, rss = time_v([sys.executable, "-c", GENAI_SPEED_CODE, art, threads, ",".join(map(str, PP)), TG])
    res = json.loads(out.strip().splitlines()[-1])
    res["peak_rss_mb"] = rss
    return res


def default_artifact() -> Path:
    import edgepipe

    out = Path(tempfile.mkdtemp(prefix="vs-genai-")) / "smollm2-raspberrypi5"
    edgepipe.build(target="raspberrypi5", out=out, progress=lambda m: print(f"  build: {m}", flush=True))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", type=Path, help="an edgepipe CPU artifact (default: build the default model for raspberrypi5)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--json", type=Path, help="also write every figure here")
    args = ap.parse_args(argv)
    art = args.artifact or default_artifact()
    if not (art / "genai_config.json").is_file():
        print(f"error: {art} has no genai_config.json; pass an edgepipe CPU artifact", file=sys.stderr)
        return 2
    runs: dict[str, list[dict[str, float]]] = {"edgepipe": [], "genai": []}
    keys = [f"pp{p}" for p in PP] + [f"tg{TG}"]
    for rep in range(args.reps):
        order = ("edgepipe", "genai") if rep % 2 == 0 else ("genai", "edgepipe")
        for engine in order:
            res = edgepipe_speed(art, args.threads) if engine == "edgepipe" else genai_speed(art, args.threads)
            runs[engine].append(res)
            figures = ", ".join(f"{k} {res[k]:.1f}" for k in keys)
            print(f"[{time.strftime('%H:%M:%S')}] rep {rep + 1}/{args.reps} {engine}: {figures}, peak RSS {res['peak_rss_mb']:.0f} MB", flush=True)
    med = {e: {k: statistics.median(r[k] for r in rows) for k in [*keys, "peak_rss_mb"]} for e, rows in runs.items()}
    print(f"\n{art}, {args.threads} threads, median of {args.reps} interleaved reps, tokens/s:\n")
    print("| engine | " + " | ".join(keys) + " | peak RSS MB |")
    print("|---|" + "---:|" * (len(keys) + 1))
    for e in ("edgepipe", "genai"):
        print(f"| {e} | " + " | ".join(f"{med[e][k]:.1f}" for k in keys) + f" | {med[e]['peak_rss_mb']:.0f} |")
    ratios = {k: med["edgepipe"][k] / med["genai"][k] for k in keys}
    ratios["peak_rss_mb"] = med["edgepipe"]["peak_rss_mb"] / med["genai"]["peak_rss_mb"]
    print("| edgepipe / genai | " + " | ".join(f"{ratios[k]:.2f}" for k in keys) + f" | {ratios['peak_rss_mb']:.2f} |")
    if args.json:
        report: dict[str, Any] = {"artifact": str(art), "threads": args.threads, "runs": runs, "median": med, "ratios": ratios}
        args.json.write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
