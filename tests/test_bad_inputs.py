"""Bad input tried on purpose, table-driven: CLI flags, target profiles, model folders, calibration /
eval files, artifacts and manifests. Each row asserts the exit code, a distinctive piece of the
one-line message, no traceback, and that nothing was written (no --out, no new cache entry) or lost
(the workspace and the stage cache hold exactly what they held before)."""

from __future__ import annotations

import json
import os
import shutil
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from model_edits import edit_tensors, int8_weights
from reliability_support import TARGET, built_artifact, env, shared_cache, tiny_model, tree_state, use_zoo

from edgepipe.cli import main


@pytest.fixture(autouse=True)
def _use_conftest_zoo(zoo):
    """Reuse tests/conftest.py's session models, artifact and stage cache."""
    use_zoo(zoo)


GOOD_TARGET = (Path(__file__).resolve().parent.parent / "targets" / f"{TARGET}.yaml").read_text()


class W:
    """A case's workspace: a fresh folder with helpers to make the bad thing in it."""

    def __init__(self, root: Path):
        self.root = root
        self.out = root / "out"

    def file(self, name: str, data: str | bytes) -> str:
        p = self.root / name
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data.encode() if isinstance(data, str) else data)
        return str(p)

    def target(self, text: str, name: str = "t.yaml") -> str:
        return self.file(name, text)

    def target_edit(self, old: str, new: str) -> str:
        assert old in GOOD_TARGET, old
        return self.target(GOOD_TARGET.replace(old, new))

    def model(self) -> Path:
        m = self.root / "model"
        shutil.copytree(tiny_model(), m)
        return m

    def config_edit(self, **changes) -> Path:
        m = self.model()
        cfg = json.loads((m / "config.json").read_text())
        cfg.update(changes)
        (m / "config.json").write_text(json.dumps(cfg))
        return m

    def artifact(self) -> Path:
        a = self.root / "art"
        shutil.copytree(built_artifact(), a)
        return a

    def manifest_edit(self, fn: Callable[[dict], None]) -> Path:
        a = self.artifact()
        m = json.loads((a / "manifest.json").read_text())
        fn(m)
        (a / "manifest.json").write_text(json.dumps(m))
        return a

    def build(self, *extra: str, model: Path | None = None, target: str = TARGET) -> list[str]:
        assert model is None or isinstance(model, Path), model
        return ["build", "--model", str(model or tiny_model()), "--target", target, "--out", str(self.out), *extra]


def _tamper_safetensors(m: Path, fn: Callable[[bytearray, dict, int], None]) -> Path:
    p = m / "model.safetensors"
    raw = bytearray(p.read_bytes())
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8: 8 + n])
    fn(raw, header, 8 + n)
    p.write_bytes(bytes(raw))
    return m


def _poison(value: float, dtype=np.float32):
    def fn(raw: bytearray, header: dict, start: int) -> None:
        name = next(k for k, t in header.items() if k != "__metadata__" and "layers.1.mlp" in k)
        lo = header[name]["data_offsets"][0] + start
        raw[lo + 8: lo + 12] = np.array([value], dtype=dtype).tobytes()

    return fn


def _truncate(raw: bytearray, header: dict, start: int) -> None:
    del raw[len(raw) - 1000:]


