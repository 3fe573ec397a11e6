"""The command line: a thin click layer over the Python API. The only module that prints."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import click

from edgepipe.errors import EdgepipeError

EXIT_BUDGET = 3


def _progress(enabled: bool) -> Callable[[str], None]:
    start = time.time()

    def say(msg: str) -> None:
        if enabled:
            click.echo(f"[{time.time() - start:7.1f}s] {msg}", err=True)

    return say


def _fail(e: EdgepipeError) -> None:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    click.echo(f"error: {msg}", err=True)
    sys.exit(e.exit_code)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so every stage's clean-up runs as it does for Ctrl-C.

    Python's default SIGTERM action ends the process without unwinding: a stage's temporary
    folder stayed behind (12 GB of GPTQ Hessians for Granite 2B) until a later sweep.
    """


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated()


def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the project's own errors into a one-line message and its exit code; no traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EdgepipeError as e:
            _fail(e)
        except _Terminated:
            click.echo("error: terminated; nothing was published (run the same command again to resume)", err=True)
            sys.exit(143)
        except KeyboardInterrupt:
            click.echo("error: interrupted; nothing was published (run the same command again to resume)", err=True)
            sys.exit(130)
        except MemoryError:
            click.echo("error: out of memory; build on a machine with more RAM or a smaller model", err=True)
            sys.exit(1)

    return wrapper


@contextlib.contextmanager
def _native_stdout_to_stderr(enabled: bool) -> Iterator[None]:
    """Send what native libraries write to file descriptor 1 to stderr while ``enabled``.

    ``--json`` promises one JSON object on stdout; the QNN SDK prints banner lines straight to
    fd 1 from C++, past Python's sys.stdout.
    """
    if not enabled:
        yield
        return
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no real fd 1 (embedded interpreters)
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        os.dup2(saved, 1)
        os.close(saved)


def _emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=None, sort_keys=True, default=str))


