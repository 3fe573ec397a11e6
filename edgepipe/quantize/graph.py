"""``quantize``: the fp32 decoder export -> MatMulNBits graph, as a BitPlan says.

Every MatMul with a constant weight becomes ``MatMulNBits``, and a tied embedding / lm_head table
becomes one quantized tensor shared by ``GatherBlockQuantized`` (the lookup) and ``MatMulNBits``
(the head), so the largest matrix of a small LLM is not left in fp32. An untied input embedding
gets a quantized table of its own, read by ``GatherBlockQuantized`` the same way. Weights are read one
initializer at a time from the fp32 export's external data and written to the artifact's as soon
as they are quantized.
"""

from __future__ import annotations

import dataclasses
import logging
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from edgepipe.errors import InputError
from edgepipe.quantize.bitplan import BitPlan, gathered_tables, lookup_tables, matrices_from_onnx
from edgepipe.quantize.blockwise import QuantizedBlocks
from edgepipe.quantize.configs import MixedPrecision, WeightOnlyConfig, as_scheme
from edgepipe.quantize.handlers import WeightStats, quantize_weight
from edgepipe.quantize.weight_cache import WeightCache

logger = logging.getLogger(__name__)

__all__ = ["quantize"]

MS_DOMAIN = "com.microsoft"
DATA_FILE = "model.onnx.data"
INLINE_BELOW = 1024  # bytes: smaller tensors stay in model.onnx, as onnx.save_model's size_threshold


def _plan_for(config: Any, model: Any) -> BitPlan:
    """``config`` -> the plan for this graph, looked up by the config's type."""
    for kind, make in _PLANNERS.items():
        if isinstance(config, kind):
            return make(config, model)
    raise InputError(f"quantize takes a weight-only config, a MixedPrecision scheme or a BitPlan, not {type(config).__name__}")


def _given_plan(plan: BitPlan, model: Any) -> BitPlan:
    if plan.matrices != matrices_from_onnx(model):
        raise InputError("the BitPlan was made for another model: its matrices are not this graph's")
    return plan


_PLANNERS: dict[type, Callable[[Any, Any], BitPlan]] = {
    BitPlan: _given_plan,
    MixedPrecision: lambda scheme, model: BitPlan.build(scheme, matrices_from_onnx(model)),
    WeightOnlyConfig: lambda cfg, model: BitPlan.build(as_scheme(cfg), matrices_from_onnx(model)),
}


class _StreamedData:
    """Appends initializers to the external data file as soon as they are made.

    Holding every quantized matrix until a final ``onnx.save_model`` cost twice the artifact in
    RAM (the arrays and their TensorProto copies): the int8 Granite-2B build peaked at 9.1 GB in
    this stage. Tensors under ``threshold`` bytes stay inline, as ``onnx.save_model`` would keep them;
    ``onnx.save_model`` later appends the remaining initializers after these.
    """

    def __init__(self, path: Path, threshold: int = INLINE_BELOW):
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


def quantize(
    src_dir: Path,
    dst_dir: Path,
    config: WeightOnlyConfig | MixedPrecision | BitPlan,
    *,
    importance: Mapping[str, np.ndarray] | None = None,
    progress: Callable[[str], None] | None = None,
    weight_cache: WeightCache | None = None,
) -> dict[str, Any]:
    """Quantize the fp32 decoder in ``src_dir`` into ``dst_dir``; return what was done (the manifest's
    ``quantization`` section).

    ``config`` is one algorithm's config (every matrix, the table too), a :class:`MixedPrecision`
    scheme, or a :class:`BitPlan` made for this graph. ``importance`` is what
    :func:`~edgepipe.quantize.calibrate.collect_importance` measured; configs that need it fall back to
    the unweighted search without it. ``weight_cache`` keeps each quantized matrix on disk, so that
    quantizing the same model again under another plan re-quantizes only what changed.
    """
    import onnx

    src_dir, dst_dir = Path(src_dir), Path(dst_dir)
    dst_dir.mkdir(parents=True, exist_ok=True)
    model = onnx.load(str(src_dir / "model.onnx"), load_external_data=False)
    plan = _plan_for(config, model)
    importance = importance or {}
    for name in ("model.onnx", DATA_FILE):
        (dst_dir / name).unlink(missing_ok=True)
    rewrite = _Rewrite(model, src_dir, plan, _StreamedData(dst_dir / DATA_FILE))
    try:
        rewrite.matmuls(importance, progress, weight_cache)
        embedding = rewrite.own_tables(importance, weight_cache) or rewrite.share_table()
        rewrite.save(dst_dir)
    finally:
        rewrite.data.close()
    for f in src_dir.iterdir():
        if f.name not in ("model.onnx", DATA_FILE) and f.is_file():
            shutil.copy2(f, dst_dir / f.name)
    scheme = plan.scheme
    return {
        "config": scheme.as_profile(),
        "algorithm_used": "mse" if scheme.needs_calibration and not importance else scheme.algorithm,
        "matmuls": plan.counts(),
        "embedding": embedding,
        "bit_plan": plan.summary(),
    }


