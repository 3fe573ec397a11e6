"""Export with onnxruntime-genai's model builder: fused GroupQueryAttention graphs, fp32 base.

The builder runs in a subprocess: its peak memory is returned to the system when it ends, a
crash cannot take the build down with it, and its chatter goes to a log file.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from edgepipe.errors import StageError

logger = logging.getLogger(__name__)

# Architectures the builder exports (source: onnxruntime_genai/models/builder.py, create_model,
# onnxruntime-genai 0.18.0). Rows marked "tested" have a tiny-model test in tests/.
SUPPORTED_ARCHITECTURES: dict[str, str] = {
    "LlamaForCausalLM": "llama",  # tested; SmolLM2, Llama 3.x
    "GraniteForCausalLM": "granite",  # tested; embedding/residual/attention multipliers, logits scaling
    "Qwen2ForCausalLM": "qwen2",  # tested; Qwen 2.5
    "Phi3ForCausalLM": "phi3",  # tested; Phi-3/3.5 mini (short rope)
    "Qwen3ForCausalLM": "qwen3",
    "MistralForCausalLM": "mistral",
    "GemmaForCausalLM": "gemma",
    "Gemma2ForCausalLM": "gemma2",
    "Gemma3ForCausalLM": "gemma3",  # tested (text only); its transformers-5 config is normalised first (export/normalize.py)
    "PhiForCausalLM": "phi",
    "OlmoForCausalLM": "olmo",
    "NemotronForCausalLM": "nemotron",
    "SmolLM3ForCausalLM": "smollm3",
    "InternLM2ForCausalLM": "internlm2",
}


def export_fp32(
    model_dir: Path, out_dir: Path, *, cache_dir: Path, log_file: Path, progress: Callable[[str], None] | None = None
) -> Path:
    """Run the builder (fp32, CPU) from ``model_dir`` into ``out_dir``; return ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    cmd = [
        sys.executable, "-m", "onnxruntime_genai.models.builder",
        "-i", str(model_dir), "-o", str(out_dir), "-p", "fp32", "-e", "cpu", "-c", str(cache_dir),
    ]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    if progress:
        progress("exporting fp32 ONNX with the onnxruntime-genai builder")
    with open(log_file, "w") as log:
        proc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        tail = [ln for ln in log_file.read_text(errors="replace").splitlines() if ln.strip()][-1:] or ["no output"]
        if proc.returncode < 0 or "MemoryError" in tail[0] or proc.returncode == 137:
            raise StageError(f"export ran out of memory (exit {proc.returncode}); build on a machine with more RAM, log: {log_file}")
        raise StageError(f"export failed: {tail[0][:300]} (full log: {log_file})")
    if not (out_dir / "model.onnx").is_file() or not (out_dir / "genai_config.json").is_file():
        raise StageError(f"export wrote no model.onnx/genai_config.json into {out_dir}; see {log_file}")
    return out_dir
