"""``build`` and ``search``: make artifacts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import click

from edgepipe.cli import main
from edgepipe.cli._common import (
    EXIT_BUDGET,
    _emit_json,
    _guard,
    _native_stdout_to_stderr,
    _progress,
)


@main.command()
@click.option("--model", type=click.Path(path_type=Path), help="Hugging Face model folder (default: the embedded SmolLM2-135M-Instruct).")
@click.option("--target", required=True, help="Target profile name (see `edgepipe targets`) or a profile .yaml path.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Artifact folder to write.")
@click.option("--calib", type=click.Path(path_type=Path), help="Calibration text (UTF-8); default: the packaged text.")
@click.option("--eval", "eval_file", type=click.Path(path_type=Path), help="Evaluation text (UTF-8), not the calibration text.")
@click.option("--device", help="Also validate on a device: qemu, qemu:CPU or ssh://user@host[:port].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (the manifest summary) on stdout.")
@click.option("--sign", "sign_key", type=click.Path(path_type=Path), help="Sign the artifact with this private key as the last step.")
@click.option("--allow-untrained", is_flag=True, help="Build a random / untrained model on purpose (recorded in the manifest).")
@click.option("--bits-per-weight", type=click.FloatRange(0, min_open=True), help="Size budget: mean stored bits per quantized weight (replaces the profile's).")
@click.option("--max-mb", type=click.FloatRange(0, min_open=True), help="Size budget: the artifact in MiB (replaces the profile's).")
@click.option("--max-decode-time", type=click.FloatRange(0, min_open=True),
              help="Time budget within the size budget: predicted decode kernel time, a fraction of the base format's (profile kernel_time).")
@_guard
def build(
    model: Path | None, target: str, out: Path, calib: Path | None, eval_file: Path | None, device: str | None, as_json: bool,
    sign_key: Path | None, allow_untrained: bool, bits_per_weight: float | None, max_mb: float | None, max_decode_time: float | None,
) -> None:  # fmt: skip
    """Export, quantize, validate and package a model. Exit 0: every budget holds; 3: built, a budget failed."""
    from edgepipe.pipeline import build as do_build

    if sign_key is not None:
        from edgepipe.package.signing import load_private_key

        load_private_key(sign_key)  # a bad key fails now, not after the build
    with _native_stdout_to_stderr(as_json):
        res = do_build(model=model, target=target, out=out, calib=calib, eval_file=eval_file, device=device, progress=_progress(True),
                       allow_random_weights=allow_untrained, bits_per_weight=bits_per_weight, max_mb=max_mb,
                       max_decode_time=max_decode_time)
    if sign_key is not None:
        from edgepipe.package.signing import sign_artifact

        signed = sign_artifact(res.artifact, sign_key)
        _progress(True)(f"signed with key {signed.key_id[:16]} ({signed.files} files)")
    m = res.manifest
    if as_json:
        _emit_json({
            "artifact": str(res.artifact), "verdict": m.verdict, "failed_budgets": list(m.failed_budgets),
            "metrics": m.metrics, "budgets": [b.to_dict() for b in m.budgets], "target": m.target_name, "kind": m.kind.value,
        })
    else:
        from edgepipe.runtime.kinds import spec_of

        first, *rest = spec_of(m.kind).summary(m.to_dict())
        click.echo(f"{res.artifact}: {first}")
        for line in rest:
            click.echo(line)
        click.echo(f"  report: {res.artifact / 'report.md'}")
    sys.exit(0 if res.passed else EXIT_BUDGET)


def _budget_list(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[float, ...] | None:
    if value is None:
        return None
    try:
        budgets = tuple(float(v) for v in value.split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of bits per weight (e.g. 5.5,6,6.5)") from None
    if not budgets or any(not (0 < b < 64) for b in budgets):
        raise click.BadParameter(f"{value!r}: give bits per weight between 0 and 64 (e.g. 5.5,6,6.5)")
    return budgets


@main.command()
@click.option("--model", type=click.Path(path_type=Path), help="Hugging Face model folder (default: the embedded SmolLM2-135M-Instruct).")
@click.option("--target", required=True, help="Target profile name or .yaml path (a CPU target).")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Folder for the points, pareto.json, pareto.png and report.md.")
@click.option("--budgets", callback=_budget_list, help="Comma-separated bits per weight (default: four from the allowed formats, plus the profile's).")
@click.option("--calib", type=click.Path(path_type=Path), help="Calibration text (UTF-8); default: the packaged text.")
@click.option("--eval", "eval_file", type=click.Path(path_type=Path), help="Evaluation text (UTF-8).")
@click.option("--max-decode-time", type=click.FloatRange(0, min_open=True), help="A time budget for every point (see build --max-decode-time).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (pareto.json) on stdout.")
@_guard
def search(
    model: Path | None, target: str, out: Path, budgets: tuple[float, ...] | None, calib: Path | None, eval_file: Path | None,
    max_decode_time: float | None, as_json: bool,
) -> None:  # fmt: skip
    """Build several size budgets from one export and calibration; write the size / quality trade-off. Exit 3: no point passes."""
    from edgepipe.search import search as do_search

    with _native_stdout_to_stderr(as_json):
        res = do_search(model=model, target=target, out=out, budgets=budgets, calib=calib, eval_file=eval_file, progress=_progress(True),
                        max_decode_time=max_decode_time)
    if as_json:
        _emit_json(json.loads((res.out / "pareto.json").read_text(encoding="utf-8")))
    else:
        for i, p in enumerate(res.points):
            mark = "*" if i == res.chosen else " "
            if "error" in p:
                click.echo(f"{mark} {p['bits_per_weight']:g} bits/weight: {p['error']}")
            else:
                click.echo(f"{mark} {p['bits_per_weight']:g} bits/weight: {p['artifact_mb']} MiB, KL {p['kl_divergence']:.5f}, "
                           f"PPL {p['ppl_increase_pct']:+.2f} %, top-1 {p['top1_agreement']:.4f}, {p['verdict']}")
        click.echo(f"  report: {res.out / 'report.md'}")
    sys.exit(0 if res.passed else EXIT_BUDGET)




@main.command()
@click.argument("plan", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(path_type=Path), help="Folder for the cells' artifacts and matrix.json / matrix.md (default: PLAN.out beside the plan).")
@click.option("--ray", "ray_address", metavar="auto|ADDRESS", help="Run each stage as a task on this Ray cluster (pip install 'edgepipe[cluster]').")
@click.option("--jobs", type=click.IntRange(1, 256), default=1, show_default=True, help="Local mode: cells built at once, one process each.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (matrix.json) on stdout.")
@_guard
def matrix(plan: Path, out: Path | None, ray_address: str | None, jobs: int, as_json: bool) -> None:
    """Build models x targets x budgets (a plan file); one table and an artifact per cell. Exit 3: a budget failed; 1: a cell failed."""
    from edgepipe.matrix import run_matrix
    from edgepipe.matrix.table import RESULTS_JSON, RESULTS_MD

    with _native_stdout_to_stderr(as_json):
        res = run_matrix(plan, out=out, ray=ray_address, jobs=jobs, progress=_progress(True))
    if as_json:
        _emit_json(json.loads((res.out / RESULTS_JSON).read_text(encoding="utf-8")))
    else:
        for r in res.rows:
            status = f"failed in {r.get('stage')}: {r['error']}" if "error" in r else f"{r['artifact_mb']} MiB, KL {r['kl_divergence']:.5f}, {r['verdict']}"
            click.echo(f"{r['cell']}: {status}" + (" (kept)" if r["cell"] in res.reused else ""))
        click.echo(f"  table: {res.out / RESULTS_MD}")
    sys.exit(res.exit_code)
