"""The int8 KV cache's scale rule, measured: quality of one quantized decoder with its float32 cache and
with int8 caches whose scales are ``margin x calibrated max / 127`` for several margins.

For each of the eval text's windows (the build's 13 x 512 tokens, second halves scored, as the build's
validation), every variant's logits are compared with the fp32 export's (the build's KL, PPL, top-1)
and with the same quantized decoder's float32 cache (``kl_vs_f32cache``: what the int8 cache alone
costs). ``--decode N`` also runs N windows as generation does (128-token prefill chunks, then one
token per step over the second half) and reports the int8 cache's KL against the float32 cache's on
those steps, for margin 1 (or the first given).

    python benchmarks/kv_int8_margin.py --quantized QDIR --reference FP32_DIR --ranges kv_ranges.npz \\
        [--margins 0.8,0.9,1,1.25,1.5,2] [--windows N] [--decode 2] [--threads 2] [--json OUT]

QDIR is the quantize stage's folder (the decoder before the optimize passes; its cache float32),
FP32_DIR the export stage's, the ranges the kv_ranges stage's npz (``~/.cache/edgepipe/<stage>/<key>``;
a build's progress names the keys).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

if not __package__:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _variant(src: Path, dst: Path, scales: dict[str, np.ndarray]) -> Path:
    import onnx

    from edgepipe.optimize.kv_cache_int8 import KVCacheInt8Pass
    from edgepipe.optimize.manager import apply_to_proto

    dst.mkdir(parents=True)
    for f in src.iterdir():  # the weights copied: onnxruntime refuses a symbolic link out of the folder
        if f.is_file() and f.name != "model.onnx":
            shutil.copy2(f, dst / f.name)
    model = onnx.load(str(src / "model.onnx"), load_external_data=False)
    assert apply_to_proto(KVCacheInt8Pass(scales), model).modified
    onnx.save_model(model, str(dst / "model.onnx"))
    return dst


def _decode_logits(lm: Any, win: np.ndarray, start: int) -> np.ndarray:
    """Logits of positions start-1 .. end-2 as generation computes them: a chunked prefill, then steps."""
    st = lm.stepper(len(win))
    rows = [st.step(win[:start], last_only=True)[-1].copy()]
    for t in win[start:-1]:
        rows.append(st.step(np.array([t]), last_only=True)[-1].copy())
    return np.stack(rows)


def main(argv: list[str] | None = None) -> int:
    from edgepipe.optimize.kv_cache_int8 import scales_from_ranges
    from edgepipe.optimize.kv_ranges import load_ranges
    from edgepipe.runtime.evaluate import compare_logits
    from edgepipe.runtime.model import CausalLM
    from edgepipe.texts import EVAL_WINDOWS, read_text_file, token_windows

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quantized", type=Path, required=True)
    ap.add_argument("--reference", type=Path, required=True)
    ap.add_argument("--ranges", type=Path, required=True)
    ap.add_argument("--margins", default="0.8,0.9,1,1.25,1.5,2")
    ap.add_argument("--windows", type=int, default=0, help="score only the first N eval windows (0: all)")
    ap.add_argument("--decode", type=int, default=0, help="windows also run step by step")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    margins = [float(m) for m in args.margins.split(",")]
    ranges = load_ranges(args.ranges)
    windows = token_windows(args.quantized / "tokenizer.json", read_text_file(None, "eval.txt", "eval"), EVAL_WINDOWS, "eval")
    score_from = len(windows[0]) // 2
    windows = windows[: args.windows or None]
    with tempfile.TemporaryDirectory() as tmp:
        lms = {"f32cache": CausalLM(args.quantized, threads=args.threads, release_pages=False)}
        for m in margins:
            dst = _variant(args.quantized, Path(tmp) / f"m{m}", {k: scales_from_ranges(v, m) for k, v in ranges.items()})
            lms[f"int8 x{m:g}"] = CausalLM(dst, threads=args.threads, release_pages=False)
        ref = CausalLM(args.reference, threads=args.threads, release_pages=False)
        sums: dict[str, dict[str, float]] = {n: dict.fromkeys(("kl", "kl_vs_f32cache", "nll", "agree", "tokens"), 0.0) for n in lms}
        ref_nll = 0.0
        for w, win in enumerate(windows):
            pos = np.arange(score_from, len(win) - 1)
            targets = win[1:][pos]
            r = ref.logits(win)[:-1][pos]
            f32 = None
            for name, lm in lms.items():
                got = lm.logits(win)[:-1][pos]
                f32 = got if f32 is None else f32
                c, n = compare_logits(r, got, targets), len(pos)  # the build's own figures, per window
                s = sums[name]
                s["kl"] += c["kl_divergence"] * n
                s["kl_vs_f32cache"] += compare_logits(f32, got, targets)["kl_divergence"] * n
                s["nll"] += np.log(c["perplexity"]) * n
                s["agree"] += c["top1_agreement"] * n
                s["tokens"] += n
            ref_nll += np.log(c["reference_perplexity"]) * n
            print(f"window {w + 1}/{len(windows)}: " + ", ".join(f"{n} KL {s['kl'] / s['tokens']:.5f}" for n, s in sums.items()), flush=True)
        n_tok = sums["f32cache"]["tokens"]
        ref_ppl = float(np.exp(ref_nll / n_tok))
        out: dict[str, Any] = {"windows": len(windows), "scored_tokens": int(n_tok), "variants": {}}
        print(f"\n{len(windows)} windows, {int(n_tok)} scored tokens; fp32 export PPL {ref_ppl:.3f}\n")
        print("| cache | KL vs fp32 export | KL vs the float32 cache | PPL +% | top-1 |")
        print("|---|---:|---:|---:|---:|")
        for name, s in sums.items():
            row = {"kl": s["kl"] / n_tok, "kl_vs_f32cache": s["kl_vs_f32cache"] / n_tok,
                   "ppl_increase_pct": 100 * (np.exp(s["nll"] / n_tok) / ref_ppl - 1), "top1": s["agree"] / n_tok}
            out["variants"][name] = row
            print(f"| {name} | {row['kl']:.4f} | {row['kl_vs_f32cache']:.5f} | {row['ppl_increase_pct']:+.2f} | {row['top1']:.3f} |")
        if args.decode:
            first = f"int8 x{(1.0 if 1.0 in margins else margins[0]):g}"
            kl = n = 0.0
            for win in windows[: args.decode]:
                a = _decode_logits(lms["f32cache"], win, score_from)
                b = _decode_logits(lms[first], win, score_from)
                kl += compare_logits(a, b, win[score_from:])["kl_divergence"] * len(a)
                n += len(a)
            out["decode_kl_vs_f32cache"] = {"variant": first, "windows": args.decode, "tokens": int(n), "kl": kl / n}
            print(f"\nstep by step ({args.decode} windows, {int(n)} steps): KL({first} || float32 cache) {kl / n:.5f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
