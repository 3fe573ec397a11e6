"""``run``, ``serve``, ``validate``, ``bench``, ``verify``: use an artifact."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from edgepipe.cli import main
from edgepipe.cli._common import (
    _emit_json,
    _guard,
    _progress,
    _trusted_keys_option,
)


@main.command()
@click.argument("artifact", type=click.Path(path_type=Path))
@click.option("--prompt", required=True)
@click.option("--max-new-tokens", type=int, default=64, show_default=True, help="1..100000")
@click.option("--temperature", type=float, default=0.0, show_default=True, help="0 = greedy; up to 100.")
@click.option("--top-k", type=int, default=0, show_default=True, help="0 = off.")
@click.option("--top-p", type=float, default=1.0, show_default=True, help="In (0, 1].")
@click.option("--seed", type=int, help="A non-negative integer.")
@click.option("--lookup", is_flag=False, flag_value="", default=None, metavar="[N]",
              help="Prompt-lookup decoding: verify up to N tokens copied from the text so far per step (default 8, 1..32).")
@click.option("--draft", type=click.Path(path_type=Path), help="Speculative decoding with this smaller artifact of the same tokenizer.")
@click.option("--draft-tokens", type=int, default=4, show_default=True, help="With --draft: most drafted tokens per step, 1..32.")
@_trusted_keys_option
@_guard
def run(artifact: Path, prompt: str, max_new_tokens: int, temperature: float, top_k: int, top_p: float, seed: int | None,
        lookup: str | None, draft: Path | None, draft_tokens: int) -> None:
    """Generate text from an artifact (verifies the manifest first)."""
    from edgepipe.runtime import args
    from edgepipe.runtime.artifact import run_prompt

    cfg = args.generation_config(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed,
                                 lookup=lookup, draft_tokens=draft_tokens)
    pieces = run_prompt(artifact, prompt, cfg, draft=draft)  # verifies the manifest before anything is printed
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
@click.option("--lookup", is_flag=False, flag_value="", default=None, metavar="[N]",
              help="Prompt-lookup decoding for every request: up to N tokens copied from the text per step (default 8, 1..32).")
@_guard
def serve(artifact: Path, host: str, port: int, api_key_file: Path | None, max_queue: int, threads: int, lookup: str | None) -> None:
    """Serve an artifact over an OpenAI-compatible HTTP API (verifies the manifest first)."""
    from edgepipe.runtime import args
    from edgepipe.runtime.serve import ServeConfig
    from edgepipe.runtime.serve import serve as run_server

    cfg = ServeConfig(artifact=artifact, host=host, port=port, api_key_file=api_key_file, max_queue=max_queue, threads=threads,
                      lookup=args.lookup_tokens(lookup))
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


