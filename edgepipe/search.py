"""``edgepipe search``: several size budgets built from one export and calibration, measured, and the
trade-off between size and quality written out (``pareto.json``, ``pareto.png``, ``report.md``).

Every point is an ordinary build with the profile's budget replaced (``bits_per_weight``); the stage
cache shares the export and the sensitivity stage between them, so a point costs its quantization,
validation and packaging. The chosen point is the smallest artifact whose every budget holds (none:
the one of least KL): what ``build --bits-per-weight`` of that value makes.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepipe.errors import InputError, TargetError
from edgepipe.runtime.progress import Progress, silent

__all__ = ["SearchResult", "choose", "default_budgets", "pareto_front", "point_row", "search"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SearchResult:
    out: Path
    points: tuple[dict[str, Any], ...]
    chosen: int | None  # index into points
    passed: bool  # the chosen point's every budget holds


def default_budgets(q: Any) -> tuple[float, ...]:
    """Four budgets from just above the cheapest allowed format to the dearest, plus the profile's own."""
    from edgepipe.quantize.configs import allowed_formats

    fmts = allowed_formats(q)
    lo, hi = fmts[0].bits_per_weight + 0.05, fmts[-1].bits_per_weight
    steps = [round(lo + (hi - lo) * i / 3, 2) for i in range(4)] if hi > lo else [round(lo, 2)]
    return tuple(sorted(set(steps) | ({q.bits_per_weight} if q.bits_per_weight else set())))


def point_row(budget: float, art: Path, res: Any) -> dict[str, Any]:
    m = res.manifest.to_dict()
    met, q = m["metrics"], m["quantization"]
    acc, thr = met.get("accuracy", {}), met.get("throughput", {})
    alloc = q.get("allocation", {})
    return {
        "bits_per_weight": budget, "artifact": str(art), "artifact_mb": met["artifact_mb"], "artifact_bytes": met["artifact_bytes"],
        "matrix_bits_per_weight": alloc.get("bits_per_weight"), "predicted_loss": alloc.get("predicted_loss"),
        "ppl_increase_pct": acc.get("ppl_increase_pct"), "kl_divergence": acc.get("kl_divergence"), "top1_agreement": acc.get("top1_agreement"),
        "prefill_tok_s": thr.get("prefill_tok_s"), "decode_tok_s": thr.get("decode_tok_s"),
        "verdict": m["verdict"], "failed_budgets": list(m["failed_budgets"]), "formats": alloc.get("formats"),
        "kernel_time": alloc.get("kernel_time"),
    }


def choose(points: Sequence[dict[str, Any]]) -> int | None:
    built = [i for i, p in enumerate(points) if p.get("kl_divergence") is not None]
    passing = [i for i in built if points[i]["verdict"] == "pass"]
    if passing:
        return min(passing, key=lambda i: (points[i]["artifact_bytes"], points[i]["kl_divergence"]))
    return min(built, key=lambda i: points[i]["kl_divergence"]) if built else None


def pareto_front(points: Sequence[dict[str, Any]]) -> list[int]:
    """Indices of the points no other point beats on both size and KL."""
    built = [(i, p) for i, p in enumerate(points) if p.get("kl_divergence") is not None]
    return [i for i, p in built if not any(
        q["artifact_bytes"] <= p["artifact_bytes"] and q["kl_divergence"] <= p["kl_divergence"] and
        (q["artifact_bytes"], q["kl_divergence"]) != (p["artifact_bytes"], p["kl_divergence"]) for _, q in built
    )]


