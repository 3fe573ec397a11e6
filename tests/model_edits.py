"""Broken checkpoints on purpose, for the bad-input tests of decoders and encoders alike."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np


def edit_tensors(model: Path, fn: Callable[[dict], None]) -> Path:
    """Rewrite ``model``'s safetensors after ``fn`` edits its tensors (name -> numpy array), in place."""
    from safetensors.numpy import load_file, save_file

    tensors = load_file(str(model / "model.safetensors"))
    fn(tensors)
    save_file(tensors, str(model / "model.safetensors"), metadata={"format": "pt"})
    return model


def int8_weights(t: dict) -> None:
    """A broken conversion: every weight stored as int8."""
    for k in list(t):
        t[k] = np.clip(np.round(t[k] * 64), -127, 127).astype(np.int8)
