"""``targets``, ``estimate``, ``cache``: the profiles, predictions and the stage cache."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from edgepipe.cli import main
from edgepipe.cli._common import (
    EXIT_BUDGET,
    _emit_json,
    _guard,
)


@main.group(invoke_without_command=True)
@click.pass_context
@_guard
def targets(ctx: click.Context) -> None:
    """List the target profiles (`targets show NAME` prints one)."""
    if ctx.invoked_subcommand is None:
        from edgepipe.targets import list_targets, load_target

        for name in list_targets():
            t = load_target(name)
            alias = f" (alias of {t.alias_of})" if t.alias_of else ""
            click.echo(f"{name:16s} {t.description}{alias}")


@targets.command("show")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True)
@_guard
def targets_show(name: str, as_json: bool) -> None:
    """Print one target profile."""
    from edgepipe.targets import load_target

    t = load_target(name).to_dict()
    if as_json:
        _emit_json(t)
        return
    import yaml

    click.echo(yaml.safe_dump(t, sort_keys=False).rstrip())


@main.command()
@click.option("--model", required=True, type=click.Path(path_type=Path), help="Hugging Face model folder.")
@click.option("--target", required=True)
@click.option("--json", "as_json", is_flag=True)
@_guard
def estimate(model: Path, target: str, as_json: bool) -> None:
    """Predict artifact size, peak RAM and decode speed on the target, before any export."""
    from edgepipe.estimate import estimate_model
    from edgepipe.targets import load_target

    tgt = load_target(target)
    est = estimate_model(model, tgt)
    if as_json:
        _emit_json(est)
        return
    click.echo(
        f"{model} on {tgt.name}: {est['artifact_mb']} MB artifact, {est['peak_ram_mb']} MB peak RAM "
        f"(budget {est['ram_budget_mb']} MB), ~{est['decode_tok_s']} tok/s decode, ~{est['prefill_tok_s']} tok/s prefill: "
        + ("fits" if est["fits"] else "DOES NOT FIT")
    )
    click.echo(f"  basis: {est['basis']}")
    click.echo(f"  export path: {est['export_path']} ({est['export_reason']})")
    if est.get("refused"):
        click.echo(f"  a build is refused: {est['refused']}")
    if not est["fits"]:
        sys.exit(EXIT_BUDGET)


@main.command("inspect")
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object.")
@_guard
def inspect_cmd(model: Path, as_json: bool) -> None:
    """What config.json says (architecture, heads, rope, MoE...) and which export path a build takes. Exit 2: refused."""
    from edgepipe.export.preflight import REFUSED, preflight

    pre = preflight(model)
    if as_json:
        _emit_json(pre.to_dict())
    else:
        click.echo(f"{model}: {pre.architecture} ({pre.model_type})")
        click.echo(f"  {pre.layers} layers, hidden {pre.hidden}, head size {pre.head_size}, {pre.layout}, vocabulary {pre.vocab}")
        click.echo(f"  rope: {pre.rope_type}, sliding window: {pre.sliding_window}, tied embeddings: {pre.tied}, "
                   + (f"MoE: {pre.experts} experts, {pre.experts_per_token} per token" if pre.experts else "dense"))
        if pre.normalized:
            click.echo(f"  config normalised for the builder: {', '.join(pre.normalized)}")
        click.echo(f"  export path: {pre.path} ({pre.reason})")
    if pre.path == REFUSED:
        pre.raise_if_refused()


@main.group()
def cache() -> None:
    """Inspect or prune the stage cache."""


@cache.command("ls")
@click.option("--json", "as_json", is_flag=True)
@_guard
def cache_ls(as_json: bool) -> None:
    from edgepipe.cache_prune import list_cache

    entries = list_cache()
    if as_json:
        _emit_json(entries)
        return
    for e in entries:
        click.echo(f"{e['stage']:10s} {e['key']:26s} {e['bytes'] / 2**20:9.1f} MB {'complete' if e['complete'] else 'incomplete'}")
    click.echo(f"total {sum(e['bytes'] for e in entries) / 2**20:.1f} MB")


@cache.command("prune")
@click.option("--max-mb", type=float, default=0, show_default=True, help="Keep at most this much (least recently used go first).")
@_guard
def cache_prune(max_mb: float) -> None:
    from edgepipe.cache_prune import prune_cache
    from edgepipe.runtime import args

    max_mb = args.max_mb(max_mb)
    removed = prune_cache(int(max_mb * 2**20))
    click.echo(f"removed {len(removed)} entries ({sum(e['bytes'] for e in removed) / 2**20:.1f} MB)")

