"""Config normalisation between a Hugging Face folder and onnxruntime-genai's builder, as data.

Each :class:`Quirk` is one architecture's or one transformers version's departure from the
config the builder (0.18) reads, with the reason and the rewrite. A build that needs any of them
gets a normalised copy of the folder (the rewritten ``config.json``, every other file linked),
never an edited user folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Quirk:
    name: str
    applies: Callable[[dict[str, Any]], bool]
    rewrite: Callable[[dict[str, Any]], dict[str, Any]]
    reason: str


def _nested_rope(config: dict[str, Any]) -> bool:
    rp = config.get("rope_parameters")
    return isinstance(rp, dict) and "rope_type" not in rp and isinstance(rp.get("full_attention"), dict)


def _flatten_rope(config: dict[str, Any]) -> dict[str, Any]:
    """Keep the nested entries (transformers re-nests on load anyway) and add the flat keys the
    builder reads: it copies every key of ``rope_parameters`` onto the config object."""
    rp = dict(config["rope_parameters"])
    full = rp["full_attention"]
    flat = {**full, **rp}
    sliding = rp.get("sliding_attention")
    if isinstance(sliding, dict) and "rope_theta" in sliding:
        flat["rope_local_base_freq"] = sliding["rope_theta"]
    return {**config, "rope_parameters": flat}


QUIRKS: tuple[Quirk, ...] = (
    Quirk(
        "rope-per-layer-type",
        _nested_rope,
        _flatten_rope,
        # transformers >= 5 save_pretrained writes rope_parameters = {"full_attention": {...},
        # "sliding_attention": {...}} (Gemma-3); the builder reads rope_parameters["rope_type"]
        # (builders/base.py make_rope_init: KeyError) and config.rope_local_base_freq (gemma.py Gemma3Model)
        "transformers 5 nests rope parameters per layer type; the genai builder 0.18 reads rope_type and "
        "rope_local_base_freq at the top",
    ),
)


def rows_for(config: dict[str, Any]) -> list[Quirk]:
    return [q for q in QUIRKS if q.applies(config)]


def normalize_config(config: dict[str, Any]) -> dict[str, Any]:
    for quirk in rows_for(config):
        config = quirk.rewrite(config)
    return config


def normalized_folder(model_dir: Path, work_dir: Path) -> tuple[Path, list[str]]:
    """``model_dir`` itself when no quirk applies, else a copy under ``work_dir`` whose config is
    rewritten and whose other files are links (copies where links are not allowed)."""
    config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
    rows = rows_for(config)
    if not rows:
        return model_dir, []
    out = work_dir / "normalized"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.name == "config.json" or not f.is_file():
            continue
        try:
            os.symlink(f.resolve(), out / f.name)
        except OSError:
            shutil.copy2(f, out / f.name)
    (out / "config.json").write_text(json.dumps(normalize_config(config), indent=2), encoding="utf-8")
    logger.info("normalised config for the builder: %s", ", ".join(r.name for r in rows))
    return out, [r.name for r in rows]
