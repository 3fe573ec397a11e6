"""What a weight format costs in kernel time on this machine: MatMulNBits per weight, per format.

A format's cost is its bytes AND its kernel time on the target. This times onnxruntime's
``MatMulNBits`` (``accuracy_level`` 4: int8 activations) for int4 blocks of 32 / 64 / 128,
symmetric and asymmetric, and int8 blocks of 64 / 128, on the default model's matrix shapes
(SmolLM2-135M: 30 layers of qkv 576x960, o 576x576, gate and up 576x1536, down 1536x576, and the
576x49152 lm_head), at M = 1 (a decode step) and M = 512 (a prefill).

Each format is one graph of the model's 30 layers' projections with random packed weights (kernel
time does not depend on the values), an RMS norm between layers to keep activations bounded, and
one lm_head graph. onnxruntime's profiler gives each MatMulNBits node's time; the sum over the
nodes, divided by the weights, is the figure (ns per weight), so the glue ops and the session's
call overhead are left out. Formats are timed interleaved (a rotating order per rep), medians of
the reps; ratios are against int4/b32/asym measured in the same run. Peak RSS of a session per
format is not measured here (``session_options.py`` measures whole artifacts).

    python benchmarks/formats.py [--reps 5] [--iters 20] [--threads 2] [--formats int4/b32/asym,...]

On a machine whose last-level cache holds the whole model (this host's reports 480 MiB), decode
kernels are not memory bound as they are on a Pi; say which machine the figures come from.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

REFERENCE = "int4/b32/asym"
FORMATS = [
    "int4/b32/asym", "int4/b32/sym", "int4/b64/asym", "int4/b64/sym", "int4/b128/asym", "int4/b128/sym",
    "int8/b64/asym", "int8/b64/sym", "int8/b128/asym", "int8/b128/sym",
]
HIDDEN, INTER, QKV, VOCAB, LAYERS = 576, 1536, 960, 49152, 30
BODY = [("qkv", HIDDEN, QKV), ("o", HIDDEN, HIDDEN), ("gate", HIDDEN, INTER), ("up", HIDDEN, INTER), ("down", INTER, HIDDEN)]
MS = (1, 512)


def parse_format(name: str) -> tuple[int, int, bool]:
    """``int4/b32/asym`` -> (bits, block, symmetric)."""
    bits, block, kind = name.split("/")
    return int(bits.removeprefix("int")), int(block.removeprefix("b")), kind == "sym"


def matmul_nbits(rng: np.random.Generator, name: str, x: str, y: str, K: int, N: int, fmt: str) -> tuple[Any, list[Any]]:
    """One MatMulNBits node and its initializers, in onnxruntime's layout, random values."""
    from onnx import helper, numpy_helper

    bits, block, sym = parse_format(fmt)
    nb = -(-K // block)
    data = rng.integers(0, 256, size=(N, nb, block * bits // 8), dtype=np.uint8)
    scales = (rng.uniform(0.5, 1.0, size=N * nb) / (8 * np.sqrt(K))).astype(np.float32)
    inits = [numpy_helper.from_array(data, f"{name}.q"), numpy_helper.from_array(scales, f"{name}.s")]
    inputs = [x, f"{name}.q", f"{name}.s"]
    if not sym:
        zp = rng.integers(0, 256, size=N * -(-nb * bits // 8), dtype=np.uint8)
        inits.append(numpy_helper.from_array(zp, f"{name}.zp"))
        inputs.append(f"{name}.zp")
    node = helper.make_node("MatMulNBits", inputs, [y], name=name, domain="com.microsoft",
                            K=K, N=N, bits=bits, block_size=block, accuracy_level=4)
    return node, inits


def body_graph(fmt: str, seed: int = 0) -> Any:
    """The 30 layers' projections chained as in the model: qkv -> slice -> o -> gate * up -> down -> norm."""
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    nodes: list[Any] = []
    inits = [numpy_helper.from_array(np.array([0], np.int64), "zero"), numpy_helper.from_array(np.array([HIDDEN], np.int64), "hid"),
             numpy_helper.from_array(np.array([-1], np.int64), "last"), numpy_helper.from_array(np.ones(HIDDEN, np.float32), "gamma")]
    x = "x"
    for i in range(LAYERS):
        p = f"l{i}"
        for (kind, K, N), src, dst in zip(BODY, [x, f"{p}.a", f"{p}.o", f"{p}.o", f"{p}.h"],
                                          [f"{p}.qkv", f"{p}.ov", f"{p}.g", f"{p}.u", f"{p}.d"], strict=True):
            node, w = matmul_nbits(rng, f"{p}.{kind}", src, dst, K, N, fmt)
            nodes.append(node)
            inits.extend(w)
            if kind == "qkv":
                nodes.append(helper.make_node("Slice", [dst, "zero", "hid", "last"], [f"{p}.a"]))
            elif kind == "o":
                nodes.append(helper.make_node("SimplifiedLayerNormalization", [dst, "gamma"], [f"{p}.o"], axis=-1, epsilon=1e-5))
            elif kind == "up":
                nodes.append(helper.make_node("Mul", [f"{p}.g", dst], [f"{p}.h"]))
        x = f"{p}.n"
        nodes.append(helper.make_node("SimplifiedLayerNormalization", [f"{p}.d", "gamma"], [x], axis=-1, epsilon=1e-5))
    graph = helper.make_graph(nodes, "body", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", HIDDEN])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["M", HIDDEN])], inits)
    return helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def head_graph(fmt: str, seed: int = 1) -> Any:
    from onnx import TensorProto, helper

    node, inits = matmul_nbits(np.random.default_rng(seed), "lm_head", "x", "y", HIDDEN, VOCAB, fmt)
    graph = helper.make_graph([node], "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", HIDDEN])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", VOCAB])], inits)
    return helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def weights_of(part: str) -> int:
    return LAYERS * sum(K * N for _, K, N in BODY) if part == "body" else HIDDEN * VOCAB


class Timed:
    """One profiled session; ``kernel_ns()`` reads the MatMulNBits node times of the runs so far."""

    def __init__(self, model: Any, threads: int, where: Path, tag: str):
        import onnx
        import onnxruntime as ort

        path = where / f"{tag}.onnx"
        onnx.save_model(model, str(path), save_as_external_data=True, location=f"{tag}.data")
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        so.inter_op_num_threads = 1
        so.enable_profiling = True
        so.profile_file_prefix = str(where / tag)
        so.log_severity_level = 3
        self.session = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
        self.calls: list[tuple[int, int]] = []  # (M, timed runs) in the order they ran
        self.wall: dict[int, list[float]] = {m: [] for m in MS}  # ns a run took, whole session call

    def run(self, m: int, iters: int) -> None:
        x = np.random.default_rng(m).standard_normal((m, HIDDEN)).astype(np.float32)
        self.session.run(None, {"x": x})  # warm-up: this shape's buffers
        t0 = time.perf_counter()
        for _ in range(iters):
            self.session.run(None, {"x": x})
        self.wall[m].append((time.perf_counter() - t0) / iters * 1e9)
        self.calls.append((m, iters))

    def kernel_ns(self) -> dict[int, list[float]]:
        """Per M: the mean summed MatMulNBits time (ns) of a run, one figure per ``run`` call."""
        events = json.loads(Path(self.session.end_profiling()).read_text())
        runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("name") == "model_run")
        kernels = sorted((e["ts"], e["dur"]) for e in events if e.get("cat") == "Node"
                         and e.get("args", {}).get("op_name") == "MatMulNBits" and e["name"].endswith("_kernel_time"))
        per_run, k = [], 0
        for lo, hi in runs:
            total = 0
            while k < len(kernels) and kernels[k][0] < lo:
                k += 1
            while k < len(kernels) and kernels[k][0] <= hi:
                total += kernels[k][1]
                k += 1
            per_run.append(total * 1e3)
        if len(per_run) != sum(1 + n for _, n in self.calls):
            raise RuntimeError(f"profile has {len(per_run)} runs, expected {sum(1 + n for _, n in self.calls)}")
        out: dict[int, list[float]] = {m: [] for m in MS}
        i = 0
        for m, n in self.calls:
            out[m].append(statistics.fmean(per_run[i + 1 : i + 1 + n]))
            i += 1 + n
        return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20, help="timed runs per rep at M=1 (a quarter of them at M=512)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--formats", default=",".join(FORMATS))
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)
    formats = [f for f in args.formats.split(",") if f]
    if REFERENCE not in formats:
        formats.insert(0, REFERENCE)
    print(f"[{time.strftime('%H:%M:%S')}] building {len(formats)} formats x (body, lm_head); load average {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="formats-") as tmp:
        sessions = {(f, part): Timed(body_graph(f) if part == "body" else head_graph(f), args.threads, Path(tmp), f"{f.replace('/', '-')}-{part}")
                    for f in formats for part in ("body", "head")}
        for rep in range(args.reps):
            for f in formats[rep % len(formats):] + formats[: rep % len(formats)]:
                for part in ("body", "head"):
                    for m in MS:
                        sessions[(f, part)].run(m, max(1, args.iters // 4) if m > 1 else args.iters)
            print(f"[{time.strftime('%H:%M:%S')}] rep {rep + 1}/{args.reps} done; load average {os.getloadavg()}", flush=True)
        ns = {key: s.kernel_ns() for key, s in sessions.items()}
        wall = {key: {m: statistics.median(v) for m, v in s.wall.items()} for key, s in sessions.items()}
    return report(formats, ns, wall, args)


def report(formats: list[str], ns: dict[tuple[str, str], dict[int, list[float]]],
           wall: dict[tuple[str, str], dict[int, float]], args: argparse.Namespace) -> int:
    # per weight and token: a prefill's time is shared by its M tokens
    med = {(f, part, m): statistics.median(ns[(f, part)][m]) / weights_of(part) / m for f in formats for part in ("body", "head") for m in MS}
    print(f"\nMatMulNBits kernel time, ns per weight and token (median of {args.reps} reps of the mean of {args.iters} runs at M=1, "
          f"{max(1, args.iters // 4)} at M=512), {args.threads} threads, "
          f"accuracy_level 4; ratio = / {REFERENCE}\n")
    print("| format | body M=1 | lm_head M=1 | body M=512 | lm_head M=512 | body M=1 ratio | lm_head M=1 ratio | body M=512 ratio | lm_head M=512 ratio |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    cols = [(p, m) for m in MS for p in ("body", "head")]
    for f in formats:
        vals = [med[(f, p, m)] for p, m in cols]
        ratios = [med[(f, p, m)] / med[(REFERENCE, p, m)] for p, m in cols]
        print(f"| {f} | " + " | ".join(f"{v:.4f}" for v in vals) + " | " + " | ".join(f"{r:.3f}" for r in ratios) + " |")
    print("\nThe whole session call (all ops, with the profiler on), ms per run, median:\n")
    print("| format | body M=1 | lm_head M=1 | body M=512 | lm_head M=512 |")
    print("|---|---:|---:|---:|---:|")
    for f in formats:
        print(f"| {f} | " + " | ".join(f"{wall[(f, p)][m] / 1e6:.3f}" for p, m in cols) + " |")
    if args.json:
        args.json.write_text(json.dumps({"reps": args.reps, "iters": args.iters, "threads": args.threads,
                                         "ns_per_weight_token": {f"{f} {p} M={m}": v for (f, p, m), v in med.items()},
                                         "wall_ms": {f"{f} {p} M={m}": w / 1e6 for (f, p), d in wall.items() for m, w in d.items()}},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
