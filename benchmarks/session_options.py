"""onnxruntime session options and the runtime's prefill chunking, A/B on one artifact and machine.

Each variant runs in a fresh process under ``/usr/bin/time -v`` (peak RSS), variants interleaved
in a rotating order per rep: a prefill of 512 tokens (after one untimed warm-up prefill) and a
decode of 128 tokens from a one-token context, as ``vs_llamacpp.py`` times edgepipe. Prints one
line per run, then per variant the medians and the ratios against ``default`` (the runtime as it
ships), measured in the same run.

    python benchmarks/session_options.py --artifact DIR [--artifact DIR ...] [--reps 3] [--threads 2]
        [--variants default,arena-off,chunk-128+mem-pattern-off,...]

Variants (``--list`` prints them): the session's CPU memory arena and memory pattern, prepacking
(``session.disable_prepacking``), initializers on the device allocator instead of the arena,
intra-op spinning, the thread pool's dynamic block size and thread affinity, the thread count, MLAS's lookup-table
MatMulNBits kernels, prefill chunks (``CausalLM(prefill_chunk=N)``), the weight pages kept after loading
(``pages-kept``: ``CausalLM(release_pages=False)``), environment variables onnxruntime reads
(``gqa-flash-off``: GroupQueryAttention without its flash kernel), and another onnxruntime version
(``--onnxruntime DIR`` adds the variant ``other-ort``: ``pip install --target DIR onnxruntime==X --no-deps``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as python benchmarks/session_options.py: the repo root on sys.path, for `benchmarks.*`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.vs_speed import time_v

PP, TG, SLOW_TG = 512, 128, 16

# name -> what differs from the runtime's defaults (whatever those are in the code under test)
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "arena-off": {"arena": False},
    "mem-pattern-off": {"mem_pattern": False},
    "prepack-off": {"config": {"session.disable_prepacking": "1"}, "tg": SLOW_TG},
    "init-device-alloc": {"config": {"session.use_device_allocator_for_initializers": "1"}},
    "spin-off": {"spinning": False},
    "dynamic-block-4": {"config": {"session.dynamic_block_base": "4"}},
    # MLAS's lookup-table (T-MAC style) MatMulNBits kernels, where it has them for the weights' format
    "lut-gemm": {"config": {"mlas.use_lut_gemm": "1"}},
    # the pool's second thread pinned to the second logical CPU (1-based ids; the caller's thread is the first worker)
    "affinity": {"config": {"session.intra_op_thread_affinities": "2"}},
    # onnxruntime-genai's CPU sessions: an arena registered in the environment, shared by sessions
    "env-allocators": {"env_arena": True, "config": {"session.use_env_allocators": "1"}},
    "threads-1": {"threads": 1},
    "chunk-whole": {"chunk": 0},
    "chunk-64": {"chunk": 64},
    "chunk-128": {"chunk": 128},
    "chunk-256": {"chunk": 256},
    # keep the mapped weight pages prepacking read (CausalLM(release_pages=False); edgepipe.runtime.pages)
    "pages-kept": {"release_pages": False},
    # GroupQueryAttention's fp32 path: onnxruntime 1.31 runs a tiled online-softmax (flash) kernel for every
    # call with more than one key; this environment variable (read when the session is made) brings back the
    # older one (QK^T GEMM, softmax, then a second GEMM with V, the probabilities held whole)
    "gqa-flash-off": {"env": {"ORT_GQA_DISABLE_FLASH_ATTENTION": "1"}},
}

CHILD = r"""
import json, os, sys, time
art, threads, v = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
os.environ.update(v.get("env", {}))   # before onnxruntime is loaded
sys.path[:0] = v.get("sys_path", [])  # --onnxruntime DIR: another onnxruntime, installed with pip --target DIR
import numpy as np
import edgepipe.runtime.model as M
from edgepipe.runtime.facts import peak_rss_mb
shipped = M.session_options
def variant(threads=0, *, spinning=True):
    so = shipped(threads, spinning=spinning)
    if "arena" in v:
        so.enable_cpu_mem_arena = v["arena"]
    if "mem_pattern" in v:
        so.enable_mem_pattern = v["mem_pattern"]
    for key, value in v.get("config", {}).items():
        so.add_session_config_entry(key, value)
    return so
if v.get("env_arena"):
    import onnxruntime as ort
    cpu = ort.OrtMemoryInfo("Cpu", ort.OrtAllocatorType.ORT_ARENA_ALLOCATOR, 0, ort.OrtMemType.DEFAULT)
    ort.create_and_register_allocator(cpu, None)
M.session_options = variant
kw = {"spinning": v["spinning"]} if "spinning" in v else {}
if "chunk" in v:
    kw["prefill_chunk"] = v["chunk"]
if "release_pages" in v:
    kw["release_pages"] = v["release_pages"]
