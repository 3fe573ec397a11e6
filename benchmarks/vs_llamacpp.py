"""edgepipe vs llama.cpp on the same weights, on this machine, in one run.

    python benchmarks/vs_llamacpp.py [--model HF_FOLDER|austen | --random SHAPE | --random-llama] [--threads 2[,1]] [--eval FILE]
                                     [--calib FILE] [--match-sizes [--sized-only]]
                                     [--reps 3] [--no-speed] [--no-quality] [--no-edgepipe] [--no-passive] [--speed-f32]
                                     [--speed-quants Q8_0,Q4_0,Q4_K_M] [--no-int8] [--int4-target NAME|rtn]
                                     [--rebuild | --reuse] [--artifact int4=DIR] [--json OUT.json] [--markdown OUT.md]

Results of a run: ``benchmarks/RESULTS.md``.

What it does (everything is cached under ``$EDGEPIPE_CACHE/vs_llamacpp/<model sha>/``):

1. llama.cpp tools from the llama-cpp-python sdist (``benchmarks/llamacpp.py``, built once).
2. The HF folder -> GGUF f32 with llama.cpp's own converter (the full-precision reference), then
   ``llama-quantize`` to Q8_0, Q5_K_M, Q4_0 and Q4_K_M (no imatrix: llama.cpp's plain recipe).
   ``--model austen``: the fp32 Llama trained on Austen's novels (``benchmarks/train_austen.py``,
   cached); its held-out novel's opening is the eval text and a training slice the calibration text.
3. edgepipe artifacts from the same folder: ``x86-avx512`` (int8) and ``raspberrypi5`` (int4), via
   ``edgepipe.build`` (its stage cache makes a rebuild cheap; an artifact already built for
   the same target config and model is reused). ``--match-sizes``: also the int4 target with
   ``max_mb`` at Q4_0's and at Q4_K_M's file size (labels ``int4@Q4_0``, ``int4@Q4_K_M``), int4
   blocks 32/64/128 with and without zero points allowed (:func:`budget_profile`); ``--sized-only``:
   only those (the targets' own builds skipped, for a quick quality-at-size comparison).
4. Quality on the same text (``edgepipe/data/eval.txt`` by default):
   * llama.cpp: ``llama-perplexity -c 512 --kl-divergence-base`` on the f32 GGUF, then
     ``--kl-divergence`` for each quant: PPL ratio, mean KL, same-top-1, over every full
     512-token chunk, scoring the second half of each chunk (positions 256..510 predict 257..511).
   * edgepipe, same protocol: the token ids are read back from llama.cpp's base-logits file, so
     both engines see identical tokens; each chunk is run through the edgepipe artifact and its own
     fp32 ONNX export, and PPL ratio / exact KL / top-1 agreement are taken on the same positions.
     The f32 GGUF's stored log-probs give a cross-check (KL of edgepipe's quant and fp32 export
     against llama.cpp's f32 reference).
   * edgepipe's own figures from the artifact manifest (``metrics.accuracy``: first 8 windows of
     512 tokens, every position scored, vs the fp32 export) are reported alongside.
5. Speed, interleaved A B A B for ``--reps`` rounds with the same thread count (each edgepipe artifact
   right after its llama.cpp quant: ``int8`` after Q8_0, ``int4`` and ``int4@Q4_0`` after Q4_0,
   ``int4@Q4_K_M`` after Q4_K_M, so that equal-size pairs are timed side by side): llama-bench
   ``-p 128,512 -n 128 -r 1`` per round, and for edgepipe a fresh process that times a 128- and a
   512-token prefill from an empty cache and 128 single-token decode steps (warm-up first, like
   llama-bench) on the path ``generate()`` takes: the KV stepper (preallocated cache, IO binding)
   and the last position's logits only (artifacts with the ``logits_slice`` pass skip the lm_head
   on the other positions; llama-bench also computes the last token's output only). With more than one thread llama.cpp also runs with ``OMP_WAIT_POLICY=passive``:
   its OpenMP threads spin at barriers, which collapses when other processes share the cores;
   ratios are taken against the faster variant. Peak RSS of each process by ``/usr/bin/time -v``;
   edgepipe's own ``python -m edgepipe.runtime bench --json`` figure is reported too.
6. This machine's read bandwidth (``benchmarks/bandwidth.py``: OpenMP, the same thread count), and decode
   speed as a fraction of the bandwidth limit: bytes of weights read per generated token (all
   tensors, minus those a step reads one row of: an embedding table that is only gathered from,
   i.e. not tied to the output, and GroupQueryAttention's rotary cos/sin tables).
"""


