"""Where a decode step and a 512-token prefill spend their time: edgepipe (onnxruntime) vs llama.cpp.

    python benchmarks/profile_ops.py --int4 DIR --int8 DIR --gguf-dir DIR [--threads 2] [--steps 64]
                                     [--prefill 512] [--reps 3] [--no-ort] [--no-perf] [--perf-freq 2000] [--keep DIR]

``--int4`` / ``--int8``: ``edgepipe build --target raspberrypi5`` / ``--target x86-avx512`` artifacts
of the default model; ``--gguf-dir``: the folder holding its ``Q4_0.gguf``, ``Q4_K_M.gguf`` and
``Q8_0.gguf`` (``python benchmarks/vs_llamacpp.py --no-speed --no-quality`` makes all three under
``$EDGEPIPE_CACHE/vs_llamacpp/<model sha>/``). Results: ``benchmarks/RESULTS.md``. Prints markdown:

a) onnxruntime's own profiler (``enable_profiling``) on the runtime's path (``CausalLM`` +
   ``KVStepper``, IO binding, last-position logits): ``--steps`` greedy decode steps after a
   16-token prompt and 8 warm-up steps, and ``--reps`` prefills of ``--prefill`` tokens after a
   warm-up. Kernel time by op type and the top nodes, and the step's wall time split into kernels,
   the rest of ``session.run`` (executor, binding, the profiler itself) and the host (Python, numpy
   argmax). The same process also times an unprofiled session, to show what profiling adds.
b) ``perf record`` (``--perf-freq`` Hz, self time) of llama-bench (tg ``--steps`` and pp
   ``--prefill``, ``-r --reps``) for each GGUF and of a Python process running the same edgepipe
   workload (perf enabled only around the timed loop), grouped into categories by
   :mod:`benchmarks.profile_parse`. The onnxruntime wheel is stripped: its hot functions are found
   by their unwind records and labelled by their instructions (VNNI dot, FMA, pause loop).

The aarch64 kernel choice (what a Raspberry Pi 5 runs) is ``benchmarks/profile_aarch64.py``.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

if not __package__:  # run as python benchmarks/profile_ops.py: the repo root on sys.path, for `benchmarks.*`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.isa import cpu_flags
from benchmarks.llamacpp import ensure_llamacpp
from benchmarks.profile_parse import (
    PerfRow,
    classify_asm,
    fde_ranges,
    function_of,
    group,
    load_ort_profile,
    ort_breakdown,
    ort_table,
    perf_rows,
    short_dso,
    top_symbols,
)

PROMPT, WARMUP = 16, 8
QUANTS = ("Q4_0", "Q4_K_M", "Q8_0")


def say(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- the edgepipe workloads


def _ids(n: int, vocab: int) -> np.ndarray:
    return (np.arange(n, dtype=np.int64) * 7919 + 13) % max(vocab - 1, 1) + 1  # as runtime.bench


def decode(lm: Any, steps: int, mark: Any = None) -> list[float]:
    """``PROMPT`` tokens, ``WARMUP`` steps, then ``steps`` timed greedy steps (runs 0 .. WARMUP are
    untimed); wall seconds per timed step, argmax included (what ``generate`` does)."""
    state = lm.stepper(PROMPT + WARMUP + steps + 1)
    nxt = int(np.argmax(state.step(_ids(PROMPT, lm.vocab_size), last_only=True)[-1]))
    for _ in range(WARMUP):
        nxt = int(np.argmax(state.step(np.array([nxt]), last_only=True)[-1]))
    mark and mark("enable")
    walls = []
    for _ in range(steps):
        t0 = time.perf_counter()
        nxt = int(np.argmax(state.step(np.array([nxt]), last_only=True)[-1]))
        walls.append(time.perf_counter() - t0)
    mark and mark("disable")
    return walls


def prefill(lm: Any, n: int, reps: int, mark: Any = None) -> list[float]:
    """One warm-up prefill of ``n`` tokens (run 0), then ``reps`` timed ones, each in a fresh stepper."""
    ids = _ids(n, lm.vocab_size)
    lm.stepper(n).step(ids, last_only=True)
    mark and mark("enable")
    walls = []
    for _ in range(reps):
        state = lm.stepper(n)
        t0 = time.perf_counter()
        int(np.argmax(state.step(ids, last_only=True)[-1]))
        walls.append(time.perf_counter() - t0)
    mark and mark("disable")
    return walls


def _lm(art: Path, threads: int, profile_prefix: str | None = None) -> Any:
    import onnxruntime as ort

    from edgepipe.runtime.model import CausalLM, session_options

    lm = CausalLM(art, threads=threads)
    if profile_prefix:  # the same options as the runtime's, with onnxruntime's profiler on
        so = session_options(threads)
        so.enable_profiling = True
        so.profile_file_prefix = profile_prefix
        lm.session = ort.InferenceSession(str(art / lm.spec.filename), so, providers=["CPUExecutionProvider"])
    return lm


def runs_per_prefill(tokens: int, chunk: int) -> int:
    """Session runs of one prefill of ``tokens``: the runtime feeds ``chunk`` tokens per run (0: all at once)."""
    return 1 if chunk <= 0 else -(-tokens // chunk)


def ort_profile(art: Path, kind: str, args: argparse.Namespace, tmp: Path) -> list[str]:
    """Part (a) for one artifact and workload: markdown lines."""
    plain = _lm(art, args.threads)
    run = (lambda lm: decode(lm, args.steps)) if kind == "decode" else (lambda lm: prefill(lm, args.prefill, args.reps))
    run(plain)  # untimed: page cache, prepacking
    plain_walls = run(plain)
    del plain
    lm = _lm(art, args.threads, str(tmp / f"ort-{art.name}-{kind}"))
    walls = run(lm)
    path = lm.session.end_profiling()
    # a prefill is one session run per chunk of the runtime's prefill_chunk tokens: skip the warm-up
    # prefill's runs and give every figure per prefill (per decode step: one run each)
    per_unit = 1 if kind == "decode" else runs_per_prefill(args.prefill, lm.prefill_chunk)
    first = 1 + WARMUP if kind == "decode" else per_unit
    b = ort_breakdown(load_ort_profile(path), first_run=first)
    n = max(b.runs // per_unit, 1)
    wall_us = 1e6 * sum(walls)
    host = wall_us - b.run_us
    per = "step" if kind == "decode" else f"{args.prefill}-token prefill"
    lines = [
        f"**{art.name}, {kind}** ({n} × {per}, {b.runs} session runs; wall per {per}: profiled {wall_us / n:.0f} µs, unprofiled "
        f"{1e6 * sum(plain_walls) / len(plain_walls):.0f} µs in the same process)",
        "",
        f"| of the profiled wall | µs per {per} | share |",
        "|---|---:|---:|",
        f"| onnxruntime kernels (summed node time) | {b.kernel_us / n:.0f} | {100 * b.kernel_us / wall_us:.1f} % |",
        f"| session.run outside kernels | {b.outside_kernels_us / n:.0f} | {100 * b.outside_kernels_us / wall_us:.1f} % |",
        f"| host: Python loop, binding, argmax | {host / n:.0f} | {100 * host / wall_us:.1f} % |",
        "",
        *ort_table(b, per=n, top=args.top),
        "",
    ]
    Path(path).unlink(missing_ok=True)
    return lines


# ---------------------------------------------------------------- perf


def perf_report(data: Path) -> str:
    cmd = ["perf", "report", "-i", str(data), "--stdio", "--no-children", "--sort", "dso,sym", "--percent-limit", "0.01"]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout


def perf_record(cmd: list[str], data: Path, freq: int, *, control: bool = False, env: dict | None = None) -> tuple[str, str]:
    """``perf record`` of ``cmd`` (for ``control``, events start disabled and the child turns them
    on through ``EDGEPIPE_PERF_CTL``); returns ``perf report``'s text and the command's stdout."""
    rec = ["perf", "record", "-q", "-F", str(freq), "-o", str(data)]
    env = dict(env or os.environ)
    if control:
        ctl, ack = data.with_suffix(".ctl"), data.with_suffix(".ack")
        for f in (ctl, ack):
            f.unlink(missing_ok=True)
            os.mkfifo(f)
        rec += ["-D", "-1", f"--control=fifo:{ctl},{ack}"]
        env["EDGEPIPE_PERF_CTL"] = f"{ctl},{ack}"
    out = subprocess.run([*rec, "--", *cmd], check=True, env=env, stdout=subprocess.PIPE, text=True).stdout
    return perf_report(data), out


def tok_s(stdout: str) -> str:
    """The tok/s a recorded run printed: llama-bench's table cell (``123.45 ± 1.2``) or the
    workload child's ``tok/s`` line."""
    m = re.search(r"\|\s*(?:tg|pp)\d+\s*\|\s*([\d.]+ ± [\d.]+)", stdout) or re.search(r"tok/s ([\d.]+)", stdout)
    return m[1] if m else "?"


