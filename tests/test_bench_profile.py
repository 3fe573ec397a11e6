"""benchmarks/profile_parse.py: the readers behind ``benchmarks/profile_ops.py``'s breakdowns.

onnxruntime's profile of a tiny graph built here (two MatMuls and an Add) must come back as
kernel time by op type and node, inside the runs asked for; perf report text and disassembly
fixtures must land in the categories the comparison with llama.cpp relies on. No timing asserts.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.profile_parse import (  # noqa: E402
    PerfRow,
    categorize,
    classify_asm,
    fde_ranges,
    function_of,
    group,
    load_ort_profile,
    ort_breakdown,
    ort_runs,
    ort_table,
    perf_rows,
)


def _tiny_model(path: Path) -> None:
    w1 = numpy_helper.from_array(np.ones((8, 16), np.float32), "w1")
    w2 = numpy_helper.from_array(np.ones((16, 4), np.float32), "w2")
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"], name="first_mm"),
        helper.make_node("Add", ["h", "h"], ["h2"], name="the_add"),
        helper.make_node("MatMul", ["h2", "w2"], ["y"], name="second_mm"),
    ]
    graph = helper.make_graph(
        nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [None, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None, 4])], [w1, w2],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8), str(path))


def test_ort_profile_becomes_op_and_node_table(tmp_path):
    _tiny_model(tmp_path / "m.onnx")
    so = ort.SessionOptions()
    so.enable_profiling = True
    so.profile_file_prefix = str(tmp_path / "prof")
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # keep the three nodes
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), so, providers=["CPUExecutionProvider"])
    for _ in range(5):
        sess.run(None, {"x": np.ones((3, 8), np.float32)})
    events = load_ort_profile(sess.end_profiling())
    assert len(ort_runs(events)) == 5
    b = ort_breakdown(events, first_run=2)
    assert b.runs == 3
    assert set(b.by_op) == {"MatMul", "Add"}
    assert set(b.by_node) == {"first_mm", "the_add", "second_mm"}
    assert b.by_node["the_add"][0] == "Add"
    assert abs(sum(b.by_op.values()) - b.kernel_us) < 1e-6
    assert 0 < b.kernel_us <= b.run_us
    # kernels of runs 0-1 are excluded: fewer than all five runs' kernels
    assert b.kernel_us < ort_breakdown(events).kernel_us
    table = ort_table(b, per=b.runs, top=2)
    assert table[0].startswith("| op type |")
    node_rows = table[table.index("") + 3 :]
    assert len(node_rows) == 2 and all(ln.split(" | ")[0].lstrip("| ") in b.by_node for ln in node_rows)


PERF_FIXTURE = """\
# Samples: 41  of event 'cpu-clock:pppH'
#
# Overhead  Shared Object        Symbol
# ........  ...................  ..........
#
    40.00%  llama-bench          [.] ggml_vec_dot_q4_0_q8_0
    10.00%  llama-bench          [.] ggml_vec_dot_q6_K_q8_K
     8.00%  libgomp.so.1.0.0     [.] 0x000000000001f7da
     6.00%  llama-bench          [.] ggml_barrier
     5.00%  llama-bench          [.] quantize_row_q8_0
     4.00%  llama-bench          [.] ggml_compute_forward_flash_attn_ext
     3.00%  llama-bench          [.] ggml_compute_forward_rms_norm_f32
     2.00%  llama-bench          [.] ggml_compute_forward_rope_f32
     2.00%  [kernel.kallsyms]    [k] _raw_spin_unlock_irqrestore
     1.50%  libpython3.11.so.1.0 [.] _PyEval_EvalFrameDefault
     1.00%  onnxruntime_pybind11_state.cpython-311-x86_64-linux-gnu.so  [.] 0x00000000004a1b2c
     0.50%  libc.so.6            [.] __memmove_evex_unaligned_erms
"""


def test_perf_report_rows_and_categories():
    rows = perf_rows(PERF_FIXTURE)
    assert len(rows) == 12
    assert rows[0] == PerfRow(40.0, "llama-bench", "ggml_vec_dot_q4_0_q8_0", False)
    assert rows[8].kernel
    cats = {r.symbol: categorize(r) for r in rows}
    assert cats["ggml_vec_dot_q4_0_q8_0"] == "matmul Q4_0"
    assert cats["ggml_vec_dot_q6_K_q8_K"] == "matmul Q6_K"
    repacked = PerfRow(1.0, "llama-bench", "gemv_q4_b32_8x8_q8_0_lut_avx<block<4, 8> >", False)
    assert categorize(repacked) == "matmul Q4_0"
    assert categorize(PerfRow(1.0, "llama-bench", "ggml_threadpool_chunk_add", False)) == "threading / barrier / spin"
    assert cats["quantize_row_q8_0"] == "activation quantize"
    assert cats["0x000000000001f7da"] == "threading / barrier / spin"  # stripped libgomp
    assert cats["ggml_barrier"] == "threading / barrier / spin"
    assert cats["ggml_compute_forward_flash_attn_ext"] == "attention / softmax"
    assert cats["ggml_compute_forward_rms_norm_f32"] == "norm"
    assert cats["ggml_compute_forward_rope_f32"] == "rope"
    assert cats["_raw_spin_unlock_irqrestore"] == "OS kernel"
    assert cats["_PyEval_EvalFrameDefault"] == "host: python"
    assert cats["0x00000000004a1b2c"] == "unlabelled (onnxruntime_pybind11_state)"
    labelled = group(rows, {"0x00000000004a1b2c": "matmul int8 dot (VNNI)"})
    assert labelled["matmul int8 dot (VNNI)"] == 1.0
    assert abs(sum(labelled.values()) - sum(r.pct for r in rows)) < 1e-9
    assert list(labelled)[0] == "matmul Q4_0"  # largest first


def test_fde_ranges_and_lookup():
    frames = """\
