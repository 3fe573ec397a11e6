"""The KV cache's calibrated ranges: per (layer, KV head, channel) max |value| over the calibration text.

An int8 cache (:mod:`edgepipe.optimize.kv_cache_int8`) has static scales, so they must come from
data. This is a stage of its own, between quantize and optimize, rather than part of the pass:
the optimize stage is graph-only (it copies the weights unread and runs in a second), while this
runs the model over the calibration text; a stage keyed by the quantized graph and the calibration
text is measured once and found in the cache by every build (and pass version) that shares them,
and the pass stays a pure function of the graph and the scales it is handed.

What is measured is the graph that will run, the quantized decoder with its float32 cache: its
``present`` outputs after a whole-window prefill are the keys after GroupQueryAttention's rotary
and the values, exactly what the int8 cache will hold. onnxruntime runs it (the runtime's
``CausalLM``), one calibration window at a time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.stage import StageContext, run_cached

RANGES_FILE = "kv_ranges.npz"


@dataclass(frozen=True)
class KVRangesConfig:
    VERSION = 1

    input_key: str  # the quantize stage's key: the graph whose cache is measured
    calib_key: str  # the calibration text and its window count


@dataclass(frozen=True)
class KVRanges:
    path: Path  # the npz: {present output name: [kv heads, head size] float32 max |value|}
    key: str
    info: dict[str, Any]


def measure_ranges(model_dir: Path, windows: Sequence[np.ndarray], threads: int = 0) -> dict[str, np.ndarray]:
    """{present output name: [kv heads, head size] max |value|} of the decoder in ``model_dir`` over
    ``windows`` (token id arrays), each prefilled from an empty float32 cache."""
    from edgepipe.runtime.model import CausalLM

    lm = CausalLM(model_dir, threads=threads, release_pages=False)
    if lm.kv_dtype != np.float32:
        raise ValueError(f"{model_dir}: the cache to calibrate is {np.dtype(lm.kv_dtype).name}, not float32")
    spec = lm.spec
    names = [n for i in range(spec.num_layers) for n in (spec.present_key % i, spec.present_value % i)]
    amax = {n: np.zeros((spec.num_kv_heads, spec.head_size), dtype=np.float32) for n in names}
    for ids in windows:
        _, presents = lm.forward(np.asarray(ids)[None, :], lm.empty_cache(), last_only=True)
        for name, present in zip(names, presents, strict=True):
            np.maximum(amax[name], np.abs(present[0]).max(axis=1), out=amax[name])
    return amax


def has_attention_cache(model_dir: Path) -> bool:
    """Whether the decoder in ``model_dir`` keeps its cache in GroupQueryAttention nodes, the only cache
    an int8 pass can convert (the generic exporter's graphs attend with plain ops): without them there
    is nothing to calibrate, and measuring would cost a pass over the calibration text for nothing."""
    import onnx

    model = onnx.load(str(Path(model_dir) / "model.onnx"), load_external_data=False)
    return any(n.op_type == "GroupQueryAttention" and n.domain == "com.microsoft" for n in model.graph.node)


def load_ranges(path: Path) -> dict[str, np.ndarray]:
    with np.load(path) as data:
        return {k: data[k] for k in data.files}


def run_kv_ranges(model_dir: Path, windows: Sequence[np.ndarray], config: KVRangesConfig, ctx: StageContext) -> KVRanges:
    def produce(tmp: Path) -> dict[str, Any]:
        ctx.progress(f"measuring the KV cache's ranges on {len(windows)} calibration windows")
        amax = measure_ranges(model_dir, windows, ctx.threads)
        np.savez(tmp / RANGES_FILE, **amax)  # type: ignore[arg-type]  # numpy's stub types the kwargs as allow_pickle
        keys = [a for n, a in amax.items() if n.endswith("key")]
        values = [a for n, a in amax.items() if not n.endswith("key")]
        return {"windows": len(windows), "tokens": int(sum(len(w) for w in windows)), "tensors": len(amax),
                "key_max": float(max(a.max() for a in keys)) if keys else None,
                "value_max": float(max(a.max() for a in values)) if values else None}

    out = run_cached("kv_ranges", config, produce, ctx)
    return KVRanges(path=out.dir / RANGES_FILE, key=out.key, info=out.info)
