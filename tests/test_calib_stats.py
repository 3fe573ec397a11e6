"""The calibration statistics are a stage of their own (edgepipe.quantize.calib_stats): a profile that
changes its formats reprices the matrices from the cached statistics, without the Fisher pass; and the
``fisher-output`` proxy prices a format by the error the profile's own algorithm (GPTQ) makes."""

from __future__ import annotations

import json

import numpy as np

from edgepipe.pipeline import run_stages
from edgepipe.targets import load_target, parse_target


def _profile(formats: list[str], sensitivity: str = "fisher"):
    data = load_target("raspberrypi5").to_dict()
    data.pop("alias_of", None)
    data["quantization"]["formats"] = formats
    data["quantization"]["sensitivity"] = sensitivity
    return parse_target({"schema_version": 1, **data})


def _sensitivity(zoo, profile) -> tuple[list[str], dict]:
    said: list[str] = []
    run_stages(target=profile, stop_after="sensitivity", model=zoo.model("llama"), progress=said.append)
    from edgepipe.cache import cache_root

    made = [line for line in said if line.startswith(("calib-stats:", "sensitivity:"))]
    entries = sorted((cache_root() / "sensitivity").glob("*/sensitivity.json"), key=lambda p: p.stat().st_mtime)
    return made, json.loads(entries[-1].read_text())


def test_a_changed_format_list_reuses_the_fisher_statistics(zoo):
    two = ["int4/b32/asym", "int8/b64/asym"]
    _said, first = _sensitivity(zoo, _profile(two))
    said, second = _sensitivity(zoo, _profile([*two, "int4/b16/asym"]))
    assert any(s.startswith("calib-stats: cached") for s in said), said
    assert not any("Fisher statistics" in s for s in said), said  # no forward / backward pass again
    assert second["proxy"] == first["proxy"] == "fisher"
    for name, losses in first["losses"].items():  # the same statistics: the shared formats priced the same
        for label, loss in losses.items():
            assert np.isclose(second["losses"][name][label], loss, rtol=1e-6), (name, label)
        assert "int4/b16/asym" in second["losses"][name]


def test_fisher_output_prices_gptq_below_round_to_nearest(zoo):
    """In output space (dW^T H dW, what GPTQ minimises) GPTQ's error is below rounding's in the same
    format, and the build's proxy uses it: the sensitivity stage with ``fisher-output`` records the
    GPTQ price, not the rounding one."""
    from edgepipe.quantize.calibrate import collect_importance
    from edgepipe.quantize.configs import Gptq, Rtn
    from edgepipe.quantize.handlers import WeightStats
    from edgepipe.quantize.sensitivity import realised_losses

    three = ["int4/b16/asym", "int4/b32/asym", "int8/b64/asym"]
    said, built = _sensitivity(zoo, _profile(three, "fisher-output"))
    assert built["proxy"] == "fisher-output" and any(s.startswith("calib-stats:") for s in said)
    calib = [zoo.eval_ids(128, offset=o) for o in (0, 128, 256)]
    imp = collect_importance(zoo.fp32("llama"), calib, hessians=True)
    ratios = []
    for name, w in _export_matrices(zoo.fp32("llama")).items():
        if f"{name}@H" not in imp:
            continue
        b = np.ones(w.shape[1])
        rtn = realised_losses(w, (Rtn(bits=4, block_size=32, symmetric=False),), b, WeightStats(imp, name))
        gptq = realised_losses(w, (Gptq(bits=4, block_size=32, symmetric=False),), b, WeightStats(imp, name))
        ratios.append(gptq["int4/b32/asym"] / rtn["int4/b32/asym"])
    assert len(ratios) >= 10 and max(ratios) < 1.0, ratios
    # 8 bits below 4 for most matrices (not all: on this tiny model's few calibration tokens GPTQ can hide
    # its error where the calibration inputs do not reach, and then prices it lower than int8's rounding)
    body = [v["int8/b64/asym"] < v["int4/b32/asym"] for v in built["losses"].values() if "int8/b64/asym" in v]  # the tied table keeps 4 bits
    assert np.mean(body) >= 0.5, body


def _export_matrices(model_dir):
    from edgepipe.quantize.calib_stats import _export_weights

    return dict(_export_weights(model_dir))