from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

if not __package__:  # run as python benchmarks/vs_llamacpp.py: the repo root on sys.path, for `benchmarks.*`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks import isa, vs_speed
from benchmarks.isa import cpu_flags, isa_flags
from benchmarks.llamacpp import Paths, build_info, ensure_llamacpp
from benchmarks.random_models import SHAPES, random_model_dir
from benchmarks.train_austen import austen_model
from benchmarks.vs_common import say
from benchmarks.vs_edgepipe_side import PAIRS, SIZE_MATCHED, edgepipe_artifacts, edgepipe_results, rtn_profile, sized_artifacts
from benchmarks.vs_llama_side import QUANTS, convert_and_quantize, llama_results
from benchmarks.vs_report import machine_facts, summarize
from benchmarks.vs_speed import SPEED_QUANTS, edgepipe_runtime_bench, speed_results


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--model",
        help="Hugging Face folder (default: edgepipe's default SmolLM2), or 'austen': the fp32 Llama trained on "
        "Austen's novels (benchmarks/train_austen.py, trained once and cached; its held-out and calibration texts "
        "become the --eval and --calib defaults)",
    )
    p.add_argument("--calib", type=Path, help="calibration text for the edgepipe builds (default: the packaged text)")
    p.add_argument(
        "--match-sizes",
        action="store_true",
        help=f"also build the int4 target with --max-mb at each of {', '.join(SIZE_MATCHED)}'s file sizes",
    )
    p.add_argument(
        "--random",
        choices=sorted(SHAPES),
        help="instead of --model: a random-init model of this shape (benchmarks/random_models.py, created and cached; "
        "builds pass --allow-untrained), e.g. qwen2.5-0.5b: Qwen2.5-0.5B's config",
    )
    p.add_argument(
        "--random-llama",
        action="store_const",
        dest="random",
        const="llama-709m",
        help="the same as --random llama-709m: issue 6's random-init Llama (hidden 2048, 10 layers, 709M params)",
    )
    p.add_argument(
        "--speed-quants",
        default=",".join(SPEED_QUANTS),
        help=f"llama.cpp quants to time (default {','.join(SPEED_QUANTS)}; each is timed next to its edgepipe counterpart)",
    )
    p.add_argument(
        "--artifact",
        action="append",
        default=[],
        metavar="LABEL=DIR",
        help="time this prebuilt edgepipe folder as LABEL (int8, int4, int4@Q4_0 or int4@Q4_K_M: the last two are "
        "timed next to the quant whose size they match) instead of building one (repeatable)",
    )
    p.add_argument("--no-int8", action="store_true", help="build and compare the int4 artifact only")
    p.add_argument("--sized-only", action="store_true", help="with --match-sizes: build only the size-matched artifacts")
    p.add_argument(
        "--int4-target",
        help="edgepipe profile (name or .yaml) for the int4 artifact (default raspberrypi5; with --random "
        "'rtn': x86-avx2 with round-to-nearest; 'rtn:NAME[:b128sym]': profile NAME with round-to-nearest, no size "
        "budget and optionally another int4 block size / symmetry for every matrix, see rtn_profile)",
    )
    p.add_argument(
        "--threads", default="2", help="thread count, or a comma list to measure several (e.g. 2,1)"
    )
    p.add_argument("--eval", dest="eval_file", type=Path, help="eval text (default: edgepipe/data/eval.txt)")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument(
        "--isa",
        choices=isa.ISAS,
        default="host",
        help="avx2: time both tools as on an AVX2-only CPU (llama.cpp built for AVX2, every timed process under a "
        "CPUID mask that hides AVX-512, AVX-VNNI and AMX; benchmarks/isa.py)",
    )
    p.add_argument("--no-speed", action="store_true", help="quality and sizes only")
    p.add_argument("--no-edgepipe", action="store_true", help="llama.cpp only")
    p.add_argument(
        "--no-quality",
        action="store_true",
        help="run no quality measurement: report only the figures already cached in the work folder",
    )
    p.add_argument(
        "--no-passive",
        action="store_true",
        help="do not also run llama.cpp with OMP_WAIT_POLICY=passive (threads > 1)",
    )
    p.add_argument("--speed-f32", action="store_true", help="also time the f32 GGUF")
    p.add_argument(
        "--rebuild", action="store_true", help="build the edgepipe artifacts again even if current"
    )
    p.add_argument(
        "--reuse",
        action="store_true",
        help="reuse edgepipe artifacts of the same model and target even if edgepipe's code is newer",
    )
    p.add_argument(
        "--json", type=Path, help="write every figure here (default: the work folder's results.json)"
    )
    p.add_argument("--markdown", type=Path, help="also write the tables to this file")
    return p


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The arguments, with ``speed_quants`` and ``threads`` as lists; contradictions are usage errors."""
    p = _parser()
    args = p.parse_args(argv)
    args.speed_quants = [q.strip() for q in args.speed_quants.split(",") if q.strip()]
    if set(args.speed_quants) - set(QUANTS):
        p.error(f"--speed-quants takes some of {','.join(QUANTS)}")
    if args.random and args.model:
        p.error("--random / --random-llama and --model exclude each other")
    args.threads = [int(t) for t in str(args.threads).split(",") if t.strip()]
    labels = {e for e, _ in PAIRS}
    for a in args.artifact:
        if "=" not in a or a.split("=", 1)[0] not in labels:
            p.error(f"--artifact takes LABEL=DIR with LABEL one of {', '.join(sorted(labels))}: {a!r}")
    return args


def _edgepipe_targets(args: argparse.Namespace, work: Path) -> dict[str, str]:
    """Profile (name or .yaml path) -> label of each edgepipe artifact to build."""
    int4_target = args.int4_target or ("rtn" if args.random else "raspberrypi5")
    ep_targets = {} if args.no_int8 else {"x86-avx512": "int8"}
    if int4_target == "rtn" or int4_target.startswith("rtn:"):
        int4_target = str(rtn_profile(work, int4_target[4:] or "x86-avx2"))
    ep_targets[int4_target] = "int4"
    return ep_targets


def _run_facts(args: argparse.Namespace, lc: Paths, model_dir: Path, info: Any, eval_file: Path, work: Path) -> dict[str, Any]:
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "model": str(model_dir),
        "model_sha256": info.sha256,
        "parameters": info.num_parameters,
        "eval_file": str(eval_file),
        "threads": args.threads,
        "reps": args.reps,
        "machine": machine_facts(args.isa),
        "llamacpp": {
            "llama_cpp_python": lc.version,
            "llama_cpp": lc.commit,
            **{k: v for k, v in build_info(lc.root).items() if k not in ("version", "commit")},
        },
        "work": str(work),
    }



def _artifacts(
    args: argparse.Namespace, model_dir: Path, work: Path, ep_targets: dict[str, str], ggufs: dict[str, Path], texts: dict[str, Path]
) -> dict[str, Path]:
    """``--artifact`` folders, the edgepipe builds for the labels they do not cover, and with
    ``--match-sizes`` the int4 target built at llama.cpp's file sizes."""
    given = dict(a.split("=", 1) for a in args.artifact)
    arts = {k: Path(v).resolve() for k, v in given.items()}
    if set(ep_targets.values()) - set(arts) and not (args.match_sizes and args.sized_only):
        ep_targets = {t: label for t, label in ep_targets.items() if label not in arts}
        arts.update(
            edgepipe_artifacts(
                model_dir, work, say, rebuild=args.rebuild, targets=ep_targets, reuse_any=args.reuse,
                allow_random_weights=bool(args.random), texts=texts,
            )
        )
    if args.match_sizes:
        int4 = next(t for t, label in _edgepipe_targets(args, work).items() if label == "int4")
        sizes = {q: ggufs[q].stat().st_size for q in SIZE_MATCHED}
        arts.update(sized_artifacts(model_dir, work, say, int4, sizes, texts, rebuild=args.rebuild, reuse_any=args.reuse))
    return arts


