"""The fp32 export must compute what PyTorch computes: a few tokens through both, before anything
is measured against the export.

Every accuracy figure is relative to the fp32 export, so an exporter that silently mis-maps a
tensor (onnxruntime-genai's builder takes any Linear of vocabulary width for the lm_head) or a
checkpoint that transformers completes at random would go unnoticed by every budget. transformers
loads the checkpoint in a subprocess (its memory is returned when it ends) and reports what it had
to initialise, drop or reshape: any of those is an error naming the tensor. Its logits on a few
tokens must then match the export's. Models too large to hold in fp32 next to the build are not
cross-checked (the record says so); the checkpoint checks of ``inspect`` still cover them.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.errors import ModelError, StageError

logger = logging.getLogger(__name__)

TOKENS = 16
MAX_PARAMETERS = 1_000_000_000  # 4 GB in fp32; larger models skip the cross-check
MAX_REL_DIFF = 1e-3  # max |logit diff| over the logits' range: fp32 vs fp32, only kernel rounding differs


def probe_ids(vocab_size: int) -> np.ndarray:
    """Fixed token ids spread over the vocabulary (no tokenizer needed)."""
    return (np.arange(TOKENS, dtype=np.int64) * 7919 + 1) % vocab_size


def crosscheck(model_dir: Path, export_dir: Path, work: Path, *, vocab_size: int, num_parameters: int, threads: int = 0) -> dict[str, Any]:
    """Compare the export's logits with transformers' on :func:`probe_ids`; return the record."""
    if num_parameters > MAX_PARAMETERS:
        return {"skipped": f"{num_parameters / 1e9:.1f} B parameters: too large to hold in fp32 beside the build"}
    from edgepipe.export.segmented import reference_logits

    ids = probe_ids(vocab_size)
    out = work / "torch_logits.npy"
    cmd = [sys.executable, "-m", "edgepipe.export.crosscheck", str(model_dir), str(out), ",".join(map(str, ids))]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if ln.strip()] or ["no output"]
        raise StageError(f"transformers could not run the checkpoint for the export cross-check: {lines[-1][:300]}")
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    for kind in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        if report.get(kind):
            raise ModelError(f"transformers reports {kind.replace('_', ' ')} loading the checkpoint, e.g. {report[kind][0]!r}; "
                             "it would initialise them at random: pass the complete checkpoint")
    torch_logits = np.load(out).astype(np.float64)
    onnx_logits = reference_logits(export_dir, [ids], threads=threads)[0].astype(np.float64)
    span = max(float(np.ptp(torch_logits)), 1e-6)
    diff = float(np.max(np.abs(torch_logits - onnx_logits)))
    agree = float(np.mean(torch_logits.argmax(-1) == onnx_logits.argmax(-1)))
    record = {"tokens": TOKENS, "max_abs_logit_diff": diff, "relative_diff": diff / span, "top1_agreement": agree}
    if not np.isfinite(diff) or diff / span > MAX_REL_DIFF:
        raise ModelError(
            f"the fp32 export does not compute what PyTorch does on {TOKENS} tokens (max |logit diff| {diff:.3g}, "
            f"{100 * diff / span:.2g}% of the logits' range, top-1 agreement {agree:.2f}): the exporter mis-read this "
            "checkpoint; this architecture variant is not supported"
        )
    logger.info("export cross-check: %s", record)
    return record


def _main(model_dir: str, out: str, ids: str) -> None:
    """Subprocess: load with transformers (fp32), report what it had to fix up, save the logits."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(max(1, min(4, os.cpu_count() or 1)))
    loaded: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, output_loading_info=True)
    model, info = loaded
    model.eval()
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[int(i) for i in ids.split(",")]])).logits[0]
    np.save(out, logits.float().numpy())
    print(json.dumps({k: [str(x) for x in v] for k, v in info.items() if isinstance(v, (list, set, tuple))}))


if __name__ == "__main__":
    _main(*sys.argv[1:4])
