"""benchmarks/formats.py and benchmarks/session_options.py: the parts that decide what is timed
(no timings are asserted).

* formats: each format's graph is a valid onnxruntime model whose MatMulNBits nodes carry that
  format, and the profile reader attributes kernel time to each ``run`` call;
* session options: variants joined with ``+`` merge (config entries too), unknown names are refused.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import formats, session_options  # noqa: E402


@pytest.mark.parametrize("fmt", ["int4/b32/asym", "int4/b128/sym", "int8/b64/asym"])
def test_format_graphs_run_with_their_format(fmt, monkeypatch, tmp_path):
    import onnxruntime as ort

    monkeypatch.setattr(formats, "LAYERS", 2)
    model = formats.body_graph(fmt)
    bits, block, sym = formats.parse_format(fmt)
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 2 * len(formats.BODY)
    for n in nodes:
        attrs = {a.name: a.i for a in n.attribute}
        assert (attrs["bits"], attrs["block_size"], attrs["accuracy_level"]) == (bits, block, 4)
        assert len(n.input) == (3 if sym else 4)  # a zero-point input only for asymmetric formats
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for m in (1, 3):
        (y,) = sess.run(None, {"x": np.ones((m, formats.HIDDEN), np.float32)})
        assert y.shape == (m, formats.HIDDEN) and np.isfinite(y).all()


def test_profile_reader_counts_each_call(monkeypatch, tmp_path):
    """Kernel time per ``run`` call, split by M, one figure per call: what the medians are taken over."""
    monkeypatch.setattr(formats, "VOCAB", 256)
    timed = formats.Timed(formats.head_graph("int4/b32/asym"), 1, tmp_path, "head")
    timed.run(1, 3)
    timed.run(512, 1)
    timed.run(1, 2)
    ns = timed.kernel_ns()
    assert len(ns[1]) == 2 and len(ns[512]) == 1
    assert all(v > 0 for v in ns[1] + ns[512])
    assert formats.weights_of("head") == formats.HIDDEN * 256


def test_session_option_variants_merge_and_unknown_names_are_refused(capsys):
    merged = session_options.resolve("chunk-128+mem-pattern-off+prepack-off")
    assert merged["chunk"] == 128 and merged["mem_pattern"] is False
    assert merged["config"] == {"session.disable_prepacking": "1"} and merged["tg"] == session_options.SLOW_TG
    assert session_options.resolve("default") == {"config": {}}
    both = session_options.resolve("gqa-flash-off+chunk-256")
    assert both["env"] == {"ORT_GQA_DISABLE_FLASH_ATTENTION": "1"} and both["chunk"] == 256
    assert session_options.main(["--artifact", "x", "--variants", "default,nope"]) == 2
    assert "nope" in capsys.readouterr().err
