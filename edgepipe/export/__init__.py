"""Hugging Face folder -> fp32 ONNX decoder with KV cache."""

from edgepipe.export.genai_builder import SUPPORTED_ARCHITECTURES, export_fp32
from edgepipe.export.inspect import ModelInfo, inspect_model

__all__ = ["ModelInfo", "SUPPORTED_ARCHITECTURES", "export_fp32", "inspect_model"]
