"""A format's kernel time as the allocator's second budget (issue 16 item 2): the time budget met
within the size budget, a tighter time budget never predicting a smaller loss, an unreachable one
refused in one line naming the fastest reachable, and the profile schema's refusals."""

from __future__ import annotations

import dataclasses
import json

import pytest

from edgepipe.errors import TargetError
from edgepipe.quantize.allocate import Budget, allocate
from edgepipe.quantize.kernel_time import KernelTimes, allocate_within_time
from edgepipe.runtime.manifest import verify_artifact
from edgepipe.targets import load_target, parse_target
from edgepipe.targets.schema import KernelTime
from tests.test_allocate import cli, problem

# decode / prefill ratios of the kind benchmarks/formats.py measures (AVX-512 host, Llama-3.2-1B's shapes)
ROWS = (
    KernelTime("int4/b16/asym", 1.35, 1.3), KernelTime("int4/b32/asym", 1.0, 1.0), KernelTime("int4/b64/asym", 0.86, 0.8),
    KernelTime("int4/b128/asym", 0.79, 0.67), KernelTime("int8/b64/asym", 1.17, 0.7), KernelTime("int8/b128/sym", 1.12, 0.65),
)
Q = dataclasses.replace(load_target("raspberrypi5").quantization, kernel_time=ROWS)
TIMES = KernelTimes.of(Q)


def test_time_budgets_are_met_within_the_size_budget_and_cost_loss_monotonically():
    plan, options, losses = problem(16, Q)
    size = Budget(bits_per_weight=5.3)
    limit = size.matrix_bytes(plan.parameters(), 0)
    free = allocate(plan, options, losses, size, limit, "test")
    free_time = TIMES.plan_time(free.plan)
    assert free_time is not None and free_time > 0.9  # the size budget alone buys 8-bit matrices and small blocks
    prev = free.predicted_loss
    for cap in (free_time, 0.9, 0.87, 0.85):
        a = allocate_within_time(plan, options, losses, dataclasses.replace(size, max_decode_time=cap), limit, "test", TIMES, cap)
        t = TIMES.plan_time(a.plan)
        assert t is not None and t <= cap and a.plan.bytes() <= limit
        assert a.predicted_loss >= prev - 1e-12  # a tighter time budget never predicts less loss
        # the loss is the proxy's own (the time penalty is not in it)
        assert a.predicted_loss == pytest.approx(sum(losses[e.matrix.name][e.format.label] for e in a.plan))
        prev = a.predicted_loss
    assert prev > free.predicted_loss  # and the tightest one did cost something
    fast = allocate_within_time(plan, options, losses, size, limit, "test", TIMES, 0.85)
    assert {e.format.label for e in fast.plan} <= {"int4/b64/asym", "int4/b128/asym", "int8/b128/sym", "int4/b32/asym", "int8/b64/asym"}


def test_an_unreachable_time_budget_names_the_fastest_reachable():
    plan, options, losses = problem(6, Q)
    size = Budget(bits_per_weight=5.3)
    with pytest.raises(TargetError, match=r"decode-time budget 0.5 cannot be met within 5.3 bits/weight: the fastest .* is 0\.8\d\d") as e:
        allocate_within_time(plan, options, losses, size, size.matrix_bytes(plan.parameters(), 0), "test", TIMES, 0.5)
    assert "\n" not in str(e.value)


def test_the_profile_schema_checks_kernel_times():
    data = load_target("raspberrypi5").to_dict()
    q = data["quantization"]
    q["kernel_time"] = [dataclasses.asdict(r) for r in ROWS]
    q["max_decode_time"] = 0.9
    parsed = parse_target(data).quantization
    assert parsed.kernel_time == ROWS and parsed.max_decode_time == 0.9
    q["kernel_time"] = [dataclasses.asdict(r) for r in ROWS[:-1]]
    with pytest.raises(TargetError, match=r"needs kernel_time for the base and every allowed format; add a row for int8/b128/sym"):
        parse_target(data)
    q["kernel_time"] = [dataclasses.asdict(r) for r in (*ROWS, ROWS[0])]
    with pytest.raises(TargetError, match="names int4/b16/asym twice"):
        parse_target(data)
    q["kernel_time"] = [dataclasses.asdict(r) for r in ROWS]
    q["kernel_time"][1]["decode"] = 0
    with pytest.raises(TargetError, match="positive ratios"):
        parse_target(data)
    q["kernel_time"][1]["decode"] = 1.0
    q["bits_per_weight"] = None
    q["formats"] = []
    with pytest.raises(TargetError, match="max_decode_time needs a size budget"):
        parse_target(data)


@pytest.mark.slow
def test_build_max_decode_time_records_the_predicted_times(zoo, tmp_path):
    """Through the CLI on a tiny model: a profile with kernel times, the size budget from the profile and
    the time budget from --max-decode-time; the manifest records both budgets and the predicted times."""
    import yaml

    data = load_target("raspberrypi5").to_dict()
    data["quantization"]["kernel_time"] = [dataclasses.asdict(r) for r in ROWS]
    data.pop("alias_of", None)
    profile = tmp_path / "timed.yaml"
    profile.write_text(yaml.safe_dump({"schema_version": 1, **data}), encoding="utf-8")
    model = zoo.model("llama")
    res = cli("build", "--model", model, "--target", profile, "--out", tmp_path / "a", "--max-decode-time", "0.85", "--json")
    assert res.exit_code in (0, 3), res.stderr
    alloc = verify_artifact(tmp_path / "a").to_dict()["quantization"]["allocation"]
    assert alloc["budget"] == {"bits_per_weight": 6.12, "max_mb": None, "max_decode_time": 0.85}
    assert alloc["kernel_time"]["decode"] <= 0.85 and alloc["kernel_time"]["prefill"] > 0
    assert "time budget: decode ≤ 0.85" in (tmp_path / "a" / "report.md").read_text(encoding="utf-8")
    assert json.loads(res.stdout)["metrics"]["artifact_mb"] > 0
    doc = json.loads(cli("search", "--model", model, "--target", profile, "--out", tmp_path / "s", "--budgets", "5.5,6.12",
                         "--max-decode-time", "0.85", "--json").stdout)
    assert all(p["kernel_time"]["decode"] <= 0.85 for p in doc["points"])
    assert "| decode kernel time |" in (tmp_path / "s" / "report.md").read_text()
    bad = cli("build", "--model", model, "--target", "raspberrypi5", "--out", tmp_path / "b", "--max-decode-time", "0.9")
    assert bad.exit_code == 2 and "needs kernel_time" in bad.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "b").exists()


def test_search_refuses_a_time_budget_without_kernel_times_before_building(tmp_path):
    res = cli("search", "--target", "raspberrypi5", "--out", tmp_path / "s", "--budgets", "5.5,6", "--max-decode-time", "0.9")
    assert res.exit_code == 2
    assert res.stderr.strip().splitlines()[-1].startswith("error: ") and "needs kernel_time" in res.stderr
    assert not (tmp_path / "s" / "points").exists()
