"""Deploy, health check, interruption and rollback over SSH, against the loopback OpenSSH server of
tests/test_ssh.py (this machine is the board; its runtime venv is the one test_ssh keeps).

- ``test_deploy_and_rollback`` (default suite): two versions, ``deployments`` (--json), rollback.
- ``test_broken_artifact_keeps_the_old_version``: a model that cannot load fails the board's health
  check; ``current`` does not move and the next deploy cleans its folder up.
- ``test_interrupted_deploys_keep_the_old_version`` (slow): ``edgepipe deploy`` killed mid-copy (the
  copy slowed down by an rsync that is rate-limited), during the health check and at the switch.
- ``test_board_with_trusted_keys`` (slow): a board whose sshd sets ``EDGEPIPE_TRUSTED_KEYS`` refuses an
  unsigned artifact and takes the signed one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from serve_support import ask_server
from test_ssh import Sshd, needs_sshd, sshd, test_cache, tiny_artifact  # noqa: F401  (fixtures)

from edgepipe.cli import main
from edgepipe.devices.deploy import deploy, deployments, rollback
from edgepipe.errors import ArtifactError, DeviceError, InputError

ROOT = Path(__file__).resolve().parents[1]


def _variant(src: Path, dest: Path, note: str) -> Path:
    """The same model files under a new manifest (a rebuild): a new version to deploy."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest)
    m = json.loads((dest / "manifest.json").read_text())
    m["note"] = note
    (dest / "manifest.json").write_text(json.dumps(m, indent=2))
    return dest


def _break_model(src: Path, dest: Path) -> Path:
    """An artifact whose model file is garbage but whose manifest lists its hash: it verifies, and cannot load."""
    shutil.rmtree(dest, ignore_errors=True)
    shutil.copytree(src, dest)
    (dest / "model.onnx").write_bytes(b"not an onnx model" * 64)
    m = json.loads((dest / "manifest.json").read_text())
    m["files"]["model.onnx"] = {"sha256": hashlib.sha256((dest / "model.onnx").read_bytes()).hexdigest(), "size": 17 * 64}
    (dest / "manifest.json").write_text(json.dumps(m, indent=2))
    return dest


def _current(root: Path) -> str | None:
    link = root / "current"
    return os.readlink(link).rsplit("/", 1)[-1] if link.is_symlink() else None


@pytest.fixture()
def board(test_cache: Path, request) -> Path:  # noqa: F811
    b = test_cache / "board"
    shutil.rmtree(b / "deploy" / request.node.name, ignore_errors=True)
    return b


@needs_sshd
def test_deploy_and_rollback(sshd, tiny_artifact, board, tmp_path):  # noqa: F811
    spec = sshd.spec(remote_dir=board)
    name = "test_deploy_and_rollback"
    root = board / "deploy" / name
    said: list[str] = []
    first = deploy(tiny_artifact, spec, name=name, progress=said.append)
    assert first.previous is None and first.version.startswith("0001-") and _current(root) == first.version
    assert first.signature == "unsigned" and first.health["accuracy"]["host_top1_agreement"] >= 0.9
    assert any("health check" in m for m in said)
    assert (root / "current" / "manifest.json").read_bytes() == (tiny_artifact / "manifest.json").read_bytes()
    n_files = len(json.loads((tiny_artifact / "manifest.json").read_text())["files"]) + 1
    assert len(first.files_copied) == n_files

    v2 = _variant(tiny_artifact, tmp_path / "v2", "second build")
    second = deploy(v2, spec, name=name)
    assert second.version.startswith("0002-") and second.previous == first.version
    assert second.files_copied == ("manifest.json",)  # the model files were found on the board
    assert (root / "versions" / first.version).is_dir()  # the previous version stays
    assert not list((root / "incoming").iterdir())

    res = CliRunner().invoke(main, ["deployments", spec, "--json"])
    assert res.exit_code == 0, res.output
    dep = next(d for d in json.loads(res.output)["deployments"] if d["name"] == name)
    assert dep["current"] == second.version and [v["version"] for v in dep["versions"]] == [first.version, second.version]

    back = CliRunner().invoke(main, ["rollback", spec, "--name", name])
    assert back.exit_code == 0 and first.version in back.output, back.output
    assert _current(root) == first.version
    with pytest.raises(InputError, match="no version older"):
        rollback(spec, name=name)
    assert rollback(spec, name=name, to=second.version).current == second.version
    # the board runs what `current` names
    proc = subprocess.run([sys.executable, "-m", "edgepipe.runtime", "verify", str(root / "current")], capture_output=True, text=True)
    assert proc.returncode == 0 and json.loads(proc.stdout)["verified"] is True
    # and serves it from the venv the deploy made (jinja2 included: the chat template renders)
    venv_python = next(board.glob("venv-*/bin/python"))
    served = ask_server([str(venv_python), "-m", "edgepipe.runtime", "serve", str(root / "current"), "--port", "0"], "Emma Woodhouse")
    assert served["completion"] and served["chat_status"] == 200, served


