"""A build killed with SIGKILL at any point resumes from the last complete stage and produces the
same artifact as an uninterrupted build; two builds of the same inputs are byte-identical."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import pytest
from reliability_support import TARGET, built_artifact, env, kill_when, sha256, start_build, tiny_model, tree_state, use_zoo

COMPARED = ("model.onnx", "model.onnx.data", "reference.npz", "genai_config.json", "tokenizer.json", "tokenizer_config.json")


@pytest.fixture(autouse=True)
def _use_conftest_zoo(zoo):
    """Reuse tests/conftest.py's session models, artifact and stage cache."""
    use_zoo(zoo)


def _cli(*args: str, cache: Path | None = None):
    """The CLI in-process (no interpreter start-up): exit code and output."""
    from click.testing import CliRunner

    from edgepipe.cli import main

    with env(EDGEPIPE_CACHE=str(cache) if cache else None):
        res = CliRunner().invoke(main, list(args))
    assert res.exception is None or isinstance(res.exception, SystemExit), res.output
    return res


def _manifest_files(artifact: Path) -> dict:
    files = json.loads((artifact / "manifest.json").read_text())["files"]
    return {k: v for k, v in files.items() if k != "report.md"}  # the report carries metrics and timings


def _assert_same_artifact(a: Path, b: Path) -> None:
    for name in COMPARED:
        if (a / name).exists() or (b / name).exists():
            assert sha256(a / name) == sha256(b / name), f"{name} differs between two builds of the same inputs"
    assert _manifest_files(a) == _manifest_files(b)


def test_sigkill_during_and_after_export_resumes_to_identical_artifact(tmp_path):
    ref = built_artifact()  # uninterrupted, with its own (shared) cache: an independent export
    model = tiny_model()
    cache, out = tmp_path / "cache", tmp_path / "out"
    export_dir = cache / "export"

    # 1. killed in the middle of export: only a .tmp-* folder is left, never taken as complete
    proc = start_build(model, TARGET, out, cache)
    kill_when(proc, lambda: export_dir.is_dir() and any(export_dir.glob(".tmp-*/model")), "export to start writing")
    assert not any(export_dir.glob("*/.complete")), "a killed export left a folder marked complete"
    assert not any(p for p in export_dir.iterdir() if not p.name.startswith(".tmp-"))
    assert not out.exists(), "a killed build published something at --out"
    ls = _cli("cache", "ls", "--json", cache=cache)
    assert ls.exit_code == 0, ls.output
    entries = json.loads(ls.output)
    assert entries and all(not e["complete"] for e in entries), entries

    # 2. killed right after export completed (the marker is the last thing written before the rename)
    proc = start_build(model, TARGET, out, cache)
    kill_when(proc, lambda: any(export_dir.glob("[!.]*/.complete")), "the export stage to complete")
    complete = [p.parent for p in export_dir.glob("[!.]*/.complete")]
    assert len(complete) == 1 and (complete[0] / "model" / "model.onnx").is_file()
    assert not out.exists()

    # 3. run again: export comes from the cache, and the artifact equals the uninterrupted build's
    proc = start_build(model, TARGET, out, cache)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr[-3000:]
    assert "export: cached" in stderr, stderr
    assert "exporting fp32 ONNX" not in stderr
    assert "Traceback" not in stderr
    _assert_same_artifact(ref, out)
    v = _cli("verify", str(out))
    assert v.exit_code == 0, v.output

    # 4. killed while packaging over a previous artifact: the previous one survives intact
    before = tree_state(out)
    proc = start_build(model, TARGET, out, cache)
    kill_when(proc, lambda: any(p.is_dir() for p in tmp_path.glob(".out.tmp-*")), "packaging to start")
    assert tree_state(out) == before, "a build killed while packaging changed the previous artifact"
    assert _cli("verify", str(out)).exit_code == 0
    # and the next run publishes over it cleanly
    res = _cli("build", "--model", str(model), "--target", TARGET, "--out", str(out), cache=cache)
    assert res.exit_code == 0, res.output
    assert "quantize: cached" in res.output
    _assert_same_artifact(ref, out)

    # 5. the killed runs' leftovers are visible to `cache ls` and removed by `cache prune`
    leftovers = list(export_dir.glob(".tmp-*"))
    assert leftovers
    pr = _cli("cache", "prune", "--max-mb", "1000", cache=cache)
    assert pr.exit_code == 0 and "removed" in pr.output, pr.output
    assert not any(export_dir.glob(".tmp-*"))
    assert any(export_dir.glob("[!.]*/.complete")), "prune with room to spare removed a complete entry"


def test_rebuild_in_same_cache_is_byte_identical(tmp_path):
    """Same inputs, same cache, another --out: every model file and the manifest's hashes agree."""
    from reliability_support import shared_cache

    from edgepipe.pipeline import build

    ref = built_artifact()
    out = tmp_path / "again"
    msgs: list[str] = []
    with env(EDGEPIPE_CACHE=str(shared_cache())):
        build(target=TARGET, out=out, model=tiny_model(), progress=msgs.append)
    assert any("export: cached" in m for m in msgs) and any("quantize: cached" in m for m in msgs)
    _assert_same_artifact(ref, out)


def test_sigterm_cleans_up_like_ctrl_c(tmp_path):
    """SIGTERM (what `kill`, systemd and CI runners send) unwinds the build: exit 143, one-line
    message, no stage temp folder left behind, nothing published."""
    model = tiny_model()
    cache, out = tmp_path / "cache", tmp_path / "out"
    export_dir = cache / "export"
    proc = start_build(model, TARGET, out, cache)
    t0 = time.time()
    while not (export_dir.is_dir() and any(export_dir.glob(".tmp-*/model"))):
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        assert time.time() - t0 < 300, "export never started"
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # the build process only; it must stop its export child itself
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err[-2000:]
    assert "error: terminated" in err and "Traceback" not in err, err[-2000:]
    assert not list(cache.glob("*/.tmp-*")), "a terminated stage left its temporary folder"
    assert not out.exists()
