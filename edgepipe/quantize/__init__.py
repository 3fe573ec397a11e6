"""Weight-only quantization of a decoder export: one verb, one frozen config.

``quantize(src_dir, dst_dir, config, importance=...)`` where ``config`` is one algorithm's config
(:class:`Rtn`, :class:`Mse`, :class:`Imatrix`, :class:`Gptq`), a :class:`MixedPrecision` scheme (what
:func:`scheme_from_target` makes of a profile), or a :class:`BitPlan` -- which matrix gets which
config, and its exact bytes. Handlers are looked up by config type (:mod:`.handlers`); the plan comes
from the exported graph (:func:`plan_from_onnx`) or, before any export, from ``config.json``
(:func:`plan_from_config`), and the two agree. A :class:`WeightCache` keeps quantized matrices on disk
for searches that quantize one model many ways.
"""

from __future__ import annotations

from edgepipe.quantize.architectures import matrices_from_config, plan_from_config
from edgepipe.quantize.bitplan import BitPlan, Matrix, ModelMatrices, PlannedMatrix, matrices_from_onnx, plan_from_onnx
from edgepipe.quantize.configs import FP32, Format, Gptq, Imatrix, MixedPrecision, Mse, Rtn, WeightOnlyConfig, as_scheme, layer_matches, scheme_from_target
from edgepipe.quantize.graph import quantize
from edgepipe.quantize.weight_cache import WeightCache

__all__ = [
    "FP32",
    "BitPlan",
    "Format",
    "Gptq",
    "Imatrix",
    "Matrix",
    "MixedPrecision",
    "ModelMatrices",
    "Mse",
    "PlannedMatrix",
    "Rtn",
    "WeightCache",
    "WeightOnlyConfig",
    "as_scheme",
    "layer_matches",
    "matrices_from_config",
    "matrices_from_onnx",
    "plan_from_config",
    "plan_from_onnx",
    "quantize",
    "scheme_from_target",
]