@needs_sshd
def test_broken_artifact_keeps_the_old_version(sshd, tiny_artifact, board, tmp_path):  # noqa: F811
    spec = sshd.spec(remote_dir=board)
    name = "test_broken_artifact_keeps_the_old_version"
    root = board / "deploy" / name
    good = deploy(tiny_artifact, spec, name=name)
    broken = _break_model(tiny_artifact, tmp_path / "broken")
    res = CliRunner().invoke(main, ["deploy", str(broken), spec, "--name", name])
    assert res.exit_code in (1, 2) and "health check" in res.output and f"stays on {good.version}" in res.output, res.output
    assert _current(root) == good.version and [p.name for p in (root / "versions").iterdir()] == [good.version]
    assert len(list((root / "incoming").iterdir())) == 1  # kept until the next deploy
    again = deploy(_variant(tiny_artifact, tmp_path / "v2", "fixed"), spec, name=name)
    assert again.cleaned and not list((root / "incoming").iterdir()) and again.previous == good.version
    assert deployments(spec, name=name)[0]["current"] == again.version


def _throttled_rsync(folder: Path) -> Path:
    """An ``rsync`` on PATH that is the real one at 20 kB/s, so a copy lasts long enough to be cut."""
    folder.mkdir(parents=True, exist_ok=True)
    shim = folder / "rsync"
    shim.write_text(f"#!/bin/sh\nexec {shutil.which('rsync')} --bwlimit=20 \"$@\"\n")
    shim.chmod(0o755)
    return folder


def _deploy_until(spec: str, artifact: Path, name: str, marker: str, env: dict[str, str], delay: float = 0.0) -> str:
    """Start ``edgepipe deploy``, kill it (SIGKILL, as a dropped link or a power cut would) once its
    progress prints ``marker`` (after ``delay``), and return what it printed."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "edgepipe.cli", "deploy", str(artifact), spec, "--name", name],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, start_new_session=True,
    )  # fmt: skip
    seen = []
    assert proc.stdout is not None
    for line in proc.stdout:
        seen.append(line)
        if marker in line:
            time.sleep(delay)
            os.killpg(proc.pid, signal.SIGKILL)
            break
    proc.wait(timeout=60)
    return "".join(seen)


@needs_sshd
@pytest.mark.slow
def test_interrupted_deploys_keep_the_old_version(sshd, tiny_artifact, board, tmp_path):  # noqa: F811
    spec = sshd.spec(remote_dir=board)
    name = "test_interrupted_deploys_keep_the_old_version"
    root = board / "deploy" / name
    good = deploy(tiny_artifact, spec, name=name)
    new = tmp_path / "new"
    shutil.copytree(tiny_artifact, new)
    extra = new / "extra.bin"  # a file that is not on the board yet, big enough to be cut off mid-copy
    extra.write_bytes(os.urandom(300_000))
    m = json.loads((new / "manifest.json").read_text())
    m["files"]["extra.bin"] = {"sha256": hashlib.sha256(extra.read_bytes()).hexdigest(), "size": extra.stat().st_size}
    (new / "manifest.json").write_text(json.dumps(m, indent=2))
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGEPIPE_CACHE": os.environ["EDGEPIPE_CACHE"]}
    slow_env = {**env, "PATH": f"{_throttled_rsync(tmp_path / 'bin')}{os.pathsep}{env['PATH']}"}

    out = _deploy_until(spec, new, name, " files (", slow_env, delay=3.0)  # mid-copy
    assert _current(root) == good.version, out
    (inc,) = (root / "incoming").iterdir()
    assert (inc / "model.onnx.data").is_file(), out  # seeded on the board from the current version
    cut = inc / "extra.bin"  # the one file that had to travel, cut off
    assert not cut.is_file() or cut.read_bytes() != extra.read_bytes(), out
    for marker, delay in (("health check", 0.5), ("switching", 0.0)):
        out = _deploy_until(spec, new, name, marker, env, delay)
        assert marker in out
        cur = _current(root)
        if marker == "health check":
            assert cur == good.version, out
        else:  # killed at the switch: the old or the new version, complete, never neither
            assert cur is not None and (root / "versions" / cur / "manifest.json").is_file()
    final = deploy(new, spec, name=name)
    assert _current(root) == final.version and (root / "versions" / good.version).is_dir()
    assert not list((root / "incoming").iterdir()) and not list(root.glob("current.*"))
    assert not (root / "current" / ".rsync-partial").exists()  # the resumed copy left nothing behind


@needs_sshd
@pytest.mark.slow
def test_board_with_trusted_keys(tiny_artifact, test_cache, tmp_path):  # noqa: F811
    from edgepipe.package.signing import keygen, sign_artifact

    pair = keygen(tmp_path / "release.key")
    keys = tmp_path / "board-keys"
    keys.mkdir()
    shutil.copy(pair.public, keys / "release.pub")
    server = Sshd(tmp_path / "sshd", f"SetEnv EDGEPIPE_TRUSTED_KEYS={keys}\n")
    try:
        spec = server.spec(remote_dir=test_cache / "board")
        name = "test_board_with_trusted_keys"
        shutil.rmtree(test_cache / "board" / "deploy" / name, ignore_errors=True)
        with pytest.raises(ArtifactError, match="is not signed"):
            deploy(tiny_artifact, spec, name=name)
        signed = tmp_path / "signed"
        shutil.copytree(tiny_artifact, signed)
        sign_artifact(signed, pair.private)
        done = deploy(signed, spec, name=name)
        assert done.signature == "verified" and done.version.startswith("0001-")
        with pytest.raises((ArtifactError, DeviceError)):
            deploy(_variant(signed, tmp_path / "resigned-not", "manifest changed after signing"), spec, name=name)
        assert deployments(spec, name=name)[0]["current"] == done.version
    finally:
        server.stop()