00000018 0000000000000014 0000001c FDE cie=00000000 pc=0000000000001000..0000000000001050
00000030 0000000000000024 00000034 FDE cie=00000000 pc=0000000000002000..0000000000002400
"""
    ranges = fde_ranges(frames)
    assert ranges == [(0x1000, 0x1050), (0x2000, 0x2400)]
    assert function_of(ranges, 0x1010) == (0x1000, 0x1050)
    assert function_of(ranges, 0x1050) is None
    assert function_of(ranges, 0x23FF) == (0x2000, 0x2400)
    assert function_of(ranges, 0x10) is None


def test_classify_asm():
    vnni = "  4a1b2c:\tvpdpbusd %zmm1,%zmm2,%zmm3\n  4a1b32:\tvpaddd %zmm3,%zmm4,%zmm4\n"
    assert classify_asm(vnni) == "matmul int8 dot (VNNI)"
    fma = "  10:\tvfmadd231ps %zmm0,%zmm1,%zmm2\n"
    assert classify_asm(fma) == "matmul fp32 FMA (AVX-512)"
    spin = "  10:\tpause\n  12:\tmov (%rdi),%eax\n  14:\ttest %eax,%eax\n  16:\tje 10\n"
    assert classify_asm(spin) == "threading / barrier / spin"
    assert classify_asm("  10:\tsdot v0.4s, v1.16b, v2.16b\n") == "matmul int8 dot (ARM dotprod)"
    assert classify_asm("  10:\tmov %rax,%rbx\n") == "other onnxruntime"


def test_classify_asm_thread_pool_queue():
    queue = "  10:\tmov %ecx,%eax\n  12:\tlock cmpxchg %r12b,(%r8)\n  17:\tand $0x3ff,%edi\n"
    assert classify_asm(queue) == "threading / barrier / spin"
    # a kernel that also uses an atomic stays a kernel
    assert classify_asm(queue + "  20:\tvpdpbusd %zmm1,%zmm2,%zmm3\n") == "matmul int8 dot (VNNI)"


def test_tok_s_of_a_recorded_run():
    from benchmarks.profile_ops import tok_s

    bench = "| llama ?B Q4_0 |  87.49 MiB | 134.52 M | CPU | 2 | tg64 | 123.45 ± 1.20 |\n"
    assert tok_s(bench) == "123.45 ± 1.20"
    assert tok_s("tok/s 98.70\n") == "98.70"
    assert tok_s("nothing") == "?"



def test_a_prefill_is_one_session_run_per_chunk():
    """The profile's prefill figures are per prefill: the runtime feeds a prompt in runs of
    ``DEFAULT_PREFILL_CHUNK`` tokens, so a 512-token prefill is 4 session runs (the warm-up's too)."""
    from benchmarks.profile_ops import runs_per_prefill
    from edgepipe.runtime.model import DEFAULT_PREFILL_CHUNK

    assert runs_per_prefill(512, 128) == 4 and runs_per_prefill(500, 128) == 4 and runs_per_prefill(129, 128) == 2
    assert runs_per_prefill(512, 0) == 1 and runs_per_prefill(512, 512) == 1
    assert runs_per_prefill(512, DEFAULT_PREFILL_CHUNK) == -(-512 // DEFAULT_PREFILL_CHUNK)


IN_ASM = """\
----------------
IN: 
0x7f0000001000:  d503201f  nop      
0x7f0000001004:  d4000001  svc      #0

----------------
IN: 
0x7f0000102000:  4f98e27a  .byte    0x7a, 0xe2, 0x98, 0x4f
0x7f0000102004:  6f98e27a  .byte    0x7a, 0xe2, 0x98, 0x6f
0x7f0000102008:  4e20cc00  fmla     v0.4s, v0.4s, v0.4s
0x7f000010200c:  4e80a400  .byte    0x00, 0xa4, 0x80, 0x4e

----------------
IN: 
0x7f0000103000:  4e400c00  fmla     v0.8h, v0.8h, v0.8h
"""


def test_aarch64_in_asm_blocks_and_kernel_functions():
    from benchmarks.profile_aarch64 import after_marker, insn_class, kernel_functions, parse_in_asm

    blocks = parse_in_asm(IN_ASM)
    assert [b.addr for b in blocks] == [0x7F0000001000, 0x7F0000102000, 0x7F0000103000]
    assert insn_class(0x4F98E27A) == "dotprod sdot (element)"
    assert insn_class(0x6F98E27A) == "dotprod udot (element)"
    assert insn_class(0x4E80A400) == "i8mm smmla"
    assert insn_class(0x4E20CC00) == "fp32 fmla .4s"
    assert insn_class(0x4E400C00) == "fp16 fmla .8h"
    assert insn_class(0xD503201F) is None
    work = after_marker(blocks, 0x7F0000001000)
    assert len(work) == 2
    # the library's executable mapping starts at 0x7f0000100000, file offset 0x1000
    maps = [["7f0000100000-7f0000200000", "r-xp", "00001000", "fe:00", "1", "/x/lib.so"],
            ["7f0000200000-7f0000300000", "r--p", "00101000", "fe:00", "1", "/x/lib.so"]]
    found = kernel_functions(work, maps, [(0x3000, 0x3100)])
    assert found[(0x3000, 0x3100)] == {"dotprod sdot (element)": 1, "dotprod udot (element)": 1,
                                       "fp32 fmla .4s": 1, "i8mm smmla": 1}
    assert found[(0x4000, 0x4040)] == {"fp16 fmla .8h": 1}  # no unwind record: its 64-byte line
