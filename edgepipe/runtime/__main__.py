"""Device entry point: ``python -m edgepipe.runtime {validate,bench,run,verify} ARTIFACT``.

argparse + json only, so that it runs where only onnxruntime, numpy and tokenizers are
installed (a Raspberry Pi, or the aarch64 environment under qemu).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edgepipe.errors import EdgepipeError
from edgepipe.runtime import args as contract


def main(argv: list[str] | None = None) -> int:
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
    f = sub.add_parser("verify")
    f.add_argument("artifact")
    args = p.parse_args(argv)
    try:
        _check(args)
        if args.cmd == "validate":
            from edgepipe.runtime.validate import validate

            text = None
            if args.eval_file:
                try:
                    text = Path(args.eval_file).read_text(encoding="utf-8")
                except (OSError, UnicodeDecodeError) as e:
                    raise EdgepipeError(f"cannot read eval file {args.eval_file}: {e}") from None
            out = validate(
                args.artifact, eval_text=text, max_tokens=args.max_tokens, with_bench=not args.no_bench, threads=args.threads
            )
            print(json.dumps(out))
        elif args.cmd == "bench":
            from edgepipe.runtime.artifact import open_artifact
            from edgepipe.runtime.facts import artifact_bytes
            from edgepipe.runtime.kinds import spec_of

            lm, manifest = open_artifact(args.artifact, threads=args.threads, verify=not args.no_verify, generates=True)
            out = spec_of(manifest.kind).run_bench(lm)
            out["model_bytes"] = artifact_bytes(Path(args.artifact))
            print(json.dumps(out))
        elif args.cmd == "run":
            from edgepipe.runtime.artifact import run_prompt

            cfg = contract.generation_config(
                max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed,
            )
            for piece in run_prompt(args.artifact, args.prompt, cfg):
                sys.stdout.write(piece)
                sys.stdout.flush()
            sys.stdout.write("\n")
        elif args.cmd == "verify":
            from edgepipe.runtime.manifest import verify_artifact

            m = verify_artifact(args.artifact)
            print(json.dumps({"verified": True, "files": len(m.files), "kind": m.kind.value}))
    except EdgepipeError as e:
        print(f"error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return e.exit_code
    return 0


def _check(args: argparse.Namespace) -> None:
    """The flags every subcommand shares, against the one contract (``edgepipe.runtime.args``)."""
    if getattr(args, "threads", None) is not None:
        contract.threads(args.threads)
    if getattr(args, "max_tokens", None) is not None:
        contract.max_tokens(args.max_tokens)


if __name__ == "__main__":
    sys.exit(main())
