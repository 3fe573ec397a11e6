"""Store the quantized LayerNormalization scale (gamma) as uint8 instead of int8 (an onnx-ir pass).

Why: QNN's HTP backend rejects ``LayerNorm`` whose weight is int8 (``backendValidateOpConfig``
fails with error 3110 on QNN 2.51), so with an int8 weight profile every LayerNorm of a
transformer falls back to the CPU. uint8 is accepted. The change is exact: ``q_u8 = q_i8 +
128`` and ``zp_u8 = zp_i8 + 128`` dequantize to the same real values, so accuracy does not move.

This is a storage change, not a fusion: no pattern of ops becomes another, one tensor's type
changes. Runs on a QDQ model (after quantization). A DequantizeLinear that also feeds other nodes
is copied first, so only the LayerNorm input changes type.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, ClassVar

import numpy as np
import onnx_ir as ir

from edgepipe.optimize.manager import PassReport, apply_to_proto

if TYPE_CHECKING:
    import onnx

logger = logging.getLogger(__name__)

__all__ = ["LayerNormUint8", "layernorm_weights_to_uint8"]


@dataclasses.dataclass(frozen=True)
class _Site:
    """A LayerNorm whose scale a DequantizeLinear makes from int8 initializer ``q`` and zero point ``zp``."""

    ln: ir.Node
    dq: ir.Node
    q: ir.Value
    zp: ir.Value


def _int8_scale_site(ln: ir.Node) -> _Site | None:
    """``ln`` as a site to rewrite, or None when its scale is not an int8 DequantizeLinear of initializers."""
    if ln.op_type != "LayerNormalization" or len(ln.inputs) < 2 or ln.inputs[1] is None:
        return None
    dq = ln.inputs[1].producer()
    if dq is None or dq.op_type != "DequantizeLinear" or len(dq.inputs) < 3:
        return None
    q, zp = dq.inputs[0], dq.inputs[2]
    if q is None or zp is None or not (q.is_initializer() and zp.is_initializer()):
        return None
    return _Site(ln, dq, q, zp) if q.dtype == ir.DataType.INT8 else None


def _to_uint8(graph: ir.Graph, value: ir.Value, name: str) -> ir.Value:
    """A new uint8 initializer holding ``value`` (an int8 initializer) + 128."""
    tensor = value.const_value
    if tensor is None:  # an initializer always has one; this tells the type checker
        raise ValueError(f"initializer {value.name!r} has no value")
    array = (tensor.numpy().astype(np.int16) + 128).astype(np.uint8)
    new = ir.Value(name=name, type=ir.TensorType(ir.DataType.UINT8), shape=ir.Shape(array.shape), const_value=ir.tensor(array, name=name))
    graph.register_initializer(new)
    return new


def _rewrite(graph: ir.Graph, site: _Site) -> None:
    """Point the LayerNorm's scale at a uint8 DequantizeLinear: the same one if only the LayerNorm reads
    it, else a copy."""
    ln, dq = site.ln, site.dq
    base = f"{ln.name or ln.outputs[0].name}_scale_u8"
    q = _to_uint8(graph, site.q, base + "_q")
    zp = _to_uint8(graph, site.zp, base + "_zp")
    out = dq.outputs[0]
    if len(out.uses()) == 1 and not out.is_graph_output():
        dq.replace_input_with(0, q)
        dq.replace_input_with(2, zp)
        return
    copy_out = ir.Value(name=base + "_dq_out", type=out.type, shape=out.shape)
    copy = ir.node(
        dq.op_type, [q, dq.inputs[1], zp, *dq.inputs[3:]], attributes=dq.attributes,
        domain=dq.domain, outputs=[copy_out], name=base + "_dq",
    )
    graph.insert_before(ln, copy)
    ln.replace_input_with(1, copy_out)


def _drop_unused(graph: ir.Graph, values: list[ir.Value]) -> None:
    """Remove the int8 originals that no node (and no graph input or output) uses any more."""
    for value in values:
        unused = not (value.uses() or value.is_graph_output() or value.is_graph_input())
        if unused and value.name is not None and value.name in graph.initializers:
            del graph.initializers[value.name]


class LayerNormUint8(ir.passes.InPlacePass):
    """Rewrite int8 LayerNorm scale initializers (behind DequantizeLinear) to uint8.

    Needs: a QDQ model; a LayerNorm's scale counts when a DequantizeLinear makes it from an int8
    initializer and an initializer zero point (others are left alone). Changes: two uint8
    initializers per such LayerNorm, the DequantizeLinear (or its copy) pointed at them, the int8
    originals dropped where unused. Reports ``{"count": LayerNorms rewritten}``.
    """

    name: ClassVar[str] = "layernorm_uint8"

    def call(self, model: ir.Model) -> PassReport:
        graph = model.graph
        sites = [site for ln in graph if (site := _int8_scale_site(ln)) is not None]
        for site in sites:
            _rewrite(graph, site)
        _drop_unused(graph, [v for site in sites for v in (site.q, site.zp)])
        if sites:
            logger.info("stored %d LayerNorm scales as uint8 (HTP rejects int8)", len(sites))
        return PassReport(model, bool(sites), {"count": len(sites)})

    def ensures(self, model: ir.Model) -> None:
        """No LayerNorm scale is left behind an int8 DequantizeLinear of initializers."""
        left = [ln.name for ln in model.graph if _int8_scale_site(ln) is not None]
        if left:
            raise ir.passes.PostconditionError(f"LayerNorm scales still int8: {left}")


def layernorm_weights_to_uint8(model: onnx.ModelProto) -> int:
    """Rewrite int8 LayerNorm scale initializers (behind DequantizeLinear) of ``model`` (changed in
    place) to uint8; return the count."""
    return int(apply_to_proto(LayerNormUint8(), model).details.get("count", 0))
