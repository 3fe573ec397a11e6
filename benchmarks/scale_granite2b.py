"""Granite 2B at full size: peak RSS of the whole build process tree, and wall time per stage.

    python benchmarks/scale_granite2b.py [--target raspberrypi5] [--out DIR] [--keep-cache]
                                         [--cache DIR] [--interval 0.25] [--json OUT.json] [--until STAGE]

1. Creates (once, cached under ``$EDGEPIPE_CACHE/models/``; about a minute and 5.5 GB of RAM) a
   random-initialised ``GraniteForCausalLM`` of IBM Granite 3.x 2B's exact shape — hidden 2048, 40 layers,
   32 heads / 8 KV heads, intermediate 8192, vocab 49155, tied embeddings, Granite's embedding / residual /
   attention multipliers and logits scaling — saved in bfloat16 as the real checkpoint is
   (2.53 B parameters, 5.07 GB of safetensors): ``granite3-2b`` of ``benchmarks/random_models.py``.
   Hub weights cannot be downloaded here; the tokenizer is the default model's (SmolLM2's 49152-token
   BPE: every id fits Granite's vocab).
2. Runs ``edgepipe build --model <it> --target <target> --out <out> --json`` as a subprocess with
   a **fresh stage cache** (nothing reused: the export runs), and samples the RSS of the build
   process and all its children (the builder's export process, the benchmark process) every
   ``--interval`` seconds. Each progress line the build prints is time-stamped, so the peak is
   attributed to the stage that was running.
3. Prints the table: per stage wall time and peak process-tree RSS, the whole build's peak, the
   artifact's size against ``edgepipe estimate``'s prediction, and the accuracy against the fp32
   export. Random weights make perplexity meaningless, so the agreement figures are what count:
   top-1 agreement, mean KL of the next-token distributions and the logits' cosine similarity.

Goal (issue 6): peak RSS <= 10 GB, so that the build fits a 16 GB laptop.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as python benchmarks/scale_granite2b.py: the repo root on sys.path, for `benchmarks.*`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.random_models import random_model_dir

GOAL_GB = 10.0
# Stages, in order, by the first words of the build's progress lines
STAGES = [
    ("inspect", ("model ",)),
    ("export", ("exporting",)),
    ("allocate", ("sensitivity", "allocation")),  # only with a size budget (issue 12)
    ("calibrate", ("calibrating",)),
    ("quantize", ("quantized ",)),
    ("validate-accuracy", ("validating accuracy", "fp32 reference", "scored")),
    ("validate-throughput", ("measuring throughput",)),
    ("package", ("artifact written",)),
]


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class TreeRss:
    """Samples the summed RSS of a process and its descendants in a thread."""

    def __init__(self, pid: int, interval: float):
        import psutil

        self.proc = psutil.Process(pid)
        self.interval = interval
        self.samples: list[tuple[float, float]] = []  # (time, bytes)
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        import psutil

        while not self._stop.is_set():
            total = 0
            try:
                procs = [self.proc, *self.proc.children(recursive=True)]
            except psutil.NoSuchProcess:
                break
            for p in procs:
                try:
                    total += p.memory_info().rss
                except psutil.Error:
                    pass
            self.samples.append((time.time(), float(total)))
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeRss:
        self.thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self.thread.join()


def stage_of(line: str) -> str | None:
    text = line.split("] ", 1)[-1]
    for name, prefixes in STAGES:
        if text.startswith(prefixes):
            return name
    return None


def _later(stage: str, until: str | None) -> bool:
    names = [n for n, _ in STAGES]
    return until is not None and names.index(stage) > names.index(until)


def run_build(model: Path, target: str, out: Path, cache: Path, interval: float, until: str | None = None) -> dict[str, Any]:
    """The build as a subprocess, its tree's RSS sampled; with ``until``, stopped (SIGTERM) when a
    stage after that one starts, so one stage's cost is measured without the hour after it."""
    env = dict(os.environ, EDGEPIPE_CACHE=str(cache))
    cmd = [sys.executable, "-m", "edgepipe.cli", "build", "--model", str(model), "--target", target, "--out", str(out), "--json",
           "--allow-untrained"]  # a random-init model of Granite 2B's shape, on purpose
    t0 = time.time()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    marks: list[tuple[float, str]] = [(t0, "inspect")]
    lines: list[str] = []
    with TreeRss(proc.pid, interval) as rss:
        assert proc.stderr is not None
        for line in proc.stderr:
            line = line.rstrip()
            lines.append(line)
            say(line)
            st = stage_of(line)
            if st and _later(st, until):
                proc.terminate()
                break
            if st and st != marks[-1][1]:
                marks.append((time.time(), st))
        stdout = proc.stdout.read() if proc.stdout else ""
        proc.wait()
    t1 = time.time()
    stages = []
    for i, (ts, name) in enumerate(marks):
        te = marks[i + 1][0] if i + 1 < len(marks) else t1
        peak = max((b for t, b in rss.samples if ts <= t <= te), default=0.0)
        stages.append({"stage": name, "wall_s": round(te - ts, 1), "peak_rss_gb": round(peak / 1e9, 2)})
    result = json.loads(stdout.strip().splitlines()[-1]) if stdout.strip() else {}
    return {
        "exit_code": proc.returncode,
        "wall_s": round(t1 - t0, 1),
        "peak_rss_gb": round(max((b for _, b in rss.samples), default=0.0) / 1e9, 2),
        "samples": len(rss.samples),
        "stages": stages,
        "result": result,
        "stderr_tail": lines[-5:],
    }


