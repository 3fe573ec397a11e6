"""The KV cache's dtype, A/B: the same artifact with a float32 and a float16 cache, on this machine.

Each (artifact, context) runs in a fresh process under ``/usr/bin/time -v`` (peak RSS), the
artifacts interleaved in a rotating order per rep. A run times, as generation runs (the KV stepper,
last-position logits): a 512-token prefill after one untimed warm-up, then, in a stepper of
``context`` positions (the cache buffer the runtime allocates for that many), a prefill of
``context - 128`` tokens and 128 decode steps at that depth (positions context-128 .. context).
Prints one line per run, then medians and the ratios against the first artifact (the reference),
measured in the same run.

    python benchmarks/kv_cache.py --artifact fp32-kv=DIR --artifact fp16-kv=DIR [--contexts 512,2048] [--reps 3] [--threads 2]

A context of 129 times decode right after a 1-token prompt (positions 1..129). (Before 2026-12-07 16:45
UTC, a context under 512 timed its "pp512" on only ``context`` tokens.)

``--make-fp16 DIR OUT`` writes OUT: DIR's artifact with the ``kv_cache_fp16`` pass applied to its
graph (every other file copied), for artifacts built without ``runtime.kv_cache_dtype: float16``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as python benchmarks/kv_cache.py: the repo root on sys.path, for `benchmarks.*`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.vs_speed import time_v

PP, TG = 512, 128

CHILD = r"""
import json, sys, time
import numpy as np
from edgepipe.runtime.model import CausalLM
from edgepipe.runtime.facts import peak_rss_mb
art, threads, ctx, pp, tg = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
lm = CausalLM(art, threads=threads)
ids = (np.arange(max(ctx, pp), dtype=np.int64) * 7919 + 13) % max(lm.spec.vocab_size - 1, 1) + 1   # as device.bench
lm.stepper(pp).step(ids[:pp], last_only=True)   # warm-up
t0 = time.perf_counter()
lm.stepper(pp).step(ids[:pp], last_only=True)
out = {f"pp{pp}": pp / (time.perf_counter() - t0)}
st = lm.stepper(ctx)
t0 = time.perf_counter()
nxt = int(np.argmax(st.step(ids[: ctx - tg], last_only=True)[-1]))
out["pp_fill"] = (ctx - tg) / (time.perf_counter() - t0)
t0 = time.perf_counter()
for _ in range(tg):
    nxt = int(np.argmax(st.step(np.array([nxt]), last_only=True)[-1]))
out["tg_at_depth"] = tg / (time.perf_counter() - t0)
out["kv_dtype"] = np.dtype(lm.kv_dtype).name
out["vmhwm_mb"] = peak_rss_mb()
print(json.dumps(out))
"""

KEYS = (f"pp{PP}", "pp_fill", "tg_at_depth", "peak_rss_mb")


def run_one(art: Path, threads: int, ctx: int) -> dict[str, Any]:
    out, rss = time_v([sys.executable, "-c", CHILD, art, threads, ctx, PP, TG])
    res: dict[str, Any] = json.loads(out.strip().splitlines()[-1])
    res["peak_rss_mb"] = rss
    return res


def make_fp16(src: Path, dst: Path) -> dict[str, Any]:
    """``src``'s artifact with its graph run through the kv_cache_fp16 pass, into ``dst`` (a benchmark
    variant: its manifest still describes ``src``)."""
    import onnx

    from edgepipe.optimize.kv_cache_fp16 import KVCacheFp16Pass
    from edgepipe.optimize.manager import apply_to_proto

    dst.mkdir(parents=True, exist_ok=False)
    for f in src.iterdir():
        if f.is_file() and f.name != "model.onnx":
            shutil.copy2(f, dst / f.name)
    model = onnx.load(str(src / "model.onnx"), load_external_data=False)
    details = dict(apply_to_proto(KVCacheFp16Pass(), model).details)
    onnx.save_model(model, str(dst / "model.onnx"))
    return details


def report(ctx: int, runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, float]]:
    med = {a: {k: statistics.median(r[k] for r in rows) for k in KEYS} for a, rows in runs.items()}
    ref = next(iter(med.values()))
    n = len(next(iter(runs.values())))
    print(f"\ncontext {ctx}: medians of {n} interleaved reps (decode: {TG} steps at positions {ctx - TG}..{ctx})\n")
    print(f"| artifact | KV | pp{PP} tok/s | prefill {ctx - TG} tok/s | decode tok/s | peak RSS MB | pp{PP} / ref | decode / ref | RSS - ref MB |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for a, m in med.items():
        kv = runs[a][0]["kv_dtype"]
        print(f"| {a} | {kv} | {m[KEYS[0]]:.1f} | {m['pp_fill']:.1f} | {m['tg_at_depth']:.1f} | {m['peak_rss_mb']:.0f} | "
              f"{m[KEYS[0]] / ref[KEYS[0]]:.3f} | {m['tg_at_depth'] / ref['tg_at_depth']:.3f} | {m['peak_rss_mb'] - ref['peak_rss_mb']:+.0f} |")
    return med


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", action="append", default=[], help="LABEL=DIR (repeatable; the first is the reference)")
    ap.add_argument("--contexts", default="512,2048")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--make-fp16", nargs=2, type=Path, metavar=("DIR", "OUT"), help="write DIR with a float16 cache to OUT and exit")
    ap.add_argument("--json", type=Path, help="also write every figure here")
    args = ap.parse_args(argv)
    if args.make_fp16:
        print(json.dumps(make_fp16(*args.make_fp16)))
        return 0
    arts = dict(a.split("=", 1) for a in args.artifact)
    if len(arts) < 1 or not all(Path(d).is_dir() for d in arts.values()):
        print("error: pass --artifact LABEL=DIR (an existing artifact folder), at least once", file=sys.stderr)
        return 2
    names = list(arts)
    result: dict[str, Any] = {"threads": args.threads, "reps": args.reps, "contexts": {}}
    for ctx in (int(c) for c in args.contexts.split(",")):
        runs: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
        for rep in range(args.reps):
            for name in names[rep % len(names):] + names[: rep % len(names)]:
                res = run_one(Path(arts[name]), args.threads, ctx)
                res["load1"] = os.getloadavg()[0]
                runs[name].append(res)
                print(f"[{time.strftime('%H:%M:%S')}] ctx {ctx} rep {rep + 1}/{args.reps} {name} ({res['kv_dtype']}): "
                      f"pp{PP} {res[KEYS[0]]:.1f}, prefill {res['pp_fill']:.1f}, decode {res['tg_at_depth']:.1f}, "
                      f"peak RSS {res['peak_rss_mb']:.0f} MB, load average {res['load1']:.1f}", flush=True)
        result["contexts"][ctx] = {"runs": runs, "median": report(ctx, runs)}
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
