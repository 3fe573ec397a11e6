"""What a weight format costs in kernel time on this machine: MatMulNBits per weight, per format.

A format's cost is its bytes AND its kernel time on the target. This times onnxruntime's
``MatMulNBits`` for int4 blocks of 32 / 64 / 128, symmetric and asymmetric, and int8 blocks of
64 / 128, on a model's matrix shapes (``--shape``: the default model SmolLM2-135M, 30 layers of
qkv 576x960, o 576x576, gate and up 576x1536, down 1536x576, and the 576x49152 lm_head; or
Llama-3.2-1B's / Qwen2.5-0.5B's, see ``SHAPES``), at M = 1 (a decode step) and M = 512 (a prefill).
``accuracy_level`` is 4 (int8 activations, what edgepipe writes) unless a format names another:
``int4/b32/asym@0`` (fp32 activations; 1 is the same kernel on x86).

Each format is one graph of the model's layers' projections (``--layers`` fewer) with random packed
weights (kernel time does not depend on the values), an RMS norm between layers to keep activations
bounded, and one lm_head graph. onnxruntime's profiler gives each MatMulNBits node's time; the sum
over the nodes, divided by the weights, is the figure (ns per weight), so the glue ops and the
session's call overhead are left out. Formats are timed interleaved (a rotating order per rep),
medians of the reps; ratios are against int4/b32/asym measured in the same run. At M = 1 the
table also gives the rate the kernels stream the format's bytes as stored (GB/s), and with
``--bandwidth`` that rate as a share of this machine's read bandwidth (``benchmarks/bandwidth.py``,
measured before and after). Peak RSS of a session per format is not measured here
(``session_options.py`` measures whole artifacts).

    python benchmarks/formats.py [--shape smollm2|llama3.2-1b|qwen2.5-0.5b] [--layers N] [--ms 1,512]
        [--reps 5] [--iters 20] [--threads 2] [--formats int4/b32/asym,int4/b128/sym@0,...] [--bandwidth]

The weights of one graph must be far larger than the last-level cache for the M = 1 figures to say
what a decode of a model that size costs (``bandwidth.py --sweep``: from 256 MiB up on this host);
the default model's are not (~40 MB per format): say which machine and shape the figures come from.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

if not __package__:  # run as python benchmarks/formats.py: the repo root on sys.path, for `benchmarks.*`
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.random_models import SHAPES as RANDOM_SHAPES  # noqa: E402

REFERENCE = "int4/b32/asym"
FORMATS = [
    "int4/b32/asym", "int4/b32/sym", "int4/b64/asym", "int4/b64/sym", "int4/b128/asym", "int4/b128/sym",
    "int8/b64/asym", "int8/b64/sym", "int8/b128/asym", "int8/b128/sym",
]


@dataclass(frozen=True)
class Shape:
    """A model's projection sizes: qkv = hidden + 2 x KV width (grouped-query attention)."""

    hidden: int
    inter: int
    qkv: int
    vocab: int
    layers: int

    def body(self) -> list[tuple[str, int, int]]:
        h, i = self.hidden, self.inter
        return [("qkv", h, self.qkv), ("o", h, h), ("gate", h, i), ("up", h, i), ("down", i, h)]


def _shape_of(config: dict[str, Any]) -> Shape:
    """A transformers config's projection sizes (one definition of the model: benchmarks/random_models.py)."""
    head = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    return Shape(
        hidden=config["hidden_size"],
        inter=config["intermediate_size"],
        qkv=config["num_attention_heads"] * head + 2 * config["num_key_value_heads"] * head,
        vocab=config["vocab_size"],
        layers=config["num_hidden_layers"],
    )


SHAPES = {
    "smollm2": Shape(hidden=576, inter=1536, qkv=960, vocab=49152, layers=30),
    # Llama-3.2-1B's and Qwen2.5-0.5B's config.json, as random_models.SHAPES has them
    **{name: _shape_of(RANDOM_SHAPES[name][1]) for name in ("llama3.2-1b", "qwen2.5-0.5b")},
}
SHAPE = SHAPES["smollm2"]
MS = (1, 512)


def parse_format(name: str) -> tuple[int, int, bool]:
    """``int4/b32/asym`` (or ``int4/b32/asym@0``) -> (bits, block, symmetric)."""
    bits, block, kind = name.split("@")[0].split("/")
    return int(bits.removeprefix("int")), int(block.removeprefix("b")), kind == "sym"


def accuracy_level(name: str) -> int:
    """``...@N`` -> N; 4 (int8 activations, what edgepipe's quantizer writes) otherwise."""
    return int(name.split("@")[1]) if "@" in name else 4


