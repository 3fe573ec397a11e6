"""Activation statistics for importance-weighted quantization (llama.cpp's "imatrix" idea).

For every MatMul with a constant weight we collect the mean square of each input channel of its
activation over calibration text: a weight error on a channel that carries large activations
costs more output error, so the quantizer weights its squared error by these numbers.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

logger = logging.getLogger(__name__)


def weight_matmuls(model) -> dict[str, str]:
    """Map weight-initializer name -> activation tensor name, for MatMuls with 2-D constant weights."""
    inits = {t.name: t for t in model.graph.initializer}
    out: dict[str, str] = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and node.input[1] in inits and len(inits[node.input[1]].dims) == 2:
            out[node.input[1]] = node.input[0]
    return out


def collect_importance(
    model_dir: Path,
    windows: Iterable[np.ndarray],
    *,
    threads: int = 0,
    hessians: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict[str, np.ndarray]:
    """Mean square of each input channel of every weight MatMul, over the token ``windows``.

    With ``hessians``, also ``"<weight>@H"``: the mean of x x^T over tokens (for GPTQ), one per
    distinct activation (MatMuls that share an input share the array).
    """
    import onnx
    import onnxruntime as ort

    from edgepipe.runtime.model import GENAI_CONFIG, DecoderSpec, session_options

    model_path = Path(model_dir) / "model.onnx"
    model = onnx.load(str(model_path), load_external_data=False)
    acts = weight_matmuls(model)
    wanted = sorted(set(acts.values()))
    existing = {o.name for o in model.graph.output}
    for name in wanted:
        if name not in existing:
            model.graph.output.append(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None))
    so = session_options(threads)
    # the external weights stay where the fp32 export wrote them; nothing is copied
    so.add_session_config_entry("session.model_external_initializers_file_folder_path", str(model_path.parent))
    sess = ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])
    sums: dict[str, np.ndarray | None] = {name: None for name in wanted}
    outer: dict[str, np.ndarray] = {}
    count = 0
    spec = DecoderSpec.from_genai_config(Path(model_dir) / GENAI_CONFIG)
    empty = np.zeros((1, spec.num_kv_heads, 0, spec.head_size), dtype=np.float32)
    past = [i.name for i in sess.get_inputs() if i.name.startswith("past_key_values")]
    for n, ids in enumerate(windows):
        ids = np.asarray(ids, dtype=np.int64)[None, :]
        feeds = {"input_ids": ids, "attention_mask": np.ones_like(ids)}
        feeds.update({name: empty for name in past})
        outs = sess.run(wanted, feeds)
        for name, val in zip(wanted, outs):
            x = val.reshape(-1, val.shape[-1]).astype(np.float64)
            sq = np.square(x).sum(0)
            sums[name] = sq if sums[name] is None else sums[name] + sq
            if hessians:
                xtx = x.T @ x
                outer[name] = xtx if name not in outer else outer[name] + xtx
        count += ids.shape[1]
        if progress:
            progress(f"calibration window {n + 1}")
    if not count:
        return {}
    out = {w: (sums[a] / count).astype(np.float32) for w, a in acts.items() if sums[a] is not None}
    if hessians:
        shared = {a: (h / count) for a, h in outer.items()}
        out.update({f"{w}@H": shared[a] for w, a in acts.items() if a in shared})
    return out
