"""Faults injected for real: a full disk (a small tmpfs mounted for EDGEPIPE_CACHE or --out), out of
memory in a stage, a device with too little free RAM, artifacts that name code to load."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from reliability_support import (
    TARGET,
    built_artifact,
    can_mount_tmpfs,
    copy_artifact,
    env,
    fill_disk,
    shared_cache,
    tiny_model,
    tmpfs,
    tree_state,
    use_zoo,
)

from edgepipe.cli import main


@pytest.fixture(autouse=True)
def _use_conftest_zoo(zoo):
    """Reuse tests/conftest.py's session models, artifact and stage cache."""
    use_zoo(zoo)


def _cli(*args: str, cache: Path | None = None):
    with env(EDGEPIPE_CACHE=str(cache) if cache else None):
        res = CliRunner().invoke(main, list(args), catch_exceptions=True)
    assert res.exception is None or isinstance(res.exception, SystemExit), (
        f"non-project exception: {res.exception!r}\n{res.output}"
    )
    assert "Traceback" not in res.output
    return res


def _entries(cache: Path) -> list[dict]:
    res = _cli("cache", "ls", "--json", cache=cache)
    assert res.exit_code == 0, res.output
    return json.loads(res.output.strip().splitlines()[-1])


@pytest.fixture()
def mountable():
    reason = can_mount_tmpfs()
    if reason:
        pytest.skip(reason)


def _copy_stage(src_cache: Path, dst_cache: Path, stage: str) -> None:
    for entry in (src_cache / stage).iterdir():
        if not entry.name.startswith("."):
            shutil.copytree(entry, dst_cache / stage / entry.name)


def test_disk_full_before_export_names_stage_and_need(tmp_path, mountable):
    built_artifact()
    out = tmp_path / "out"
    with tmpfs(tmp_path / "fs", "1m") as fs:
        cache = fs / "cache"
        cache.mkdir()
        fill_disk(fs, 64 << 10)
        res = _cli("build", "--model", str(tiny_model()), "--target", TARGET, "--out", str(out), cache=cache)
        assert res.exit_code == 1, res.output
        line = res.output.strip().splitlines()[-1]
        assert line.startswith("error: export: the disk is full"), line
        assert "needs about" in line and "0 MB" not in line.split("needs about")[1]
        assert not out.exists()
        assert not any((cache / "export").glob(".tmp-*"))


def test_disk_full_in_quantize_keeps_cache_consistent(tmp_path, mountable):
    built_artifact()
    prev = copy_artifact(tmp_path / "prev")
    before = tree_state(prev)
    with tmpfs(tmp_path / "fs", "3m") as fs:
        cache = fs / "cache"
        from conftest import find_export

        export = find_export(tiny_model())  # only this model's export: the shared cache holds other models' too
        assert export is not None
        shutil.copytree(export.parent, cache / "export" / export.parent.name)
        from edgepipe.pipeline import run_stages

        with env(EDGEPIPE_CACHE=str(cache)):  # the size budget's statistics (the Fisher diagonal: more than quantize's margin)
            run_stages(target=TARGET, stop_after="sensitivity", model=tiny_model())
        fill_disk(fs, 170 << 10)  # more than the stage's up-front estimate, less than it writes
        res = _cli("build", "--model", str(tiny_model()), "--target", TARGET, "--out", str(prev), cache=cache)
        assert res.exit_code == 1, res.output
        line = res.output.strip().splitlines()[-1]
        assert line.startswith("error: quantize: the disk is full at"), line
        assert "KB free" in line and "needs about" in line
        entries = _entries(cache)
        # what came before quantize stays, complete (the export, and the size budget's statistics, sensitivity and
        # allocation); nothing of quantize
        assert sorted(e["stage"] for e in entries) == ["allocate", "calib-stats", "export", "sensitivity"], entries
        assert all(e["complete"] for e in entries), entries
        assert not list((cache / "quantize").glob(".tmp-*"))
        (fs / "filler.bin").unlink()
        # room again: the same command resumes from the cached stages and finishes
        res = _cli("build", "--model", str(tiny_model()), "--target", TARGET, "--out", str(prev), cache=cache)
        assert res.exit_code == 0, res.output
        assert "export: cached" in res.output and "sensitivity: cached" in res.output and "allocate: cached" in res.output
    assert tree_state(prev) != before  # republished ...
    assert _cli("verify", str(prev)).exit_code == 0  # ... and whole