class _Rewrite:
    """The graph surgery of one ``quantize`` call: nodes to replace, initializers to add and drop."""

    def __init__(self, model: Any, src_dir: Path, plan: BitPlan, data: _StreamedData):
        self.model, self.src_dir, self.plan, self.data = model, src_dir, plan, data
        self.inits = {t.name: t for t in model.graph.initializer}
        self.new_inits: dict[str, Any] = {}
        self.replaced: dict[str, list[Any]] = {}  # a node's first output -> its replacement nodes (protobuf wrappers have no stable id)
        self.drop: set[str] = set()
        self.quantized: dict[str, QuantizedBlocks] = {}  # metadata only: arrays dropped once written

    def load(self, name: str) -> np.ndarray:
        from onnx import numpy_helper

        return numpy_helper.to_array(self.inits[name], base_dir=str(self.src_dir))

    def matmuls(
        self, importance: Mapping[str, np.ndarray], progress: Callable[[str], None] | None, cache: WeightCache | None = None
    ) -> None:
        graph = self.model.graph
        consumers: dict[str, list[Any]] = {}
        for node in graph.node:
            for i in node.input:
                consumers.setdefault(i, []).append(node)
        nodes = [n for n in graph.node if n.op_type == "MatMul" and n.input[1] in self.plan]
        for idx, node in enumerate(nodes):
            wname = node.input[1]
            cfg = self.plan[wname].config
            if cfg is None:
                continue
            if wname not in self.quantized:
                self._write(wname, quantize_weight(cfg, self.load(wname), WeightStats(importance, wname), cache=cache))
            self.replaced[node.output[0]] = [self._matmul_nbits(node, wname, cfg)]
            if all(c.op_type == "MatMul" for c in consumers.get(wname, [])) or not self.plan[wname].matrix.is_table:
                self.drop.add(wname)
            if progress and (idx % 16 == 0 or idx == len(nodes) - 1):
                progress(f"quantized {idx + 1}/{len(nodes)} matrices")

    def _write(self, wname: str, qb: QuantizedBlocks) -> None:
        base = wname.removesuffix(".weight")
        for name, arr in self._tensor_names(base, qb).items():
            self.new_inits[name] = self.data.tensor(arr, name)
        empty = np.empty(0, np.uint8)
        self.quantized[wname] = dataclasses.replace(
            qb, data=empty, scales=np.empty(0, np.float32), zero_points=None if qb.zero_points is None else empty
        )

    @staticmethod
    def _tensor_names(base: str, qb: QuantizedBlocks) -> dict[str, np.ndarray]:
        out = {f"{base}.weight_Q{qb.bits}": qb.data, f"{base}.weight_scales": qb.scales}
        if qb.zero_points is not None:
            out[f"{base}.weight_zp"] = qb.zero_points
        return out

    def _matmul_nbits(self, node: Any, wname: str, cfg: WeightOnlyConfig) -> Any:
        from onnx import helper

        qb, base = self.quantized[wname], wname.removesuffix(".weight")
        inputs = [node.input[0], *self._tensor_names(base, qb)]
        return helper.make_node(
            "MatMulNBits", inputs, list(node.output), name=(node.name or base) + "_Q", domain=MS_DOMAIN,
            K=qb.K, N=qb.N, bits=qb.bits, block_size=qb.block_size, accuracy_level=cfg.accuracy_level,
        )

    def own_tables(self, importance: Mapping[str, np.ndarray], cache: WeightCache | None = None) -> str | None:
        """Untied input embedding: Gather(E) ==> GatherBlockQuantized of E's own quantized table, E
        quantized as its plan entry's [hidden, vocab] (blocks along each row). None if there is none
        or the plan leaves it fp32."""
        label = None
        for wname, gather in lookup_tables(self.model).items():
            entry = self.plan[wname] if wname in self.plan else None
            if entry is None or entry.config is None:
                continue
            w = entry.matrix.oriented(self.load(wname))
            self._write(wname, quantize_weight(entry.config, np.ascontiguousarray(w), WeightStats(importance, wname), cache=cache))
            self._gather_block_quantized(wname, self.quantized[wname], gather)
            self.drop.add(wname)
            label = f"{entry.format.label} (own table; lm_head separate)"
        return label

    def share_table(self) -> str:
        """Tied embedding: Transpose(W) -> Gather  ==>  Reshape(W's quantized data) -> GatherBlockQuantized."""
        embedding = "fp32"
        for wname, gather in gathered_tables(self.model).items():
            qb = self.quantized.get(wname)
            if qb is None:
                continue
            if qb.K % qb.block_size:
                logger.warning("embedding width %d is not a multiple of block %d; lookup stays fp32", qb.K, qb.block_size)
                continue
            self._gather_block_quantized(wname, qb, gather)
            self.replaced[gather.input[0]] = []  # the Transpose
            self.drop.add(wname)
            embedding = f"int{qb.bits} (shared with lm_head)"
        return embedding

    def _gather_block_quantized(self, wname: str, qb: QuantizedBlocks, gather: Any) -> None:
        from onnx import TensorProto, helper, numpy_helper

        base = wname.removesuffix(".weight")
        shape_name = f"{base}.embedding_shape"
        self.new_inits[shape_name] = numpy_helper.from_array(np.array([qb.N, qb.K * qb.bits // 8], dtype=np.int64), shape_name)
        # The shape is a graph input too (its initializer the default), which keeps onnxruntime from
        # constant-folding the Reshape: folded, it is a heap copy of the whole table (27 MB on the
        # default model's int8 build, all resident); unfolded, a view of the mapped table whose pages
        # are read only for the rows looked up (benchmarks/RESULTS.md, issue 16).
        self.model.graph.input.append(helper.make_tensor_value_info(shape_name, TensorProto.INT64, [2]))
        flat = f"{base}/Reshape/output_0"
        reshape = helper.make_node("Reshape", [f"{base}.weight_Q{qb.bits}", shape_name], [flat], name=f"{base}/Reshape")
        names = list(self._tensor_names(base, qb))
        gbq = helper.make_node(
            "GatherBlockQuantized", [flat, gather.input[1], *names[1:]], list(gather.output), name=(gather.name or "embed") + "_Q",
            domain=MS_DOMAIN, bits=qb.bits, block_size=qb.block_size, gather_axis=0, quantize_axis=1,
        )
        self.replaced[gather.output[0]] = [reshape, gbq]

    def save(self, dst_dir: Path) -> None:
        import onnx
        from onnx import helper, numpy_helper

        graph = self.model.graph
        nodes = [new for node in graph.node for new in self.replaced.get(node.output[0], [node])]
        del graph.node[:]
        graph.node.extend(nodes)
        kept = []
        for t in graph.initializer:
            if t.name in self.drop:
                continue
            if t.data_location == onnx.TensorProto.EXTERNAL:
                t = numpy_helper.from_array(self.load(t.name), t.name)
            kept.append(t)
        del graph.initializer[:]
        graph.initializer.extend(kept)
        graph.initializer.extend(self.new_inits[k] for k in sorted(self.new_inits))
        if not any(o.domain == MS_DOMAIN for o in self.model.opset_import):
            self.model.opset_import.append(helper.make_opsetid(MS_DOMAIN, 1))
        self.data.close()  # onnx.save_model appends the remaining initializers to the same file
        onnx.save_model(
            self.model, str(dst_dir / "model.onnx"), save_as_external_data=True, all_tensors_to_one_file=True,
            location=DATA_FILE, size_threshold=INLINE_BELOW,
        )
