"""benchmarks/ladder.py: how the two curves are put on one footing (no llama.cpp or build needed)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks import ladder  # noqa: E402


def _gguf(tmp_path: Path, name: str, size: int) -> Path:
    p = tmp_path / f"{name}.gguf"
    p.write_bytes(b"\0" * size)
    return p


def test_ladder_points_take_file_sizes_and_skip_unmeasured_quants(tmp_path):
    ggufs = {q: _gguf(tmp_path, q, 1000 * (i + 1)) for i, q in enumerate(ladder.QUANTS)}
    quality = {"Q4_0": {"kl_divergence": 0.26, "ppl_increase_pct": 24.7, "top1_agreement": 0.70}, "Q8_0": {"kl_divergence": None}}
    pts = ladder.ladder_points(ggufs, quality)
    assert [p["label"] for p in pts] == ["llama.cpp Q4_0"]
    assert pts[0]["artifact_bytes"] == ggufs["Q4_0"].stat().st_size
    assert pts[0]["kl_divergence"] == 0.26


def test_matched_points_replace_quality_and_keep_the_validators():
    points = [
        {"bits_per_weight": 5.2, "artifact_bytes": 90_000_000, "kl_divergence": 0.07, "ppl_increase_pct": 7.0, "top1_agreement": 0.84},
        {"bits_per_weight": 4.0, "error": "out of reach"},
    ]
    matched = {"5.2 bits/weight": {"kl_divergence": 0.065, "ppl_increase_pct": 6.5, "top1_agreement": 0.85}}
    out = ladder.matched_points(points, matched)
    assert out[0]["kl_divergence"] == 0.065 and out[0]["validator"]["kl_divergence"] == 0.07
    assert out[1] == points[1]
    md = ladder.table(out, [{"label": "llama.cpp Q4_0", "artifact_bytes": 91_000_000, "kl_divergence": 0.26, "ppl_increase_pct": 24.7, "top1_agreement": 0.7}], 0)
    lines = md.splitlines()
    assert "edgepipe 5.2 bits/weight (chosen)" in lines[2] and "llama.cpp Q4_0" in lines[3]  # smallest file first
