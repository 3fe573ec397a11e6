"""The quality-search harness the int4 and int8 searches share: quantize a variant from the fp32 export
with the build's own quantizer and score it exactly as ``edgepipe build`` does (the packaged eval text,
exact KL against the fp32 export), keeping each variant's result in ``work`` so a rerun only scores
what changed.
"""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from pathlib import Path


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)



def artifact_bytes(d: Path) -> int:
    return sum((d / n).stat().st_size for n in ("model.onnx", "model.onnx.data"))


class Scorer:
    def __init__(self, fp32: Path, eval_windows):
        from edgepipe.runtime.model import CausalLM

        self.windows = eval_windows
        log("fp32 reference logits")
        lm = CausalLM(fp32)
        self.ref = [lm.logits(w) for w in eval_windows]

    def __call__(self, model_dir: Path) -> dict:
        from edgepipe.runtime.evaluate import score
        from edgepipe.runtime.model import CausalLM

        lm = CausalLM(model_dir)
        it = iter(self.ref)
        acc = score(
            lm.logits, self.windows, reference_fn=lambda w: next(it), score_from=len(self.windows[0]) // 2
        )
        return acc.result()


def profile_record(cfg_kw: dict) -> dict:
    """A variant's keyword arguments as a full profile ``quantization`` section (lists, defaults filled)."""
    from edgepipe.targets import Quantization

    return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(Quantization(**cfg_kw)).items()}


def scheme_of(cfg_kw: dict):
    """The quantize scheme of a variant: its keyword arguments are a profile's ``quantization`` fields."""
    from edgepipe.quantize import scheme_from_target
    from edgepipe.targets import Quantization

    return scheme_from_target(Quantization(**cfg_kw))


def run_variant(name: str, cfg_kw: dict, fp32: Path, imp, scorer: Scorer, work: Path, cache) -> dict:
    from edgepipe.quantize import quantize

    res_f = work / "results" / f"{name}.json"
    if res_f.exists():
        r = json.loads(res_f.read_text())
        if r["config"] == profile_record(cfg_kw):
            return r
    out = work / "q" / name
    t0 = time.time()
    info = quantize(fp32, out, scheme_of(cfg_kw), importance=imp, weight_cache=cache)
    tq = time.time() - t0
    acc = scorer(out)
    r = {
        "name": name,
        "config": profile_record(cfg_kw),
        "bytes": artifact_bytes(out),
        "matmuls": info["matmuls"],
        "quantize_s": round(tq, 1),
        **acc,
    }
    res_f.parent.mkdir(exist_ok=True)
    res_f.write_text(json.dumps(r, indent=1))
    return r
