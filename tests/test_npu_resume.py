"""An NPU build is cached and resumable like the CPU one: `edgepipe build` of the tiny Llama for a
tiny Snapdragon profile, SIGKILLed as soon as its first NPU stage (npu-export) is complete, reruns
from that stage and publishes a verified artifact; a second identical build is all cache hits up
to packaging, with the same model files. Skips only when onnxruntime-qnn cannot be imported."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from reliability_support import kill_when, start_build

pytest.importorskip("onnxruntime_qnn", reason="onnxruntime-qnn not installed: pip install 'edgepipe[npu]'")

STAGES = ("npu-export", "npu-quantize", "npu-compile", "npu-validate")
# what each stage says when it does its work (never said by a cache hit)
WORK = ("exporting fp32 prefill", "QDQ prefill", "compiling the prefill EPContext", "HTP simulator: ")
P, C = 16, 48  # prefill length and KV capacity of the tiny graphs (as tests/test_npu_decoder.py)


def _profile(tmp_path: Path) -> Path:
    """The 8 Gen 3 profile at the tiny model's sizes, with budgets the tiny graphs meet."""
    import yaml

    from edgepipe.targets import load_target

    data = load_target("snapdragon-8gen3").to_dict()
    data["npu"].update(seq_len=P, context_length=C, calibration_samples=8)
    data["budgets"].update(min_top1_agreement=0.5, max_ppl_increase_pct=25.0)
    path = tmp_path / "tiny-8gen3.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _complete(cache: Path, stage: str) -> list[Path]:
    return [p.parent for p in (cache / stage).glob("[!.]*/.complete")]


def _model_files(artifact: Path) -> dict[str, str]:
    """sha256 of every file the manifest lists but the report (it carries this run's timings)."""
    files = json.loads((artifact / "manifest.json").read_text())["files"]
    return {name: hashlib.sha256((artifact / name).read_bytes()).hexdigest() for name in files if name != "report.md"}


def test_killed_npu_build_resumes_from_its_last_stage(tiny_llama: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from click.testing import CliRunner

    from edgepipe.cli import main
    from edgepipe.runtime.manifest import verify_artifact

    target, cache, out = _profile(tmp_path), tmp_path / "cache", tmp_path / "out"

    # 1. killed right after the first NPU stage completed (its marker is written last, then renamed)
    proc = start_build(tiny_llama, target, out, cache)
    kill_when(proc, lambda: bool(_complete(cache, "npu-export")), "the npu-export stage to complete", timeout=600)
    exported = _complete(cache, "npu-export")
    assert len(exported) == 1 and {p.name for p in exported[0].iterdir()} >= {"prefill.fp32.onnx", "decode.fp32.onnx"}
    assert not _complete(cache, "npu-validate") and not out.exists(), "a killed build published or finished something"

    # 2. the rerun takes the export from the cache and builds the rest
    proc = start_build(tiny_llama, target, out, cache)
    _, err = proc.communicate(timeout=1200)
    assert proc.returncode == 0, err[-3000:]
    assert "npu-export: cached" in err and "exporting fp32 prefill" not in err, err[-3000:]
    assert "Traceback" not in err
    for stage, work in zip(STAGES[1:], WORK[1:], strict=True):
        assert f"{stage}: cached" not in err and work in err, (stage, err[-3000:])
    manifest = verify_artifact(out)  # every file's hash and size as recorded
    assert manifest.kind == "npu-decoder" and manifest.verdict == "pass"
    assert {"prefill_ctx_qnn.bin", "decode_ctx_qnn.bin", "prefill.qdq.onnx", "npu_config.json"} <= set(manifest.files)

    # 3. the same build again: every stage from the cache, only packaging runs; the same model files
    monkeypatch.setenv("EDGEPIPE_CACHE", str(cache))
    res = CliRunner().invoke(main, ["build", "--model", str(tiny_llama), "--target", str(target), "--out", str(tmp_path / "again")])
    assert res.exit_code == 0, res.output
    for stage, work in zip(STAGES, WORK, strict=True):
        assert f"{stage}: cached" in res.output and work not in res.output, (stage, res.output)
    assert _model_files(tmp_path / "again") == _model_files(out)
    assert verify_artifact(tmp_path / "again").verdict == "pass"