def test_disk_full_while_packaging_leaves_previous_artifact(tmp_path, mountable):
    built_artifact()
    with tmpfs(tmp_path / "fs", "2m") as fs:
        out = copy_artifact(fs / "art")
        before = tree_state(fs)
        fill_disk(fs, 200 << 10)
        filler = {str(fs / "filler.bin")}
        res = _cli("build", "--model", str(tiny_model()), "--target", TARGET, "--out", str(out), cache=shared_cache())
        assert res.exit_code == 1, res.output
        line = res.output.strip().splitlines()[-1]
        assert line.startswith("error: package: the disk is full at"), line
        after = tree_state(fs)
        after = {k: v for k, v in after.items() if k not in filler}
        assert after == before, "a failed package step changed or left files beside --out"
        assert _cli("verify", str(out)).exit_code == 0


def test_out_of_memory_in_a_stage_names_it(tmp_path, monkeypatch):
    built_artifact()
    import edgepipe.quantize

    def boom(*a, **k):
        raise MemoryError()

    monkeypatch.setattr(edgepipe.quantize, "quantize", boom)
    cache = tmp_path / "cache"
    _copy_stage(shared_cache(), cache, "export")
    prev = copy_artifact(tmp_path / "prev")
    before = tree_state(prev)
    res = _cli("build", "--model", str(tiny_model()), "--target", TARGET, "--out", str(prev), cache=cache)
    assert res.exit_code == 1, res.output
    line = res.output.strip().splitlines()[-1]
    assert line.startswith("error: quantize: out of memory ("), line
    assert "it needs about" in line
    assert tree_state(prev) == before
    assert all(e["complete"] for e in _entries(cache))
    assert not list((cache / "quantize").glob(".tmp-*"))


def test_damaged_cache_entry_is_rebuilt_not_trusted(tmp_path):
    built_artifact()
    from edgepipe.cache import cached_stage

    calls = []

    def produce(tmp: Path):
        calls.append(1)
        (tmp / "model").mkdir()
        (tmp / "model" / "w.bin").write_bytes(b"x" * 1000)

    with env(EDGEPIPE_CACHE=str(tmp_path / "c")):
        d, _ = cached_stage("s", {"a": 1}, produce)
        (d / "model" / "w.bin").write_bytes(b"x" * 10)  # truncated behind the cache's back
        d2, _ = cached_stage("s", {"a": 1}, produce)
        assert len(calls) == 2 and (d2 / "model" / "w.bin").stat().st_size == 1000
        msgs: list[str] = []
        cached_stage("s", {"a": 1}, produce, progress=msgs.append)
        assert len(calls) == 2 and msgs and "cached" in msgs[0]


def test_cache_ls_and_prune(tmp_path):
    from edgepipe.cache import cached_stage

    cache = tmp_path / "c"
    with env(EDGEPIPE_CACHE=str(cache)):
        for i in range(3):
            cached_stage("s", {"i": i}, lambda t, i=i: (t / "f").write_bytes(b"z" * (100_000 * (i + 1))) and None)
    (cache / "s" / ".tmp-killed").mkdir()
    (cache / "s" / ".tmp-killed" / "half").write_bytes(b"h" * 10)
    res = _cli("cache", "ls", cache=cache)
    assert res.exit_code == 0
    assert res.output.count("complete") == 4 and "incomplete" in res.output and "total" in res.output
    entries = _entries(cache)
    assert len(entries) == 4
    res = _cli("cache", "prune", "--max-mb", "0.4", cache=cache)  # least recently used go first
    assert res.exit_code == 0 and res.output.startswith("removed ")
    left = _entries(cache)
    assert all(e["complete"] for e in left) and sum(e["bytes"] for e in left) <= 0.4 * 2**20
    assert _cli("cache", "prune", "--max-mb", "-1", cache=cache).exit_code == 2
    res = _cli("cache", "prune", cache=cache)
    assert res.exit_code == 0 and _entries(cache) == []