def bytes_per_weight(name: str) -> float:
    """A format's bytes per weight as stored in the model: data, an fp32 scale per block and, when
    asymmetric, a zero point of the same bit width per block."""
    bits, block, sym = parse_format(name)
    return bits / 8 + 4 / block + (0 if sym else bits / 8 / block)


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
                            K=K, N=N, bits=bits, block_size=block, accuracy_level=accuracy_level(fmt))
    return node, inits


def _model(nodes: list[Any], inits: list[Any], name: str, x: str, y: str, n_in: int, n_out: int) -> Any:
    from onnx import TensorProto, helper

    graph = helper.make_graph(nodes, name, [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["M", n_in])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["M", n_out])], inits)
    return helper.make_model(graph, ir_version=9, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])


def body_graph(fmt: str, seed: int = 0, shape: Shape | None = None) -> Any:
    """The layers' projections chained as in the model: qkv -> slice -> o -> gate * up -> down -> norm."""
    from onnx import helper, numpy_helper

    sh = shape or SHAPE
    rng = np.random.default_rng(seed)
    nodes: list[Any] = []
    inits = [numpy_helper.from_array(np.array([0], np.int64), "zero"), numpy_helper.from_array(np.array([sh.hidden], np.int64), "hid"),
             numpy_helper.from_array(np.array([-1], np.int64), "last"), numpy_helper.from_array(np.ones(sh.hidden, np.float32), "gamma")]
    x = "x"
    for i in range(sh.layers):
        p = f"l{i}"
        for (kind, K, N), src, dst in zip(sh.body(), [x, f"{p}.a", f"{p}.o", f"{p}.o", f"{p}.h"],
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
    return _model(nodes, inits, "body", "x", x, sh.hidden, sh.hidden)


def head_graph(fmt: str, seed: int = 1, shape: Shape | None = None) -> Any:
    sh = shape or SHAPE
    node, inits = matmul_nbits(np.random.default_rng(seed), "lm_head", "x", "y", sh.hidden, sh.vocab, fmt)
    return _model([node], inits, "head", "x", "y", sh.hidden, sh.vocab)


def weights_of(part: str, shape: Shape | None = None) -> int:
    sh = shape or SHAPE
    return sh.layers * sum(K * N for _, K, N in sh.body()) if part == "body" else sh.hidden * sh.vocab


class Timed:
    """One profiled session; ``kernel_ns()`` reads the MatMulNBits node times of the runs so far."""

    def __init__(self, model: Any, threads: int, where: Path, tag: str, ms: tuple[int, ...] = MS):
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
        self.hidden = int(self.session.get_inputs()[0].shape[1])
        self.ms = ms
        self.calls: list[tuple[int, int]] = []  # (M, timed runs) in the order they ran
        self.wall: dict[int, list[float]] = {m: [] for m in ms}  # ns a run took, whole session call

    def run(self, m: int, iters: int) -> None:
        x = np.random.default_rng(m).standard_normal((m, self.hidden)).astype(np.float32)
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
        out: dict[int, list[float]] = {m: [] for m in self.ms}
        i = 0
        for m, n in self.calls:
            out[m].append(statistics.fmean(per_run[i + 1 : i + 1 + n]))
            i += 1 + n
        return out


def _bandwidth(threads: int) -> float:
    from benchmarks.bandwidth import read_bandwidth_gbs

    return float(read_bandwidth_gbs(Path(tempfile.gettempdir()) / "edgepipe-bandwidth", threads)["read_gbs"])


def _args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--shape", choices=sorted(SHAPES), default="smollm2")
    ap.add_argument("--layers", type=int, default=0, help="time this many layers of the shape (0: all)")
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="rows per run to time (1: a decode step)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--iters", type=int, default=20, help="timed runs per rep at M=1 (a quarter of them at larger M)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--formats", default=",".join(FORMATS), help="int4/b32/asym,...; @N sets accuracy_level N (default 4)")
    ap.add_argument("--bandwidth", action="store_true", help="measure the read bandwidth before and after (benchmarks/bandwidth.py)")
    ap.add_argument("--json", type=Path)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    global SHAPE
    args = _args(argv)
    sh = SHAPES[args.shape]
    SHAPE = Shape(sh.hidden, sh.inter, sh.qkv, sh.vocab, args.layers or sh.layers)
    ms = tuple(int(m) for m in args.ms.split(","))
    formats = [f for f in args.formats.split(",") if f]
    if REFERENCE not in formats:
        formats.insert(0, REFERENCE)
    bw = [_bandwidth(args.threads)] if args.bandwidth else []
    print(f"[{time.strftime('%H:%M:%S')}] {args.shape} ({SHAPE}), {len(formats)} formats x (body, lm_head); "
          f"load average {os.getloadavg()}", flush=True)
    with tempfile.TemporaryDirectory(prefix="formats-") as tmp:
        sessions = {(f, part): Timed(body_graph(f) if part == "body" else head_graph(f), args.threads, Path(tmp),
                                     f"{f.replace('/', '-')}-{part}", ms)
                    for f in formats for part in ("body", "head")}
        for rep in range(args.reps):
            for f in formats[rep % len(formats):] + formats[: rep % len(formats)]:
                for part in ("body", "head"):
                    for m in ms:
                        sessions[(f, part)].run(m, max(1, args.iters // 4) if m > 1 else args.iters)
            print(f"[{time.strftime('%H:%M:%S')}] rep {rep + 1}/{args.reps} done; load average {os.getloadavg()}", flush=True)
        ns = {key: s.kernel_ns() for key, s in sessions.items()}
        wall = {key: {m: statistics.median(v) for m, v in s.wall.items()} for key, s in sessions.items()}
    if args.bandwidth:
        bw.append(_bandwidth(args.threads))
    return report(formats, ns, wall, args, ms, max(bw) if bw else None)


def report(formats: list[str], ns: dict[tuple[str, str], dict[int, list[float]]],
           wall: dict[tuple[str, str], dict[int, float]], args: argparse.Namespace, ms: tuple[int, ...] = MS,
           bw: float | None = None) -> int:
    # per weight and token: a prefill's time is shared by its M tokens
    med = {(f, part, m): statistics.median(ns[(f, part)][m]) / weights_of(part) / m for f in formats for part in ("body", "head") for m in ms}
    print(f"\nMatMulNBits kernel time, ns per weight and token (median of {args.reps} reps of the mean of {args.iters} runs at M=1, "
          f"{max(1, args.iters // 4)} at larger M), {args.threads} threads, accuracy_level 4 unless @N; ratio = / {REFERENCE}\n")
    cols = [(p, m) for m in ms for p in ("body", "head")]
    names = [f"{'lm_head' if p == 'head' else p} M={m}" for p, m in cols]
    print("| format | " + " | ".join(names) + " | " + " | ".join(f"{n} ratio" for n in names) + " |")
    print("|---|" + "---:|" * 2 * len(cols))
    for f in formats:
        vals = [med[(f, p, m)] for p, m in cols]
        ratios = [med[(f, p, m)] / med[(REFERENCE, p, m)] for p, m in cols]
        print(f"| {f} | " + " | ".join(f"{v:.4f}" for v in vals) + " | " + " | ".join(f"{r:.3f}" for r in ratios) + " |")
    gbs: dict[str, float] = {}
    if 1 in ms:
        print("\nM=1: the format's bytes as stored, streamed per second by the kernels"
              + (f"; % of the read bandwidth {bw:.1f} GB/s" if bw else "") + "\n")
        print("| format | bytes/weight | body GB/s | lm_head GB/s | body % of read BW | lm_head % of read BW |\n|---|---:|---:|---:|---:|---:|")
        for f in formats:
            b, g = bytes_per_weight(f), [bytes_per_weight(f) / med[(f, p, 1)] for p in ("body", "head")]
            gbs.update({f"{f} body": g[0], f"{f} head": g[1]})
            pct = " | ".join(f"{x / bw * 100:.0f}" if bw else "" for x in g)
            print(f"| {f} | {b:.4f} | {g[0]:.1f} | {g[1]:.1f} | {pct} |")
    print("\nThe whole session call (all ops, with the profiler on), ms per run, median:\n")
    print("| format | " + " | ".join(names) + " |\n|---|" + "---:|" * len(cols))
    for f in formats:
        print(f"| {f} | " + " | ".join(f"{wall[(f, p)][m] / 1e6:.3f}" for p, m in cols) + " |")
    if args.json:
        args.json.write_text(json.dumps({"reps": args.reps, "iters": args.iters, "threads": args.threads, "shape": str(SHAPE),
                                         "read_gbs": bw, "stream_gbs_m1": gbs,
                                         "ns_per_weight_token": {f"{f} {p} M={m}": v for (f, p, m), v in med.items()},
                                         "wall_ms": {f"{f} {p} M={m}": w / 1e6 for (f, p), d in wall.items() for m, w in d.items()}},
                                        indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
