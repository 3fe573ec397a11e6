"""Device entry point: ``python -m edgepipe.runtime {validate,bench,run,verify,serve} ARTIFACT``.

argparse + json only, so that it runs where only onnxruntime, numpy and tokenizers are
installed (a Raspberry Pi, or the aarch64 environment under qemu).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from edgepipe.errors import EdgepipeError, path_error
from edgepipe.runtime import args as contract


def _serve(args: argparse.Namespace) -> None:
    from edgepipe.runtime.serve import ServeConfig, serve

    key = Path(args.api_key_file) if args.api_key_file else None
    cfg = ServeConfig(Path(args.artifact), args.host, args.port, key, args.max_queue, args.threads, lookup=contract.lookup_tokens(args.lookup))
    serve(cfg, lambda line: print(line, file=sys.stderr, flush=True))


def _trust(value: str | None) -> None:
    """``--trusted-keys`` stands for ``$EDGEPIPE_TRUSTED_KEYS`` (read where the artifact is opened)."""
    if value is not None:
        import os

        from edgepipe.runtime.signing import ENV_TRUSTED_KEYS

        os.environ[ENV_TRUSTED_KEYS] = value


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m edgepipe.runtime")
    sub = p.add_subparsers(dest="cmd", required=True)
    v = sub.add_parser("validate")
    v.add_argument("artifact")
    v.add_argument("--eval", dest="eval_file")
    v.add_argument("--max-tokens", type=int)
    v.add_argument("--no-bench", action="store_true")
    v.add_argument("--threads", type=int, default=0)
    v.add_argument("--json", action="store_true")
    b = sub.add_parser("bench")
    b.add_argument("artifact")
    b.add_argument("--no-verify", action="store_true")
    b.add_argument("--threads", type=int, default=0)
    b.add_argument("--json", action="store_true")
    r = sub.add_parser("run")
    r.add_argument("artifact")
    r.add_argument("--prompt", required=True)
    r.add_argument("--max-new-tokens", type=int, default=64)
    r.add_argument("--temperature", type=float, default=0.0)
    r.add_argument("--top-k", type=int, default=0)
    r.add_argument("--top-p", type=float, default=1.0)
    r.add_argument("--seed", type=int)
    r.add_argument("--draft", help="a smaller artifact of the same tokenizer: speculative decoding")
    r.add_argument("--draft-tokens", type=int, default=4)
    f = sub.add_parser("verify")
    f.add_argument("artifact")
    s = sub.add_parser("serve")
    s.add_argument("artifact")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8080)
    s.add_argument("--api-key-file")
    s.add_argument("--max-queue", type=int, default=8)
    s.add_argument("--threads", type=int, default=0)
    for cmd in (r, s):  # "--lookup" alone: the default length; "--lookup N": at most N tokens per step
        cmd.add_argument("--lookup", nargs="?", const="", default=None)
    for cmd in (v, b, r, f, s):
        cmd.add_argument("--trusted-keys", help="public key file(s) or folder(s), ':'-separated (default: $EDGEPIPE_TRUSTED_KEYS)")
    return p


def _validate(args: argparse.Namespace) -> None:
    from edgepipe.runtime.validate import validate

    text = None
    if args.eval_file:
        from edgepipe.runtime.args import read_user_text

        text = read_user_text(args.eval_file, "eval file")
    out = validate(args.artifact, eval_text=text, max_tokens=args.max_tokens, with_bench=not args.no_bench, threads=args.threads)
    print(json.dumps(out))


def _bench(args: argparse.Namespace) -> None:
    from edgepipe.runtime.artifact import open_artifact
    from edgepipe.runtime.facts import artifact_bytes
    from edgepipe.runtime.kinds import spec_of

    lm, manifest = open_artifact(args.artifact, threads=args.threads, verify=not args.no_verify, generates=True)
    out = spec_of(manifest.kind).run_bench(lm)
    out["model_bytes"] = artifact_bytes(Path(args.artifact))
    print(json.dumps(out))


def _run(args: argparse.Namespace) -> None:
    from edgepipe.runtime.artifact import run_prompt

    cfg = contract.generation_config(
        max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
        lookup=args.lookup, draft_tokens=args.draft_tokens,
    )
    for piece in run_prompt(args.artifact, args.prompt, cfg, draft=args.draft):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _verify(args: argparse.Namespace) -> None:
    from edgepipe.runtime.manifest import check_artifact

    m, sig = check_artifact(args.artifact)
    print(json.dumps({"verified": True, "files": len(m.files), "kind": m.kind.value, "signature": sig.status}))


_COMMANDS = {"validate": _validate, "bench": _bench, "run": _run, "serve": _serve, "verify": _verify}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    _trust(args.trusted_keys)
    try:
        _check(args)
        _COMMANDS[args.cmd](args)
    except EdgepipeError as e:
        return _fail(e)
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except OSError as e:
        known = path_error(e)
        if known is None:
            raise
        return _fail(known)
    return 0


def _fail(e: EdgepipeError) -> int:
    print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
    return e.exit_code


def _check(args: argparse.Namespace) -> None:
    """The flags every subcommand shares, against the one contract (``edgepipe.runtime.args``)."""
    if getattr(args, "threads", None) is not None:
        contract.threads(args.threads)
    if getattr(args, "max_tokens", None) is not None:
        contract.max_tokens(args.max_tokens)


if __name__ == "__main__":
    sys.exit(main())