def _model_and_texts(args: argparse.Namespace) -> tuple[Path, Path, dict[str, Path]]:
    """The model folder, the evaluation text, and the calibration / evaluation texts of the edgepipe
    builds. ``--model austen``: the trained Austen model, its held-out and calibration slices."""
    from edgepipe.models import default_model_dir

    packaged_eval = Path(__file__).resolve().parent.parent / "edgepipe" / "data" / "eval.txt"
    if args.model == "austen":
        model_dir = austen_model(progress=say)
        eval_file, calib = args.eval_file or model_dir / "heldout.txt", args.calib or model_dir / "calib.txt"
    else:
        model_dir = random_model_dir(args.random, say) if args.random else Path(args.model) if args.model else default_model_dir(say)
        eval_file, calib = args.eval_file or packaged_eval, args.calib
    texts = {"calib": calib.resolve()} if calib else {}
    if args.eval_file or args.model == "austen":
        texts["eval_file"] = eval_file.resolve()
    return model_dir.resolve(), eval_file.resolve(), texts



def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)

    import edgepipe
    from edgepipe.models import cache_root

    t_start = time.time()
    load_before = os.getloadavg()
    if args.isa != "host":
        say(f"timing as {args.isa}: numpy under the CPUID mask finds {isa.check(args.isa)}")
        vs_speed.SPEED_ENV = isa.env_for(args.isa)
    lc = ensure_llamacpp(say, isa=isa_flags(isa.masked_flags(cpu_flags(), args.isa)))
    model_dir, eval_file, texts = _model_and_texts(args)
    info = edgepipe.inspect_model(model_dir)
    work = cache_root() / "vs_llamacpp" / info.sha256[:16]
    work.mkdir(parents=True, exist_ok=True)
    ep_targets = _edgepipe_targets(args, work)
    T = args.threads[0]
    R = _run_facts(args, lc, model_dir, info, eval_file, work)

    ggufs = convert_and_quantize(lc, model_dir, work, T)
    R["llama"] = llama_results(lc, ggufs, eval_file, work, T, compute=not args.no_quality)

    arts: dict[str, Path] = {}
    if not args.no_edgepipe:
        arts = _artifacts(args, model_dir, work, ep_targets, ggufs, texts)
        R["edgepipe"] = edgepipe_results(args, arts, model_dir, work, T)

    if not args.no_speed:
        R["speed"], R["bandwidth"] = speed_results(args, lc, ggufs, arts, work)
        if arts:
            R["edgepipe"]["runtime_bench"] = {label: edgepipe_runtime_bench(a, T) for label, a in arts.items()}
    R["load_before"], R["load_after"] = load_before, os.getloadavg()
    R["seconds"] = round(time.time() - t_start, 1)

    out_json = args.json or work / ("results.json" if args.isa == "host" else f"results-{args.isa}.json")
    out_json.write_text(json.dumps(R, indent=2, default=str))
    text = summarize(R)
    print(text)
    print(
        f"\nall figures: {out_json}; load average before {load_before[0]:.2f}, after {R['load_after'][0]:.2f}"
    )
    if args.markdown:
        args.markdown.write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