def search(
    *, target: str, out: Path | str, model: Path | str | None = None, budgets: Sequence[float] | None = None,
    calib: Path | str | None = None, eval_file: Path | str | None = None, progress: Progress | None = None,
    max_decode_time: float | None = None,
) -> SearchResult:
    """Build ``target`` at each of ``budgets`` (bits per weight; default: :func:`default_budgets`) into
    ``out/points/``, then write ``out/pareto.json``, ``out/pareto.png`` and ``out/report.md``.
    ``max_decode_time`` puts every point under that time budget too (:mod:`edgepipe.quantize.kernel_time`):
    two searches, with and without, show what the speed costs this model."""
    from edgepipe.package.plots import PARETO, pareto_plot
    from edgepipe.pipeline import build, with_budget
    from edgepipe.targets import load_target

    say = progress or silent
    tgt = load_target(target)
    sizes = tuple(budgets or default_budgets(tgt.quantization))
    if max_decode_time is not None:  # a profile without kernel times is refused here, not once per point
        tgt = with_budget(tgt, sizes[0], None, max_decode_time)
    if tgt.runtime.execution_provider != "CPUExecutionProvider":
        raise InputError(f"search allocates CPU weight formats; {tgt.name} runs on {tgt.runtime.execution_provider}")
    out = Path(out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    points: list[dict[str, Any]] = []
    for b in sizes:
        say(f"search: building at {b:g} bits/weight")
        art = out / "points" / f"bpw-{b:g}"
        try:
            res = build(target=tgt, out=art, model=model, calib=calib, eval_file=eval_file, progress=say, bits_per_weight=b)
        except TargetError as e:  # this budget is out of the model's reach: the others still count
            points.append({"bits_per_weight": b, "error": str(e).splitlines()[0]})
            continue
        points.append(point_row(b, art, res))
    chosen = choose(points)
    if chosen is None:
        raise TargetError(f"no budget of the search could be built for this model: {points[0].get('error')}")
    doc = {"target": tgt.name, "model": str(model) if model else "default", "points": points, "chosen": chosen, "pareto": pareto_front(points)}
    (out / "pareto.json").write_text(json.dumps(doc, indent=1, sort_keys=True), encoding="utf-8")
    drawn = pareto_plot(points, chosen, out / PARETO)
    (out / "report.md").write_text(search_report(doc, PARETO if drawn else None), encoding="utf-8")
    return SearchResult(out, tuple(points), chosen, points[chosen]["verdict"] == "pass")


def search_report(doc: dict[str, Any], figure: str | None) -> str:
    c = doc["points"][doc["chosen"]]
    lines = [
        f"# Size budget search for {doc['target']} ({doc['model']})", "",
        f"Chosen: **{c['bits_per_weight']:g} bits/weight**, {c['artifact_mb']} MiB, KL {c['kl_divergence']:.5f}, verdict {c['verdict']} "
        f"(`edgepipe build --bits-per-weight {c['bits_per_weight']:g}` makes it).", "",
        "| bits/weight | MiB | PPL +% | mean KL | top-1 | prefill tok/s | decode tok/s | decode kernel time | verdict |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for i, p in enumerate(doc["points"]):
        if "error" in p:
            lines.append(f"| {p['bits_per_weight']:g} | — | — | — | — | — | — | — | {p['error']} |")
            continue
        mark = " (chosen)" if i == doc["chosen"] else (" (Pareto)" if i in doc["pareto"] else "")
        kt = (p.get("kernel_time") or {}).get("decode")
        lines.append(
            f"| {p['bits_per_weight']:g}{mark} | {p['artifact_mb']} | {p['ppl_increase_pct']:.2f} | {p['kl_divergence']:.5f} | "
            f"{p['top1_agreement']:.4f} | {p['prefill_tok_s']} | {p['decode_tok_s']} | {'—' if kt is None else f'{kt:.3f}'} | {p['verdict']} |"
        )
    lines.append("")
    if any((p.get("kernel_time") or {}).get("decode") is not None for p in doc["points"]):
        lines += ["Decode kernel time: predicted from the profile's `kernel_time`, as a fraction of its base format everywhere.", ""]
    if figure:
        lines += [f"![size vs KL]({figure})", ""]
    return "\n".join(lines)
