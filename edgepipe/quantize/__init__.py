"""Weight-only quantization of a decoder export: one verb, one frozen config.

``quantize(src_dir, dst_dir, WeightOnly(bits=4, block_size=32, ...), importance=...)`` turns every
MatMul with a constant weight into ``MatMulNBits`` and the tied embedding / lm_head table into one
quantized tensor shared by ``GatherBlockQuantized`` (the lookup) and ``MatMulNBits`` (the head),
so the largest matrix of a small LLM is not left in fp32. Weights are read one initializer at a
time from the fp32 export's external data.
"""

from __future__ import annotations

import dataclasses
import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.quantize.blockwise import QuantizedBlocks, quantize_matrix

logger = logging.getLogger(__name__)

__all__ = ["WeightOnly", "quantize", "plan_bits"]

MS_DOMAIN = "com.microsoft"
_LAYER_RE = re.compile(r"layers\.(\d+)\.")
LM_HEAD = "lm_head"


@dataclass(frozen=True)
class WeightOnly:
    """Weight-only block quantization (MatMulNBits / GatherBlockQuantized).

    ``eight_bit_layers`` names transformer layers kept at 8 bits ("first", "last" or an index);
    ``eight_bit_ops`` names projections kept at 8 bits everywhere ("down_proj", "qkv_proj", ...).
    ``embedding_bits`` applies to the tied embedding / lm_head table (32 leaves it in fp32).
    ``eight_bit_block_size`` gives the 8-bit matrices their own block (default ``block_size``): an
    8-bit block needs no fine scales, and at 64 each costs 8.6 instead of 9.25 bits per weight, so a
    size budget holds ~18 % more 8-bit matrices.
    """

    bits: int = 4
    block_size: int = 32
    symmetric: bool = False
    accuracy_level: int = 4
    algorithm: str = "imatrix"
    embedding_bits: int = 8
    embedding_block_size: int | None = None
    eight_bit_layers: tuple[str, ...] = ()
    eight_bit_ops: tuple[str, ...] = ()
    eight_bit_block_size: int | None = None

    @classmethod
    def from_target(cls, q: Any) -> WeightOnly:
        return cls(
            bits=q.bits,
            block_size=q.block_size,
            symmetric=q.symmetric,
            accuracy_level=q.accuracy_level,
            algorithm=q.algorithm,
            embedding_bits=q.embedding_bits,
            embedding_block_size=q.embedding_block_size,
            eight_bit_layers=tuple(q.eight_bit_layers),
            eight_bit_ops=tuple(q.eight_bit_ops),
            eight_bit_block_size=q.eight_bit_block_size,
        )

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["eight_bit_layers"] = list(self.eight_bit_layers)
        d["eight_bit_ops"] = list(self.eight_bit_ops)
        return d


def _layer_matches(spec: str, layer: int, num_layers: int) -> bool:
    """``spec`` is "first", "last", "first:N", "last:N", "N" or "A-B" (inclusive); a comma joins several."""
    for part in spec.split(","):
        part = part.strip()
        if part == "first" and layer == 0 or part == "last" and layer == num_layers - 1:
            return True
        where, _, count = part.partition(":")
        if count.isdigit() and (
            where == "first" and layer < int(count) or where == "last" and layer >= num_layers - int(count)
        ):
            return True
        lo, _, hi = part.partition("-")
        if lo.isdigit() and (hi.isdigit() or not hi) and int(lo) <= layer <= int(hi or lo):
            return True
    return False


def plan_bits(weight_name: str, num_layers: int, cfg: WeightOnly) -> int:
    """Bits for one MatMul weight under ``cfg`` (32 = leave in fp32)."""
    if LM_HEAD in weight_name:
        return cfg.embedding_bits
    if cfg.bits == 32:
        return 32
    m = _LAYER_RE.search(weight_name)
    layer = int(m.group(1)) if m else None
    if layer is not None and any(_layer_matches(s, layer, num_layers) for s in cfg.eight_bit_layers):
        return 8
    for spec in cfg.eight_bit_ops:
        op, _, layers = spec.partition("@")
        if op in weight_name and (not layers or (layer is not None and _layer_matches(layers, layer, num_layers))):
            return 8
    return cfg.bits


def _embedding_block(hidden: int, block: int) -> int | None:
    for b in (block, 128, 64, 32, 16):
        if hidden % b == 0:
            return b
    return None


