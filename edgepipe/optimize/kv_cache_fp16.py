"""Keep the KV cache in float16 while every other activation stays float32.

The builder's CPU graphs hold past/present keys and values in float32: on SmolLM2-135M that is
48 KB per position (30 layers x 3 KV heads x 64 x 2 x 4 B), 94 MB at the Pi profile's 2048-token
context, where llama.cpp keeps its cache in f16 by default. onnxruntime's CPU GroupQueryAttention
has two kernels, T = float with a float (or int8/uint8) cache and T = float16 with a float16 (or
int8/uint8) cache, none that mixes a float query with a float16 cache, and the builder only writes
a float16 cache for float16 models. So this pass runs each attention node in float16: its float
inputs (query, key, value, the rotary tables, Qwen3's q/k norm weights...) go through a ``Cast`` to
float16, its output through a ``Cast`` back to float32, and the graph's past/present tensors become
float16. The rotary tables are initializers: their one shared ``Cast`` is folded by onnxruntime when
the session is made, so a step casts only the new positions' q/k/v and the attention output.

The runtime reads the cache's dtype from the session's inputs (``CausalLM.kv_dtype``) and
onnxruntime-genai from the graph, so neither needs to be told. Tensors are never read.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import ClassVar

import onnx_ir as ir

from edgepipe.optimize.manager import PassReport

logger = logging.getLogger(__name__)

__all__ = ["GQA", "KVCacheFp16Pass", "attention_nodes"]

GQA = "GroupQueryAttention"
_PAST = (3, 4)  # past_key, past_value
_PRESENT = (1, 2)  # present_key, present_value
# inputs of type T (the query's): query, key, value, cos_cache, sin_cache, attention_bias,
# head_sink, q_norm_weight, k_norm_weight (onnxruntime's com.microsoft schema, 1.31)
_T_INPUTS = (0, 1, 2, 7, 8, 10, 11, 14, 15)
_QUANTIZED_CACHE = ("k_quant_type", "v_quant_type", "kv_cache_bit_width")


def _value_at(values: Sequence[ir.Value | None], i: int) -> ir.Value | None:
    return values[i] if i < len(values) else None


def _why_not(node: ir.Node) -> str | None:
    """None when ``node`` is an attention node this pass can run in float16, else the reason."""
    if any(a in node.attributes for a in _QUANTIZED_CACHE):
        return "its cache is quantized"
    if _value_at(node.outputs, 3) is not None and node.outputs[3].uses():
        return "its output_qk is used"
    for i in _PAST:
        v = _value_at(node.inputs, i)
        if v is None or not v.is_graph_input() or v.dtype != ir.DataType.FLOAT:
            return "its past is not a float32 graph input"
    for i in _PRESENT:
        v = _value_at(node.outputs, i)
        if v is None or not v.is_graph_output() or v.dtype != ir.DataType.FLOAT:
            return "its present is not a float32 graph output"
    if node.outputs[0].is_graph_output():
        return "its output is a graph output"
    return None


def attention_nodes(graph: ir.Graph, pass_name: str, why_not: Callable[[ir.Node], str | None]) -> list[ir.Node]:
    """The graph's GroupQueryAttention nodes when ``why_not`` finds none it cannot change, else none (the
    cache has one dtype for all layers: a KV pass changes every node or none), saying why in the log."""
    nodes = [n for n in graph if n.op_type == GQA and n.domain == "com.microsoft"]
    if not nodes:
        logger.info("%s: no GroupQueryAttention; not applied", pass_name)
        return []
    reasons = {n.name: r for n in nodes if (r := why_not(n)) is not None}
    if reasons:
        name, why = next(iter(reasons.items()))
        logger.warning("%s: %s: %s; not applied", pass_name, name, why)
        return []
    return nodes


def _cast(value: ir.Value, to: ir.DataType, name: str) -> ir.Node:
    out = ir.val(name, to, value.shape)
    return ir.node("Cast", [value], {"to": to}, outputs=[out], name=f"{name}/Cast")


class KVCacheFp16Pass(ir.passes.InPlacePass):
    """Run every GroupQueryAttention in float16, its past/present graph inputs/outputs float16.

    Needs: GroupQueryAttention nodes whose past_key/value are float32 graph inputs and whose
    present_key/value are float32 graph outputs (the builder's decoders). A node whose cache is
    quantized or that is otherwise not of that form leaves the whole graph unchanged (one dtype for
    the whole cache); so does a graph whose cache is already float16.
    Changes: one ``Cast`` to float16 per distinct float input of the attention nodes (a rotary table
    shared by all layers is cast once), one ``Cast`` back to float32 per attention output; the past
    inputs and present outputs become float16.
    """

    name: ClassVar[str] = "kv_cache_fp16"

    def call(self, model: ir.Model) -> PassReport:
        graph = model.graph
        nodes = attention_nodes(graph, self.name, _why_not)
        if not nodes:
            return PassReport(model, False)
        casts: dict[ir.Value, ir.Value] = {}  # a float input -> its float16 copy, shared by all its readers
        for node in nodes:
            self._to_fp16(graph, node, casts)
        return PassReport(model, True, {"dtype": "float16", "attention_nodes": len(nodes), "input_casts": len(casts)})

    @staticmethod
    def _to_fp16(graph: ir.Graph, node: ir.Node, casts: dict[ir.Value, ir.Value]) -> None:
        for i in _T_INPUTS:
            v = _value_at(node.inputs, i)
            # with a float32 cache every T input is float32 (the only kernel), typed or not
            if v is None or v.dtype not in (ir.DataType.FLOAT, None):
                continue
            if v not in casts:
                cast = _cast(v, ir.DataType.FLOAT16, f"{v.name}/fp16")
                producer = v.producer()
                # right after the producer (or first, for graph inputs and initializers): every reader follows
                if producer is not None:
                    graph.insert_after(producer, cast)
                else:
                    graph.insert_before(next(iter(graph)), cast)
                casts[v] = cast.outputs[0]
            node.replace_input_with(i, casts[v])
        cache = [node.inputs[i] for i in _PAST] + [node.outputs[i] for i in _PRESENT]
        for value in cache:  # _why_not checked that all four exist
            if value is not None:
                value.dtype = ir.DataType.FLOAT16
        out = node.outputs[0]
        uses = list(out.uses())
        out.dtype = ir.DataType.FLOAT16
        back = _cast(out, ir.DataType.FLOAT, f"{out.name}/fp32")
        graph.insert_after(node, back)
        for user, index in uses:
            user.replace_input_with(index, back.outputs[0])

    def ensures(self, model: ir.Model) -> None:
        """Each attention node reads and writes one cache dtype, its query's (onnxruntime has no
        mixed kernel: a mismatch would only fail when the session is made)."""
        floats = (ir.DataType.FLOAT, ir.DataType.FLOAT16)
        for node in model.graph:
            past = _value_at(node.inputs, _PAST[0]) if node.op_type == GQA else None
            if past is None or past.dtype not in floats:  # no cache, or a quantized one
                continue
            dtypes = {v.dtype for i, v in enumerate(node.inputs) if v is not None and i in (0, *_PAST)}
            dtypes |= {v.dtype for v in node.outputs[:3]}
            dtypes.discard(None)  # an untyped intermediate value says nothing
            if len(dtypes) != 1:
                raise ir.passes.PostconditionError(f"{node.name}: query, cache and output dtypes differ: {sorted(map(str, dtypes))}")
