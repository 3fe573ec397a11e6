"""Plain vs prompt-lookup (and vs draft-model) decoding on one artifact: decode tok/s and identical greedy text.

Two workloads, greedy, on the same loaded model:

- **extraction**: answers that quote the prompt (a passage of Austen from ``../shared/data/text``,
  else the packaged eval text, then a request to copy or quote it);
- **free**: chat prompts whose answers quote nothing.

Decode tok/s of one generation is (tokens - 1) / (time of the last token - time of the first):
prefill is the same for every mode and left out. Each rep runs every prompt once per mode, the
modes of one prompt back to back in alternating order (A B, then B A); a workload's tok/s in a rep
is its summed tokens / summed decode time, and its ratio is the median over reps of each rep's
mode / plain. Tokens per step (tokens / model calls, the prefill counted) does not depend on load.
Every mode's text is compared with plain greedy's token for token; the first difference of each
prompt is printed with plain decoding's top-2 logit margin there, and the run fails (exit 1) when
a margin is not a near-tie (``TIE_MARGIN``: kernel numerics, see README).

    python benchmarks/speculative.py [--artifact DIR] [--draft DIR] [--lookup 8] [--threads 2] [--reps 3] [--json]

With no ``--artifact`` the default model is built for ``raspberrypi5`` once into
``<edgepipe cache>/bench/smollm2-raspberrypi5`` and reused.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

SHARED_TEXT = Path(__file__).resolve().parent.parent.parent / "shared" / "data" / "text"
GOALS = {"extraction": 1.5, "free": 0.97}
# int4/int8 artifacts: onnxruntime's int8-activation MatMulNBits rounds one row differently from
# several, so a verify step's logits differ from a one-token step's (up to ~0.8 on the default
# model) and a near-tie can go the other way. A difference where plain decoding's top-2 margin is
# wider than this is a bug; below it, kernel numerics (reported, not failed).
TIE_MARGIN = 0.5
FREE = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain how photosynthesis works to a ten-year-old.",
    "Give me five tips for learning a new language, with a sentence on each.",
)


def chat(user: str, assistant: str = "") -> str:
    return f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{assistant}"


def passages(n: int, words: int = 120) -> list[str]:
    """``n`` passages of about ``words`` words, from the start of paragraphs far apart."""
    files = sorted(SHARED_TEXT.glob("*.txt")) if SHARED_TEXT.is_dir() else []
    text = files[0].read_text(encoding="utf-8") if files else resources.files("edgepipe.data").joinpath("eval.txt").read_text(encoding="utf-8")
    paras = [" ".join(p.split()) for p in text.split("\n\n")]
    paras = [p for p in paras if len(p.split()) >= words]
    picks = [paras[i * len(paras) // n] for i in range(n)]
    return [" ".join(p.split()[:words]) for p in picks]


def workloads() -> dict[str, list[str]]:
    a, b, c = passages(3)
    head = lambda p: " ".join(p.split()[:4])  # noqa: E731
    extraction = [
        chat(f"Copy this text:\n{a}", f"Here is the text:\n\n{head(a)}"),
        chat(f"{b}\n\nQuote the passage above in full, word for word.", f'"{head(b)}'),
        f"{c}\n\nOnce more, the same text:\n\n{head(c)}",
    ]
    return {"extraction": extraction, "free": [chat(p) for p in FREE]}


def default_artifact() -> Path:
    import edgepipe
    from edgepipe.models import cache_root

    out = cache_root() / "bench" / "smollm2-raspberrypi5"
    if not (out / "manifest.json").is_file():
        print(f"building the default model for raspberrypi5 into {out} (once)", file=sys.stderr, flush=True)
        edgepipe.build(target="raspberrypi5", out=out, progress=lambda m: print(f"  build: {m}", file=sys.stderr, flush=True))
    return out


def timed(lm: Any, ids: list[int], cfg: Any, draft: Any = None) -> dict[str, Any]:
    from edgepipe.runtime.generate import generate
    from edgepipe.runtime.speculative import SpecStats

    stats = SpecStats()
    stamps: list[float] = []
    tokens: list[int] = []
    for t in generate(lm, ids, cfg, draft=draft, stats=stats):
        stamps.append(time.perf_counter())
        tokens.append(t)
    span = stamps[-1] - stamps[0] if len(stamps) > 1 else 0.0
    return {"tokens": tokens, "decoded": len(tokens) - 1, "seconds": span, "stats": stats}


def divergence(lm: Any, ids: list[int], plain: list[int], other: list[int]) -> tuple[str, float]:
    """The first differing token and plain decoding's top-2 logit margin there (inf: a prefix)."""
    i = next((i for i, (x, y) in enumerate(zip(plain, other, strict=False)) if x != y), min(len(plain), len(other)))
    if i >= min(len(plain), len(other)):
        return f"one output is a prefix of the other ({len(plain)} vs {len(other)} tokens)", float("inf")
    state = lm.stepper(len(ids) + i + 1)
    logits = state.step(np.asarray(ids, dtype=np.int64), last_only=True)
    for t in plain[:i]:
        logits = state.step(np.asarray([t], dtype=np.int64), last_only=True)
    top = np.sort(logits[-1])[-2:]
    margin = float(top[1] - top[0])
    return f"first difference at token {i} ({plain[i]} vs {other[i]}); plain decoding's top-2 logit margin there: {margin:.3f}", margin