class _StreamedData:
    """Appends initializers to the external data file as soon as they are made.

    Holding every quantized matrix until a final ``onnx.save_model`` cost twice the artifact in
    RAM (the arrays and their TensorProto copies): the int8 Granite-2B build peaked at 9.1 GB in
    this stage. Tensors under ``threshold`` bytes stay inline, as ``onnx.save_model`` would keep them;
    ``onnx.save_model`` later appends the remaining initializers after these.
    """

    def __init__(self, path: Path, threshold: int = 1024):
        self.path = path
        self.location = path.name
        self.threshold = threshold
        self._f = open(path, "wb")

    def tensor(self, arr: np.ndarray, name: str) -> Any:
        from onnx import TensorProto, helper, numpy_helper

        arr = np.ascontiguousarray(arr)
        if arr.nbytes < self.threshold:
            return numpy_helper.from_array(arr, name)
        t = TensorProto()
        t.name = name
        t.data_type = helper.np_dtype_to_tensor_dtype(arr.dtype)
        t.dims.extend(arr.shape)
        t.data_location = TensorProto.EXTERNAL
        offset = self._f.tell()
        self._f.write(arr.tobytes())
        for key, value in (("location", self.location), ("offset", str(offset)), ("length", str(arr.nbytes))):
            entry = t.external_data.add()
            entry.key, entry.value = key, value
        return t

    def close(self) -> None:
        self._f.close()


def _num_layers(model: Any) -> int:
    """Transformer layers = those with weight matrices: onnxruntime-genai's builder names the final
    norm "layers.<N>", which would make "last" one past the real last layer."""
    layers = {int(m.group(1)) for t in model.graph.initializer if len(t.dims) == 2 and (m := _LAYER_RE.search(t.name))}
    return max(layers) + 1 if layers else 0


def gptq_weights(model_path: Path, cfg: WeightOnly) -> set[str]:
    """The MatMul weights of the ONNX model at ``model_path`` that ``quantize`` will GPTQ.

    Only 4-bit matrices go through GPTQ (8-bit ones are rounded to nearest), so calibration needs
    Hessians for their inputs alone: on Granite-2B with the Pi profiles that skips the 8192x8192
    Hessians of six down projections (1.5 GB of disk and their x^T x products).
    """
    import onnx

    from edgepipe.quantize.calibrate import weight_matmuls

    if cfg.algorithm != "gptq":
        return set()
    model = onnx.load(str(model_path), load_external_data=False)
    n = _num_layers(model)
    return {w for w in weight_matmuls(model) if plan_bits(w, n, cfg) == 4}


