"""Put a torch.onnx decoder graph in the form the rest of the pipeline reads.

The quantizer rewrites ``MatMul(x, W)`` with a 2-D initializer ``W`` [K, N]; its BitPlan finds a
matrix's layer by ``layers.<i>.`` in the name and the table by ``lm_head`` (the names the genai
builder writes). torch.onnx writes a Linear as ``Gemm`` (``transB``) or as a MatMul of a folded
``val_123`` constant, GPT-2's Conv1D as ``Gemm``, and a tied head as ``MatMul(x, Transpose(E))``.
This pass makes every weight product a ``MatMul`` of a ``[K, N]`` initializer named after the
module that owns it (``model.layers.<i>.<rest>.weight``, from the exporter's name scopes) and
the head ``lm_head.MatMul.weight``; a tied embedding then reads ``Transpose(lm_head...)`` through
its ``Gather``, the builder's pattern, so the quantizer shares one int table for both. An untied
token embedding is named ``model.embed_tokens.weight``, as the builder names it (the quantizer
gives it a table of its own; ``estimate`` lists it under that name from the preflight's facts).
"""

from __future__ import annotations

import re
from typing import Any

import numpy as np

HEAD = "lm_head.MatMul.weight"
EMBEDDING = "model.embed_tokens.weight"  # edgepipe.quantize.bitplan.EMBEDDING (export does not import quantize)
_POINTWISE = ("Div", "Mul", "Tanh", "Cast", "Add", "Sub", "Identity")
_LAYER = re.compile(r"^(?:.*?\.)?(\d+)\.(.+)$")


def canonical_name(scope: str) -> str:
    """``m.transformer.h.3.attn.c_attn`` -> ``model.layers.3.attn.c_attn.weight``."""
    scope = scope.removeprefix("m.")
    hit = _LAYER.match(scope)
    return f"model.layers.{hit.group(1)}.{hit.group(2)}.weight" if hit else f"{scope}.weight"


def _scope(node: Any) -> str | None:
    for p in node.metadata_props:
        if p.key == "pkg.torch.onnx.name_scopes":
            scopes = [s.strip(" '\"") for s in p.value.strip("[]").split(",")]
            modules = [s for s in scopes if s.startswith("m.")]
            return modules[-1] if modules else None
    return None


def _head_node(graph: Any, producers: dict[str, Any]) -> Any:
    node = producers.get("logits")
    for _ in range(8):
        if node is None or node.op_type in ("MatMul", "Gemm"):
            return node
        if node.op_type not in _POINTWISE:
            return None
        node = producers.get(node.input[0])
    return None


class _Weights:
    """The source of a MatMul/Gemm's right operand: an initializer, possibly through a Transpose."""

    def __init__(self, graph: Any):
        self.inits = {t.name: t for t in graph.initializer}
        self.producers = {o: n for n in graph.node for o in n.output}

    def source(self, name: str) -> tuple[str, bool] | None:
        if name in self.inits and len(self.inits[name].dims) == 2:
            return name, False
        prod = self.producers.get(name)
        if prod is None or prod.op_type != "Transpose" or prod.input[0] not in self.inits:
            return None
        perm = [list(a.ints) for a in prod.attribute if a.name == "perm"]
        if len(self.inits[prod.input[0]].dims) != 2 or (perm and perm[0] != [1, 0]):
            return None
        return prod.input[0], True


def _gemm_plain(node: Any) -> tuple[bool, bool]:
    """(usable, transB) of a Gemm: alpha = beta = 1 and no transA are what a MatMul (+ Add) computes."""
    attrs = {a.name: a for a in node.attribute}
    alpha = attrs["alpha"].f if "alpha" in attrs else 1.0
    beta = attrs["beta"].f if "beta" in attrs else 1.0
    trans_a = attrs["transA"].i if "transA" in attrs else 0
    return alpha == 1.0 and beta == 1.0 and not trans_a, bool(attrs["transB"].i if "transB" in attrs else 0)


