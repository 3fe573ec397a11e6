"""The PNG figures ``report.md`` embeds: the per-layer format map of a build and a search's Pareto plot.

matplotlib belongs to the ``build`` extra: without it the figures are left out (logged), the report
and the artifact are unchanged otherwise. The device runtime never imports this.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from edgepipe.quantize.bitplan import layer_of

logger = logging.getLogger(__name__)

FORMAT_MAP = "formats.png"
PARETO = "pareto.png"


def _pyplot() -> Any | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning("matplotlib is not installed (pip install 'edgepipe[build]'): the report has no figures")
        return None
    return plt


def _kind(name: str) -> str:
    """``model.layers.3.attn.qkv_proj.MatMul.weight`` -> ``qkv_proj``; the table -> ``lm_head``; an
    untied input embedding ``model.embed_tokens.weight`` -> ``embed_tokens``."""
    parts = name.removesuffix(".weight").removesuffix(".MatMul").split(".")
    return parts[-1]


def format_map(matrices: Mapping[str, str], path: Path) -> Path | None:
    """Which matrix got which format: one row per kind of matrix, one column per layer."""
    plt = _pyplot()
    if plt is None or not matrices:
        return None
    labels = sorted(set(matrices.values()))
    kinds = sorted({_kind(n) for n in matrices}, key=lambda k: (k in ("lm_head", "embed_tokens"), k))
    layers = sorted({x for n in matrices if (x := layer_of(n)) is not None}) or [0]
    import numpy as np

    grid = np.full((len(kinds), len(layers) + 1), np.nan)
    for name, label in matrices.items():
        layer = layer_of(name)
        col = layers.index(layer) if layer is not None else len(layers)
        grid[kinds.index(_kind(name)), col] = labels.index(label)
    fig, ax = plt.subplots(figsize=(max(4.0, 0.25 * len(layers) + 2), 0.45 * len(kinds) + 1.4))
    cmap = plt.get_cmap("viridis", max(len(labels), 2))
    ax.imshow(grid, aspect="auto", cmap=cmap, vmin=-0.5, vmax=max(len(labels), 2) - 0.5, interpolation="nearest")
    ax.set_yticks(range(len(kinds)), kinds)
    ax.set_xticks(range(len(layers) + 1), [str(x) for x in layers] + ["table"], fontsize=6, rotation=90)
    ax.set_xlabel("layer")
    handles = [plt.Rectangle((0, 0), 1, 1, color=cmap(i)) for i in range(len(labels))]
    ax.legend(handles, labels, loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=len(labels), fontsize=7, frameon=False)
    ax.set_title("weight format per matrix")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def pareto_plot(points: Sequence[Mapping[str, Any]], chosen: int | None, path: Path, extra: Sequence[Mapping[str, Any]] = ()) -> Path | None:
    """Size (MiB) against mean KL for each searched point, the chosen one ringed; ``extra`` points
    (say another tool's quant ladder: ``label``, ``artifact_mb``, ``kl_divergence``) drawn beside them."""
    plt = _pyplot()
    ok = [p for p in points if p.get("kl_divergence") is not None]
    if plt is None or not ok:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot([p["artifact_mb"] for p in ok], [p["kl_divergence"] for p in ok], "o-", label="edgepipe (budgets)")
    for p in ok:
        ax.annotate(f"{p['bits_per_weight']:g}", (p["artifact_mb"], p["kl_divergence"]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    if chosen is not None and points[chosen].get("kl_divergence") is not None:
        c = points[chosen]
        ax.plot([c["artifact_mb"]], [c["kl_divergence"]], "o", ms=14, mfc="none", mec="red", label="chosen")
    for e in extra:
        ax.plot([e["artifact_mb"]], [e["kl_divergence"]], "s", label=e["label"])
    ax.set_xlabel("artifact size (MiB)")
    ax.set_ylabel("mean KL vs fp32")
    ax.set_yscale("log")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
