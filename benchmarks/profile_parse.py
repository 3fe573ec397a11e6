"""Pure parsing and grouping for ``benchmarks/profile_ops.py`` (no timing, no subprocesses).

* onnxruntime's profile (``SessionOptions.enable_profiling``): a JSON list of trace events. Each
  ``session.run`` is one ``Session`` event named ``model_run``; each node's kernel is a ``Node``
  event named ``<node>_kernel_time`` with ``args.op_name``. :func:`ort_breakdown` sums the kernels
  that fall inside the chosen runs, by operator type and by node.
* ``perf report --stdio --no-children --sort dso,sym``: one line per (DSO, symbol) with its share
  of the samples. :func:`perf_rows` reads them, :func:`categorize` files each under one category
  (matmul by quant type, attention / softmax, norm, rope, threading / spin, host, other) so that
  ggml's and onnxruntime's functions are compared by what they do.
* The onnxruntime wheel is stripped (no MLAS names for perf). Its functions are still delimited by
  the ``.eh_frame`` records (:func:`fde_ranges`), and each hot one is labelled by the instructions
  it runs (:func:`classify_asm`: VNNI ``vpdpbusd`` = int8 dot kernel, ``pause`` = spin loop, ...).
"""

from __future__ import annotations

import bisect
import json
import re
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# ---------------------------------------------------------------- onnxruntime's profiler


@dataclass(frozen=True)
class OrtBreakdown:
    """Kernel time (µs) of the chosen runs of a profiled session."""

    runs: int
    run_us: float  # the model_run events' durations, summed
    kernel_us: float  # every node kernel inside those runs, summed
    by_op: dict[str, float] = field(default_factory=dict)
    by_node: dict[str, tuple[str, float]] = field(default_factory=dict)  # node -> (op type, µs)

    @property
    def outside_kernels_us(self) -> float:
        """Session time that no kernel accounts for (executor, binding, allocation, profiler)."""
        return self.run_us - self.kernel_us


def load_ort_profile(path: Path | str) -> list[dict[str, Any]]:
    events = json.loads(Path(path).read_text())
    return [e for e in events if isinstance(e, dict)]


def ort_runs(events: list[dict[str, Any]]) -> list[tuple[float, float]]:
    """``(start µs, duration µs)`` of every ``session.run``, in order."""
    runs = [(float(e["ts"]), float(e["dur"])) for e in events if e.get("cat") == "Session" and e.get("name") == "model_run"]
    return sorted(runs)


def ort_breakdown(events: list[dict[str, Any]], first_run: int = 0, last_run: int | None = None) -> OrtBreakdown:
    """The kernels of runs ``first_run`` .. ``last_run`` (exclusive; default: to the end) by op type
    and by node. A kernel belongs to the run whose interval holds its start."""
    runs = ort_runs(events)[first_run:last_run]
    starts = [s for s, _ in runs]
    by_op: dict[str, float] = defaultdict(float)
    by_node: dict[str, tuple[str, float]] = {}
    total = 0.0
    for e in events:
        name = str(e.get("name", ""))
        if e.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        ts, dur = float(e["ts"]), float(e["dur"])
        i = bisect.bisect_right(starts, ts) - 1
        if i < 0 or ts > runs[i][0] + runs[i][1]:
            continue
        op = str(e.get("args", {}).get("op_name", "?"))
        node = name.removesuffix("_kernel_time")
        by_op[op] += dur
        by_node[node] = (op, by_node.get(node, (op, 0.0))[1] + dur)
        total += dur
    return OrtBreakdown(len(runs), sum(d for _, d in runs), total, dict(by_op), by_node)


def ort_table(b: OrtBreakdown, *, per: int = 1, top: int = 8) -> list[str]:
    """Markdown: µs per ``per`` (a step, a prefill) and share of the kernel time, by op type, then
    the ``top`` nodes."""
    div = max(per, 1)
    kern = b.kernel_us or 1.0
    lines = ["| op type | µs per run | share of kernel time |", "|---|---:|---:|"]
    for op, us in sorted(b.by_op.items(), key=lambda kv: -kv[1]):
        lines.append(f"| {op} | {us / div:.1f} | {100 * us / kern:.1f} % |")
    lines += ["", "| top node | op | µs per run | share |", "|---|---|---:|---:|"]
    for node, (op, us) in sorted(b.by_node.items(), key=lambda kv: -kv[1][1])[:top]:
        lines.append(f"| {node} | {op} | {us / div:.1f} | {100 * us / kern:.1f} % |")
    return lines


# ---------------------------------------------------------------- perf report

_PERF_LINE = re.compile(r"^\s*(\d+(?:\.\d+)?)%\s+(\S+)\s+\[([.k])\]\s+(.*?)\s*$")


@dataclass(frozen=True)
class PerfRow:
    pct: float
    dso: str
    symbol: str
    kernel: bool  # [k]: the OS kernel


def perf_rows(text: str) -> list[PerfRow]:
    """The rows of ``perf report --stdio --no-children --sort dso,sym`` (comments and blanks skipped)."""
    rows = []
    for line in text.splitlines():
        m = _PERF_LINE.match(line)
        if m:
            rows.append(PerfRow(float(m[1]), m[2], m[4], m[3] == "k"))
    return rows


