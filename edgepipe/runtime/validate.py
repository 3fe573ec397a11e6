"""Validate an artifact on this device: accuracy (against its own reference, or perplexity on a
text) and throughput. The body of ``python -m edgepipe.runtime validate``, which every device
runner calls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.errors import ArtifactError, InputError
from edgepipe.runtime.artifact import load_tokenizer, open_artifact
from edgepipe.runtime.evaluate import score, score_against_reference, windows_from_ids
from edgepipe.runtime.facts import device_facts
from edgepipe.runtime.kinds import spec_of
from edgepipe.runtime.progress import Progress

REFERENCE = "reference.npz"


def validate(
    artifact: Path | str,
    *,
    eval_text: str | None = None,
    max_tokens: int | None = None,
    window: int = 512,
    with_bench: bool = True,
    threads: int = 0,
    progress: Progress | None = None,
) -> dict[str, Any]:
    """Validate an artifact on this device.

    Without ``eval_text`` the model is scored on the artifact's own evaluation windows against the
    fp32 reference it carries (and against the build host's tokens); with ``eval_text`` only the
    perplexity of this model on that text can be measured here.
    """
    artifact = Path(artifact)
    if progress:
        progress("verifying manifest hashes")
    lm, manifest = open_artifact(artifact, threads=threads, generates=True)
    spec = spec_of(manifest.kind)
    result: dict[str, Any] = {"artifact": str(artifact), "verified": True, "device": device_facts()}
    if eval_text is not None:
        result["accuracy"] = _score_text(lm, load_tokenizer(artifact), eval_text, max_tokens, window, progress)
    elif not spec.has_reference:
        raise InputError(
            f"a {manifest.kind} artifact carries no reference logits (its build scored it on the HTP simulator); "
            "pass --eval FILE to measure perplexity on this device"
        )
    else:
        result["accuracy"] = _score_reference(lm, artifact / REFERENCE, max_tokens, progress)
    if with_bench:
        if progress:
            progress("measuring throughput")
        result["throughput"] = spec.run_bench(lm)
    return result


def _score_text(lm: Any, tok: Any, text: str, max_tokens: int | None, window: int, progress: Progress | None) -> dict[str, Any]:
    ids = tok.encode(text).ids
    if max_tokens:
        ids = ids[: max_tokens + 1]
    wins = windows_from_ids(ids, min(window, lm.context_length))  # the KV cache bounds a window
    if not wins:
        raise InputError("the eval text has fewer than 2 tokens; pass a longer --eval file")
    acc: dict[str, Any] = score(lm.logits, wins, progress=progress).result()
    acc["source"] = "eval text (no reference on this device)"
    return acc


def _score_reference(lm: Any, ref_path: Path, max_tokens: int | None, progress: Progress | None) -> dict[str, Any]:
    if not ref_path.is_file():
        raise ArtifactError(f"{ref_path} is missing; pass --eval FILE or rebuild the artifact")
    with np.load(ref_path) as z:
        ref = {k: z[k] for k in z.files}
    acc: dict[str, Any] = score_against_reference(lm.logits, ref, max_tokens=max_tokens, progress=progress)
    acc["source"] = "artifact reference windows (fp32 export's top-k and host top-1)"
    return acc
