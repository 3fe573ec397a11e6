"""The matrix's results: ``matrix.json`` (one row per cell), ``matrix.md`` and, for each model and target
built at several budgets, the search's Pareto plot (size vs KL, the chosen point ringed)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RESULTS_JSON = "matrix.json"
RESULTS_MD = "matrix.md"


def write_results(out: Path, plan_source: Path, rows: Sequence[dict[str, Any]], kept: Sequence[str] = ()) -> dict[str, Any]:
    """Write the table and the plots; return the JSON document."""
    plots = _pareto_plots(out, rows)
    doc = {
        "plan": str(plan_source), "cells": list(rows), "plots": plots, "kept": list(kept),
        "built": sum(1 for r in rows if "error" not in r), "failed": [r["cell"] for r in rows if "error" in r],
        "failed_budgets": [r["cell"] for r in rows if "error" not in r and not r["passed"]],
    }
    _atomic(out / RESULTS_JSON, json.dumps(doc, indent=1, sort_keys=True, default=str))
    _atomic(out / RESULTS_MD, render(doc))
    return doc


def _atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _pareto_plots(out: Path, rows: Sequence[dict[str, Any]]) -> dict[str, str]:
    """One plot per (model, target) that has more than one built budget point."""
    from edgepipe.package.plots import pareto_plot
    from edgepipe.search import choose

    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if "error" not in r and r.get("budget"):
            groups.setdefault(f"{r['model']}--{r['target']}", []).append(r)
    plots: dict[str, str] = {}
    for name, points in sorted(groups.items()):
        if len(points) < 2:
            continue
        points = sorted(points, key=lambda p: p["artifact_bytes"])
        drawn = pareto_plot(points, choose(points), out / f"pareto-{name}.png")
        if drawn is not None:
            plots[name] = drawn.name
    return plots


def render(doc: dict[str, Any]) -> str:
    lines = [
        f"# Build matrix ({doc['plan']})", "",
        f"{doc['built']} of {len(doc['cells'])} cells built; {len(doc['failed'])} failed; "
        f"{len(doc['failed_budgets'])} built with a failed budget; {len(doc['kept'])} kept from an earlier run.", "",
        "| cell | budget | MiB | bits/weight | PPL +% | mean KL | top-1 | decode tok/s | verdict |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in doc["cells"]:
        lines.append(_row(r))
    lines.append("")
    for name, png in doc["plots"].items():
        lines += [f"## {name}", "", f"![size vs KL]({png})", ""]
    return "\n".join(lines)


def _num(v: Any, fmt: str) -> str:
    return "—" if v is None else format(v, fmt)


def _row(r: dict[str, Any]) -> str:
    b = r.get("budget") or {}
    budget = f"{b['bits_per_weight']:g} bits/weight" if b.get("bits_per_weight") else (f"{b['max_mb']:g} MiB" if b.get("max_mb") else "profile")
    if "error" in r:
        return f"| {r['cell']} | {budget} | — | — | — | — | — | — | failed in {r.get('stage', '?')}: {r['error']} |"
    verdict = r["verdict"] + (f" ({', '.join(r['failed_budgets'])})" if r.get("failed_budgets") else "")
    return (f"| {r['cell']} | {budget} | {r['artifact_mb']} | {_num(r.get('matrix_bits_per_weight'), '.3f')} | "
            f"{_num(r.get('ppl_increase_pct'), '.2f')} | {_num(r.get('kl_divergence'), '.5f')} | {_num(r.get('top1_agreement'), '.4f')} | "
            f"{_num(r.get('decode_tok_s'), '')} | {verdict} |")