def _flip_byte(a: Path, name: str) -> Path:
    p = a / name
    b = bytearray(p.read_bytes())
    b[len(b) // 2] ^= 0xFF
    p.write_bytes(bytes(b))
    return a


def _deep(n: int) -> str:
    return "[" * n + "]" * n


def _index(m: Path, weight_map: object) -> Path:
    (m / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return m


def _full_index(m: Path, **changes: str) -> Path:
    from safetensors import safe_open

    with safe_open(str(m / "model.safetensors"), "np") as f:
        names = list(f.keys())
    return _index(m, {**{n: "model.safetensors" for n in names}, **changes})


def _deep_header(m: Path) -> Path:
    header = _deep(100000).encode()
    (m / "model.safetensors").write_bytes(struct.pack("<Q", len(header)) + header)
    return m


ALIAS_BOMB = "a: &a [x, x, x, x, x, x, x, x, x]\n" + "".join(
    f"{c}: &{c} [{', '.join(['*' + p] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi", strict=True)
)


def _dangling(w: W) -> W:
    w.out.symlink_to(w.root / "gone")
    return w


def _fifo(w: W, name: str = "fifo.txt") -> str:
    path = w.root / name
    os.mkfifo(path)
    return str(path)


def _replace(path: Path, kind: str) -> None:
    """``path`` (a file) becomes a FIFO or an empty folder of the same name."""
    path.unlink()
    if kind == "fifo":
        os.mkfifo(path)
    else:
        path.mkdir()


def _art_with(w: W, name: str, data: str) -> Path:
    """``--out`` holding a previous artifact plus a file of the user's."""
    shutil.copytree(built_artifact(), w.out)
    (w.out / name).parent.mkdir(parents=True, exist_ok=True)
    (w.out / name).write_text(data)
    return w.out


def _deep_manifest(a: Path) -> Path:
    m = json.loads((a / "manifest.json").read_text())
    nested: object = 1
    for _ in range(40):
        nested = {"x": nested}
    m["metrics"]["deep"] = nested
    (a / "manifest.json").write_text(json.dumps(m))
    return a


@dataclass(frozen=True)
class Case:
    id: str
    args: Callable[[W], list[str]]
    code: int
    message: str
    out_exists: bool = False  # --out was made by the case (the user's folder): it must survive untouched
    env: tuple[tuple[str, str | None], ...] = ()  # extra environment of the invocation


def _with(thing: Path, fn: Callable[[Path], object]) -> Path:
    fn(thing)
    return thing


def _art(w: W, a: Path, cmd: str = "verify") -> list[str]:
    if cmd == "run":
        return ["run", str(a), "--prompt", "hello", "--max-new-tokens", "2"]
    return [cmd, str(a)]


CASES = [
    # ---- the command line ----
    Case("cli-no-target", lambda w: ["build", "--out", str(w.out)], 2, "Missing option '--target'"),
    Case("cli-unknown-command", lambda w: ["frobnicate"], 2, "No such command"),
    Case("cli-max-new-tokens-0", lambda w: ["run", str(w.root), "--prompt", "x", "--max-new-tokens", "0"], 2, "not in the range"),
    Case("cli-max-new-tokens-huge", lambda w: ["run", str(w.root), "--prompt", "x", "--max-new-tokens", str(10**12)], 2, "not in the range"),
    Case("cli-temperature-negative", lambda w: ["run", str(w.root), "--prompt", "x", "--temperature", "-1"], 2, "not in the range"),
    Case("cli-temperature-nan", lambda w: _art(w, w.artifact(), "run") + ["--temperature", "nan"], 2, "not NaN"),
    Case("cli-top-p-zero", lambda w: ["run", str(w.root), "--prompt", "x", "--top-p", "0"], 2, "not in the range"),
    Case("cli-prune-not-a-number", lambda w: ["cache", "prune", "--max-mb", "lots"], 2, "is not a valid float"),
    Case("cli-empty-prompt", lambda w: ["run", str(w.artifact()), "--prompt", ""], 2, "prompt is empty"),
    Case("cli-out-is-a-file", lambda w: w.build("--out", w.file("f.txt", "x")), 2, "is a file; choose a folder path"),
    Case("cli-out-not-artifact", lambda w: (w.file("out/notes.txt", "mine"), w.build())[1], 2, "is not an edgepipe artifact"),
    Case("cli-out-under-a-file", lambda w: w.build("--out", w.file("f.txt", "x") + "/sub"), 2, "which is a file"),
    # ---- target profiles ----
    Case("target-unknown-name", lambda w: w.build(target="nope"), 2, "unknown target 'nope'"),
    Case("target-unicode-name", lambda w: w.build(target="ラズパイ5 🍓"), 2, "unknown target"),
    Case("target-huge-name", lambda w: w.build(target="x" * 5000), 2, "unknown target"),
    Case("target-missing-file", lambda w: w.build(target=str(w.root / "gone.yaml")), 2, "does not exist"),
    Case("target-empty-file", lambda w: w.build(target=w.target("")), 2, "must be a mapping, got NoneType"),
    Case("target-top-level-list", lambda w: w.build(target=w.target("- a\n- b\n")), 2, "must be a mapping, got list"),
    Case("target-unknown-key", lambda w: w.build(target=w.target(GOOD_TARGET + "colour: red\n")), 2, "unknown key 'colour'"),
    Case("target-unknown-nested-key", lambda w: w.build(target=w.target_edit("  bits: 4", "  bitz: 4")), 2, "unknown key 'bitz'"),
    Case("target-bits-3", lambda w: w.build(target=w.target_edit("  bits: 4", "  bits: 3")), 2, "allowed values"),
    Case("target-bits-string", lambda w: w.build(target=w.target_edit("  bits: 4", '  bits: "4"')), 2, "allowed values"),
    Case("target-bits-bool", lambda w: w.build(target=w.target_edit("  bits: 4", "  bits: true")), 2, "allowed values"),
    Case("target-block-48", lambda w: w.build(target=w.target_edit("block_size: 32", "block_size: 48")), 2, "use 16, 32, 64"),
    Case("target-huge-cores", lambda w: w.build(target=w.target_edit("cores: 4", "cores: 1000000000000")), 2, "must be an integer between"),
    Case("target-nan-ram", lambda w: w.build(target=w.target_edit("ram_gb: 16", "ram_gb: .nan")), 2, "must be a number between"),
    Case("target-negative-budget", lambda w: w.build(target=w.target_edit("max_ram_mb: 8000", "max_ram_mb: -5")), 2, "must be a number between"),
    Case("target-bool-as-string", lambda w: w.build(target=w.target_edit("symmetric: false", "symmetric: 'no'")), 2, "must be true or false"),
    Case("target-empty-name", lambda w: w.build(target=w.target_edit("name: x86-avx2", 'name: ""')), 2, "must be a non-empty string"),
    Case("target-bad-yaml", lambda w: w.build(target=w.target("cpu: [\n")), 2, "is not valid YAML"),
    Case("target-python-tag", lambda w: w.build(target=w.target("name: !!python/object/apply:os.system ['true']\n")), 2, "is not valid YAML"),
    Case("target-not-utf8", lambda w: w.build(target=w.target(b"name: \xff\xfe\n")), 2, "cannot read target profile"),
    Case("target-deep-nesting", lambda w: w.build(target=w.target("a: " + _deep(1000) + "\n")), 2, "target profile"),
    Case("target-schema-2", lambda w: w.build(target=w.target_edit("schema_version: 1", "schema_version: 2")), 2, "schema_version 2 is not supported"),
    Case("target-missing-cpu", lambda w: w.build(target=w.target("name: t\ndescription: d\nquantization: {}\nruntime: {}\nbudgets: {}\n")), 2, "missing required key 'cpu'"),
    Case("target-npu-on-cpu-ep", lambda w: w.build(target=w.target(GOOD_TARGET + "npu:\n  htp_arch: 75\n")), 2, "needs runtime.execution_provider"),
    Case("target-qnn-without-npu", lambda w: w.build(target=w.target(GOOD_TARGET.replace("CPUExecutionProvider", "QNNExecutionProvider"))), 2, "needs an npu section"),
    Case("target-alias-cycle", lambda w: (w.target(f"name: b\nalias_of: {w.root / 'a.yaml'}\n", "b.yaml"),
                                          w.build(target=w.target(f"name: a\nalias_of: {w.root / 'b.yaml'}\n", "a.yaml")))[1],
         2, "alias_of forms a cycle"),
    # ---- model folders ----
    Case("model-missing", lambda w: w.build(model=w.root / "nowhere"), 2, "does not exist"),
    Case("model-is-a-file", lambda w: w.build(model=Path(w.file("m.bin", "x"))), 2, "is a file; pass --model"),
    Case("model-no-config", lambda w: w.build(model=_with(w.model(), lambda m: (m / "config.json").unlink())), 2, "has no config.json"),
    Case("model-config-empty", lambda w: w.build(model=_with(w.model(), lambda m: (m / "config.json").write_text(""))), 2, "is not valid JSON"),
    Case("model-config-list", lambda w: w.build(model=_with(w.model(), lambda m: (m / "config.json").write_text("[]"))), 2, "must hold a JSON object"),
    Case("model-unsupported-arch", lambda w: w.build(model=w.config_edit(architectures=["BertModel"])), 2, "architecture BertModel is not supported"),
    Case("model-hidden-size-string", lambda w: w.build(model=w.config_edit(hidden_size="64")), 2, "hidden_size must be a positive integer"),
    Case("model-zero-heads", lambda w: w.build(model=w.config_edit(num_attention_heads=0)), 2, "num_attention_heads must be a positive integer"),
    Case("model-huge-vocab", lambda w: w.build(model=w.config_edit(vocab_size=10**12)), 2, "does not fit"),
    Case("model-vocab-below-tokenizer", lambda w: w.build(model=w.config_edit(vocab_size=100)), 2, "the tokenizer does not belong"),
    Case("model-only-bin", lambda w: w.build(model=_with(w.model(), lambda m: (m / "model.safetensors").rename(m / "pytorch_model.bin"))), 2, "only PyTorch .bin"),
    Case("model-truncated-safetensors", lambda w: w.build(model=_tamper_safetensors(w.model(), _truncate)), 2, "is truncated or padded"),
    Case("model-garbage-safetensors", lambda w: w.build(model=_with(w.model(), lambda m: (m / "model.safetensors").write_bytes(os.urandom(64)))), 2, "not a readable safetensors"),
    Case("model-empty-safetensors", lambda w: w.build(model=_with(w.model(), lambda m: (m / "model.safetensors").write_bytes(b""))), 2, "not a readable safetensors"),
    Case("model-nan-weights", lambda w: w.build(model=_tamper_safetensors(w.model(), _poison(float("nan")))), 2, "holds NaN or Inf"),
    Case("model-inf-weights", lambda w: w.build(model=_tamper_safetensors(w.model(), _poison(float("-inf")))), 2, "holds NaN or Inf"),
    Case("model-no-tokenizer", lambda w: w.build(model=_with(w.model(), lambda m: (m / "tokenizer.json").unlink())), 2, "has no tokenizer.json"),
    Case("model-corrupt-tokenizer", lambda w: w.build(model=_with(w.model(), lambda m: (m / "tokenizer.json").write_text('{"version": '))), 2, "cannot be read by tokenizers"),
    Case("model-index-missing-shard", lambda w: w.build(model=(lambda m: (m / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00002-of-00002.safetensors"}})) and m)(w.model())), 2, "missing weight shard"),
    # ---- calibration / eval text ----
    Case("eval-zero-length", lambda w: w.build("--eval", w.file("e.txt", "")), 2, "is empty"),
    Case("eval-whitespace-only", lambda w: w.build("--eval", w.file("e.txt", " \n\t\u3000\n")), 2, "is empty"),
    Case("eval-missing", lambda w: w.build("--eval", str(w.root / "no.txt")), 2, "does not exist"),
    Case("eval-is-folder", lambda w: w.build("--eval", str(w.root)), 2, "is a folder"),
    Case("calib-not-utf8", lambda w: w.build("--calib", w.file("c.txt", b"\xff\xfe\x00bad")), 2, "is not UTF-8"),
    Case("eval-too-short", lambda w: w.build("--eval", w.file("e.txt", "Hello there, édge 🍓.")), 2, "it needs at least 64"),
    # ---- artifacts and manifests ----
    Case("art-missing", lambda w: ["verify", str(w.root / "none")], 2, "is not an artifact folder"),
    Case("art-no-manifest", lambda w: _art(w, _with(w.artifact(), lambda a: (a / "manifest.json").unlink())), 2, "has no manifest.json"),
    Case("art-manifest-empty", lambda w: _art(w, _with(w.artifact(), lambda a: (a / "manifest.json").write_text(""))), 2, "is not valid JSON"),
    Case("art-manifest-malformed", lambda w: _art(w, _with(w.artifact(), lambda a: (a / "manifest.json").write_text('{"kind": "edgepipe-art'))), 2, "is not valid JSON"),
    Case("art-manifest-deep", lambda w: _art(w, _with(w.artifact(), lambda a: (a / "manifest.json").write_text(_deep(100000)))), 2, "is not valid JSON"),
    Case("art-manifest-list", lambda w: _art(w, _with(w.artifact(), lambda a: (a / "manifest.json").write_text("[1]"))), 2, "must hold a JSON object"),
    Case("art-schema-99", lambda w: _art(w, w.manifest_edit(lambda m: m.update(schema_version=99))), 2, "has schema_version 99"),
    Case("art-schema-bool", lambda w: _art(w, w.manifest_edit(lambda m: m.update(schema_version=True))), 2, "has schema_version True"),
    Case("art-wrong-format", lambda w: _art(w, w.manifest_edit(lambda m: m.update(format="zip"))), 2, "is not an edgepipe manifest"),
    Case("art-unknown-kind", lambda w: _art(w, w.manifest_edit(lambda m: m.update(kind="zip"))), 2, "unknown artifact kind 'zip'"),
    Case("art-no-files", lambda w: _art(w, w.manifest_edit(lambda m: m.update(files={}))), 2, "lists no files"),
    Case("art-size-string", lambda w: _art(w, w.manifest_edit(lambda m: m["files"]["model.onnx"].update(size="21882"))), 2, "needs a 64-hex sha256"),
    Case("art-data-flipped", lambda w: _art(w, _flip_byte(w.artifact(), "model.onnx.data")), 2, "model.onnx.data does not match its sha256"),
    Case("art-data-flipped-run", lambda w: _art(w, _flip_byte(w.artifact(), "model.onnx.data"), "run"), 2, "model.onnx.data does not match its sha256"),
    Case("art-model-truncated", lambda w: _art(w, _with(w.artifact(), lambda a: (a / "model.onnx").write_bytes((a / "model.onnx").read_bytes()[:100]))), 2, "model.onnx has 100 bytes, the manifest says"),
    Case("art-tokenizer-missing", lambda w: _art(w, _with(w.artifact(), lambda a: (a / "tokenizer.json").unlink()), "run"), 2, "tokenizer.json is missing from"),
    Case("art-symlink-file", lambda w: _art(w, (lambda a: ((a / "tokenizer.json").unlink(), (a / "tokenizer.json").symlink_to(built_artifact() / "tokenizer.json"), a)[2])(w.artifact())), 2, "tokenizer.json is a symlink"),
    Case("art-path-escape", lambda w: _art(w, w.manifest_edit(lambda m: m["files"].update({"../secret": m["files"]["model.onnx"]}))), 2, "escapes the artifact folder"),
    Case("art-absolute-path", lambda w: _art(w, w.manifest_edit(lambda m: m["files"].update({"/etc/passwd": m["files"]["model.onnx"]}))), 2, "escapes the artifact folder"),
    Case("art-overlong-name", lambda w: _art(w, w.manifest_edit(lambda m: m["files"].update({"ü" * 300: m["files"]["model.onnx"]}))), 2, "unusable file name"),
    Case("art-metrics-list", lambda w: _art(w, w.manifest_edit(lambda m: m.update(metrics=[1, 2])), "run"), 2, "'metrics' must be a JSON object"),
    Case("art-genai-filename-escapes", lambda w: _art(w, _genai_filename(w.artifact(), "../model.onnx")), 2, "escapes the artifact folder"),
    # ---- issue 18: model integrity, from the files alone (before any export) ----
    Case("model-more-layers-than-weights", lambda w: w.build(model=w.config_edit(num_hidden_layers=3)), 2, "'model.layers.2.self_attn.q_proj.weight' is missing"),
    Case("model-fewer-layers-than-weights", lambda w: w.build(model=w.config_edit(num_hidden_layers=1)), 2, "'model.layers.1."),
    Case("model-untied-without-lm-head", lambda w: w.build(model=w.config_edit(tie_word_embeddings=False)), 2, "'lm_head.weight' is missing"),
    Case("model-intermediate-mismatch", lambda w: w.build(model=w.config_edit(intermediate_size=128)), 2, "but config.json implies [128, 64]"),
    Case("model-kv-heads-mismatch", lambda w: w.build(model=w.config_edit(num_key_value_heads=4)), 2, "'model.layers.0.self_attn.k_proj.weight' has shape"),
    Case("model-vocab-mismatch", lambda w: w.build(model=w.config_edit(vocab_size=400)), 2, "'model.embed_tokens.weight' has shape"),
    Case("model-int8-weights", lambda w: w.build(model=edit_tensors(w.model(), int8_weights)), 2, "is stored as I8, not a float"),
    Case("model-missing-tensor", lambda w: w.build(model=edit_tensors(w.model(), lambda t: t.pop("model.norm.weight"))), 2, "'model.norm.weight' is missing"),
    Case("model-unexpected-tensor", lambda w: w.build(model=edit_tensors(w.model(), lambda t: t.update({"model.layers.0.extra.weight": np.zeros(4, np.float32)}))),
         2, "'model.layers.0.extra.weight' is not part of a LlamaForCausalLM"),
    Case("model-index-escapes", lambda w: w.build(model=_full_index(w.model(), **{"model.norm.weight": "../model.safetensors"})), 2, "not a safetensors file inside the model folder"),
    Case("model-index-not-object", lambda w: w.build(model=_index(w.model(), ["model.safetensors"])), 2, "no weight_map object"),
    Case("model-index-deep", lambda w: w.build(model=_with(w.model(), lambda m: (m / "model.safetensors.index.json").write_text(_deep(100000)))), 2, "is nested too deeply"),
    Case("model-index-wrong-shard", lambda w: w.build(model=_full_index(w.model(), **{"not.a.tensor": "model.safetensors"})), 2, "which does not hold it"),
    Case("model-index-subfolder", lambda w: w.build(model=_full_index(w.model(), **{"model.norm.weight": "sub/model.safetensors"})), 2, "not a safetensors file inside"),
    Case("model-safetensors-deep-header", lambda w: w.build(model=_deep_header(w.model())), 2, "nested too deeply"),
    Case("model-config-deep", lambda w: w.build(model=_with(w.model(), lambda m: (m / "config.json").write_text(_deep(100000)))), 2, "is nested too deeply"),
    Case("model-config-is-fifo", lambda w: w.build(model=_with(w.model(), lambda m: ((m / "config.json").unlink(), os.mkfifo(m / "config.json")))), 2,
         "config.json is not a regular file"),
    # ---- issue 18: target profiles, bounded parsers ----
    Case("target-alias-bomb", lambda w: w.build(target=w.target(ALIAS_BOMB)), 2, "aliases (*name) are not allowed"),
    Case("target-alias-in-good-profile", lambda w: w.build(target=w.target_edit("  bits: 4", "  bits: &b 4\n  embedding_bits: *b")), 2, "aliases (*name) are not allowed"),
    Case("target-duplicate-key", lambda w: w.build(target=w.target_edit("  bits: 4", "  bits: 4\n  bits: 8")), 2, "duplicate or unhashable key 'bits'"),
    Case("target-huge-file", lambda w: w.build(target=w.target("# " + "x" * (2 << 20) + "\n" + GOOD_TARGET)), 2, "is over 1024 KB"),
    Case("target-huge-integer", lambda w: w.build(target=w.target_edit("cores: 4", "cores: " + "9" * 400)), 2, "must be an integer between"),
    Case("target-negative-kl", lambda w: w.build(target=w.target_edit("max_kl_divergence: 0.10", "max_kl_divergence: -1")), 2, "must be a number between"),
    Case("target-kl-string", lambda w: w.build(target=w.target_edit("max_kl_divergence: 0.10", "max_kl_divergence: low")), 2, "must be a number between"),
    # ---- issue 18: --out is the user's folder ----
    Case("out-dangling-symlink", lambda w: _dangling(w).build(), 2, "is a dangling symbolic link", out_exists=True),
    Case("out-symlink-to-folder", lambda w: (w.out.symlink_to(Path(w.file("real/x", "")).parent), w.build())[1], 2, "is a symbolic link", out_exists=True),
    Case("out-in-proc", lambda w: w.build("--out", "/proc/edgepipe-artifact"), 2, "is on a proc filesystem"),
    Case("out-in-sys", lambda w: w.build("--out", "/sys/kernel/edgepipe"), 2, "filesystem, not a place for files"),
    Case("out-artifact-plus-user-file", lambda w: (_art_with(w, "notes.txt", "mine"), w.build())[1], 2, "holds 1 file(s) edgepipe did not write (e.g. notes.txt)", out_exists=True),
    Case("out-artifact-plus-model-folder", lambda w: (_art_with(w, "my-model/config.json", "{}"), w.build())[1], 2, "did not write (e.g. my-model/config.json)", out_exists=True),
    Case("out-contains-the-model", lambda w: w.build("--out", str(w.root), model=w.model()), 2, "contains the input"),
    Case("out-contains-the-eval", lambda w: w.build("--eval", w.file("out/e.txt", "text " * 100)), 2, "contains the input", out_exists=True),
    Case("out-is-the-model", lambda w: (lambda m: w.build("--out", str(m), model=m))(w.model()), 2, "contains the input"),
    # ---- issue 18: one argument contract (CLI side; the device entry point in test_integrity.py) ----
    Case("cli-seed-negative", lambda w: ["run", str(w.root), "--prompt", "x", "--seed", "-1"], 2, "--seed -1 is not in the range"),
    Case("cli-seed-huge", lambda w: ["run", str(w.root), "--prompt", "x", "--seed", str(2**70)], 2, "is not in the range"),
    Case("cli-top-k-negative", lambda w: ["run", str(w.root), "--prompt", "x", "--top-k", "-5"], 2, "--top-k -5 is not in the range"),
    Case("cli-temperature-inf", lambda w: ["run", str(w.root), "--prompt", "x", "--temperature", "inf"], 2, "not NaN or infinity"),
    Case("cli-top-p-nan", lambda w: ["run", str(w.root), "--prompt", "x", "--top-p", "nan"], 2, "not NaN"),
    Case("cli-max-new-tokens-negative", lambda w: ["run", str(w.root), "--prompt", "x", "--max-new-tokens", "-3"], 2, "not in the range"),
    Case("cli-prompt-not-utf8", lambda w: ["run", str(w.artifact()), "--prompt", "caf\udce9"], 2, "the prompt is not valid UTF-8"),
    Case("cli-prompt-longer-than-context", lambda w: ["run", str(w.artifact()), "--prompt", "the " * 6000], 2, "shorten the prompt"),
    Case("cli-validate-max-tokens-negative", lambda w: ["validate", str(w.root), "--max-tokens", "-3"], 2, "--max-tokens -3 is not in the range 2.."),
    Case("cli-validate-max-tokens-1", lambda w: ["validate", str(w.root), "--max-tokens", "1"], 2, "is not in the range"),
    Case("cli-prune-nan", lambda w: ["cache", "prune", "--max-mb", "nan"], 2, "--max-mb must be a finite number"),
    Case("cli-prune-negative", lambda w: ["cache", "prune", "--max-mb", "-1"], 2, "--max-mb -1.0 is not in the range"),
    # ---- issue 18: texts, manifests, environments ----
    Case("eval-fifo", lambda w: w.build("--eval", _fifo(w)), 2, "is not a regular file"),
    Case("eval-dev-zero", lambda w: w.build("--eval", "/dev/zero"), 2, "is not a regular file"),
    Case("art-manifest-nested-40", lambda w: _art(w, _deep_manifest(w.artifact())), 2, "nests deeper than 32 levels"),
    Case("env-cache-is-a-file", lambda w: w.build(), 2, "set EDGEPIPE_CACHE to a writable folder", env=(("EDGEPIPE_CACHE", "/etc/hostname/cache"),)),
    Case("env-cache-in-proc", lambda w: w.build(), 2, "set EDGEPIPE_CACHE to a writable folder", env=(("EDGEPIPE_CACHE", "/proc/edgepipe-cache"),)),
    # ---- issue 18: a folder, a FIFO or a device where a file belongs (a FIFO used to block the build for good) ----
    Case("model-weights-fifo", lambda w: w.build(model=_with(w.model(), lambda m: _replace(m / "model.safetensors", "fifo"))), 2,
         "model.safetensors is not a regular file"),
    Case("model-weights-folder", lambda w: w.build(model=_with(w.model(), lambda m: _replace(m / "model.safetensors", "dir"))), 2,
         "model.safetensors is not a regular file"),
    Case("model-tokenizer-fifo", lambda w: w.build(model=_with(w.model(), lambda m: _replace(m / "tokenizer.json", "fifo"))), 2,
         "tokenizer.json is not a regular file"),
    Case("model-config-folder", lambda w: w.build(model=_with(w.model(), lambda m: _replace(m / "config.json", "dir"))), 2,
         "config.json is not a regular file"),
    Case("target-fifo", lambda w: w.build(target=_fifo(w, "t.yaml")), 2, "t.yaml is not a regular file"),
    Case("target-folder", lambda w: w.build(target=str(_with(w.root / "t.yaml", lambda p: p.mkdir()))), 2, "t.yaml is not a regular file"),
    Case("sign-key-fifo", lambda w: w.build("--sign", _fifo(w, "key.pem")), 2, "signing key"),
    Case("trusted-keys-fifo", lambda w: ["verify", str(w.artifact()), "--trusted-keys", _fifo(w, "keys.pem")], 2, "is not a regular file",
         env=(("EDGEPIPE_TRUSTED_KEYS", None),)),  # --trusted-keys sets it for the process: restored after the case
    Case("serve-api-key-fifo", lambda w: ["serve", str(w.artifact()), "--api-key-file", _fifo(w, "key.txt"), "--port", "1"], 2,
         "--api-key-file"),
    Case("validate-eval-fifo", lambda w: ["validate", str(w.artifact()), "--eval", _fifo(w)], 2, "is not a regular file"),
    # ---- issue 18: names too long for the filesystem (Path.exists raises ENAMETOOLONG instead of saying no) ----
    Case("out-name-too-long", lambda w: w.build("--out", str(w.root / ("o" * 300))), 2, "is too long for the filesystem"),
    Case("model-name-too-long", lambda w: w.build(model=w.root / ("m" * 300)), 2, "is too long for the filesystem"),
    Case("verify-name-too-long", lambda w: ["verify", str(w.root / ("a" * 300))], 2, "is too long for the filesystem"),
    Case("eval-name-too-long", lambda w: w.build("--eval", str(w.root / ("e" * 300))), 2, "File name too long"),
    Case("target-name-too-long", lambda w: w.build(target=str(w.root / ("t" * 300)) + ".yaml"), 2, "does not exist"),
    # ---- issue 18: an artifact holds only what its manifest lists (plus manifest.json and model.sig) ----
    Case("art-unlisted-file", lambda w: _art(w, _with(w.artifact(), lambda a: (a / "notes.txt").write_text("mine"))), 2,
         "notes.txt is in"),
    Case("art-unlisted-file-run", lambda w: _art(w, _with(w.artifact(), lambda a: (a / "evil.so").write_bytes(b"\x7fELF")), "run"), 2,
         "evil.so is in"),
    Case("art-unlisted-in-subfolder", lambda w: _art(w, _with(w.artifact(), lambda a: ((a / "sub").mkdir(), (a / "sub" / "x.onnx").write_text("x")))), 2,
         "sub/x.onnx is in"),
    Case("art-unlisted-symlinked-folder", lambda w: _art(w, _with(w.artifact(), lambda a: (a / "linked").symlink_to(w.root))), 2,
         "linked is in"),
    Case("art-unlisted-fifo", lambda w: _art(w, _with(w.artifact(), lambda a: os.mkfifo(a / "pipe"))), 2, "pipe is in"),
    Case("art-unlisted-two", lambda w: _art(w, _with(w.artifact(), lambda a: ((a / "a.txt").write_text("1"), (a / "b.txt").write_text("2")))), 2,
         "a.txt (and 1 more) is in"),
    Case("art-half-signature", lambda w: _art(w, _with(w.artifact(), lambda a: (a / "model.sig.tmp").write_text("{"))), 2,
         "model.sig.tmp is in"),
]


def _genai_filename(a: Path, name: str) -> Path:
    from edgepipe.runtime.manifest import file_entries

    cfg = json.loads((a / "genai_config.json").read_text())
    cfg["model"]["decoder"]["filename"] = name
    (a / "genai_config.json").write_text(json.dumps(cfg))
    m = json.loads((a / "manifest.json").read_text())
    m["files"] = file_entries(a)
    (a / "manifest.json").write_text(json.dumps(m))
    return a


def test_table_is_large_enough():
    assert len(CASES) >= 40
    assert len({c.id for c in CASES}) == len(CASES)


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_bad_input(case: Case, tmp_path):
    built_artifact()  # the shared cache holds the tiny model's export: a bad eval text fails after it
    w = W(tmp_path)
    args = case.args(w)
    cache = shared_cache()
    before = tree_state(tmp_path) | tree_state(cache, hash_files=False)
    with env(EDGEPIPE_CACHE=str(cache)), env(**dict(case.env)):
        res = CliRunner().invoke(main, args, catch_exceptions=True)
    out = res.output
    assert res.exception is None or isinstance(res.exception, SystemExit), f"{res.exception!r} escaped:\n{out}"
    assert "Traceback" not in out
    assert res.exit_code == case.code, out
    assert case.message in out, out
    error_lines = [ln for ln in out.splitlines() if "error:" in ln.lower()]
    assert len(error_lines) == 1, out
    assert not w.out.exists() or case.id == "cli-out-not-artifact" or case.out_exists
    after = tree_state(tmp_path) | tree_state(cache, hash_files=False)
    assert after == before, "a refused input wrote, changed or removed files"


# ---- issue 18: unreadable files and unwritable folders ----
# The tests run as root, which reads a mode-000 file. The CLI runs here as root without the two
# capabilities that let root ignore permissions (CAP_DAC_OVERRIDE, CAP_DAC_READ_SEARCH; `setpriv`), so
# mode bits bind it as they bind any user, while everything it owns stays reachable (the stage cache,
# the Python install under /root). All cases run in one such process (CliRunner, one start-up).

NO_DAC = ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--inh-caps=-dac_override,-dac_read_search"]
READABLE_FIX = "make it readable by this user"


def _unreadable(path: Path) -> str:
    path.chmod(0)
    return str(path)


def _unwritable(folder: Path) -> Path:
    folder.mkdir()
    folder.chmod(0o555)
    return folder


UNREADABLE = [
    Case("unreadable-config", lambda w: w.build(model=_with(w.model(), lambda m: _unreadable(m / "config.json"))), 2,
         "cannot read model file"),
    Case("unreadable-weights", lambda w: w.build(model=_with(w.model(), lambda m: _unreadable(m / "model.safetensors"))), 2,
         "cannot read weights file"),
    Case("unreadable-tokenizer", lambda w: w.build(model=_with(w.model(), lambda m: _unreadable(m / "tokenizer.json"))), 2,
         "cannot read tokenizer file"),
    Case("unreadable-model-folder", lambda w: w.build(model=_with(w.model(), _unreadable)), 2, "is not readable"),
    Case("unreadable-target", lambda w: w.build(target=_unreadable(Path(w.target(GOOD_TARGET)))), 2, "cannot read target profile"),
    Case("unreadable-calib", lambda w: w.build("--calib", _unreadable(Path(w.file("c.txt", "text " * 200)))), 2, "is not readable"),
    Case("unreadable-eval", lambda w: w.build("--eval", _unreadable(Path(w.file("e.txt", "text " * 200)))), 2, "is not readable"),
    Case("unwritable-out-parent", lambda w: w.build("--out", str(_unwritable(w.root / "ro") / "out")), 2, "cannot create folders in"),
    Case("unreadable-out-artifact-manifest", lambda w: (_unreadable(_art_with(w, "manifest.json", "{}") / "manifest.json"), w.build())[1],
         2, "is not an edgepipe artifact", out_exists=True),
    Case("unreadable-artifact-file", lambda w: _art(w, _with(w.artifact(), lambda a: _unreadable(a / "model.onnx.data"))), 2,
         "cannot read artifact file"),
    Case("unreadable-artifact-manifest", lambda w: _art(w, _with(w.artifact(), lambda a: _unreadable(a / "manifest.json"))), 2,
         "cannot read manifest"),
    Case("unreadable-artifact-run", lambda w: _art(w, _with(w.artifact(), lambda a: _unreadable(a / "tokenizer.json")), "run"), 2,
         "cannot read artifact file"),
]

_DRIVER = """
import json, sys
from click.testing import CliRunner
from edgepipe.cli import main
out = []
for args in json.load(sys.stdin):
    res = CliRunner().invoke(main, args, catch_exceptions=True)
    escaped = res.exception is not None and not isinstance(res.exception, SystemExit)
    out.append({"code": res.exit_code, "output": res.output, "escaped": repr(res.exception) if escaped else None})
print(json.dumps(out))
"""


def _no_dac_works(tmp: Path) -> str | None:
    import shutil as sh
    import subprocess
    import sys

    if sh.which("setpriv") is None:
        return "setpriv is not installed"
    probe = tmp / "probe"
    probe.write_text("x")
    probe.chmod(0)
    r = subprocess.run([*NO_DAC, sys.executable, "-c", f"open({str(probe)!r}).read()"], capture_output=True, text=True)
    probe.chmod(0o600)
    return None if r.returncode != 0 and "PermissionError" in r.stderr else f"a mode-000 file stays readable here: {r.stderr[-200:]}"


def test_unreadable_inputs(tmp_path):
    """Each: exit 2, the one line names the file and says to fix its permissions (or click's
    "is not readable" for a path option), no traceback, and nothing written, changed or removed."""
    import subprocess
    import sys

    reason = _no_dac_works(tmp_path)
    if reason:
        pytest.skip(reason)
    built_artifact()
    cache = shared_cache()
    work = {c.id: W(tmp_path / c.id) for c in UNREADABLE}
    for w in work.values():
        w.root.mkdir()
    argv = [c.args(work[c.id]) for c in UNREADABLE]
    before = tree_state(tmp_path) | tree_state(cache, hash_files=False)
    r = subprocess.run([*NO_DAC, sys.executable, "-c", _DRIVER], input=json.dumps(argv), capture_output=True, text=True,
                       env=dict(os.environ, EDGEPIPE_CACHE=str(cache)), timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    results = json.loads(r.stdout.strip().splitlines()[-1])
    for case, res in zip(UNREADABLE, results, strict=True):
        out = res["output"]
        assert res["escaped"] is None and "Traceback" not in out, (case.id, res)
        assert res["code"] == case.code and case.message in out, (case.id, out)
        errors = [ln for ln in out.splitlines() if "error:" in ln.lower()]
        assert len(errors) == 1, (case.id, out)
        if case.message.startswith("cannot read"):
            assert READABLE_FIX in errors[0], (case.id, errors)
        w = work[case.id]
        assert not w.out.exists() or case.out_exists, case.id
    for p in tmp_path.rglob("*"):  # the test's own clean-up (and tree_state) may read them again
        if not p.is_symlink():
            p.chmod(0o755 if p.is_dir() else 0o644)
    after = tree_state(tmp_path) | tree_state(cache, hash_files=False)
    changed = {k for k in set(before) | set(after) if before.get(k) != after.get(k)}
    assert not changed, f"a refused input wrote, changed or removed files: {sorted(changed)[:5]}"
