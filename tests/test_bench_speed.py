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


@pytest.mark.parametrize("fmt", ["int4/b32/asym", "int4/b128/sym", "int8/b64/asym", "int4/b32/asym@0"])
def test_format_graphs_run_with_their_format(fmt, monkeypatch, tmp_path):
    import onnxruntime as ort

    shape = formats.Shape(hidden=128, inter=256, qkv=128 + 2 * 32, vocab=512, layers=2)
    model = formats.body_graph(fmt, shape=shape)
    bits, block, sym = formats.parse_format(fmt)
    nodes = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nodes) == 2 * len(shape.body())
    for n in nodes:
        attrs = {a.name: a.i for a in n.attribute}
        assert (attrs["bits"], attrs["block_size"], attrs["accuracy_level"]) == (bits, block, formats.accuracy_level(fmt))
        assert len(n.input) == (3 if sym else 4)  # a zero-point input only for asymmetric formats
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for m in (1, 3):
        (y,) = sess.run(None, {"x": np.ones((m, shape.hidden), np.float32)})
        assert y.shape == (m, shape.hidden) and np.isfinite(y).all()


def test_format_names_accuracy_levels_and_bytes():
    assert formats.parse_format("int4/b32/asym@0") == (4, 32, False)
    assert [formats.accuracy_level(f) for f in ("int4/b32/asym", "int4/b32/asym@0", "int8/b64/sym@1")] == [4, 0, 1]
    # data + fp32 scale per block (+ a zero point of the same width per block when asymmetric)
    assert formats.bytes_per_weight("int4/b32/asym") == 0.5 + 4 / 32 + 0.5 / 32
    assert formats.bytes_per_weight("int4/b128/sym") == 0.5 + 4 / 128
    assert formats.bytes_per_weight("int8/b64/asym@1") == 1 + 4 / 64 + 1 / 64
    one_b = formats.SHAPES["llama3.2-1b"]  # Llama-3.2-1B's 1,235,814,400 parameters: body + tied table + norms
    assert formats.weights_of("body", one_b) + formats.weights_of("head", one_b) + (2 * 16 + 1) * 2048 == 1_235_814_400


def test_profile_reader_counts_each_call(monkeypatch, tmp_path):
    """Kernel time per ``run`` call, split by M, one figure per call: what the medians are taken over."""
    monkeypatch.setattr(formats, "SHAPE", formats.Shape(hidden=576, inter=1536, qkv=960, vocab=256, layers=1))
    timed = formats.Timed(formats.head_graph("int4/b32/asym"), 1, tmp_path, "head")
    timed.run(1, 3)
    timed.run(512, 1)
    timed.run(1, 2)
    ns = timed.kernel_ns()
    assert len(ns[1]) == 2 and len(ns[512]) == 1
    assert all(v > 0 for v in ns[1] + ns[512])
    assert formats.weights_of("head") == 576 * 256


def test_session_option_variants_merge_and_unknown_names_are_refused(capsys):
    merged = session_options.resolve("chunk-128+mem-pattern-off+prepack-off")
    assert merged["chunk"] == 128 and merged["mem_pattern"] is False
    assert merged["config"] == {"session.disable_prepacking": "1"} and merged["tg"] == session_options.SLOW_TG
    assert session_options.resolve("default") == {"config": {}}
    assert session_options.resolve("lut-gemm")["config"] == {"mlas.use_lut_gemm": "1"}
    both = session_options.resolve("gqa-flash-off+chunk-256")
    assert both["env"] == {"ORT_GQA_DISABLE_FLASH_ATTENTION": "1"} and both["chunk"] == 256
    assert session_options.main(["--artifact", "x", "--variants", "default,nope"]) == 2
    assert "nope" in capsys.readouterr().err
