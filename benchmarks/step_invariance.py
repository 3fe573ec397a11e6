"""Does a position's output depend on how many tokens the step that computes it carries?

Lookup and draft decoding verify several tokens in one step; their greedy text equals plain greedy
decoding's only where a position's logits come out the same from a one-token step and from a
several-token step. This reports, for an artifact, the first operator whose output differs between
the two and how far the difference has grown by the logits, so a new onnxruntime (or a new graph
pass) can be checked in a minute:

    python benchmarks/step_invariance.py ARTIFACT [--prefix 36] [--width 4]

It prefills ``--prefix`` token ids, then computes the next ``--width`` positions once as ``--width``
one-token steps and once as one step, with every node output exposed as a graph output, and
compares the last position. No timing.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Divergence:
    """Where the one-token and the several-token step first disagree, and what the logits show."""

    first_op: str | None  # op type of the first node (graph order) whose output differs; None: none does
    first_node: str | None
    first_diff: float
    logits_diff: float  # max |difference| of the last position's logits
    per_node: list[tuple[str, str, float]]  # (op type, node name, max |difference|) in graph order


def _session(artifact: Path) -> tuple[Any, list[tuple[str, str, str]]]:
    import onnx
    import onnxruntime as ort

    model = onnx.load(str(artifact / "model.onnx"), load_external_data=False)
    exposed = [(n.op_type, n.name, o) for n in model.graph.node for o in n.output if o and not o.startswith("present")]
    have = {o.name for o in model.graph.output}
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(o) for _, _, o in exposed if o not in have)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(artifact))
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"]), exposed


def measure(artifact: Path, *, prefix: int = 36, width: int = 4, seed: int = 1) -> Divergence:
    """Compare the last of ``width`` positions after ``prefix`` random ids: one-token steps vs one step."""
    sess, exposed = _session(Path(artifact))
    inputs = {i.name: i for i in sess.get_inputs()}
    outputs = [o.name for o in sess.get_outputs()]
    model = json.loads((Path(artifact) / "genai_config.json").read_text(encoding="utf-8"))["model"]
    decoder = model["decoder"]
    past = [n for n in inputs if n.startswith("past_key_values")]
    ids = np.random.default_rng(seed).integers(0, int(model["vocab_size"]), size=prefix + width)

    def run(tokens: np.ndarray, cache: list[np.ndarray], start: int) -> tuple[dict[str, np.ndarray], list[np.ndarray]]:
        n = len(tokens)
        feeds: dict[str, Any] = {"input_ids": tokens[None].astype(np.int64)}
        if "attention_mask" in inputs:
            feeds["attention_mask"] = np.ones((1, start + n), np.int64)
        if "position_ids" in inputs:
            feeds["position_ids"] = np.arange(start, start + n, dtype=np.int64)[None]
        feeds.update(zip(past, cache, strict=True))
        got = dict(zip(outputs, sess.run(None, feeds), strict=True))
        return got, [got[p.replace("past_key_values", "present")] for p in past]

    kv_type = np.float16 if "float16" in inputs[past[0]].type else np.float32
    empty = [np.zeros((1, decoder["num_key_value_heads"], 0, decoder["head_size"]), kv_type) for _ in past]
    _, cache = run(ids[:prefix], empty, 0)
    single: dict[str, np.ndarray] = {}
    c = cache
    for i in range(width):
        single, c = run(ids[prefix + i : prefix + i + 1], c, prefix + i)
    several, _ = run(ids[prefix:], cache, prefix)
    per_node = []
    for op, node, out in exposed:
        a, b = single.get(out), several.get(out)
        # a per-position activation [1, seq, hidden]: compare the last position
        if a is None or b is None or a.dtype.kind != "f" or a.ndim != 3 or b.shape[1] != width or a.shape[1] != 1:
            continue
        per_node.append((op, node, float(np.abs(a[:, -1] - b[:, -1]).max())))
    first = next(((op, n, d) for op, n, d in per_node if d > 0), None)
    return Divergence(
        first_op=first[0] if first else None,
        first_node=first[1] if first else None,
        first_diff=first[2] if first else 0.0,
        logits_diff=float(np.abs(single["logits"][:, -1] - several["logits"][:, -1]).max()),
        per_node=per_node,
    )


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--prefix", type=int, default=36)
    ap.add_argument("--width", type=int, default=4)
    ap.add_argument("--all", action="store_true", help="print every node, not only where the difference grows")
    a = ap.parse_args(argv)
    d = measure(a.artifact, prefix=a.prefix, width=a.width)
    print(f"first node that differs: {d.first_op} {d.first_node} (max |diff| {d.first_diff:.3g})")
    print(f"logits, last position: max |diff| {d.logits_diff:.3g}")
    worst = 0.0
    for op, node, diff in d.per_node:
        if a.all or diff > 2 * worst:
            print(f"  {op:34s} {node[:70]:70s} {diff:.3g}")
            worst = max(worst, diff)
    return 0


if __name__ == "__main__":
    sys.exit(main())
