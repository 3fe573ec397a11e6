"""Graph transforms: onnx-ir passes composed by a pass manager, and onnxscript rewrite rules.

One transform per module, each with its own test: ``logits_slice`` (the CPU decoder's pass),
``gelu_fusion`` (onnxscript rules: Erf-GELU -> ``Gelu`` for the HTP), ``layernorm_uint8`` (an onnx-ir
pass on a QDQ model), ``manager`` (the pass manager); ``decoder`` runs the CPU decoder's passes on an
exported folder. Importing this package costs nothing: the passes are imported when they run.
"""

from edgepipe.optimize.decoder import PASSES, decoder_passes, optimize_dir, optimize_model

__all__ = ["PASSES", "decoder_passes", "optimize_dir", "optimize_model"]
