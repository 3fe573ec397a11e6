"""Speed for ``benchmarks/vs_llamacpp.py`` (and ``vs_genai.py`` / ``session_options.py``, which time edgepipe
the same way): llama-bench and edgepipe's decode / prefill loop in fresh processes under ``/usr/bin/time -v``,
interleaved A B A B, with this machine's read bandwidth (``benchmarks/bandwidth.py``) measured between rounds."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.bandwidth import METHOD as BW_METHOD
from benchmarks.bandwidth import read_bandwidth_gbs
from benchmarks.llamacpp import Paths
from benchmarks.vs_common import grab, say

SPEED_QUANTS = ("Q8_0", "Q4_0", "Q4_K_M")  # the ones with an edgepipe counterpart (vs_edgepipe_side.PAIRS)
# the edgepipe artifacts timed right after each llama.cpp quant in the interleaved loop (each label once)
TIMED_NEXT_TO = {"Q8_0": ("int8",), "Q4_0": ("int4", "int4@Q4_0"), "Q4_K_M": ("int4@Q4_K_M",)}
PP = (128, 512)
TG = 128
PASSIVE = "(OMP passive)"
NOSPIN = "(no spinning)"


EDGEPIPE_SPEED_CODE = r"""
import json, sys, time
import numpy as np
from pathlib import Path
from edgepipe.runtime.model import CausalLM
from edgepipe.runtime.facts import peak_rss_mb
art, threads, pps, tg = sys.argv[1], int(sys.argv[2]), [int(x) for x in sys.argv[3].split(",")], int(sys.argv[4])
lm = CausalLM(art, threads=threads, spinning=sys.argv[5] == "spin")
vocab = lm.spec.vocab_size
ids = (np.arange(max(pps), dtype=np.int64) * 7919 + 13) % max(vocab - 1, 1) + 1   # as device.bench
# as generate() runs: the KV stepper (preallocated cache, IO binding), the last position's logits only
def prefill(p):
    lm.stepper(p).step(ids[:p], last_only=True)
def decode(n):
    st = lm.stepper(n + 1)
    nxt = int(np.argmax(st.step(ids[:1], last_only=True)[-1]))
    t0 = time.perf_counter()
    for _ in range(n):
        nxt = int(np.argmax(st.step(np.array([nxt]), last_only=True)[-1]))
    return n / (time.perf_counter() - t0)
out = {}
for p in pps:   # warm-up once per shape, like llama-bench's warm-up run per test
    prefill(p)
decode(4)
for p in pps:
    t0 = time.perf_counter()
    prefill(p)
    out[f"pp{p}"] = p / (time.perf_counter() - t0)
