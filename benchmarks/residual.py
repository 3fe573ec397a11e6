"""Where a weight's output error lands: the residual stream it is added to (int4_search's
``hessian-greedy-resid`` allocation divides each matrix's output error by that stream's mean square).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import numpy as np

RESIDUAL_NORMS = ("SkipSimplifiedLayerNormalization", "SkipLayerNormalization")


def first_residual_norm(outputs, consumers: dict[str, list]) -> tuple[str, str] | None:
    """The two inputs (residual, branch) of the first Skip*Norm reached breadth-first from ``outputs``."""
    seen, frontier = set(), list(outputs)
    while frontier:
        nxt = []
        for t in frontier:
            for c in consumers.get(t, []):
                if id(c) in seen:
                    continue
                seen.add(id(c))
                if c.op_type in RESIDUAL_NORMS:
                    return (c.input[0], c.input[1])
                nxt.extend(o for o in c.output if o)
        frontier = nxt
    return None


def residual_inputs(model) -> dict[str, tuple[str, str]]:
    """Map weight name -> the two inputs (residual, branch) of the first Skip*Norm its output reaches.

    Follows consumers breadth-first from each weight MatMul's output (through attention, the
    activation function, the next projection); weights whose output reaches no such node are left out.
    """
    from edgepipe.quantize.calibrate import weight_matmuls

    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)
    weights = set(weight_matmuls(model))
    out: dict[str, tuple[str, str]] = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in weights or node.input[1] in out:
            continue
        found = first_residual_norm(node.output, consumers)
        if found:
            out[node.input[1]] = found
    return out


def residual_mean_squares(
    model_dir: Path, windows: Iterable[np.ndarray], *, threads: int = 0
) -> dict[str, float]:
    """Per weight: the mean square of the residual stream (residual + branch) its error is added to."""
    import onnx
    import onnxruntime as ort

    from edgepipe.runtime.model import GENAI_CONFIG, DecoderSpec, session_options

    model_path = Path(model_dir) / "model.onnx"
    model = onnx.load(str(model_path), load_external_data=False)
    joins = residual_inputs(model)
    wanted = sorted({t for pair in joins.values() for t in pair})
    existing = {o.name for o in model.graph.output}
    for name in wanted:
        if name not in existing:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    so = session_options(threads)
    so.add_session_config_entry(
        "session.model_external_initializers_file_folder_path", str(model_path.parent)
    )
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    spec = DecoderSpec.from_genai_config(Path(model_dir) / GENAI_CONFIG)
    empty = np.zeros((1, spec.num_kv_heads, 0, spec.head_size), dtype=np.float32)
    past = [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values")]
    pairs = sorted(set(joins.values()))
    sums = dict.fromkeys(pairs, 0.0)
    count = 0
    for ids in windows:
        ids = np.asarray(ids, dtype=np.int64)[None, :]
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        feeds.update({name: empty for name in past})
        vals = dict(zip(wanted, sess.run(wanted, feeds), strict=True))
        for a, b in pairs:
            # position 0 left out: its residual is an attention sink, orders of magnitude larger
            r = (vals[a] + vals[b]).reshape(-1, vals[a].shape[-1])[1:].astype(np.float64)
            sums[(a, b)] += float(np.square(r).mean(-1).sum())
        count += ids.shape[1] - 1
    if not count:
        return {}
    return {w: sums[pair] / count for w, pair in joins.items()}
