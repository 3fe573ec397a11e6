"""The Fisher sensitivity proxy: every matrix of an export found among the checkpoint's linears (fused
qkv / gate_up included), and its prediction ranks matrices as quantizing them really costs."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import ARCHS


def _export_matrices(model_dir):
    import onnx
    from onnx import numpy_helper

    from edgepipe.quantize.bitplan import plan_from_onnx
    from edgepipe.quantize.configs import Rtn

    names = {e.matrix.name for e in plan_from_onnx(model_dir / "model.onnx", Rtn(bits=4, block_size=32))}
    model = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    return {t.name: numpy_helper.to_array(t, base_dir=str(model_dir)) for t in model.graph.initializer if t.name in names}


@pytest.mark.parametrize("arch", ARCHS)
def test_every_export_matrix_matches_checkpoint_linears(zoo, arch):
    from edgepipe.quantize.fisher import LinearIndex, fisher_pair, fisher_statistics

    stats, weights = fisher_statistics(zoo.model(arch), [zoo.eval_ids(64)])
    index = LinearIndex(weights)
    for name, w in _export_matrices(zoo.fp32(arch)).items():
        parts = index.split(w)
        assert parts, f"{arch}: {name} {w.shape} matches no linear"
        a, b, _full = fisher_pair(stats, parts)
        assert a.shape == (w.shape[0],) and b.shape == (w.shape[1],)
        assert np.all(a > 0) and np.all(b > 0)