out[f"tg{tg}"] = decode(tg)
out["vmhwm_mb"] = peak_rss_mb()
out["threads"] = lm.session.get_session_options().intra_op_num_threads
out["logits_slice"] = lm.can_slice_logits
print(json.dumps(out))
"""


# the environment of every timed command: with --isa avx2, the CPUID mask's (benchmarks/isa.py;
# vs_llamacpp.main sets it)
SPEED_ENV: dict[str, str] | None = None


def time_v(cmd: list[Any], env: dict[str, str] | None = None) -> tuple[str, float]:
    """Run under /usr/bin/time -v (in :data:`SPEED_ENV` unless ``env`` is given); return stdout and the peak RSS in MB."""
    env = SPEED_ENV if env is None else env
    with tempfile.NamedTemporaryFile("r", suffix=".time") as tf:
        r = subprocess.run(
            ["/usr/bin/time", "-v", "-o", tf.name, *map(str, cmd)], capture_output=True, text=True, env=env
        )
        if r.returncode:
            raise RuntimeError(f"{' '.join(map(str, cmd))} failed: {r.stderr.strip()[-800:]}")
        rss = grab(r"Maximum resident set size \(kbytes\):\s*(\d+)", tf.read())
    return r.stdout, (rss or 0) / 1024


def llama_speed(lc: Paths, gguf: Path, threads: int, passive: bool = False) -> dict[str, float]:
    """llama-bench; ``passive``: OMP_WAIT_POLICY=passive, so that OpenMP threads sleep at barriers
    instead of spinning (spinning collapses when other processes share the cores)."""
    env = dict(SPEED_ENV or os.environ, OMP_WAIT_POLICY="passive") if passive else None
    out, rss = time_v(
        env=env,
        cmd=[
            lc.bench,
            "-m",
            gguf,
            "-p",
            ",".join(map(str, PP)),
            "-n",
            TG,
            "-t",
            threads,
            "-r",
            1,
            "-o",
            "json",
        ],
    )
    res: dict[str, float] = {"peak_rss_mb": rss}
    for row in json.loads(out):
        key = f"pp{row['n_prompt']}" if row["n_gen"] == 0 else f"tg{row['n_gen']}"
        res[key] = float(row["avg_ts"])
    return res


def edgepipe_speed(art: Path, threads: int, spinning: bool = True) -> dict[str, float]:
    """``spinning=False``: onnxruntime's threads sleep between ops (the counterpart of llama.cpp's
    OMP_WAIT_POLICY=passive rows)."""
    out, rss = time_v(
        [sys.executable, "-c", EDGEPIPE_SPEED_CODE, art, threads, ",".join(map(str, PP)), TG, "spin" if spinning else "nospin"]
    )
    res = json.loads(out.strip().splitlines()[-1])
    res["peak_rss_mb"] = rss
    return res


def edgepipe_runtime_bench(art: Path, threads: int) -> dict[str, Any]:
    out, rss = time_v(
        [sys.executable, "-m", "edgepipe.runtime", "bench", art, "--json", "--threads", threads]
    )
    res = json.loads(out.strip().splitlines()[-1])
    res["time_v_peak_rss_mb"] = rss
    return res


Timed = Callable[[], dict[str, float]]


def _speed_order(
    args: argparse.Namespace, lc: Paths, ggufs: dict[str, Path], arts: dict[str, Path], T: int
) -> list[tuple[str, Timed]]:
    """A B A B: each llama.cpp quant (spin-wait and passive OpenMP) next to its edgepipe counterparts
    (:data:`TIMED_NEXT_TO`: the size-matched artifacts next to the quant whose size they match)."""
    order: list[tuple[str, Timed]] = []
    variants = T > 1 and not args.no_passive
    quants = [q for q in TIMED_NEXT_TO if q in args.speed_quants] + (["f32"] if args.speed_f32 else [])
    for lq in quants:
        order.append((lq, lambda g=ggufs[lq], T=T: llama_speed(lc, g, T)))
        for e in (e for e in TIMED_NEXT_TO.get(lq, ()) if e in arts):
            order.append((e, lambda a=arts[e], T=T: edgepipe_speed(a, T)))
            if variants:
                order.append((f"{e} {NOSPIN}", lambda a=arts[e], T=T: edgepipe_speed(a, T, spinning=False)))
        if variants:
            order.append((f"{lq} {PASSIVE}", lambda g=ggufs[lq], T=T: llama_speed(lc, g, T, passive=True)))
    return order


def _bandwidth_between(work: Path, threads: int, bw_runs: list[float]) -> None:
    bw_runs.append(read_bandwidth_gbs(work, threads)["read_gbs"])
    say(f"read bandwidth: {bw_runs[-1]:.1f} GB/s")


def speed_results(
    args: argparse.Namespace, lc: Paths, ggufs: dict[str, Path], arts: dict[str, Path], work: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Interleaved speed runs per thread count, and the read bandwidth measured before and between rounds."""
    bw_runs: list[float] = []
    _bandwidth_between(work, args.threads[0], bw_runs)
    speed: dict[str, Any] = {}
    for T in args.threads:
        order = _speed_order(args, lc, ggufs, arts, T)
        runs = speed[f"t{T}"] = {}
        for rep in range(args.reps):
            for name, fn in order:
                r = fn()
                r["rep"], r["load1"] = rep, os.getloadavg()[0]
                runs.setdefault(name, []).append(r)
                say(
                    f"t{T} rep {rep + 1}/{args.reps} {name}: "
                    + ", ".join(f"{k} {v:.1f}" for k, v in r.items() if k != "rep")
                )
            _bandwidth_between(work, args.threads[0], bw_runs)  # between rounds: other jobs come and go
    bandwidth = {
        "read_gbs": max(bw_runs),
        "runs_gbs": bw_runs,
        "threads": args.threads[0],
        "method": f"{BW_METHOD} (benchmarks/bandwidth.py), highest of {len(bw_runs)} measurements spread over the run",
    }
    return speed, bandwidth
