"""Bad inputs: exit 2, exactly one stderr line starting with ``error:``, no traceback, and ``--out``
untouched (absent stays absent, an existing folder keeps its files)."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgepipe.cli import main


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_error(res, *needles: str, progress_ok: bool = False) -> str:
    assert res.exit_code == 2, (res.exit_code, res.stdout, res.stderr, res.exception)
    assert isinstance(res.exception, SystemExit), res.exception  # not an unexpected exception
    lines = res.stderr.strip().splitlines()
    if progress_ok:  # commands that report progress ("[   0.0s] ...") before the device work fails
        assert all(ln.startswith("[") for ln in lines[:-1]), res.stderr
        lines = lines[-1:]
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith("error: ") and "Traceback" not in res.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir" for p in sorted(root.rglob("*"))}


@pytest.fixture()
def model_copy(zoo, tmp_path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(zoo.model("llama"), dst)
    return dst


def build_fails(tmp_path: Path, *args, needles=()) -> str:
    out = tmp_path / "out"
    res = cli("build", "--target", "x86-avx2", "--out", out, *args)
    msg = assert_one_error(res, *needles)
    assert not out.exists(), "a failed build wrote --out"
    assert not list(tmp_path.glob(".out.*")), "a failed build left a staging folder"
    return msg


def test_unknown_target(zoo, tmp_path):
    out = tmp_path / "out"
    res = cli("build", "--model", zoo.model("llama"), "--target", "raspberrypi9", "--out", out)
    assert_one_error(res, "raspberrypi9", "raspberrypi5", "x86-avx2")
    assert not out.exists()


def test_missing_model_folder(tmp_path):
    build_fails(tmp_path, "--model", tmp_path / "nope", needles=("does not exist",))


def test_model_folder_without_safetensors(model_copy, tmp_path):
    (model_copy / "model.safetensors").unlink()
    build_fails(tmp_path, "--model", model_copy, needles=("safetensors",))


def test_truncated_safetensors(model_copy, tmp_path):
    f = model_copy / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    build_fails(tmp_path, "--model", model_copy, needles=("model.safetensors", "truncated"))


def test_corrupt_config(model_copy, tmp_path):
    (model_copy / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], "hidden_size": 64,')
    build_fails(tmp_path, "--model", model_copy, needles=("config.json", "not valid JSON"))


def test_unsupported_architecture(zoo, tmp_path):
    # GPT-2 builds since issue 15 (the generic export path); an encoder (no causal LM head) is refused
    from transformers import BertConfig, BertModel

    folder = tmp_path / "bert"
    BertModel(BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, vocab_size=384)).save_pretrained(folder)
    shutil.copy(zoo.tokenizer / "tokenizer.json", folder)
    msg = build_fails(tmp_path, "--model", folder, needles=("BertModel", "not supported"))
    for arch in ("LlamaForCausalLM", "GraniteForCausalLM", "Qwen2ForCausalLM", "Phi3ForCausalLM"):
        assert arch in msg


def test_missing_tokenizer(model_copy, tmp_path):
    (model_copy / "tokenizer.json").unlink()
    build_fails(tmp_path, "--model", model_copy, needles=("tokenizer.json",))


@pytest.mark.parametrize("kind", ["missing", "empty", "folder", "binary"])
def test_bad_eval_file(zoo, tmp_path, kind):
    path = tmp_path / "eval.txt"
    if kind == "empty":
        path.write_text("  \n")
    elif kind == "folder":
        path.mkdir()
    elif kind == "binary":
        path.write_bytes(b"\xff\xfe\x00\x81" * 100)
    msg = build_fails(tmp_path, "--model", zoo.model("llama"), "--eval", path)
    assert "eval" in msg and str(path) in msg


def test_unreadable_eval_file(zoo, tmp_path):
    import os

    if os.geteuid() == 0:  # root reads a mode-000 file; /proc/self/mem fails to read for anyone (EIO)
        path = Path("/proc/self/mem")
    else:
        path = tmp_path / "eval.txt"
        path.write_text("some text " * 100)
        path.chmod(0)
    build_fails(tmp_path, "--model", zoo.model("llama"), "--eval", path, needles=("cannot read eval file", str(path)))


def test_out_exists_and_is_not_an_artifact(zoo, tmp_path):
    out = tmp_path / "precious"
    out.mkdir()
    (out / "notes.txt").write_text("do not delete")
    (out / "sub").mkdir()
    (out / "sub" / "data.bin").write_bytes(b"\x00\x01" * 100)
    before = snapshot(out)
    res = cli("build", "--model", zoo.model("llama"), "--target", "x86-avx2", "--out", out)
    assert_one_error(res, str(out), "not an edgepipe artifact")
    assert snapshot(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["precious"]


@pytest.fixture()
def tampered(llama_artifact, tmp_path) -> Path:
    art = tmp_path / "art"
    shutil.copytree(llama_artifact, art)
    f = art / "model.onnx.data"
    data = bytearray(f.read_bytes())
    data[len(data) // 2] ^= 0xFF  # same size, one byte flipped
    f.write_bytes(bytes(data))
    return art


@pytest.mark.parametrize("command", [["verify"], ["run", "--prompt", "Hello"], ["validate", "--json"], ["bench", "--json"]])
def test_tampered_artifact(tampered, command):
    res = cli(command[0], tampered, *command[1:])
    msg = assert_one_error(res, "model.onnx.data", progress_ok=command[0] == "validate")
    assert "sha256" in msg
    assert res.stdout == ""


def test_missing_and_extra_files(llama_artifact, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(llama_artifact, art)
    (art / "tokenizer.json").unlink()
    assert_one_error(cli("verify", art), "tokenizer.json", "missing")
    assert_one_error(cli("run", tmp_path / "nothing", "--prompt", "x"), "not an artifact folder")


def test_errors_from_a_real_process(zoo, tampered, tmp_path):
    """The installed entry points, not only CliRunner: same contract on real stderr."""
    for cmd in (
        [sys.executable, "-m", "edgepipe.cli", "build", "--model", str(tmp_path / "nope"), "--target", "x86-avx2", "--out", str(tmp_path / "o")],
        [sys.executable, "-m", "edgepipe.cli", "verify", str(tampered)],
        [sys.executable, "-m", "edgepipe.runtime", "verify", str(tampered)],
        [sys.executable, "-m", "edgepipe.runtime", "run", str(tampered), "--prompt", "Hi"],
    ):
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2, (cmd, p.stderr)
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in p.stderr, p.stderr
        assert p.stdout == ""
    assert not (tmp_path / "o").exists()


def test_manifest_not_json(llama_artifact, tmp_path):
    art = tmp_path / "art"
    shutil.copytree(llama_artifact, art)
    (art / "manifest.json").write_text(json.dumps({"kind": "edgepipe-artifact"})[:-3])
    assert_one_error(cli("verify", art), "manifest.json", "not valid JSON")
