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


def _set_trusted_keys(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--trusted-keys`` stands for ``$EDGEPIPE_TRUSTED_KEYS`` in this process and the device entries it starts."""
    if value is not None:
        from edgepipe.runtime.signing import ENV_TRUSTED_KEYS

        os.environ[ENV_TRUSTED_KEYS] = value
    return value


def _trusted_keys_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--trusted-keys", expose_value=False, callback=_set_trusted_keys, is_eager=True,
        help="Public key file(s) or folder(s) to check signatures with, ':'-separated; '' for none "
        "(default: $EDGEPIPE_TRUSTED_KEYS, ~/.config/edgepipe/trusted-keys, /etc/edgepipe/trusted-keys).",
    )(fn)  # fmt: skip


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
@click.option("--sign", "sign_key", type=click.Path(path_type=Path), help="Sign the artifact with this private key as the last step.")
@click.option("--allow-untrained", is_flag=True, help="Build a random / untrained model on purpose (recorded in the manifest).")
@click.option("--bits-per-weight", type=click.FloatRange(0, min_open=True), help="Size budget: mean stored bits per quantized weight (replaces the profile's).")
@click.option("--max-mb", type=click.FloatRange(0, min_open=True), help="Size budget: the artifact in MiB (replaces the profile's).")
@_guard
def build(
    model: Path | None, target: str, out: Path, calib: Path | None, eval_file: Path | None, device: str | None, as_json: bool,
    sign_key: Path | None, allow_untrained: bool, bits_per_weight: float | None, max_mb: float | None,
) -> None:  # fmt: skip
    """Export, quantize, validate and package a model. Exit 0: every budget holds; 3: built, a budget failed."""
    from edgepipe.pipeline import build as do_build

    if sign_key is not None:
        from edgepipe.package.signing import load_private_key

        load_private_key(sign_key)  # a bad key fails now, not after the build
    with _native_stdout_to_stderr(as_json):
        res = do_build(model=model, target=target, out=out, calib=calib, eval_file=eval_file, device=device, progress=_progress(True),
                       allow_random_weights=allow_untrained, bits_per_weight=bits_per_weight, max_mb=max_mb)
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
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object (pareto.json) on stdout.")
@_guard
def search(model: Path | None, target: str, out: Path, budgets: tuple[float, ...] | None, calib: Path | None, eval_file: Path | None, as_json: bool) -> None:
    """Build several size budgets from one export and calibration; write the size / quality trade-off. Exit 3: no point passes."""
    from edgepipe.search import search as do_search

    with _native_stdout_to_stderr(as_json):
        res = do_search(model=model, target=target, out=out, budgets=budgets, calib=calib, eval_file=eval_file, progress=_progress(True))
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
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt", required=True)
@click.option("--max-new-tokens", type=int, default=64, show_default=True, help="1..100000")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy; up to 100.")
@click.option("--top-k", type=int, default=0, show_default=True, help="0 = off.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="In (0, 1].")
@click.option("--seed", type=int, help="A non-negative integer.")
@_trusted_keys_option
@_guard
def run(artifact: Path, prompt: str, max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int | None) -> None:
    """Generate text from an artifact (verifies the manifest first)."""
    from edgepipe.runtime import args
    from edgepipe.runtime.artifact import run_prompt

    cfg = args.generation_config(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed)
    pieces = run_prompt(artifact, prompt, cfg)  # verifies the manifest before anything is printed
    click.echo(prompt, nl=False)
    for piece in pieces:
        click.echo(piece, nl=False)
    click.echo()


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to bind; anything but loopback is reachable from the network.")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True, help="0: any free port.")
@click.option("--api-key-file", type=click.Path(path_type=Path), help="File whose first line is the key every request must send as 'Authorization: Bearer KEY'.")
@click.option("--max-queue", type=click.IntRange(0), default=8, show_default=True, help="Requests that may wait while one generates; more get 503.")
@click.option("--threads", type=click.IntRange(0), default=0, show_default=True, help="onnxruntime threads (0: the target's count or one per core).")
@_guard
def serve(artifact: Path, host: str, port: int, api_key_file: Path | None, max_queue: int, threads: int) -> None:
    """Serve an artifact over an OpenAI-compatible HTTP API (verifies the manifest first)."""
    from edgepipe.runtime.serve import ServeConfig
    from edgepipe.runtime.serve import serve as run_server

    cfg = ServeConfig(artifact=artifact, host=host, port=port, api_key_file=api_key_file, max_queue=max_queue, threads=threads)
    run_server(cfg, lambda line: click.echo(line, err=True))


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--eval", "eval_file", type=click.Path(path_type=Path), help="Score perplexity on this text instead of the artifact's reference windows.")
@click.option("--device", default="local", show_default=True, help="local, qemu, qemu:CPU or ssh://user@host[:port].")
@click.option("--max-tokens", type=int, help="Score at most this many tokens, at least 2 (emulated devices are slow).")
@click.option("--json", "as_json", is_flag=True)
@_trusted_keys_option
@_guard
def validate(artifact: Path, eval_file: Path | None, device: str, max_tokens: int | None, as_json: bool) -> None:
    """Check accuracy (and, on real hardware, speed) of an artifact on a device."""
    from edgepipe.devices import get_runner
    from edgepipe.runtime import args
    from edgepipe.runtime.manifest import read_manifest
    from edgepipe.texts import read_text_file

    max_tokens = args.max_tokens(max_tokens)
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
@_trusted_keys_option
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
@_trusted_keys_option
@_guard
def verify(artifact: Path) -> None:
    """Check the signature (when keys are trusted) and every file of an artifact against its manifest."""
    from edgepipe.runtime.manifest import check_artifact

    m, sig = check_artifact(artifact)
    note = "" if sig.status == "unsigned" else f"; {sig.describe()}"  # unsigned: the line it always was
    click.echo(f"{artifact}: OK ({len(m.files)} files verified{note})")


@main.command()
@click.option("--out", required=True, type=click.Path(path_type=Path), help="Private key file to write (its public key: OUT.pub).")
@click.option("--force", is_flag=True, help="Replace an existing key pair.")
@_guard
def keygen(out: Path, force: bool) -> None:
    """Make a signing key pair (ECDSA P-256, PEM). Keep OUT private; copy OUT.pub to the devices."""
    from edgepipe.package.signing import keygen as make_keys

    pair = make_keys(out, force=force)
    click.echo(f"private key: {pair.private}\npublic key:  {pair.public} (id {pair.key_id[:16]})")


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--key", "key", required=True, type=click.Path(path_type=Path), help="Private key (PEM) from `edgepipe keygen`.")
@click.option("--json", "as_json", is_flag=True)
@_guard
def sign(artifact: Path, key: Path, as_json: bool) -> None:
    """Sign an artifact (writes ARTIFACT/model.sig, OpenSSF model-signing format) after checking its hashes."""
    from edgepipe.package.signing import sign_artifact

    s = sign_artifact(artifact, key)
    if as_json:
        _emit_json({"artifact": str(s.artifact), "signature": str(s.signature), "key_id": s.key_id, "files": s.files})
        return
    click.echo(f"{artifact}: signed {s.files} files with key {s.key_id[:16]} ({s.signature})")


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.argument("board")
@click.option("--name", help="Deployment name on the board (default: the artifact folder's name).")
@click.option("--max-tokens", type=click.IntRange(2), default=64, show_default=True, help="Reference tokens the health check scores.")
@click.option("--min-agreement", type=click.FloatRange(0, 1), default=0.9, show_default=True,
              help="Top-1 agreement with the build host the board must reach.")  # fmt: skip
@click.option("--json", "as_json", is_flag=True)
@_guard
def deploy(artifact: Path, board: str, name: str | None, max_tokens: int, min_agreement: float, as_json: bool) -> None:
    """Copy ARTIFACT to BOARD (ssh://user@host[:port]) as a new version, health-check it there, then switch to it."""
    from edgepipe.devices.deploy import HealthCheck
    from edgepipe.devices.deploy import deploy as do_deploy

    res = do_deploy(artifact, board, name=name, health=HealthCheck(max_tokens=max_tokens, min_agreement=min_agreement),
                    progress=_progress(True))  # fmt: skip
    if as_json:
        _emit_json(res.to_dict())
        return
    click.echo(f"{res.name}: {res.version} is current on {res.board} (previous: {res.previous or 'none'}; {res.signature})")
    click.echo(f"  path on the board: {res.path}")


@main.command()
@click.argument("board")
@click.option("--name", required=True, help="Deployment name on the board.")
@click.option("--to", "to", help="Version to switch to (default: the one before the current one).")
@click.option("--json", "as_json", is_flag=True)
@_guard
def rollback(board: str, name: str, to: str | None, as_json: bool) -> None:
    """Switch a deployment on BOARD back to an earlier version (its files are still there)."""
    import dataclasses

    from edgepipe.devices.deploy import rollback as do_rollback

    res = do_rollback(board, name=name, to=to)
    if as_json:
        _emit_json(dataclasses.asdict(res))
        return
    click.echo(f"{res.name}: {res.current} is current on {res.board} (was {res.previous})")


@main.command()
@click.argument("board")
@click.option("--name", help="Only this deployment.")
@click.option("--json", "as_json", is_flag=True)
@_guard
def deployments(board: str, name: str | None, as_json: bool) -> None:
    """List the deployments on BOARD, their versions and which one is current."""
    from edgepipe.devices.deploy import deployments as list_deployments

    deps = list_deployments(board, name=name)
    if as_json:
        _emit_json({"board": board, "deployments": deps})
        return
    if not deps:
        click.echo(f"no deployments on {board}")
    for d in deps:
        click.echo(f"{d['name']} ({d['root']})")
        for v in d["versions"]:
            mark = "*" if v["version"] == d["current"] else " "
            click.echo(f"  {mark} {v['version']}  {v['kind'] or '?'}  {v['target'] or '?'}  {v['created'] or '?'}  {'signed' if v['signed'] else 'unsigned'}")


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--oci", "oci_out", required=True, type=click.Path(path_type=Path), help="OCI image layout folder to write (a path ending in .tar: an archive).")
@click.option("--platform", default="linux/arm64", show_default=True, type=click.Choice(["linux/arm64", "linux/amd64"]), help="Root filesystem, wheels.")
@click.option("--model-only", is_flag=True, help="The artifact alone as an OCI artifact (CNCF ModelPack), no root filesystem.")
@click.option("--tag", default="latest", show_default=True, help="Reference name in index.json (skopeo's oci:DIR:TAG).")
@click.option("--json", "as_json", is_flag=True)
@_guard
def package(artifact: Path, oci_out: Path, platform: str, model_only: bool, tag: str, as_json: bool) -> None:
    """Write a verified artifact as an OCI image (Debian Python root + runtime + artifact), no daemon needed."""
    from edgepipe.package.oci import package_oci

    res = package_oci(artifact, oci_out, platform=platform, model_only=model_only, tag=tag, progress=_progress(True))
    if as_json:
        _emit_json(res.to_dict())
        return
    kind = "model-only OCI artifact" if model_only else f"OCI image ({platform})"
    click.echo(f"{res.out}: {kind}, {res.bytes / 2**20:.1f} MB, manifest {res.manifest_digest}")


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
    from edgepipe.estimate import estimate_for
    from edgepipe.export import inspect_model
    from edgepipe.targets import load_target

    tgt = load_target(target)
    est = estimate_for(inspect_model(model), tgt)
    if as_json:
        _emit_json(est)
        return
    click.echo(
        f"{model} on {tgt.name}: {est['artifact_mb']} MB artifact, {est['peak_ram_mb']} MB peak RAM "
        f"(budget {est['ram_budget_mb']} MB), ~{est['decode_tok_s']} tok/s decode, ~{est['prefill_tok_s']} tok/s prefill: "
        + ("fits" if est["fits"] else "DOES NOT FIT")
    )
    click.echo(f"  basis: {est['basis']}")
    if not est["fits"]:
        sys.exit(EXIT_BUDGET)


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
@click.option("--max-mb", type=float, default=0, show_default=True, help="Keep at most this much (least recently used go first).")
@_guard
def cache_prune(max_mb: float) -> None:
    from edgepipe.cache import prune_cache
    from edgepipe.runtime import args

    max_mb = args.max_mb(max_mb)
    removed = prune_cache(int(max_mb * 2**20))
    click.echo(f"removed {len(removed)} entries ({sum(e['bytes'] for e in removed) / 2**20:.1f} MB)")


if __name__ == "__main__":
    main()