def _perf_mark() -> Any:
    """``mark("enable" | "disable")`` writes to perf's control fifo (no-op outside ``perf_record``)."""
    spec = os.environ.get("EDGEPIPE_PERF_CTL")
    if not spec:
        return None
    ctl_path, ack_path = spec.split(",")
    ctl = open(ctl_path, "w")  # noqa: SIM115 - kept open for the process
    ack = open(ack_path)  # noqa: SIM115

    def mark(cmd: str) -> None:
        ctl.write(cmd + "\n")
        ctl.flush()
        ack.readline()

    return mark


def ort_library() -> Path:
    import onnxruntime

    capi = Path(onnxruntime.__file__).parent / "capi"
    return next(capi.glob("onnxruntime_pybind11_state*.so"))


def label_stripped(rows: list[PerfRow], lib: Path, top: int = 40) -> dict[str, str]:
    """Categories for the rows that are bare addresses in onnxruntime's stripped library: addresses
    are gathered into functions by their unwind records and the ``top`` hottest functions are
    labelled by their instructions (:func:`classify_asm`); the rest stay unlabelled."""
    name = lib.name
    frames = subprocess.run(["readelf", "--debug-dump=frames", str(lib)], capture_output=True, text=True).stdout
    ranges = fde_ranges(frames)
    func_of: dict[str, tuple[int, int] | None] = {}
    heat: dict[tuple[int, int], float] = defaultdict(float)
    hottest: dict[tuple[int, int], tuple[float, int]] = {}
    for r in rows:
        if short_dso(r.dso) == short_dso(name) and r.symbol.startswith("0x"):
            addr = int(r.symbol, 16)
            f = func_of[r.symbol] = function_of(ranges, addr)
            if f:
                heat[f] += r.pct
                hottest[f] = max(hottest.get(f, (0.0, addr)), (r.pct, addr))
    labels: dict[tuple[int, int], str] = {}
    for a, b in sorted(heat, key=lambda f: -heat[f])[:top]:
        asm = _objdump(lib, a, b)
        hot = next((ln for ln in asm.splitlines() if ln.strip().startswith(f"{hottest[(a, b)][1]:x}:")), None)
        labels[(a, b)] = classify_asm(asm, hot)
    out = {sym: labels[f] for sym, f in func_of.items() if f in labels}
    # hand-written MLAS kernels (.S files) have no unwind record: the code around the address
    loose = sorted((r for r in rows if r.symbol in func_of and func_of[r.symbol] is None), key=lambda r: -r.pct)
    for r in loose[:top]:
        addr = int(r.symbol, 16)
        out[r.symbol] = classify_asm(_objdump(lib, addr - 64, addr + 64))
    return out