@click.group()
@click.option("-v", "--verbose", is_flag=True, help="Log details to stderr.")
@click.version_option(package_name="edgepipe")
def main(verbose: bool) -> None:
    """edgepipe: build, verify and run quantized LLM artifacts for edge devices."""
    import signal
    import threading

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, _on_sigterm)
    logging.basicConfig(level=logging.INFO if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


@main.command()
@click.option("--model", type=click.Path(path_type=Path), help="Hugging Face model folder (default: the embedded SmolLM2-135M-Instruct).")
@click.option("--target", required=True, help="Target profile name (see `edgepipe targets`) or a profile .yaml path.")
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Artifact folder to write.")
@click.option("--calib", type=click.Path(path_type=Path), help="Calibration text (UTF-8); default: the packaged text.")
@click.option("--eval", "eval_file", type=click.Path(path_type=Path), help="Evaluation text (UTF-8), not the calibration text.")
@click.option("--device", help="Also validate on a device: qemu, qemu:CPU or ssh://user@host[:port].")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (the manifest summary) on stdout.")
@_guard
def build(model: Path | None, target: str, out: Path, calib: Path | None, eval_file: Path | None, device: str | None, as_json: bool) -> None:
    """Export, quantize, validate and package a model. Exit 0: every budget holds; 3: built, a budget failed."""
    from edgepipe.pipeline import build as do_build

    with _native_stdout_to_stderr(as_json):
        res = do_build(model=model, target=target, out=out, calib=calib, eval_file=eval_file, device=device, progress=_progress(True))
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


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt", required=True)
@click.option("--max-new-tokens", type=click.IntRange(1, 100000), default=64, show_default=True)
@click.option("--temperature", type=click.FloatRange(0, 100), default=0.0, show_default=True, help="0 = greedy.")
@click.option("--top-k", type=click.IntRange(0), default=0, show_default=True)
@click.option("--top-p", type=click.FloatRange(0, 1, min_open=True), default=1.0, show_default=True)
@click.option("--seed", type=int)
@_guard
def run(artifact: Path, prompt: str, max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int | None) -> None:
    """Generate text from an artifact (verifies the manifest first)."""
    import math

    from edgepipe.runtime.artifact import run_prompt
    from edgepipe.runtime.generate import GenerationConfig

    if not (math.isfinite(temperature) and math.isfinite(top_p)):  # click's FloatRange lets NaN through
        raise click.BadParameter("--temperature and --top-p must be numbers, not NaN")
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    pieces = run_prompt(artifact, prompt, cfg)  # verifies the manifest before anything is printed
    click.echo(prompt, nl=False)
    for piece in pieces:
        click.echo(piece, nl=False)
    click.echo()


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--eval", "eval_file", type=click.Path(path_type=Path), help="Score perplexity on this text instead of the artifact's reference windows.")
@click.option("--device", default="local", show_default=True, help="local, qemu, qemu:CPU or ssh://user@host[:port].")
@click.option("--max-tokens", type=click.IntRange(2), help="Score at most this many tokens (emulated devices are slow).")
@click.option("--json", "as_json", is_flag=True)
@_guard
def validate(artifact: Path, eval_file: Path | None, device: str, max_tokens: int | None, as_json: bool) -> None:
    """Check accuracy (and, on real hardware, speed) of an artifact on a device."""
    from edgepipe.devices import get_runner
    from edgepipe.runtime.manifest import read_manifest
    from edgepipe.texts import read_text_file

    manifest = read_manifest(artifact)
    if eval_file is not None:
        read_text_file(eval_file, "", "eval")  # a clear error before any device work
    target = None
    if device.startswith("qemu"):
        from edgepipe.targets import parse_target

        t = dict(manifest.target)
        t.pop("alias_of", None)
        target = parse_target(t)
    runner = get_runner(device, target=target)
    res = runner.validate(artifact, eval_file=eval_file, max_tokens=max_tokens, progress=_progress(True))
    if as_json:
        _emit_json(res)
        return
    acc = res.get("accuracy", {})
    click.echo(f"{artifact}: verified on {res.get('runner')} ({res.get('device', {}).get('machine')})")
    for k, v in acc.items():
        click.echo(f"  {k}: {v:.4f}" if isinstance(v, float) else f"  {k}: {v}")
    for k, v in (res.get("throughput") or {}).items():
        click.echo(f"  {k}: {v}")
    if res.get("claims"):
        click.echo(f"  claims: {res['claims']}")


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True)
@_guard
def bench(artifact: Path, as_json: bool) -> None:
    """Prefill / decode tokens per second, time to first token and peak RSS on this machine."""
    from edgepipe.devices.local import run_entry
    from edgepipe.runtime.manifest import read_manifest

    read_manifest(artifact)
    res = run_entry([sys.executable, "-m", "edgepipe.runtime", "bench", str(artifact), "--json"], "bench")
    if as_json:
        _emit_json(res)
        return
    for k, v in res.items():
        click.echo(f"{k}: {v}")


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@_guard
def verify(artifact: Path) -> None:
    """Check every file of an artifact against its manifest (sha256 and size)."""
    from edgepipe.runtime.manifest import verify_artifact

    m = verify_artifact(artifact)
    click.echo(f"{artifact}: OK ({len(m.files)} files verified)")


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
    from edgepipe.cache import list_cache

    entries = list_cache()
    if as_json:
        _emit_json(entries)
        return
    for e in entries:
        click.echo(f"{e['stage']:10s} {e['key']:26s} {e['bytes'] / 2**20:9.1f} MB {'complete' if e['complete'] else 'incomplete'}")
    click.echo(f"total {sum(e['bytes'] for e in entries) / 2**20:.1f} MB")


@cache.command("prune")
@click.option("--max-mb", type=click.FloatRange(0), default=0, show_default=True, help="Keep at most this much (least recently used go first).")
@_guard
def cache_prune(max_mb: float) -> None:
    from edgepipe.cache import prune_cache

    removed = prune_cache(int(max_mb * 2**20))
    click.echo(f"removed {len(removed)} entries ({sum(e['bytes'] for e in removed) / 2**20:.1f} MB)")


if __name__ == "__main__":
    main()
