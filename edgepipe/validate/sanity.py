"""The fp32 reference must be a language model (or a sentence encoder) before anything is measured against it.

Every accuracy budget is relative to the fp32 export: a checkpoint whose reference is garbage
(random weights, a broken conversion) makes garbage-vs-garbage look perfect. A model that guesses
uniformly over its vocabulary has perplexity equal to the vocabulary size; a trained one is far
below it (SmolLM2-135M: ~31 of 49152; the tests' tiny models, trained a few dozen steps: 94-101 of
their 384; a random-init one: near 384). So the reference's perplexity on the eval text must stay
under a fraction of that bound, unless the caller builds an untrained model on purpose (tests, shape benchmarks) and
says so (``allow_random_weights``), which the manifest records.

A sentence encoder predicts no tokens; its counterpart is a retrieval check on a small semantic-search
set shipped with edgepipe (queries and the documents that answer them, in other words): a trained
encoder finds each query's document, an untrained or broken one does little better than chance.
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


# sentence encoders: top-1 query -> document retrieval of the fp32 graph on the shipped semantic-search
# set (20 pairs, chance 0.05). Measured: all-MiniLM-L6-v2 1.00; random-init BERTs (MiniLM's shape, a
# 2-layer one, weights drawn with MiniLM's own statistics, rows shuffled) 0.00-0.25; MiniLM with random
# layers over its trained embeddings 0.50; MiniLM's weights cast to int8 0.05 (every embedding zero).
MIN_ENCODER_RETRIEVAL = 0.6
MAX_MEAN_COSINE = 0.99  # of different sentences: above it, every sentence gets the same embedding


def check_encoder_reference(queries: Any, documents: Any, *, allow_random_weights: bool) -> dict[str, Any]:
    """Refuse (exit 2, with the evidence) an fp32 encoder whose embeddings are not finite, are zero or
    all alike, or do not find a query's document (``queries[i]`` belongs to ``documents[i]``) far
    better than chance; return the manifest's record. NaN, Inf or zero embeddings are refused even
    with ``allow_random_weights`` (a random model on purpose still computes numbers)."""
    import numpy as np

    q, d = np.asarray(queries, dtype=np.float64), np.asarray(documents, dtype=np.float64)
    if not (np.all(np.isfinite(q)) and np.all(np.isfinite(d))):
        raise ModelError("the model's fp32 embeddings hold NaN or Inf: the weights are broken; pass a trained checkpoint")
    norms = np.concatenate([np.linalg.norm(q, axis=1), np.linalg.norm(d, axis=1)])
    if float(norms.min()) <= 1e-6:
        raise ModelError("the model's fp32 embedding of a sentence is all zeros: the weights are broken "
                         "(e.g. a conversion that stored them as integers); pass a trained checkpoint")
    unit = np.concatenate([q, d]) / norms[:, None]
    sims = unit @ unit.T
    mean_cos = float(sims[~np.eye(len(sims), dtype=bool)].mean())
    top1 = float(np.mean(np.argmax(unit[: len(q)] @ unit[len(q):].T, axis=1) == np.arange(len(q))))
    record = {"retrieval_top1": round(top1, 4), "min_retrieval_top1": MIN_ENCODER_RETRIEVAL, "chance": round(1 / len(d), 4),
              "mean_cosine_between_sentences": round(mean_cos, 4), "allow_random_weights": allow_random_weights}
    if allow_random_weights:
        return record
    if mean_cos > MAX_MEAN_COSINE:
        raise ModelError(f"the model's fp32 embeddings of different sentences are all alike (mean cosine {mean_cos:.4f}): "
                         "the weights are untrained or broken; pass a trained checkpoint (or --allow-untrained for a random model on purpose)")
    if top1 < MIN_ENCODER_RETRIEVAL:
        raise ModelError(
            f"the model's fp32 embeddings find the right document for {top1:.0%} of the {len(q)} queries of edgepipe's "
            f"semantic-search check (chance {1 / len(d):.0%}, must be at least {MIN_ENCODER_RETRIEVAL:.0%}): the weights are "
            "untrained or broken, or this is no sentence-embedding model; pass a trained one (or --allow-untrained for a random model on purpose)"
        )
    return record
