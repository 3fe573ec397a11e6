"""benchmarks/bandwidth.py: the yardstick behind "decode at N % of read bandwidth".

* bytes a decode step reads, counted on a real built artifact: every weight a step multiplies by,
  never a table it reads one row of (the rotary cos/sin caches of GroupQueryAttention, an
  untied embedding);
* the bandwidth program compiles and both of its kernels sum the buffer (no timing is asserted).
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import bandwidth  # noqa: E402


def test_read_bytes_leave_out_tables_read_one_row_per_token(llama_artifact):
    import onnx

    got = bandwidth.onnx_read_bytes(llama_artifact)
    m = onnx.load(str(llama_artifact / "model.onnx"), load_external_data=False)
    gqa = [n for n in m.graph.node if n.op_type == "GroupQueryAttention"]
    assert gqa, "the tiny Llama's builder graph has GroupQueryAttention"
    rotary = {n.input[i] for n in gqa for i in bandwidth.GQA_ROW_INPUTS}
    assert rotary and rotary <= set(got["gather_only"])
    # the tied table is the lm_head's weight too: every step reads it whole, so it is counted
    tied = {n.input[1] for n in m.graph.node if n.op_type == "MatMulNBits"}
    assert not tied & set(got["gather_only"])
    sizes = {}
    for t in m.graph.initializer:
        ext = {e.key: e.value for e in t.external_data}
        sizes[t.name] = int(ext["length"]) if "length" in ext else len(t.raw_data)
    assert got["tensor_bytes"] == sum(sizes.values())
    assert got["read_bytes_per_token"] == got["tensor_bytes"] - sum(sizes[n] for n in got["gather_only"])
    weights = sum(sizes[n] for node in m.graph.node if node.op_type == "MatMulNBits" for n in node.input[1:] if n in sizes)
    norms = sum(sizes[n] for node in m.graph.node if node.op_type.endswith("LayerNormalization") for n in node.input if n in sizes)
    assert weights + norms <= got["read_bytes_per_token"] <= weights + norms + 1024  # the rest: a few shape constants


@pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc")
def test_bandwidth_program_runs_both_kernels(tmp_path):
    for kernel in ("sum", "vec4"):
        assert bandwidth.measure(tmp_path, threads=1, mib=8, kernel=kernel, reps=1) > 0
    assert len(list(tmp_path.glob("bwread-*.c"))) == 1  # compiled once, named by its source
