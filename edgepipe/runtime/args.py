"""The one argument contract of both entry points: ``edgepipe`` (click) and ``python -m edgepipe.runtime``
(argparse, on the device). Each parses its own flags, then hands the values to these functions, so
the same ranges hold on both and neither can be driven into NaN, negative limits or silent no-ops.
Plain functions that raise :class:`~edgepipe.errors.InputError` (exit 2, one line naming the flag).
"""

from __future__ import annotations

import math

from edgepipe.errors import InputError
from edgepipe.runtime.generate import GenerationConfig

MAX_NEW_TOKENS = 100_000
MAX_TEMPERATURE = 100.0
MAX_TOP_K = 1 << 20
MAX_SEED = 2**63 - 1  # numpy's generator takes any non-negative int; keep it a signed 64-bit value
MAX_THREADS = 1024
MAX_EVAL_TOKENS = 10**9
MAX_DRAFT_TOKENS = 32  # --lookup N / --draft-tokens N: a step verifies at most this many drafts
DEFAULT_LOOKUP = 8  # --lookup without N


def int_in(flag: str, value: int, lo: int, hi: int) -> int:
    """``value`` as an int in [lo, hi]; a bool or anything else is refused with the range."""
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise InputError(f"{flag} {value!r} is not in the range {lo}..{hi}")
    return value


def float_in(flag: str, value: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    """A finite number in [lo, hi] (or (lo, hi] with ``lo_open``)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{flag} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise InputError(f"{flag} must be a finite number, not NaN or infinity (got {value})")
    if value < lo or value > hi or (lo_open and value == lo):
        left = "(" if lo_open else "["
        raise InputError(f"{flag} {value} is not in the range {left}{lo}, {hi}]")
    return float(value)


def prompt_text(prompt: str) -> str:
    """A prompt must be text: undecodable bytes on the command line arrive as lone surrogates."""
    try:
        prompt.encode("utf-8")
    except UnicodeEncodeError:
        raise InputError("the prompt is not valid UTF-8; pass it as UTF-8 text (check the terminal's encoding)") from None
    return prompt


def generation_config(
    *, max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
    lookup: int | str | None = None, draft_tokens: int = 4,
) -> GenerationConfig:
    """A :class:`GenerationConfig` whose every field was checked against the contract."""
    return GenerationConfig(
        max_new_tokens=int_in("--max-new-tokens", max_new_tokens, 1, MAX_NEW_TOKENS),
        temperature=float_in("--temperature", temperature, 0.0, MAX_TEMPERATURE),
        top_k=int_in("--top-k", top_k, 0, MAX_TOP_K),
        top_p=float_in("--top-p", top_p, 0.0, 1.0, lo_open=True),
        seed=None if seed is None else int_in("--seed", seed, 0, MAX_SEED),
        lookup=lookup_tokens(lookup),
        draft_tokens=int_in("--draft-tokens", draft_tokens, 1, MAX_DRAFT_TOKENS),
    )


def lookup_tokens(value: int | str | None) -> int:
    """``--lookup [N]``: at most N tokens copied from the text per step. The entry points pass the
    flag's text: None (no flag) is 0, off; ``""`` (the flag without N) is ``DEFAULT_LOOKUP``."""
    if value is None:
        return 0
    if value == "":
        return DEFAULT_LOOKUP
    if isinstance(value, str):
        try:
            value = int(value.strip())
        except ValueError:
            raise InputError(f"--lookup {value!r} is not a whole number (the most tokens copied per step, 1..{MAX_DRAFT_TOKENS})") from None
    return int_in("--lookup", value, 0, MAX_DRAFT_TOKENS)


def max_tokens(value: int | None) -> int | None:
    """``validate --max-tokens``: at least 2 (one scored prediction needs two tokens), or None for all."""
    return None if value is None else int_in("--max-tokens", value, 2, MAX_EVAL_TOKENS)


def threads(value: int) -> int:
    """``--threads``: 0 (one per physical core) up to a sane bound."""
    return int_in("--threads", value, 0, MAX_THREADS)


def max_mb(value: float) -> float:
    """``cache prune --max-mb``: a finite, non-negative size."""
    return float_in("--max-mb", value, 0.0, 1e12)


MAX_USER_TEXT_BYTES = 64 << 20


def read_user_text(path: object, what: str) -> str:
    """A small UTF-8 text file named on the command line (an eval text, an API key): a FIFO or a
    device would block or never end, so only a regular file is read."""
    from pathlib import Path

    from edgepipe.errors import cannot_read

    p = Path(str(path))
    try:
        if not p.exists():
            raise InputError(f"{what} {p} does not exist; pass an existing UTF-8 text file")
        if not p.is_file():
            raise InputError(f"{what} {p} is not a regular file (a folder, a pipe or a device); pass a UTF-8 text file")
        if p.stat().st_size > MAX_USER_TEXT_BYTES:
            raise InputError(f"{what} {p} is over {MAX_USER_TEXT_BYTES >> 20} MB; pass a smaller file")
        return p.read_text(encoding="utf-8")
    except OSError as e:
        raise InputError(cannot_read(what, p, e)) from None
    except UnicodeDecodeError:
        raise InputError(f"{what} {p} is not UTF-8 text; convert it (e.g. iconv -t utf-8)") from None
