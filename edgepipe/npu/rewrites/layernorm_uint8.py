"""Store the quantized LayerNormalization scale (gamma) as uint8 instead of int8.

Why: QNN's HTP backend rejects ``LayerNorm`` whose weight is int8 (``backendValidateOpConfig``
fails with error 3110 on QNN 2.51), so with an int8 weight profile every LayerNorm of a
transformer falls back to the CPU. uint8 is accepted. The change is exact: ``q_u8 = q_i8 +
128`` and ``zp_u8 = zp_i8 + 128`` dequantize to the same real values, so accuracy does not move.

Runs on a QDQ model (after quantization). A DequantizeLinear that also feeds other nodes is
copied first, so only the LayerNorm input changes type.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

from edgepipe.npu.rewrites._graph import consumers, producers

log = logging.getLogger(__name__)


def layernorm_weights_to_uint8(model: onnx.ModelProto) -> int:
    """Rewrite int8 LayerNorm scale initializers (behind DequantizeLinear) to uint8; return count."""
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    prod = producers(graph)
    cons = consumers(graph)
    count = 0
    new_inits: list[TensorProto] = []
    replaced: set[str] = set()
    for ln in graph.node:
        if ln.op_type != "LayerNormalization" or len(ln.input) < 2:
            continue
        dq = prod.get(ln.input[1])
        if dq is None or dq.op_type != "DequantizeLinear" or len(dq.input) < 3:
            continue
        q_init, zp_init = inits.get(dq.input[0]), inits.get(dq.input[2])
        if q_init is None or zp_init is None or q_init.data_type != TensorProto.INT8:
            continue
        q = numpy_helper.to_array(q_init).astype(np.int16) + 128
        zp = numpy_helper.to_array(zp_init).astype(np.int16) + 128
        base = f"{ln.name or ln.output[0]}_scale_u8"
        q_new = numpy_helper.from_array(q.astype(np.uint8), base + "_q")
        zp_new = numpy_helper.from_array(zp.astype(np.uint8), base + "_zp")
        new_inits += [q_new, zp_new]
        replaced.update((q_init.name, zp_init.name))
        if len(cons.get(dq.output[0], [])) == 1:
            dq.input[0], dq.input[2] = q_new.name, zp_new.name
        else:
            copy = onnx.NodeProto()
            copy.CopyFrom(dq)
            copy.name = base + "_dq"
            copy.input[0], copy.input[2] = q_new.name, zp_new.name
            del copy.output[:]
            copy.output.append(base + "_dq_out")
            ln.input[1] = copy.output[0]
            idx = list(graph.node).index(ln)
            graph.node.insert(idx, copy)
        count += 1
    graph.initializer.extend(new_inits)
    # the int8 originals, where no node uses them any more
    used = {name for node in graph.node for name in node.input} | {o.name for o in graph.output}
    dead = [i for i in graph.initializer if i.name in replaced and i.name not in used]
    for init in dead:
        graph.initializer.remove(init)
    if count:
        log.info("stored %d LayerNorm scales as uint8 (HTP rejects int8)", count)
    return count
