"""Artifacts written under manifest schema 1 (before the artifact kind was recorded) still verify,
run and validate. ``tests/data/schema1-cpu-decoder`` was built by edgepipe at commit fe6c5dd (the
last schema-1 writer) from the tiny Llama of ``conftest.make_model`` for ``x86-avx2``."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgepipe.cli import main
from edgepipe.runtime.kinds import ArtifactKind, legacy_kind
from edgepipe.runtime.manifest import read_manifest, verify_artifact

V1 = Path(__file__).parent / "data" / "schema1-cpu-decoder"


@pytest.fixture
def v1(tmp_path: Path) -> Path:
    dst = tmp_path / "v1"
    shutil.copytree(V1, dst)
    return dst


def test_schema1_manifest_reads_as_a_cpu_decoder(v1: Path) -> None:
    raw = json.loads((v1 / "manifest.json").read_text())
    assert raw["schema_version"] == 1 and raw["kind"] == "edgepipe-artifact"  # the checked-in file is really schema 1
    m = verify_artifact(v1)
    assert m.schema_version == 1 and m.kind is ArtifactKind.CPU_DECODER
    assert m.passed and m.target_name == "x86-avx2" and set(m.files) >= {"model.onnx", "model.onnx.data", "reference.npz"}
    assert [b.budget for b in m.budgets] == ["max_artifact_mb", "max_ram_mb", "max_ppl_increase_pct", "min_top1_agreement"]


def test_schema1_artifact_runs_and_validates(v1: Path) -> None:
    res = CliRunner().invoke(main, ["run", str(v1), "--prompt", "It was a truth", "--max-new-tokens", "8"])
    assert res.exit_code == 0, res.output
    assert res.output.startswith("It was a truth") and len(res.output.strip()) > len("It was a truth")
    p = subprocess.run([sys.executable, "-m", "edgepipe.runtime", "validate", str(v1), "--max-tokens", "64", "--no-bench"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    acc = json.loads(p.stdout.strip().splitlines()[-1])["accuracy"]
    assert acc["eval_tokens"] == 64 and acc["host_top1_agreement"] > 0.95


def test_schema1_tampering_is_still_refused(v1: Path) -> None:
    data = bytearray((v1 / "model.onnx.data").read_bytes())
    data[100] ^= 0xFF
    (v1 / "model.onnx.data").write_bytes(bytes(data))
    res = CliRunner().invoke(main, ["verify", str(v1)])
    assert res.exit_code == 2 and "does not match its sha256" in res.output


@pytest.mark.parametrize(("metrics", "kind"), [
    ({"task": "causal-lm"}, ArtifactKind.NPU_DECODER),
    ({"coverage": {}}, ArtifactKind.NPU_ENCODER),
])
def test_schema1_npu_kinds(tmp_path: Path, metrics: dict, kind: ArtifactKind) -> None:
    """Schema-1 NPU folders had npu_config.json; a decoder's metrics said task: causal-lm."""
    files = {"npu_config.json": {"sha256": "0" * 64, "size": 0}}
    assert legacy_kind(tmp_path, {"files": files, "metrics": metrics}) is kind
    (tmp_path / "npu_config.json").write_text("")
    manifest = {"kind": "edgepipe-artifact", "schema_version": 1, "files": files, "metrics": metrics}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    assert read_manifest(tmp_path).kind is kind