def test_run_refuses_before_loading_when_ram_is_short(tmp_path, monkeypatch):
    import edgepipe.runtime.artifact as artifact
    import edgepipe.runtime.model as model

    art = built_artifact()
    monkeypatch.setattr(artifact, "mem_available_mb", lambda: 12.0)

    def no_load(*a, **k):
        raise AssertionError("the model was loaded despite too little RAM")

    monkeypatch.setattr(model, "CausalLM", no_load)
    res = _cli("run", str(art), "--prompt", "hello", "--max-new-tokens", "2")
    assert res.exit_code == 2, res.output
    assert "12 MB of free RAM" in res.output and "needs about" in res.output


def test_runtime_registers_no_custom_ops(monkeypatch):
    """The session options hold no custom-op library and no library file is dlopened while loading an artifact."""
    import ctypes

    import onnxruntime as ort

    import edgepipe.runtime.model as model

    registered, loaded, created = [], [], []

    class SpyOptions(ort.SessionOptions):
        def __init__(self, *a):
            super().__init__(*a)
            created.append(self)

        def register_custom_ops_library(self, path):  # pragma: no cover - must not be called
            registered.append(path)
            return super().register_custom_ops_library(path)

    monkeypatch.setattr(model.ort, "SessionOptions", SpyOptions)
    real_cdll = ctypes.CDLL
    monkeypatch.setattr(ctypes, "CDLL", lambda name, *a, **k: loaded.append(name) or real_cdll(name, *a, **k))
    from edgepipe.runtime.artifact import open_artifact

    lm, _ = open_artifact(built_artifact())
    assert created, "the runtime did not build its session options through onnxruntime.SessionOptions"
    # CDLL(None) is the process's own symbols (libc's madvise, edgepipe.runtime.pages): no file is loaded
    assert registered == [] and [name for name in loaded if name is not None] == []
    assert lm.session.get_providers() == ["CPUExecutionProvider"]


def _rehash(art: Path) -> None:
    from edgepipe.runtime.manifest import file_entries

    m = json.loads((art / "manifest.json").read_text())
    m["files"] = file_entries(art)
    (art / "manifest.json").write_text(json.dumps(m))


@pytest.mark.parametrize("where", ["decoder", "session_options", "top"])
def test_genai_config_naming_custom_ops_library_is_refused(tmp_path, where):
    art = copy_artifact(tmp_path / "a")
    cfg = json.loads((art / "genai_config.json").read_text())
    lib = str(tmp_path / "libevil.so")
    if where == "decoder":
        cfg["model"]["decoder"].setdefault("session_options", {})["custom_ops_library"] = lib
    elif where == "session_options":
        cfg["model"]["decoder"]["session_options"] = {"provider_options": [], "custom_ops_library": lib}
    else:
        cfg["custom_ops_library"] = lib
    (art / "genai_config.json").write_text(json.dumps(cfg))
    _rehash(art)  # a consistent manifest: the refusal is about what the config asks for
    for cmd in (("verify", str(art)), ("run", str(art), "--prompt", "hi", "--max-new-tokens", "1")):
        res = _cli(*cmd)
        assert res.exit_code == 2, res.output
        assert "custom_ops_library" in res.output and "never loads code" in res.output


def test_model_with_custom_domain_op_is_refused_not_loaded(tmp_path):
    import onnx
    from onnx import TensorProto, helper

    art = copy_artifact(tmp_path / "a")
    node = helper.make_node("Evil", ["input_ids"], ["logits"], domain="evil.custom")
    g = helper.make_graph(
        [node], "g", [helper.make_tensor_value_info("input_ids", TensorProto.INT64, [1, None])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, None)],
    )
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("evil.custom", 1)])
    onnx.save(m, str(art / "model.onnx"))
    _rehash(art)
    res = _cli("run", str(art), "--prompt", "hi", "--max-new-tokens", "1")
    assert res.exit_code == 2, res.output
    assert "onnxruntime cannot load" in res.output