def run(args: argparse.Namespace) -> dict[str, Any]:
    from tokenizers import Tokenizer

    from edgepipe.runtime.artifact import open_draft
    from edgepipe.runtime.generate import GenerationConfig
    from edgepipe.runtime.model import CausalLM

    artifact = args.artifact or default_artifact()
    lm = CausalLM(artifact, threads=args.threads)
    draft = open_draft(artifact, args.draft, threads=args.threads) if args.draft else None
    tok = Tokenizer.from_file(str(artifact / "tokenizer.json"))
    base = GenerationConfig(max_new_tokens=args.max_new_tokens)
    modes: dict[str, tuple[Any, Any]] = {"plain": (base, None), "lookup": (GenerationConfig(max_new_tokens=args.max_new_tokens, lookup=args.lookup), None)}
    if draft is not None:
        modes["draft"] = (GenerationConfig(max_new_tokens=args.max_new_tokens, draft_tokens=args.draft_tokens), draft)
    loads = [os.getloadavg()]
    rows: list[dict[str, Any]] = []
    texts: dict[tuple[str, int, str], list[int]] = {}
    differences: list[dict[str, Any]] = []
    for rep in range(args.reps):
        for work, prompts in workloads().items():
            runs_of: dict[str, list[dict[str, Any]]] = {m: [] for m in modes}
            for i, p in enumerate(prompts):  # the modes of one prompt run back to back, alternating order
                for mode in list(modes) if (rep + i) % 2 == 0 else list(reversed(modes)):
                    cfg, d = modes[mode]
                    runs_of[mode].append(timed(lm, tok.encode(p).ids, cfg, d))
                    texts.setdefault((work, i, mode), runs_of[mode][-1]["tokens"])
            for mode, runs in runs_of.items():
                s = [r["stats"] for r in runs]
                rows.append({
                    "rep": rep, "workload": work, "mode": mode,
                    "tok_s": sum(r["decoded"] for r in runs) / max(sum(r["seconds"] for r in runs), 1e-9),
                    "tokens": sum(len(r["tokens"]) for r in runs), "steps": sum(x.steps for x in s),
                    "drafted": sum(x.drafted for x in s), "accepted": sum(x.accepted for x in s),
                    "backoffs": sum(x.backoffs for x in s), "off_steps": sum(x.off_steps for x in s),
                })
                if not args.json:
                    r = rows[-1]
                    print(f"rep {rep} {work:10s} {mode:6s} {r['tok_s']:7.2f} tok/s  {r['tokens']} tokens in {r['steps']} steps, "
                          f"accepted {r['accepted']}/{r['drafted']}, back-offs {r['backoffs']}", flush=True)
        loads.append(os.getloadavg())
    for (work, i, mode), toks in sorted(texts.items()):
        plain = texts[(work, i, "plain")]
        if mode != "plain" and toks != plain:
            what, margin = divergence(lm, tok.encode(workloads()[work][i]).ids, plain, toks)
            differences.append({"where": f"{work} prompt {i}, {mode}", "what": what, "margin": margin})
    out = summarize(args, artifact, rows, loads, differences)
    out["compared"] = sum(1 for (_, _, mode) in texts if mode != "plain")
    return out