# ordered: the first pattern that matches the symbol names the category
CATEGORY_RULES: tuple[tuple[str, str], ...] = (
    (r"quantize_row|quantize_mat|QuantizeA", "activation quantize"),
    (r"q4_0|q4_b32", "matmul Q4_0"),  # ggml repacks Q4_0 to 8 interleaved rows (q4_b32_8x8 kernels)
    (r"q4_K", "matmul Q4_K"),
    (r"q6_K", "matmul Q6_K"),
    (r"q5_K|q5_0|q5_1", "matmul Q5"),
    (r"q8_0_q8_0|q8_0", "matmul Q8_0"),
    (r"flash_attn|soft_max|softmax|Softmax|GroupQueryAttention|GQA|Attention", "attention / softmax"),
    (r"rms_norm|LayerNorm|layer_norm|_norm", "norm"),
    (r"rope|Rotary", "rope"),
    (r"barrier|gomp_|GOMP_|omp_|spin|pause|ThreadPool|threadpool|WorkerLoop|futex|sched_yield|do_wait|"
     r"ggml_graph_compute_thread|ggml_graph_compute_check", "threading / barrier / spin"),
    (r"mul_mat|gemm|gemv|vec_dot|Gemm|MatMul|QNBit|SQ4Bit|SQ8Bit|sgemm|Sgemm|tinyBLAS|micro_vnni", "matmul other"),
    (r"silu|swiglu|gelu|_mul_f32|_add_f32|ggml_vec_mul|ggml_vec_add|vec_scale|get_rows|cpy|dup|"
     r"fp16_to_fp32|fp32_to_fp16", "elementwise / copies"),
)
HOST_DSOS = (r"^(lib)?python", "host: python"), (r"numpy|_multiarray|openblas", "host: numpy")


def categorize(row: PerfRow, labels: dict[str, str] | None = None) -> str:
    """The category of one perf row. ``labels`` maps a symbol (an address in a stripped DSO) to
    a category found otherwise (:func:`classify_asm`)."""
    if labels and row.symbol in labels:
        return labels[row.symbol]
    if row.kernel:
        return "OS kernel"
    for pattern, cat in HOST_DSOS:
        if re.search(pattern, Path(row.dso).name):
            return cat
    for pattern, cat in CATEGORY_RULES:
        if re.search(pattern, row.symbol):
            return cat
    if "libgomp" in row.dso:
        return "threading / barrier / spin"
    if row.symbol.startswith("0x"):
        return f"unlabelled ({short_dso(row.dso)})"
    return "other"


def short_dso(dso: str) -> str:
    return Path(dso).name.split(".cpython")[0]


def group(rows: list[PerfRow], labels: dict[str, str] | None = None) -> dict[str, float]:
    """Share of the samples (%) per category, largest first."""
    out: dict[str, float] = defaultdict(float)
    for r in rows:
        out[categorize(r, labels)] += r.pct
    return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def top_symbols(rows: list[PerfRow], n: int = 8) -> list[PerfRow]:
    return sorted(rows, key=lambda r: -r.pct)[:n]


# ---------------------------------------------------------------- stripped functions

_FDE = re.compile(r"\bFDE\b.*?pc=([0-9a-f]+)\.\.([0-9a-f]+)")


def fde_ranges(readelf_frames: str) -> list[tuple[int, int]]:
    """``(start, end)`` of every function ``readelf --debug-dump=frames`` lists (one FDE each), sorted."""
    return sorted({(int(a, 16), int(b, 16)) for a, b in _FDE.findall(readelf_frames)})


def function_of(ranges: list[tuple[int, int]], addr: int) -> tuple[int, int] | None:
    """The FDE range holding ``addr`` (None: no unwind record covers it, e.g. a hand-written kernel)."""
    i = bisect.bisect_right(ranges, (addr, float("inf"))) - 1
    if i >= 0 and ranges[i][0] <= addr < ranges[i][1]:
        return ranges[i]
    return None


# mnemonic patterns, first match wins: what kind of kernel a function is
ASM_RULES: tuple[tuple[str, str], ...] = (
    (r"\btdp\w+", "matmul int8 (AMX tiles)"),
    (r"\bvpdpbusds?\b|\bvpdpwssds?\b", "matmul int8 dot (VNNI)"),
    (r"\bvpmaddubsw\b", "matmul int8 dot (AVX2 maddubs)"),
    (r"\bvdpbf16ps\b", "matmul bf16"),
    (r"\bvfmadd\d+ps\b.*zmm", "matmul fp32 FMA (AVX-512)"),
    (r"\bvfmadd\d+ps\b", "matmul fp32 FMA (AVX2)"),
    (r"\bsdot\b|\budot\b", "matmul int8 dot (ARM dotprod)"),
    (r"\bsmmla\b|\bummla\b|\busmmla\b", "matmul int8 (ARM i8mm)"),
    (r"\bfmla\b", "matmul fp32 FMA (NEON)"),
)


def classify_asm(disassembly: str, hot: str | None = None) -> str:
    """A function's category from its disassembly (objdump): a function that loops on ``pause`` /
    ``yield`` and little else is a spin-wait; otherwise the first :data:`ASM_RULES` pattern that
    appears; else one with atomics (``lock cmpxchg``) is thread-pool bookkeeping (onnxruntime's
    work-stealing queues). ``hot``: the function's hottest instruction, if known (``pause`` = spin)."""
    if hot and re.search(r"\bpause\b|\byield\b", hot):
        return "threading / barrier / spin"
    body = [ln for ln in disassembly.splitlines() if "\t" in ln]
    if body and len(body) < 200 and any(re.search(r"\bpause\b", ln) for ln in body):
        return "threading / barrier / spin"
    for pattern, cat in ASM_RULES:
        if any(re.search(pattern, ln) for ln in body):
            return cat
    if any(re.search(r"\block\b", ln) for ln in body):  # atomics and no arithmetic: the thread pool's queues
        return "threading / barrier / spin"
    return "other onnxruntime"
