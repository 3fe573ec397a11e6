"""The fp32 reference must be a language model before anything is measured against it.

Every accuracy budget is relative to the fp32 export: a checkpoint whose reference is garbage
(random weights, a broken conversion) makes garbage-vs-garbage look perfect. A model that guesses
uniformly over its vocabulary has perplexity equal to the vocabulary size; a trained one is far
below it (SmolLM2-135M: ~31 of 49152; the tests' tiny models, trained a few dozen steps: 94-101 of
their 384; a random-init one: near 384). So the reference's perplexity on the eval text must stay
under a fraction of that bound, unless the caller builds an untrained model on purpose (tests, shape benchmarks) and
says so (``allow_random_weights``), which the manifest records.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from edgepipe.errors import ModelError

# perplexity of the fp32 reference, as a fraction of the uniform-guess bound (the vocabulary size)
MAX_REFERENCE_PPL_FRACTION = 0.5


def check_reference(accuracy: Mapping[str, Any], vocab_size: int, *, allow_random_weights: bool) -> dict[str, Any]:
    """Refuse (exit 2, with the evidence) a model whose fp32 reference is no better than guessing;
    return the manifest's record of the check."""
    ppl = accuracy.get("reference_perplexity")
    bound = MAX_REFERENCE_PPL_FRACTION * vocab_size
    record = {"reference_perplexity": ppl, "uniform_perplexity": vocab_size, "max_reference_perplexity": bound,
              "allow_random_weights": allow_random_weights}
    if allow_random_weights or not isinstance(ppl, (int, float)):
        return record
    if not math.isfinite(ppl) or ppl > bound:
        raise ModelError(
            f"the model's fp32 perplexity on the eval text is {ppl:.4g}, near or above a uniform guess over its "
            f"{vocab_size} tokens (must be below {bound:.0f}): the weights are untrained or broken; "
            "pass a trained checkpoint (or --allow-untrained for a random model on purpose)"
        )
    return record
