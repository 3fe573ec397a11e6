"""Keep the KV cache in int8 with calibrated per-channel scales; attention stays float32.

The builder's CPU graphs hold past/present keys and values in float32 (SmolLM2-135M: 48 KB per
position, 94 MB at 2048 positions). onnxruntime's CPU GroupQueryAttention (T = float) also takes an
int8 cache: attributes ``k_quant_type`` / ``v_quant_type`` (``PER_TENSOR`` or ``PER_CHANNEL``) and
``kv_cache_bit_width`` = 8, float ``k_scale`` / ``v_scale`` as inputs 12 and 13. It quantizes the new
positions' keys (after its rotary) and values as it writes them, ``q = clip(round(x / scale), -128,
127)`` (round half to even), and reads the cache back through the scales in its flash kernel, so the
query, the attention arithmetic and everything around the node stay float32. Per channel means one
scale per (KV head, channel): ``kv_num_heads * head_size`` floats, flat in that order (onnxruntime
1.31.1 checks the element count, any shape holding it is accepted; checked with channels of very
different magnitudes, tests/test_optimize_kv_cache_int8.py). Per channel is what this pass writes:
a key's channels differ by orders of magnitude (rotary pairs, outlier channels), so a per-tensor
scale would spend the 8 bits on the largest channel.

Static scales cannot adapt: a value beyond ``scale * 127`` saturates. So the scales come from data,
the per-channel maxima of the graph's own present keys/values over the calibration text
(:mod:`edgepipe.optimize.kv_ranges`, a cached stage of its own); :func:`scales_from_ranges` turns
those maxima into scales (``MARGIN``, measured: benchmarks/RESULTS.md). The pass itself reads no
tensors: the scales are handed to it and become small initializers (2 x layers x kv heads x head
size floats).

The runtime reads the cache's dtype from the session's inputs (``CausalLM.kv_dtype``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import ClassVar

import numpy as np
import onnx_ir as ir

from edgepipe.optimize.kv_cache_fp16 import _PAST, _PRESENT, GQA, _value_at, attention_nodes
from edgepipe.optimize.logits_slice import _initializer
from edgepipe.optimize.manager import PassReport

logger = logging.getLogger(__name__)

__all__ = ["MARGIN", "KVCacheInt8Pass", "scales_from_ranges"]

_K_SCALE, _V_SCALE = 12, 13
_QUANT_ATTRS = ("k_quant_type", "v_quant_type", "kv_cache_bit_width")
# scale = MARGIN * calibrated max / 127: values up to MARGIN x the largest the calibration text produced
# fit, the rest saturate. Measured on the default model (benchmarks/RESULTS.md, 2026-12-07 int8 KV cache):
# 0.9, 1.0, 1.25, 1.5 -> 1.0 has the lowest KL; 0.01 % of the eval text's values saturate, by <= 1.58x.
MARGIN = 1.0
# a channel the calibration never saw non-zero still needs a positive scale: this fraction of its head's
_FLOOR = 1e-3


def scales_from_ranges(amax: np.ndarray, margin: float = MARGIN) -> np.ndarray:
    """Per-channel scales ([kv heads, head size], float32) from the per-channel max |value| ``amax``."""
    amax = np.asarray(amax, dtype=np.float64)
    head = amax.max(axis=-1, keepdims=True)
    floor = np.maximum(head * _FLOOR, 1e-8)
    return (np.maximum(amax, floor) * margin / 127.0).astype(np.float32)


def _why_not(node: ir.Node, scales: Mapping[str, np.ndarray]) -> str | None:
    """None when ``node`` is an attention node this pass can give an int8 cache, else the reason."""
    if any(a in node.attributes for a in _QUANT_ATTRS):
        return "its cache is already quantized"
    for i in _PAST:
        v = _value_at(node.inputs, i)
        if v is None or not v.is_graph_input() or v.dtype != ir.DataType.FLOAT:
            return "its past is not a float32 graph input"
    if any(_value_at(node.inputs, i) is not None for i in (_K_SCALE, _V_SCALE)):
        return "its scale inputs are already taken"
    kv_heads = node.attributes.get_int("kv_num_heads", 0)
    for i in _PRESENT:
        v = _value_at(node.outputs, i)
        if v is None or not v.is_graph_output() or v.dtype != ir.DataType.FLOAT:
            return "its present is not a float32 graph output"
        s = scales.get(v.name or "")
        if s is None:
            return f"no calibrated range for {v.name}"
        if s.ndim != 2 or s.shape[0] != kv_heads:
            return f"the range of {v.name} has shape {s.shape}, not [{kv_heads}, head size]"
        dims = v.shape.dims if v.shape is not None else ()
        if len(dims) == 4 and isinstance(dims[3], int) and dims[3] != s.shape[1]:
            return f"the range of {v.name} has {s.shape[1]} channels, the cache {dims[3]}"
    return None


class KVCacheInt8Pass(ir.passes.InPlacePass):
    """Give every GroupQueryAttention an int8 cache with static per-channel scales.

    ``scales``: {present output name: [kv heads, head size] float32}, one per present key and value
    (:func:`scales_from_ranges` of the calibrated maxima).
    Needs: GroupQueryAttention nodes whose past_key/value are float32 graph inputs and whose
    present_key/value are float32 graph outputs with a scale each. A node that is not of that form
    leaves the whole graph unchanged (one dtype for the whole cache), with the reason in the log.
    Changes: per node the three quantization attributes, the k/v scale inputs (initializers
    ``<present>/scale``), the past inputs and present outputs int8. No node is added.
    """

    name: ClassVar[str] = "kv_cache_int8"

    def __init__(self, scales: Mapping[str, np.ndarray]) -> None:
        super().__init__()
        self.scales = {k: np.asarray(v, dtype=np.float32) for k, v in scales.items()}

    def call(self, model: ir.Model) -> PassReport:
        graph = model.graph
        nodes = attention_nodes(graph, self.name, lambda n: _why_not(n, self.scales))
        if not nodes:
            return PassReport(model, False)
        for node in nodes:
            self._to_int8(graph, node)
        return PassReport(model, True, {"dtype": "int8", "quant_type": "PER_CHANNEL", "attention_nodes": len(nodes)})

    def _to_int8(self, graph: ir.Graph, node: ir.Node) -> None:
        k_out, v_out = (node.outputs[i] for i in _PRESENT)
        scale_values = [_initializer(graph, f"{v.name}/scale", self.scales[v.name or ""]) for v in (k_out, v_out)]
        # inputs after the scales (Qwen3's q/k norm weights at 14, 15) keep their places
        node.resize_inputs(max(len(node.inputs), _V_SCALE + 1))
        node.replace_input_with(_K_SCALE, scale_values[0])
        node.replace_input_with(_V_SCALE, scale_values[1])
        node.attributes["k_quant_type"] = ir.AttrString("k_quant_type", "PER_CHANNEL")
        node.attributes["v_quant_type"] = ir.AttrString("v_quant_type", "PER_CHANNEL")
        node.attributes["kv_cache_bit_width"] = ir.AttrInt64("kv_cache_bit_width", 8)
        for value in [*(node.inputs[i] for i in _PAST), k_out, v_out]:
            if value is not None:
                value.dtype = ir.DataType.INT8

    def ensures(self, model: ir.Model) -> None:
        """Every attention node with an int8 cache reads and writes int8 and has a positive float32
        scale of ``kv_num_heads x head size`` elements for K and V (onnxruntime would only refuse a
        wrong count on the first run, and a non-positive scale not at all)."""
        for node in model.graph:
            if node.op_type != GQA or node.attributes.get_int("kv_cache_bit_width", 0) != 8:
                continue
            cache = [_value_at(node.inputs, i) for i in _PAST] + [_value_at(node.outputs, i) for i in _PRESENT]
            if any(v is None or v.dtype != ir.DataType.INT8 for v in cache):
                raise ir.passes.PostconditionError(f"{node.name}: an int8-quantized cache whose past/present are not all int8")
            kv_heads = node.attributes.get_int("kv_num_heads", 0)
            for i in (_K_SCALE, _V_SCALE):
                s = _value_at(node.inputs, i)
                arr = s.const_value.numpy() if s is not None and s.const_value is not None else None
                if arr is None or arr.dtype != np.float32 or arr.size % max(kv_heads, 1) or not (arr > 0).all():
                    raise ir.passes.PostconditionError(f"{node.name}: input {i} is not a positive float32 per-channel scale initializer")
