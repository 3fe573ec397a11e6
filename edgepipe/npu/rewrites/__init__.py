"""Graph rewrites the Qualcomm HTP needs, one per module.

Each rewrite is a function ``rewrite(model: onnx.ModelProto) -> int`` that edits the model in
place and returns how many sites it changed (0 means the graph already had the wanted form), so
that a build can log what it did and a test can assert that something happened. They are
separate from ``onnxruntime``'s own QNN pre-processing because each one encodes a specific
rejection seen on the HTP, and a test pins it down.
"""

from __future__ import annotations

from edgepipe.npu.rewrites.gelu_fusion import fuse_erf_gelu
from edgepipe.npu.rewrites.layernorm_uint8 import layernorm_weights_to_uint8

__all__ = ["fuse_erf_gelu", "layernorm_weights_to_uint8"]
