"""benchmarks/step_invariance.py: where a several-token step's numbers part from one-token steps'.

README's lookup/draft section says why greedy text of an int4/int8 artifact can differ from plain
decoding at near-ties: onnxruntime's GroupQueryAttention rounds one query row differently from
several, while MatMulNBits (accuracy level 4) gives the same numbers for one row or several. This
checks both halves on a real tiny artifact, so an onnxruntime upgrade that changes either is seen.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.step_invariance import measure  # noqa: E402


def test_only_attention_depends_on_the_step_width(llama_artifact: Path) -> None:
    d = measure(llama_artifact, prefix=12, width=4)
    ops = {op for op, _, _ in d.per_node}
    assert {"MatMulNBits", "GroupQueryAttention"} <= ops
    assert np.isfinite(d.logits_diff)
    if d.first_op is None:  # all equal: then the logits are too
        assert d.logits_diff == 0.0
        return
    assert d.first_op == "GroupQueryAttention", d.first_node
    # tiny: a rounding difference, not a different computation
    assert 0.0 < d.first_diff < 1e-4