def _objdump(lib: Path, start: int, stop: int) -> str:
    cmd = ["objdump", "-d", "--no-show-raw-insn", f"--start-address={start}", f"--stop-address={stop}", str(lib)]
    return subprocess.run(cmd, capture_output=True, text=True).stdout


def perf_table(title: str, cols: dict[str, dict[str, float]], tops: dict[str, list[PerfRow]], speed: dict[str, str]) -> list[str]:
    """Markdown: categories (rows) x runs (columns), % of the samples; then each run's top symbols."""
    cats = sorted({c for col in cols.values() for c in col}, key=lambda c: -max(col.get(c, 0) for col in cols.values()))
    lines = [f"**{title}** (% of samples)", "", "| category | " + " | ".join(cols) + " |",
             "|---|" + "---:|" * len(cols), "| tok/s while recorded | " + " | ".join(speed[c] for c in cols) + " |"]
    for c in cats:
        lines.append(f"| {c} | " + " | ".join(f"{col.get(c, 0):.1f}" for col in cols.values()) + " |")
    lines.append("")
    for name, rows in tops.items():
        lines.append(f"top symbols, {name}: " + "; ".join(f"{r.symbol[:60]} {r.pct:.1f}" for r in rows))
        lines.append("")
    return lines


def perf_side(args: argparse.Namespace, tmp: Path, kind: str) -> list[str]:
    """Part (b) for one workload (decode = tg, prefill = pp): llama-bench per quant, edgepipe per artifact."""
    lc = ensure_llamacpp(say)
    cols: dict[str, dict[str, float]] = {}
    tops: dict[str, list[PerfRow]] = {}
    speed: dict[str, str] = {}
    for q in QUANTS:
        gguf = Path(args.gguf_dir) / f"{q}.gguf"
        n = ["-p", "0", "-n", str(args.steps)] if kind == "decode" else ["-p", str(args.prefill), "-n", "0"]
        cmd = [str(lc.bench), "-m", str(gguf), "-t", str(args.threads), "-r", str(args.reps), *n]
        say(f"perf: llama-bench {q} {kind}")
        report, out = perf_record(cmd, tmp / f"llama-{q}-{kind}.data", args.perf_freq)
        rows = perf_rows(report)
        cols[f"llama.cpp {q}"], tops[f"llama.cpp {q}"], speed[f"llama.cpp {q}"] = group(rows), top_symbols(rows), tok_s(out)
    lib = ort_library()
    for label, art in (("int4", args.int4), ("int8", args.int8)):
        cmd = [sys.executable, str(Path(__file__).resolve()), "--workload", kind, "--artifact", str(art),
               "--threads", str(args.threads), "--steps", str(args.steps), "--prefill", str(args.prefill), "--reps", str(args.reps)]
        say(f"perf: edgepipe {label} {kind}")
        report, out = perf_record(cmd, tmp / f"ep-{label}-{kind}.data", args.perf_freq, control=True)
        rows = perf_rows(report)
        speed[f"edgepipe {label}"] = tok_s(out)
        labels = label_stripped(rows, lib)
        cols[f"edgepipe {label}"] = group(rows, labels)
        tops[f"edgepipe {label}"] = [PerfRow(r.pct, r.dso, labels.get(r.symbol, r.symbol), r.kernel) for r in top_symbols(rows)]
    return perf_table(f"perf, {kind} ({'tg' if kind == 'decode' else 'pp'})", cols, tops, speed)


