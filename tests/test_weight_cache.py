"""A WeightCache changes nothing but the time: the quantized model is byte-identical without a
cache, with a cold one and with a warm one (whose entries were all reused)."""

from __future__ import annotations

from pathlib import Path

from edgepipe.quantize import MixedPrecision, Mse, Rtn, WeightCache, quantize


def test_weight_cache_gives_identical_models(zoo, tmp_path: Path) -> None:
    fp32 = zoo.fp32("llama")
    scheme = MixedPrecision(default=Mse(bits=4, block_size=32), table=Rtn(bits=8, block_size=32))
    files = ("model.onnx", "model.onnx.data")

    def build(name: str, cache: WeightCache | None) -> dict[str, bytes]:
        quantize(fp32, tmp_path / name, scheme, weight_cache=cache)
        return {f: (tmp_path / name / f).read_bytes() for f in files}

    plain = build("plain", None)
    cache = WeightCache(tmp_path / "cache")
    cold = build("cold", cache)
    entries = sorted(p.name for p in (tmp_path / "cache").rglob("*") if p.is_file())
    assert entries, "the cold run stored nothing"
    stamps = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*") if p.is_file()}
    warm = build("warm", cache)
    assert plain == cold == warm
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*") if p.is_file()} == stamps  # reused, not rewritten
