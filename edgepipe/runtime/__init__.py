"""The on-device runtime: onnxruntime + numpy + tokenizers, nothing else.

This package must stay importable on a Raspberry Pi with only those three wheels
(no torch, transformers, optimum, onnxruntime-genai, pydantic, click or yaml).
"""

from edgepipe.runtime.generate import GenerationConfig, generate
from edgepipe.runtime.manifest import MANIFEST_NAME, SCHEMA_VERSION, verify_artifact
from edgepipe.runtime.model import CausalLM

__all__ = [
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "CausalLM",
    "GenerationConfig",
    "generate",
    "verify_artifact",
]