def quantize(
    src_dir: Path,
    dst_dir: Path,
    cfg: WeightOnly,
    *,
    importance: dict[str, np.ndarray] | None = None,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Quantize the fp32 decoder in ``src_dir`` into ``dst_dir``; return a summary of what was done."""
    import onnx

    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(src_dir / "model.onnx"), load_external_data=False)
    num_layers = _num_layers(model)
    importance = importance or {}
    alg = cfg.algorithm if importance or cfg.algorithm not in ("imatrix", "gptq") else "mse"

    for name in ("model.onnx", "model.onnx.data"):
        (dst_dir / name).unlink(missing_ok=True)
    data = _StreamedData(dst_dir / "model.onnx.data")
    try:
        return _quantize_graph(model, src_dir, dst_dir, cfg, data, num_layers, importance, alg, progress)
    finally:
        data.close()


def _quantize_graph(
    model: Any,
    src_dir: Path,
    dst_dir: Path,
    cfg: WeightOnly,
    data: _StreamedData,
    num_layers: int,
    importance: Any,
    alg: str,
    progress: Callable[[str], None] | None,
) -> dict[str, Any]:
    import onnx
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {t.name: t for t in graph.initializer}

    def load(name: str) -> np.ndarray:
        return numpy_helper.to_array(inits[name], base_dir=str(src_dir))

    consumers: dict[str, list] = {}
    for node in graph.node:
        for i in node.input:
            consumers.setdefault(i, []).append(node)

    new_inits: dict[str, Any] = {}
    replaced: dict[int, list] = {}  # id(node) -> replacement nodes
    drop_inits: set[str] = set()
    quantized: dict[str, QuantizedBlocks] = {}  # with their arrays dropped once written
    counts = {4: 0, 8: 0, 32: 0}
    matmuls = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in inits and len(inits[n.input[1]].dims) == 2]
    for idx, node in enumerate(matmuls):
        wname = node.input[1]
        bits = plan_bits(wname, num_layers, cfg)
        if bits == 32:
            counts[32] += 1
            continue
        w = load(wname)
        block = (cfg.eight_bit_block_size or cfg.block_size) if bits == 8 else cfg.block_size
        if LM_HEAD in wname:
            block = _embedding_block(w.shape[0], cfg.embedding_block_size or cfg.block_size) or cfg.block_size
        # 8-bit blocks gain nothing from the search; the 4-bit ones are where the error is
        algo = alg if bits == 4 else "rtn"
        hessian = importance.get(f"{wname}@H")
        if algo == "gptq" and hessian is not None and w.shape[0] % block == 0:
            from edgepipe.quantize.gptq import gptq_matrix

            qb = gptq_matrix(w, hessian, bits=bits, block_size=block, symmetric=cfg.symmetric)
        else:
            algo = "imatrix" if algo == "gptq" else algo
            qb = quantize_matrix(w, bits=bits, block_size=block, symmetric=cfg.symmetric, algorithm=algo, importance=importance.get(wname))
        del w
        counts[bits] += 1
        base = wname.removesuffix(".weight")
        names = [f"{base}.weight_Q{bits}", f"{base}.weight_scales"]
        new_inits[names[0]] = data.tensor(qb.data, names[0])
        new_inits[names[1]] = data.tensor(qb.scales, names[1])
        inputs = [node.input[0], *names]
        if qb.zero_points is not None:
            names.append(f"{base}.weight_zp")
            new_inits[names[2]] = data.tensor(qb.zero_points, names[2])
            inputs.append(names[2])
        qb = dataclasses.replace(qb, data=np.empty(0, np.uint8), scales=np.empty(0, np.float32),
                                 zero_points=None if qb.zero_points is None else np.empty(0, np.uint8))
        quantized[wname] = qb
        mm = helper.make_node(
            "MatMulNBits", inputs, list(node.output), name=(node.name or base) + "_Q", domain=MS_DOMAIN,
            K=qb.K, N=qb.N, bits=bits, block_size=block, accuracy_level=cfg.accuracy_level,
        )
        replaced[id(node)] = [mm]
        if all(c.op_type == "MatMul" for c in consumers.get(wname, [])) or LM_HEAD not in wname:
            drop_inits.add(wname)
        if progress and (idx % 16 == 0 or idx == len(matmuls) - 1):
            progress(f"quantized {idx + 1}/{len(matmuls)} matrices")

    # Tied embedding: Transpose(lm_head weight) -> Gather  ==>  Reshape(Q data) -> GatherBlockQuantized
    embedding = "fp32"
    for node in list(graph.node):
        if node.op_type != "Gather" or node.input[0] in inits:
            continue
        producer = next((p for p in graph.node if node.input[0] in p.output), None)
        if producer is None or producer.op_type != "Transpose" or producer.input[0] not in quantized:
            continue
        wname = producer.input[0]
        qb = quantized[wname]
        if qb.K % qb.block_size:
            logger.warning("embedding width %d is not a multiple of block %d; lookup stays fp32", qb.K, qb.block_size)
            continue
        base = wname.removesuffix(".weight")
        shape_name = f"{base}.embedding_shape"
        new_inits[shape_name] = numpy_helper.from_array(np.array([qb.N, qb.K * qb.bits // 8], dtype=np.int64), shape_name)
        flat = f"{base}/Reshape/output_0"
        reshape = helper.make_node("Reshape", [f"{base}.weight_Q{qb.bits}", shape_name], [flat], name=f"{base}/Reshape")
        gather_inputs = [flat, node.input[1], f"{base}.weight_scales"]
        if qb.zero_points is not None:
            gather_inputs.append(f"{base}.weight_zp")
        gbq = helper.make_node(
            "GatherBlockQuantized", gather_inputs, list(node.output), name=(node.name or "embed") + "_Q", domain=MS_DOMAIN,
            bits=qb.bits, block_size=qb.block_size, gather_axis=0, quantize_axis=1,
        )
        replaced[id(node)] = [reshape, gbq]
        replaced[id(producer)] = []
        drop_inits.add(wname)
        embedding = f"int{qb.bits} (shared with lm_head)"

    nodes = []
    for node in graph.node:
        nodes.extend(replaced.get(id(node), [node]))
    del graph.node[:]
    graph.node.extend(nodes)
    kept = []
    for t in graph.initializer:
        if t.name in drop_inits:
            continue
        if t.data_location == onnx.TensorProto.EXTERNAL:
            t = numpy_helper.from_array(load(t.name), t.name)
        kept.append(t)
    del graph.initializer[:]
    graph.initializer.extend(kept)
    graph.initializer.extend(new_inits[k] for k in sorted(new_inits))
    if not any(o.domain == MS_DOMAIN for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
    data.close()  # onnx.save_model appends the remaining initializers to the same file
    onnx.save_model(
        model, str(dst_dir / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
        location="model.onnx.data", size_threshold=1024,
    )
    for f in src_dir.iterdir():
        if f.name not in ("model.onnx", "model.onnx.data") and f.is_file():
            shutil.copy2(f, dst_dir / f.name)
    return {
        "config": cfg.to_dict(),
        "algorithm_used": alg,
        "matmuls": {"int4": counts[4], "int8": counts[8], "fp32": counts[32]},
        "embedding": embedding,
    }