# ---------------------------------------------------------------- main


def machine_lines(args: argparse.Namespace) -> list[str]:
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), "?")
    isa = sorted(f for f in cpu_flags() if re.match(r"avx512|amx|avx_vnni|avx2", f))
    import onnxruntime

    return [f"CPU: {model}, {os.cpu_count()} cores, flags {' '.join(isa)}; onnxruntime {onnxruntime.__version__}; "
            f"threads {args.threads}, decode {args.steps} steps, prefill {args.prefill} tokens x {args.reps}; "
            f"load average {' '.join(f'{x:.2f}' for x in os.getloadavg())}", ""]


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--int4", type=Path)
    p.add_argument("--int8", type=Path)
    p.add_argument("--gguf-dir", type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--steps", type=int, default=64)
    p.add_argument("--prefill", type=int, default=512)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--top", type=int, default=8, help="top nodes listed per profile")
    p.add_argument("--perf-freq", type=int, default=2000)
    p.add_argument("--keep", type=Path, help="keep perf data and profiles in this folder")
    p.add_argument("--no-ort", action="store_true", help="skip part (a)")
    p.add_argument("--no-perf", action="store_true", help="skip part (b)")
    p.add_argument("--workload", choices=("decode", "prefill"), help=argparse.SUPPRESS)  # the child perf records
    p.add_argument("--artifact", type=Path, help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.workload:  # the child under perf: the workload only, perf on around the timed loop
        lm = _lm(args.artifact, args.threads)
        mark = _perf_mark()
        walls = decode(lm, args.steps, mark) if args.workload == "decode" else prefill(lm, args.prefill, args.reps, mark)
        tokens = len(walls) if args.workload == "decode" else args.prefill * len(walls)
        print(f"tok/s {tokens / sum(walls):.2f}")
        return 0
    out = machine_lines(args)
    with tempfile.TemporaryDirectory(prefix="profile_ops-") as t:
        tmp = args.keep or Path(t)
        tmp.mkdir(parents=True, exist_ok=True)
        if not args.no_ort:
            out += ["### onnxruntime profiler", ""]
            for art in (args.int4, args.int8):
                for kind in ("decode", "prefill"):
                    say(f"onnxruntime profile: {art.name} {kind}")
                    out += ort_profile(art, kind, args, tmp)
        if not args.no_perf:
            for kind in ("decode", "prefill"):
                out += perf_side(args, tmp, kind)
    out.append(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
