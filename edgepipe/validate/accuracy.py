"""The accuracy stage: a quantized CPU decoder against its fp32 export, on held-out text, on the host.

Perplexity of both, their relative change, top-1 next-token agreement and the exact mean KL over the
full vocabulary, scored as llama.cpp's perplexity tool does (each window's second half). The fp32
reference runs a few layers at a time (``edgepipe.export.segmented``), so it never needs its whole
size in RAM. The stage also writes ``reference.npz`` (the fp32 top-k log-probs and the host's top-1
tokens), which the artifact carries so a device can check itself. Cached: for Granite-2B this is
16 minutes a resumed build does not repeat.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.stage import StageContext, run_cached

REFERENCE = "reference.npz"


@dataclass(frozen=True)
class AccuracyConfig:
    VERSION = 1

    reference_key: str  # the fp32 export
    model_key: str  # the model under test (the optimize stage's key)
    eval_key: str  # hash of the eval text
    windows: int
    window_tokens: int
    score_from: int  # first scored position of each window


@dataclass(frozen=True)
class AccuracyResult:
    accuracy: dict[str, Any]  # the manifest's metrics.accuracy
    reference_npz: Path
    key: str


def run_accuracy(
    reference_dir: Path, model_dir: Path, windows: list[np.ndarray], config: AccuracyConfig, ctx: StageContext
) -> AccuracyResult:
    def produce(tmp: Path) -> dict[str, Any]:
        from edgepipe.export.segmented import reference_logits
        from edgepipe.runtime.evaluate import reference_arrays, score
        from edgepipe.runtime.model import CausalLM

        ctx.progress(f"validating accuracy on {len(windows)} windows of {len(windows[0])} tokens")
        ref_logits = reference_logits(reference_dir, windows, threads=ctx.threads, progress=ctx.progress)
        lm = CausalLM(model_dir, threads=ctx.threads)
        it = iter(ref_logits)
        acc = score(lm.logits, windows, reference_fn=lambda w: next(it), score_from=config.score_from)
        del lm
        ref_iter = iter(ref_logits)  # reference_arrays asks for the windows in the order they were scored
        arrays: dict[str, Any] = reference_arrays(lambda w: next(ref_iter), windows, acc.top1)
        np.savez_compressed(tmp / REFERENCE, **arrays)
        return {"accuracy": {k: (round(v, 6) if isinstance(v, float) else v) for k, v in acc.result().items()}}

    out = run_cached("validate", config, produce, ctx)
    return AccuracyResult(accuracy=out.info["accuracy"], reference_npz=out.dir / REFERENCE, key=out.key)
