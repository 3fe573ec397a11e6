"""Shared helpers of the reliability tests (test_reliability_*, test_bad_inputs, test_fuzz_parsers).

A tiny random Llama (hidden 64, 2 layers, 4 heads / 2 kv heads) with a byte-level BPE tokenizer
trained offline on the packaged calibration text, and one artifact built from it. Both are made
once per test session (memoized here, so every test module shares them) under a session temp dir.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
CALIB = ROOT / "edgepipe" / "data" / "calib.txt"
TARGET = "x86-avx2"
MODEL_FILES = ("model.onnx", "model.onnx.data", "reference.npz", "genai_config.json", "tokenizer.json")

_memo: dict[str, Any] = {}


@contextlib.contextmanager
def env(**values: str | None) -> Iterator[None]:
    old = {k: os.environ.get(k) for k in values}
    try:
        _set_env(values)
        yield
    finally:
        _set_env(old)


def _set_env(values: dict[str, str | None]) -> None:
    for k, v in values.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


def make_tiny_llama(out: Path, *, seed: int = 0) -> Path:
    """save_pretrained a tiny random LlamaForCausalLM + its fast tokenizer into ``out``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([CALIB.read_text(encoding="utf-8")], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(seed)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(fast), max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )
    LlamaForCausalLM(cfg).save_pretrained(out)
    fast.save_pretrained(out)
    return out


def session_root() -> Path:
    if "root" not in _memo:
        import tempfile

        _memo["root"] = Path(tempfile.mkdtemp(prefix="edgepipe-reliability-"))
        import atexit

        atexit.register(shutil.rmtree, _memo["root"], True)
    return _memo["root"]


def use_zoo(zoo: Any) -> None:
    """Use the session fixtures of tests/conftest.py (TinyZoo): its tiny Llama, its artifact, its cache."""
    if "zoo" not in _memo:
        _memo["zoo"] = zoo
        _memo["cache"] = Path(os.environ["EDGEPIPE_CACHE"])


def tiny_model() -> Path:
    if "zoo" in _memo:
        return _memo["zoo"].model("llama")
    if "model" not in _memo:
        _memo["model"] = make_tiny_llama(session_root() / "tiny-llama")
    return _memo["model"]


def shared_cache() -> Path:
    return _memo.get("cache") or session_root() / "cache"


def built_artifact() -> Path:
    """One artifact built in-process from the tiny model with the shared cache (export + quantize cached)."""
    if "zoo" in _memo:
        with env(EDGEPIPE_CACHE=str(shared_cache())):
            return _memo["zoo"].artifact("llama", TARGET)[0]
    if "artifact" not in _memo:
        from edgepipe.pipeline import build

        out = session_root() / "artifact"
        with env(EDGEPIPE_CACHE=str(shared_cache())):
            build(target=TARGET, out=out, model=tiny_model())
        _memo["artifact"] = out
    return _memo["artifact"]


def copy_artifact(dst: Path) -> Path:
    shutil.copytree(built_artifact(), dst)
    return dst


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tree_state(*roots: Path, hash_files: bool = True) -> dict[str, tuple[int, str]]:
    """Every regular file under ``roots`` -> (size, sha256), plus every folder -> (-1, '').

    Folder mtimes are ignored (a cache hit touches its entry); with ``hash_files=False`` a file's
    mtime stands in for its hash (for a large stage cache)."""
    state: dict[str, tuple[int, str]] = {}
    for root in roots:
        if not root.exists():
            continue
        for p in sorted(root.rglob("*")):
            key = str(p)
            if p.is_symlink():
                state[key] = (-2, os.readlink(p))
            elif p.is_file():
                st = p.stat()
                state[key] = (st.st_size, sha256(p) if hash_files else str(st.st_mtime_ns))
            elif p.is_dir():
                state[key] = (-1, "")
    return state


def run_cli(*args: str, cache: Path | None = None, timeout: float = 300, cwd: Path | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    if cache is not None:
        e["EDGEPIPE_CACHE"] = str(cache)
    return subprocess.run(
        [sys.executable, "-m", "edgepipe.cli", *args], capture_output=True, text=True, env=e, timeout=timeout, cwd=cwd
    )


def can_mount_tmpfs() -> str | None:
    """None when this process may mount a tmpfs, else the reason it may not."""
    if "mount" in _memo:
        return _memo["mount"]
    reason = None
    if os.geteuid() != 0:
        reason = "mounting a tmpfs needs root"
    elif shutil.which("mount") is None:
        reason = "no mount command"
    else:
        probe = session_root() / "mount-probe"
        probe.mkdir(exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(probe)], capture_output=True, text=True)
        if r.returncode != 0:
            reason = f"mount -t tmpfs is not permitted here: {r.stderr.strip()[:200]}"
        else:
            subprocess.run(["umount", str(probe)], check=False)
    _memo["mount"] = reason
    return reason


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """Mount a tmpfs of ``size`` (e.g. "2m") at ``path``; unmount on exit."""
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


def fill_disk(where: Path, leave_bytes: int) -> Path:
    """Write a filler file so that about ``leave_bytes`` stay free on ``where``'s filesystem."""
    free = shutil.disk_usage(where).free
    filler = where / "filler.bin"
    with open(filler, "wb") as f:
        todo = max(free - leave_bytes, 0)
        chunk = b"\0" * (1 << 16)
        while todo > 0:
            try:
                f.write(chunk[: min(len(chunk), todo)])
                f.flush()
            except OSError:
                break
            todo -= min(len(chunk), todo)
    return filler


def start_build(model: Path, target: str | Path, out: Path, cache: Path, *, prelude: str = "") -> subprocess.Popen:
    """``edgepipe build`` in its own process group and stage cache (so a test can SIGKILL all of it).
    ``prelude``: Python run in the build process before the CLI starts (to time a signal exactly)."""
    e = dict(os.environ, EDGEPIPE_CACHE=str(cache))
    cli = ["-c", prelude + "\nfrom edgepipe.cli import main\nmain()\n"] if prelude else ["-m", "edgepipe.cli"]
    return subprocess.Popen(
        [sys.executable, *cli, "build", "--model", str(model), "--target", str(target), "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=e, start_new_session=True,
    )


def kill_when(proc: subprocess.Popen, cond: Any, what: str, timeout: float = 300) -> None:
    """SIGKILL the build's whole process group (build + export subprocess) as soon as ``cond()``."""
    import signal
    import time

    import pytest

    t0 = time.time()
    while not cond():
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(f"the build ended (exit {proc.returncode}) before {what}: {err[-2000:]}")
        if time.time() - t0 > timeout:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.communicate()
    assert proc.returncode == -signal.SIGKILL
