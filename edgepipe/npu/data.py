"""The NPU path's shipped default texts (in ``edgepipe/data``).

``npu_calib.txt`` is a few KB of *Emma* for QDQ calibration; ``npu_eval.json`` is a small
hand-written semantic-search set (queries + one relevant document each) for the fp32-vs-NPU
check. They share no text, so a build never evaluates on what it calibrated on.
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any


def _read(name: str) -> str:
    return resources.files("edgepipe.data").joinpath(name).read_text(encoding="utf-8")


def default_calib_text() -> str:
    return _read("npu_calib.txt")


def eval_set() -> dict[str, Any]:
    data = json.loads(_read("npu_eval.json"))
    if len(data["queries"]) != len(data["documents"]):
        raise ValueError("npu_eval.json: queries and documents must pair up")
    return data


def default_eval_sentences() -> list[str]:
    """Queries then documents, flat: the encoder build's default eval sentences."""
    data = eval_set()
    return list(data["queries"]) + list(data["documents"])
