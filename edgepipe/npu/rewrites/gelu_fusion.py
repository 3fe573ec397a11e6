"""Fuse the exact-GELU Erf decomposition into one ``Gelu`` node (ONNX opset 20).

Why: the HTP rejects a quantized ``Erf``, so a QDQ model that keeps ``x * 0.5 * (1 + erf(x /
sqrt 2))`` as five ops either falls back to the CPU or cannot be compiled at all, while the
single ``Gelu`` op maps onto the HTP's own GELU kernel. torch's exporters at opset 20 already
emit ``Gelu``; older exports, other exporters and opset < 20 graphs carry the decomposition.

Matched forms (``a`` is ``x / sqrt2`` or ``x * (1/sqrt2)``; commutative inputs either way):
``Mul(Mul(x, Add(Erf(a), 1)), 0.5)`` and ``Mul(Mul(x, 0.5), Add(Erf(a), 1))``.
"""

from __future__ import annotations

import logging
import math

import onnx
from onnx import helper

from edgepipe.npu.rewrites._graph import consumers, default_opset, is_scalar_close, producers

log = logging.getLogger(__name__)

SQRT2 = math.sqrt(2.0)


def _other(node: onnx.NodeProto, name: str) -> str | None:
    ins = list(node.input)
    if len(ins) != 2 or name not in ins:
        return None
    return ins[1] if ins[0] == name else ins[0]


def fuse_erf_gelu(model: onnx.ModelProto) -> int:
    """Replace each Erf-GELU subgraph by ``Gelu`` (approximate="none"); return the count.

    A graph whose default opset is below 20 is first converted to opset 20, because ``Gelu``
    does not exist in earlier opsets.
    """
    graph = model.graph
    if not any(n.op_type == "Erf" for n in graph.node):
        return 0
    if default_opset(model) < 20:
        from onnx import version_converter

        converted = version_converter.convert_version(model, 20)
        model.CopyFrom(converted)
        graph = model.graph
    prod = producers(graph)
    cons = consumers(graph)
    remove: set[int] = set()
    new_nodes: list[tuple[onnx.NodeProto, onnx.NodeProto]] = []  # (last node of match, Gelu)
    for erf in graph.node:
        if erf.op_type != "Erf":
            continue
        scale = prod.get(erf.input[0])
        if scale is None or scale.op_type not in ("Div", "Mul"):
            continue
        if scale.op_type == "Div":
            if not is_scalar_close(graph, scale.input[1], SQRT2):
                continue
            x = scale.input[0]
        else:
            x = None
            for i in (0, 1):
                if is_scalar_close(graph, scale.input[1 - i], 1.0 / SQRT2):
                    x = scale.input[i]
            if x is None:
                continue
        (add,) = cons.get(erf.output[0], [None])[:1] or [None]
        if add is None or add.op_type != "Add" or len(cons[erf.output[0]]) != 1:
            continue
        one = _other(add, erf.output[0])
        if one is None or not is_scalar_close(graph, one, 1.0):
            continue
        add_users = cons.get(add.output[0], [])
        if len(add_users) != 1 or add_users[0].op_type != "Mul":
            continue
        mul1 = add_users[0]
        m1_other = _other(mul1, add.output[0])
        matched: list[onnx.NodeProto]
        if m1_other == x:
            # Mul(Mul(x, add), 0.5)
            users = cons.get(mul1.output[0], [])
            if len(users) != 1 or users[0].op_type != "Mul":
                continue
            mul2 = users[0]
            half = _other(mul2, mul1.output[0])
            if half is None or not is_scalar_close(graph, half, 0.5):
                continue
            matched, last = [scale, erf, add, mul1, mul2], mul2
        else:
            # Mul(Mul(x, 0.5), add)
            half_mul = prod.get(m1_other) if m1_other else None
            if half_mul is None or half_mul.op_type != "Mul":
                continue
            if not any(
                half_mul.input[i] == x and is_scalar_close(graph, half_mul.input[1 - i], 0.5) for i in (0, 1)
            ):
                continue
            if len(cons.get(half_mul.output[0], [])) != 1:
                continue
            matched, last = [scale, half_mul, erf, add, mul1], mul1
        if len(cons.get(scale.output[0], [])) != 1:
            continue
        gelu = helper.make_node(
            "Gelu", [x], [last.output[0]], name=(erf.name or "erf") + "_gelu", approximate="none"
        )
        remove.update(id(n) for n in matched)
        new_nodes.append((last, gelu))
    if not new_nodes:
        return 0
    replacement = {id(last): gelu for last, gelu in new_nodes}
    kept = []
    for node in graph.node:
        if id(node) in replacement:
            kept.append(replacement[id(node)])
        elif id(node) not in remove:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    log.info("fused %d Erf-GELU subgraphs into Gelu", len(new_nodes))
    return len(new_nodes)