def normalize_weights(model: Any) -> dict[str, int]:
    """Rewrite ``model`` (an in-memory ModelProto with its weights loaded) in place; return counts."""
    from onnx import helper, numpy_helper

    graph = model.graph
    w = _Weights(graph)
    head = _head_node(graph, w.producers)
    new_nodes: list[Any] = []
    new_inits: dict[str, Any] = {}
    renamed: dict[str, str] = {}  # source initializer -> new [K, N] initializer
    counts = {"matmuls": 0, "gemms": 0, "tied": 0}
    for node in graph.node:
        src = w.source(node.input[1]) if node.op_type in ("MatMul", "Gemm") and len(node.input) > 1 else None
        usable, trans_b = _gemm_plain(node) if node.op_type == "Gemm" else (True, False)
        if src is None or not usable:
            new_nodes.append(node)
            continue
        name, transposed = src
        arr = numpy_helper.to_array(w.inits[name])
        if transposed != trans_b:
            arr = arr.T
        target = HEAD if head is not None and node.output[0] == head.output[0] else canonical_name(_scope(node) or name.removesuffix(".weight"))
        while target in new_inits:
            target = target.removesuffix(".weight") + "_.weight"
        new_inits[target] = numpy_helper.from_array(np.ascontiguousarray(arr, dtype=arr.dtype), target)
        renamed.setdefault(name, target)
        if node.op_type == "Gemm":
            counts["gemms"] += 1
            bias = node.input[2] if len(node.input) > 2 and node.input[2] else None
            mm_out = node.output[0] + "_mm" if bias else node.output[0]
            new_nodes.append(helper.make_node("MatMul", [node.input[0], target], [mm_out], name=node.name + "_mm"))
            if bias:
                new_nodes.append(helper.make_node("Add", [mm_out, bias], [node.output[0]], name=node.name + "_bias"))
        else:
            counts["matmuls"] += 1
            node.input[1] = target
            new_nodes.append(node)
    counts["tied"] = _retarget_gathers(new_nodes, renamed, new_inits)
    _name_token_embedding(new_nodes, w.inits, new_inits)
    del graph.node[:]
    graph.node.extend(new_nodes)
    _drop_unused(graph, new_inits)
    return counts


def _retarget_gathers(nodes: list[Any], renamed: dict[str, str], new_inits: dict[str, Any]) -> int:
    """A Gather of a table that became the head reads ``Transpose(lm_head.MatMul.weight)`` instead."""
    from onnx import helper

    tables = {src for src, dst in renamed.items() if dst == HEAD}
    count = 0
    for node in list(nodes):
        if node.op_type == "Gather" and node.input[0] in tables:
            out = HEAD.removesuffix(".weight") + "/Transpose/output_0"
            if not any(n.output and n.output[0] == out for n in nodes):
                nodes.insert(0, helper.make_node("Transpose", [HEAD], [out], name="/lm_head/Transpose", perm=[1, 0]))
            node.input[0] = out
            count += 1
    return count


def _name_token_embedding(nodes: list[Any], inits: dict[str, Any], new_inits: dict[str, Any]) -> None:
    """The 2-D table a Gather reads ``input_ids`` from directly (an untied token embedding) becomes
    ``model.embed_tokens.weight``; position tables are indexed by other inputs and keep their names."""
    from onnx import numpy_helper

    for node in nodes:
        name = node.input[0] if node.op_type == "Gather" and len(node.input) > 1 and node.input[1] == "input_ids" else None
        if name is None or name == EMBEDDING or name not in inits or len(inits[name].dims) != 2 or EMBEDDING in inits:
            continue
        new_inits[EMBEDDING] = numpy_helper.from_array(numpy_helper.to_array(inits[name]), EMBEDDING)
        node.input[0] = EMBEDDING
        return


def _drop_unused(graph: Any, new_inits: dict[str, Any]) -> None:
    """Remove initializers and nodes (dead Transposes of replaced weights) nothing reads any more."""
    outputs = {o.name for o in graph.output}
    changed = True
    while changed:
        used = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if n.output and not any(o in used for o in n.output)]
        changed = bool(dead)
        for n in dead:
            graph.node.remove(n)
    used = {i for n in graph.node for i in n.input}
    kept = [t for t in graph.initializer if t.name in used and t.name not in new_inits]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    graph.initializer.extend(new_inits[k] for k in sorted(new_inits) if k in used)