def estimate(model: Path, target: str) -> dict[str, Any]:
    import edgepipe

    return edgepipe.estimate_for(edgepipe.inspect_model(model), edgepipe.load_target(target))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--target", default="raspberrypi5")
    ap.add_argument("--out", type=Path, default=None, help="artifact folder (default: a temp folder, removed)")
    ap.add_argument("--keep-cache", action="store_true", help="keep the run's stage cache (10 GB fp32 export)")
    ap.add_argument(
        "--cache", type=Path, default=None,
        help="use (and keep) this stage cache: a second run then reuses its export/quantize stages (not a cold run)",
    )
    ap.add_argument("--interval", type=float, default=0.25, help="RSS sampling period, seconds")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    ap.add_argument("--until", choices=[n for n, _ in STAGES], default=None,
                    help="stop the build when the stage after this one starts (e.g. --until allocate: the size allocation's cost)")
    args = ap.parse_args(argv)

    from edgepipe.models import cache_root

    root = cache_root()
    model = random_model_dir("granite3-2b", say)
    (root / "bench").mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="scale-granite2b-", dir=root / "bench"))
    out = args.out or work / "artifact"
    try:
        run = run_build(model, args.target, out, args.cache or work / "cache", args.interval, args.until)
        est = estimate(model, args.target)
        manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").is_file() else {}
    finally:
        if not args.keep_cache:
            shutil.rmtree(work / "cache", ignore_errors=True)
    m = manifest.get("metrics", {})
    acc = m.get("accuracy", {})
    report = {
        "model": "random-init Granite 3.x 2B shape (bf16 safetensors, 2.53 B parameters)",
        "target": args.target,
        "machine": {"cpus": os.cpu_count(), "load_avg_after": os.getloadavg()},
        "build": run,
        "artifact_mb": m.get("artifact_mb"),
        "estimate_artifact_mb": est.get("artifact_mb"),
        "accuracy": acc,
        "verdict": manifest.get("verdict"),
        "failed_budgets": manifest.get("failed_budgets"),
        "timings": m.get("timings"),
    }
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
    print(f"\nGranite-2B-shape build for {args.target}: exit {run['exit_code']}, wall {run['wall_s'] / 60:.1f} min")
    print("\n| stage | wall s | peak RSS of the process tree, GB |\n|---|---:|---:|")
    for s in run["stages"]:
        print(f"| {s['stage']} | {s['wall_s']} | {s['peak_rss_gb']} |")
    ok = run["peak_rss_gb"] <= GOAL_GB
    print(f"| **whole build** | **{run['wall_s']}** | **{run['peak_rss_gb']}** ({'within' if ok else 'OVER'} the {GOAL_GB:.0f} GB goal) |")
    if m:
        am, em = m.get("artifact_mb"), est.get("artifact_mb")
        print(f"\nartifact {am} MB, estimate predicted {em} MB ({100 * (em / am - 1):+.1f} %)" if am and em else "")
        print(
            f"accuracy vs the fp32 export ({acc.get('eval_tokens')} scored tokens): top-1 agreement "
            f"{acc.get('top1_agreement')}, mean KL {acc.get('kl_divergence')}, logit cosine {acc.get('logit_cosine')}, "
            f"ppl {acc.get('reference_perplexity')} -> {acc.get('perplexity')} (random weights: ppl is not meaningful)"
        )
        print(f"verdict {manifest.get('verdict')}, failed budgets: {manifest.get('failed_budgets')}")
    if args.out is None:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if run["exit_code"] in (0, 3) else 1


if __name__ == "__main__":
    sys.exit(main())
