"""The CLI contract: stdout carries results (one JSON object with --json), stderr progress and
errors, exit 0 = budgets hold, 3 = built but a budget failed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from click.testing import CliRunner

from edgepipe.cli import main
from edgepipe.runtime.manifest import verify_artifact
from edgepipe.targets import targets_dir


def cli(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def one_json(stdout: str):
    lines = [ln for ln in stdout.splitlines() if ln.strip()]
    assert len(lines) == 1, f"stdout should hold exactly one JSON line, got {len(lines)}: {stdout[:500]}"
    return json.loads(lines[0])


def edgepipe_exe() -> list[str]:
    exe = Path(sys.executable).parent / "edgepipe"
    return [str(exe)] if exe.is_file() else [shutil.which("edgepipe") or "edgepipe"]


@pytest.fixture(scope="module")
def built_json(zoo, tmp_path_factory):
    """`edgepipe build --json` for the tiny Llama on x86-avx2, through the CLI (export cached)."""
    out = tmp_path_factory.mktemp("cli") / "llama-avx2"
    res = cli("build", "--model", zoo.model("llama"), "--target", "x86-avx2", "--out", out, "--json")
    return out, res


def test_build_json_exit_0(built_json):
    out, res = built_json
    assert res.exit_code == 0, res.stderr
    doc = one_json(res.stdout)
    assert doc["verdict"] == "pass" and doc["failed_budgets"] == []
    assert doc["artifact"] == str(out.absolute()) and doc["target"] == "x86-avx2"
    assert {b["budget"] for b in doc["budgets"]} >= {"max_artifact_mb", "max_ram_mb", "max_ppl_increase_pct", "min_top1_agreement"}
    assert all(b["status"] == "pass" for b in doc["budgets"] if b["status"] != "unchecked")
    assert 0 < doc["metrics"]["artifact_mb"] < 1
    assert doc["metrics"]["accuracy"]["top1_agreement"] > 0.9
    assert "[" in res.stderr and "artifact written" in res.stderr  # progress went to stderr
    verify_artifact(out)


def test_build_exit_3_when_a_budget_fails(zoo, tmp_path):
    profile = yaml.safe_load((targets_dir() / "x86-avx2.yaml").read_text())
    profile["name"] = "tight"
    profile["budgets"]["max_artifact_mb"] = 0.001
    path = tmp_path / "tight.yaml"
    path.write_text(yaml.safe_dump(profile))
    out = tmp_path / "art"
    res = cli("build", "--model", zoo.model("llama"), "--target", path, "--out", out, "--json")
    assert res.exit_code == 3, res.stderr
    doc = one_json(res.stdout)
    assert doc["verdict"] == "fail" and doc["failed_budgets"] == ["max_artifact_mb"]
    m = verify_artifact(out).to_dict()  # published, complete and verifiable all the same
    assert m["verdict"] == "fail" and m["failed_budgets"] == ["max_artifact_mb"]
    row = next(b for b in m["budgets"] if b["budget"] == "max_artifact_mb")
    assert row["status"] == "fail" and row["limit"] == 0.001 and row["value"] > 0.001
    assert m["target"]["name"] == "tight"
    assert "max_artifact_mb" in (out / "report.md").read_text()
    # the text summary says so too
    res2 = cli("build", "--model", zoo.model("llama"), "--target", path, "--out", out)
    assert res2.exit_code == 3 and "FAIL" in res2.stdout and "max_artifact_mb" in res2.stdout


def test_real_subprocess_build_and_verify(zoo, built_json, tmp_path):
    out = tmp_path / "sub"
    env = dict(os.environ)
    proc = subprocess.run(
        [*edgepipe_exe(), "build", "--model", str(zoo.model("llama")), "--target", "x86-avx2", "--out", str(out), "--json"],
        capture_output=True, text=True, env=env, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    doc = one_json(proc.stdout)
    assert doc["verdict"] == "pass"
    assert "Traceback" not in proc.stderr
    # same inputs, same cached stages: the model bytes equal the in-process build's
    first = json.loads((built_json[0] / "manifest.json").read_text())["files"]
    second = json.loads((out / "manifest.json").read_text())["files"]
    assert first["model.onnx.data"] == second["model.onnx.data"] and first["model.onnx"] == second["model.onnx"]
    v = subprocess.run([*edgepipe_exe(), "verify", str(out)], capture_output=True, text=True, timeout=120)
    assert v.returncode == 0 and "OK" in v.stdout and v.stderr == ""


def test_run(built_json):
    out, _ = built_json
    res = cli("run", out, "--prompt", "It was a truth", "--max-new-tokens", "12")
    assert res.exit_code == 0, res.stderr
    assert res.stdout.startswith("It was a truth") and len(res.stdout.strip()) > len("It was a truth")
    again = cli("run", out, "--prompt", "It was a truth", "--max-new-tokens", "12")
    assert again.stdout == res.stdout  # greedy: deterministic
    sampled = [cli("run", out, "--prompt", "It was", "--temperature", "1.2", "--seed", "7", "--max-new-tokens", "16").stdout for _ in range(2)]
    assert sampled[0] == sampled[1]


def test_validate_json(built_json):
    out, _ = built_json
    res = cli("validate", out, "--json")
    assert res.exit_code == 0, res.stderr
    doc = one_json(res.stdout)
    acc = doc["accuracy"]
    assert doc["verified"] is True and doc["runner"] == "local"
    assert acc["eval_tokens"] > 1000
    assert acc["host_top1_agreement"] > 0.99  # same machine, same artifact: the build's own tokens
    assert acc["top1_agreement"] > 0.9 and 0 <= acc["kl_divergence_topk"] < 0.01
    assert doc["throughput"]["decode_tok_s"] > 0


def test_validate_with_eval_file(built_json, tmp_path):
    out, _ = built_json
    text = tmp_path / "eval.txt"
    text.write_text("She was the youngest of the two daughters of a most affectionate, indulgent father. " * 20)
    res = cli("validate", out, "--eval", text, "--json", "--max-tokens", "100")
    assert res.exit_code == 0, res.stderr
    acc = one_json(res.stdout)["accuracy"]
    assert acc["eval_tokens"] == 100 and 1 < acc["perplexity"] < 400


def test_bench_json(built_json):
    out, _ = built_json
    res = cli("bench", out, "--json")
    assert res.exit_code == 0, res.stderr
    doc = one_json(res.stdout)
    assert doc["prefill_tok_s"] > 10 and doc["decode_tok_s"] > 1 and doc["ttft_ms"] > 0
    assert 20 < doc["peak_rss_mb"] < 1000
    assert doc["model_bytes"] == sum(p.stat().st_size for p in out.iterdir() if p.name.startswith("model.onnx"))


def test_verify(built_json):
    out, _ = built_json
    res = cli("verify", out)
    n = len(json.loads((out / "manifest.json").read_text())["files"])
    assert res.exit_code == 0 and res.stdout.strip() == f"{out}: OK ({n} files verified)"


def test_targets_list_and_show_alias():
    res = cli("targets")
    assert res.exit_code == 0
    names = {ln.split()[0] for ln in res.stdout.splitlines() if ln.strip()}
    assert {"raspberrypi", "raspberrypi5", "x86-avx2", "x86-avx512"} <= names
    assert "alias of raspberrypi5" in next(ln for ln in res.stdout.splitlines() if ln.startswith("raspberrypi "))
    alias = cli("targets", "show", "raspberrypi", "--json")
    real = cli("targets", "show", "raspberrypi5", "--json")
    assert alias.exit_code == real.exit_code == 0
    a, r = one_json(alias.stdout), one_json(real.stdout)
    assert a["name"] == "raspberrypi" and a["alias_of"] == "raspberrypi5"
    assert a["cpu"]["model"] == "Cortex-A76" and a["cpu"]["arch"] == "aarch64"
    for key in ("cpu", "quantization", "runtime", "budgets", "description"):
        assert a[key] == r[key], key
    text = cli("targets", "show", "raspberrypi")
    assert text.exit_code == 0 and "Cortex-A76" in text.stdout and "alias_of: raspberrypi5" in text.stdout


def test_estimate_json(zoo):
    res = cli("estimate", "--model", zoo.model("llama"), "--target", "raspberrypi", "--json")
    assert res.exit_code == 0, res.stderr
    est = one_json(res.stdout)
    assert est["fits"] is True
    assert 0 < est["artifact_mb"] < 1 and 0 < est["peak_ram_mb"] < est["ram_budget_mb"]
    assert est["decode_tok_s"] > 0 and est["prefill_tok_s"] > 0


def test_cache_ls(built_json):
    res = cli("cache", "ls")
    assert res.exit_code == 0
    assert "export" in res.stdout and "quantize" in res.stdout and res.stdout.strip().splitlines()[-1].startswith("total")
    entries = one_json(cli("cache", "ls", "--json").stdout)
    assert {e["stage"] for e in entries} >= {"export", "quantize"}
    assert all(e["complete"] and e["bytes"] > 0 for e in entries if not e["key"].startswith(".tmp-"))
    assert all(Path(e["path"]).is_relative_to(Path(os.environ["EDGEPIPE_CACHE"])) for e in entries)


def test_version_and_help():
    assert cli("--version").exit_code == 0
    res = cli("--help")
    assert res.exit_code == 0 and all(c in res.stdout for c in ("build", "run", "validate", "bench", "verify", "targets", "estimate", "cache"))


def test_json_build_keeps_native_stdout_off_stdout(tmp_path):
    """What native code writes to fd 1 during a --json build goes to stderr (the QNN SDK prints
    banners there), so stdout stays one JSON object."""
    import subprocess
    import sys

    code = (
        "import os, sys\n"
        "from edgepipe.cli import _native_stdout_to_stderr\n"
        "with _native_stdout_to_stderr(True):\n"
        "    os.write(1, b'# LIBNATIVE banner\\n')\n"
        "print('{\"ok\": true}')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert proc.stdout.strip() == '{"ok": true}'
    assert "# LIBNATIVE banner" in proc.stderr