def summarize(args: argparse.Namespace, artifact: Path, rows: list[dict[str, Any]], loads: list[Any], differences: list[dict[str, Any]]) -> dict[str, Any]:
    med: dict[str, dict[str, float]] = {}
    ratios: dict[str, dict[str, float]] = {}
    per_step: dict[str, dict[str, float]] = {}
    for work, mode in dict.fromkeys((r["workload"], r["mode"]) for r in rows):
        mine = [r for r in rows if r["workload"] == work and r["mode"] == mode]
        med.setdefault(work, {})[mode] = statistics.median(r["tok_s"] for r in mine)
        per_step.setdefault(work, {})[mode] = round(mine[0]["tokens"] / max(mine[0]["steps"] + 3, 1), 3) if mode != "plain" else 1.0
        if mode != "plain":  # each rep's ratio is of runs made minutes apart at most: the median of those
            plain = {r["rep"]: r["tok_s"] for r in rows if r["workload"] == work and r["mode"] == "plain"}
            ratios.setdefault(work, {})[mode] = round(statistics.median(r["tok_s"] / plain[r["rep"]] for r in mine), 3)
    return {
        "artifact": str(artifact), "draft": str(args.draft) if args.draft else None, "threads": args.threads,
        "reps": args.reps, "max_new_tokens": args.max_new_tokens, "lookup": args.lookup, "load_average": loads,
        "median_tok_s": med, "ratio_vs_plain": ratios, "tokens_per_step": per_step, "goals": GOALS, "identical_greedy_text": not differences,
        "differences": differences, "only_near_ties": all(d["margin"] < TIE_MARGIN for d in differences), "rows": rows,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--artifact", type=Path, help="an edgepipe CPU artifact (default: the default model for raspberrypi5)")
    p.add_argument("--draft", type=Path, help="also measure draft-model decoding with this artifact")
    p.add_argument("--draft-tokens", type=int, default=4)
    p.add_argument("--lookup", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    out = run(args)
    if args.json:
        print(json.dumps(out))
    else:
        loads = " -> ".join(f"{la[0]:.2f}" for la in out["load_average"])
        print(f"\n{out['artifact']}, {args.threads} threads, {args.reps} reps interleaved, {args.max_new_tokens} new tokens, "
              f"greedy; load average (1 min) {loads}")
        print("| workload | mode | median decode tok/s | median of per-rep ratios vs plain | goal | tokens per step |\n|---|---|---:|---:|---:|---:|")
        for work, modes in out["median_tok_s"].items():
            for mode, v in modes.items():
                ratio = out["ratio_vs_plain"].get(work, {}).get(mode)
                goal = f">= {GOALS[work]}" if mode == "lookup" else ""
                print(f"| {work} | {mode} | {v:.2f} | {'' if ratio is None else f'{ratio:.3f}'} | {goal} | {out['tokens_per_step'][work][mode]:.2f} |")
        n = out["compared"]
        print(f"identical greedy text: {n - len(out['differences'])}/{n} prompts" +
              ("" if not out["differences"] else "; the others differ first at near-ties" if out["only_near_ties"] else "; NOT ONLY AT NEAR-TIES"))
        for d in out["differences"]:
            print(f"  {d['where']}: {d['what']}")
    return 0 if out["only_near_ties"] else 1


if __name__ == "__main__":
    sys.exit(main())
