"""edgepipe's size/quality curve and llama.cpp's quant ladder on one plot: same weights, same text.

    python benchmarks/ladder.py [--model HF_FOLDER|austen] [--target raspberrypi5] [--budgets 5.2,5.6,6.12,7,8.5]
                                [--out DIR] [--threads 2]

What it does:

1. ``edgepipe search`` (the Python API, :func:`edgepipe.search.search`) of ``--target`` at each budget
   (bits per weight; default: the search's own four plus the profile's), into ``--out``
   (default ``$EDGEPIPE_CACHE/ladder/<model sha>/``). The stage cache shares the export and the
   sensitivity pass between points, and with ``edgepipe build`` / ``vs_llamacpp.py``.
2. llama.cpp's ladder on the same weights (``benchmarks/vs_llamacpp.py``'s cached conversion and
   ``llama-quantize``: Q8_0, Q5_K_M, Q4_0, Q4_K_M, plain recipe without imatrix) and its quality
   from ``llama-perplexity --kl-divergence`` against the f32 GGUF.
3. Every edgepipe point scored on llama-perplexity's exact tokens and positions (the second half of
   each 512-token chunk), against edgepipe's own fp32 export
   (:func:`vs_edgepipe_side.edgepipe_quality_matched`): both curves use one protocol. The search's own
   figures (its validator: every position of 8 windows) are kept beside them in the JSON.
4. ``ladder.png`` (size in MiB of the whole artifact folder / GGUF file vs mean KL, the chosen
   point circled, each llama.cpp quant a labelled square), ``ladder.json`` and ``ladder.md``.

Results: ``benchmarks/RESULTS.md``. Reruns are cheap: every build and every llama.cpp figure is cached.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as python benchmarks/ladder.py: the repo root on sys.path, for `benchmarks.*`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.llamacpp import ensure_llamacpp
from benchmarks.vs_common import say
from benchmarks.vs_edgepipe_side import edgepipe_quality_matched, fp32_export_dir
from benchmarks.vs_llama_side import QUANTS, convert_and_quantize, llama_quality
from benchmarks.vs_llamacpp import _model_and_texts

MIB = 2**20


def ladder_points(ggufs: dict[str, Path], quality: dict[str, Any]) -> list[dict[str, Any]]:
    """One plot point per llama.cpp quant that has a measured KL: file size in MiB and its figures."""
    out = []
    for q in QUANTS:
        got = quality.get(q) or {}
        if got.get("kl_divergence") is None:
            continue
        size = ggufs[q].stat().st_size
        out.append({"label": f"llama.cpp {q}", "artifact_bytes": size, "artifact_mb": round(size / MIB, 2), **got})
    return out


def matched_points(points: list[dict[str, Any]], matched: dict[str, Any]) -> list[dict[str, Any]]:
    """The search's points with KL / PPL / top-1 replaced by the matched protocol's (the search's own
    figures kept under ``validator``); points that failed to build are left as they are."""
    out = []
    for p in points:
        m = matched.get(_label(p))
        if m is None:
            out.append(p)
            continue
        own = {k: p.get(k) for k in ("kl_divergence", "ppl_increase_pct", "top1_agreement")}
        out.append({**p, **{k: m[k] for k in own}, "validator": own})
    return out


def _label(point: dict[str, Any]) -> str:
    return f"{point['bits_per_weight']:g} bits/weight"


def table(points: list[dict[str, Any]], ladder: list[dict[str, Any]], chosen: int | None) -> str:
    """A markdown table of both curves, smallest file first."""
    rows = [(p["artifact_bytes"], f"edgepipe {_label(p)}" + (" (chosen)" if i == chosen else ""), p) for i, p in enumerate(points) if "artifact_bytes" in p]
    rows += [(p["artifact_bytes"], p["label"], p) for p in ladder]
    lines = ["| model | file bytes | MiB | PPL +% | mean KL | same top-1 |", "|---|---:|---:|---:|---:|---:|"]
    for size, label, p in sorted(rows, key=lambda r: r[0]):
        lines.append(
            f"| {label} | {size:,} | {size / MIB:.2f} | {p['ppl_increase_pct']:+.2f} | {p['kl_divergence']:.4f} | {100 * p['top1_agreement']:.1f} % |"
        )
    return "\n".join(lines)


def _args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", help="Hugging Face folder (default: edgepipe's default SmolLM2), or 'austen' (benchmarks/train_austen.py)")
    p.add_argument("--target", default="raspberrypi5", help="the profile whose budgets are searched (default raspberrypi5)")
    p.add_argument("--budgets", type=lambda s: [float(x) for x in s.split(",")], help="bits per weight, comma-separated")
    p.add_argument("--out", type=Path, help="search folder (default $EDGEPIPE_CACHE/ladder/<model sha>)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--calib", type=Path, help="calibration text for the edgepipe builds")
    p.add_argument("--eval", dest="eval_file", type=Path, help="eval text (default: edgepipe/data/eval.txt)")
    args = p.parse_args(argv)
    args.random = None
    return args


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    import edgepipe
    from edgepipe.models import cache_root
    from edgepipe.package.plots import pareto_plot
    from edgepipe.search import search

    t0, load_before = time.time(), os.getloadavg()
    lc = ensure_llamacpp(say)
    model_dir, eval_file, texts = _model_and_texts(args)
    info = edgepipe.inspect_model(model_dir)
    work = cache_root() / "vs_llamacpp" / info.sha256[:16]  # vs_llamacpp.py's folder: its GGUFs and logits are reused
    work.mkdir(parents=True, exist_ok=True)
    out = (args.out or cache_root() / "ladder" / info.sha256[:16]).absolute()
    ggufs = convert_and_quantize(lc, model_dir, work, args.threads)
    ladder = ladder_points(ggufs, llama_quality(lc, ggufs, eval_file, work, args.threads))

    res = search(target=args.target, out=out, model=model_dir, budgets=args.budgets, calib=texts.get("calib"), eval_file=texts.get("eval_file"), progress=say)
    arts = {_label(p): Path(p["artifact"]) for p in res.points if "artifact" in p}
    matched = edgepipe_quality_matched(arts, fp32_export_dir(model_dir, say), work / "kld-base-c512.bin", args.threads, say)
    points = matched_points(list(res.points), matched)
    drawn = pareto_plot(points, res.chosen, out / "ladder.png", extra=ladder)
    doc = {
        "model": str(model_dir), "model_sha256": info.sha256, "target": args.target, "eval_file": str(eval_file),
        "protocol": "llama-perplexity's: -c 512, second half of each chunk scored, KL over reference log-probs above -16",
        "edgepipe": points, "chosen": res.chosen, "llama": ladder, "plot": str(drawn) if drawn else None,
        "load_before": load_before, "load_after": os.getloadavg(), "seconds": round(time.time() - t0, 1),
    }
    (out / "ladder.json").write_text(json.dumps(doc, indent=1, default=str), encoding="utf-8")
    text = table(points, ladder, res.chosen)
    (out / "ladder.md").write_text(text + "\n", encoding="utf-8")
    print(text)
    print(f"\nplot: {drawn}; all figures: {out / 'ladder.json'}; load average before {load_before[0]:.2f}, after {doc['load_after'][0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
