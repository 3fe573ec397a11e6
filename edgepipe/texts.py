"""The texts a build calibrates and evaluates on: read once, up front, with one-line errors.

The packaged defaults (``edgepipe/data``) are used when the user names none. Calibration and
evaluation texts must differ: a build never scores on the text it calibrated on.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np

from edgepipe.errors import InputError

EVAL_WINDOW = 512
EVAL_WINDOWS = 16  # the packaged eval text has 13 windows of 512 tokens
CALIB_WINDOWS = 8  # windows of EVAL_WINDOW tokens a large model calibrates on
# A small model calibrates on three times as many: SmolLM2-135M at Q4_0's size, 24 windows of
# Emma instead of 8 lower its KL from 0.0667 to 0.0629 (GPTQ's Hessians and the Fisher pass both
# see more text; benchmarks/RESULTS.md). Both passes cost parameters x tokens, so a 2.5B model
# keeps 8 (Granite-2B's Fisher pass took 100 s on 8 windows, GPTQ's calibration more).
SMALL_MODEL_CALIB_WINDOWS = 24
SMALL_MODEL_PARAMETERS = 600_000_000
MIN_EVAL_TOKENS = 64


def calib_window_count(num_parameters: int) -> int:
    """How many calibration windows a model of ``num_parameters`` gets (as many as the text holds)."""
    return SMALL_MODEL_CALIB_WINDOWS if num_parameters <= SMALL_MODEL_PARAMETERS else CALIB_WINDOWS


@dataclass(frozen=True)
class Text:
    """A text and where it came from (a path, or ``edgepipe/data/NAME`` for a packaged one)."""

    text: str
    source: str


MAX_TEXT_BYTES = 256 << 20  # far more text than any calibration or evaluation reads


def read_text_file(path: Path | str | None, default: str, what: str) -> Text:
    """Read a calibration / evaluation text; the packaged ``default`` when ``path`` is None."""
    if path is None:
        return Text(resources.files("edgepipe.data").joinpath(default).read_text(encoding="utf-8"), f"edgepipe/data/{default}")
    path = Path(path)
    try:
        if path.exists() and not path.is_dir() and not path.is_file():  # a FIFO blocks, /dev/zero never ends
            raise InputError(f"{what} file {path} is not a regular file; pass a UTF-8 text file")
        if path.is_file() and path.stat().st_size > MAX_TEXT_BYTES:
            raise InputError(f"{what} file {path} is over {MAX_TEXT_BYTES >> 20} MB; pass a smaller sample of text")
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{what} file {path} does not exist; pass an existing UTF-8 text file") from None
    except IsADirectoryError:
        raise InputError(f"{what} file {path} is a folder; pass a UTF-8 text file") from None
    except UnicodeDecodeError:
        raise InputError(f"{what} file {path} is not UTF-8 text; convert it (e.g. iconv -t utf-8)") from None
    except OSError as e:
        raise InputError(f"cannot read {what} file {path}: {e.strerror}; check its permissions") from None
    if not text.strip():
        raise InputError(f"{what} file {path} is empty; pass a file with real text")
    return Text(text, str(path))


def token_windows(tokenizer_path: Path, text: Text, n: int, what: str) -> list[np.ndarray]:
    """Up to ``n`` non-overlapping windows of ``EVAL_WINDOW`` tokens (one shorter window for a short text)."""
    from tokenizers import Tokenizer

    from edgepipe.runtime.evaluate import windows_from_ids

    ids = Tokenizer.from_file(str(tokenizer_path)).encode(text.text).ids
    if len(ids) < MIN_EVAL_TOKENS:
        raise InputError(f"{what} text {text.source} has {len(ids)} tokens; it needs at least {MIN_EVAL_TOKENS}")
    return windows_from_ids(ids, min(EVAL_WINDOW, len(ids)), n)


def split_sentences(text: str, min_chars: int = 15, max_chars: int = 400) -> list[str]:
    """Plain-text sentences (whitespace-normalised): an encoder's calibration passages and eval set."""
    import re

    flat = re.sub(r"\s+", " ", text)
    parts = re.split(r"(?<=[.!?])\s+(?=[\"'A-Z])", flat)
    return [p.strip() for p in parts if min_chars <= len(p.strip()) <= max_chars]