t0 = time.perf_counter()
lm = M.CausalLM(art, threads=v.get("threads", threads), **kw)
load_s = time.perf_counter() - t0
pp, tg = int(sys.argv[4]), int(v.get("tg", sys.argv[5]))
ids = (np.arange(pp, dtype=np.int64) * 7919 + 13) % max(lm.spec.vocab_size - 1, 1) + 1   # as device.bench
lm.stepper(pp).step(ids, last_only=True)   # warm-up
t0 = time.perf_counter()
lm.stepper(pp).step(ids, last_only=True)
out = {"load_s": load_s, f"pp{pp}": pp / (time.perf_counter() - t0)}
st = lm.stepper(tg + 1)
nxt = int(np.argmax(st.step(ids[:1], last_only=True)[-1]))
t0 = time.perf_counter()
for _ in range(tg):
    nxt = int(np.argmax(st.step(np.array([nxt]), last_only=True)[-1]))
out["tg"] = tg / (time.perf_counter() - t0)
out["vmhwm_mb"] = peak_rss_mb()
import onnxruntime
out["onnxruntime"] = onnxruntime.__version__
print(json.dumps(out))
"""


def resolve(name: str) -> dict[str, Any]:
    """A variant, or several joined by ``+`` (``chunk-128+mem-pattern-off``), merged left to right."""
    merged: dict[str, Any] = {}
    for part in name.split("+"):
        v = VARIANTS[part]
        merged = {**merged, **v, "config": {**merged.get("config", {}), **v.get("config", {})}}
        if "env" in v or "env" in merged:
            merged["env"] = {**merged.get("env", {}), **v.get("env", {})}
    return merged


def run_variant(art: Path, threads: int, name: str) -> dict[str, float]:
    out, rss = time_v([sys.executable, "-c", CHILD, art, threads, json.dumps(resolve(name)), PP, TG])
    res: dict[str, float] = json.loads(out.strip().splitlines()[-1])
    res["peak_rss_mb"] = rss
    return res


def report(art: Path, runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    keys = [f"pp{PP}", "tg", "peak_rss_mb", "load_s"]
    med = {v: {k: statistics.median(r[k] for r in rows) for k in keys} for v, rows in runs.items()}
    ref = med.get("default")
    print(f"\n{art}: medians of {len(next(iter(runs.values())))} interleaved reps (decode: tg{TG}; prepack-off tg{SLOW_TG})\n")
    print(f"| variant | pp{PP} tok/s | decode tok/s | peak RSS MB | load s | pp / default | decode / default | RSS / default |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for v, m in med.items():
        ratios = [m[k] / ref[k] if ref else float("nan") for k in keys[:3]]
        print(f"| {v} | {m[keys[0]]:.1f} | {m['tg']:.1f} | {m['peak_rss_mb']:.0f} | {m['load_s']:.2f} | "
              + " | ".join(f"{r:.3f}" for r in ratios) + " |")
    return med


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--artifact", type=Path, action="append", default=[], help="an edgepipe CPU artifact (repeatable)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--variants", default=",".join(VARIANTS), help="comma-separated names (default: all)")
    ap.add_argument("--list", action="store_true", help="print the variants and exit")
    ap.add_argument("--onnxruntime", type=Path, help="variant 'other-ort': this folder's onnxruntime (pip install --target DIR onnxruntime==X --no-deps)")
    ap.add_argument("--json", type=Path, help="also write every figure here")
    args = ap.parse_args(argv)
    if args.list:
        for name, v in VARIANTS.items():
            print(f"{name}: {json.dumps(v)}")
        return 0
    if args.onnxruntime:
        VARIANTS["other-ort"] = {"sys_path": [str(args.onnxruntime.resolve())]}
    names = [n for n in args.variants.split(",") if n]
    unknown = [p for n in names for p in n.split("+") if p not in VARIANTS]
    if unknown or not args.artifact:
        print(f"error: {'unknown variants ' + ', '.join(unknown) if unknown else 'pass --artifact DIR'} (see --list)", file=sys.stderr)
        return 2
    report_json: dict[str, Any] = {"threads": args.threads, "reps": args.reps, "artifacts": {}}
    for art in args.artifact:
        runs: dict[str, list[dict[str, float]]] = {n: [] for n in names}
        for rep in range(args.reps):
            for name in names[rep % len(names):] + names[: rep % len(names)]:
                res = run_variant(art, args.threads, name)
                runs[name].append(res)
                print(f"[{time.strftime('%H:%M:%S')}] {art.name} rep {rep + 1}/{args.reps} {name}: pp{PP} {res[f'pp{PP}']:.1f}, "
                      f"decode {res['tg']:.1f}, peak RSS {res['peak_rss_mb']:.0f} MB, load {res['load_s']:.2f} s, "
                      f"onnxruntime {res.get('onnxruntime')}, load average {os.getloadavg()[0]:.1f}", flush=True)
        report_json["artifacts"][str(art)] = {"runs": runs, "median": report(art, runs)}
    if args.json:
        args.json.write_text(json.dumps(report_json, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
