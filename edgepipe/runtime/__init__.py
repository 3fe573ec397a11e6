"""The on-device runtime: onnxruntime + numpy + tokenizers, nothing else.

This package must stay importable on a Raspberry Pi with only those three wheels
(no torch, transformers, optimum, onnxruntime-genai, pydantic, click or yaml), and imports nothing
of edgepipe outside itself but ``edgepipe.errors``. ``serve/`` (``edgepipe serve``) adds the
standard library's HTTP server and, lazily, jinja2 (the ``serve`` extra) for chat templates.
"""

from edgepipe.runtime.artifact import open_artifact, run_prompt
from edgepipe.runtime.generate import GenerationConfig, generate
from edgepipe.runtime.kinds import ArtifactKind
from edgepipe.runtime.lm import LM
from edgepipe.runtime.manifest import MANIFEST_NAME, SCHEMA_VERSION, Manifest, read_manifest, verify_artifact
from edgepipe.runtime.model import CausalLM
from edgepipe.runtime.speculative import SpecStats

__all__ = [
    "LM",
    "MANIFEST_NAME",
    "SCHEMA_VERSION",
    "ArtifactKind",
    "CausalLM",
    "GenerationConfig",
    "Manifest",
    "SpecStats",
    "generate",
    "open_artifact",
    "read_manifest",
    "run_prompt",
    "verify_artifact",
]
