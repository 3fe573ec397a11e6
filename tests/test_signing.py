"""Signed artifacts (OpenSSF model-signing format, private keys): keygen, sign, the device's policy.

Each refusal has its own one-line reason; ``model_signing``'s own verifier agrees with ours, in
both directions (it checks our signatures, we check its)."""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from edgepipe.cli import main
from edgepipe.errors import ArtifactError, InputError, SignatureError
from edgepipe.package.signing import keygen, sign_artifact
from edgepipe.runtime.artifact import open_artifact
from edgepipe.runtime.manifest import check_artifact, sha256_file, verify_artifact
from edgepipe.runtime.signing import ENV_TRUSTED_KEYS, SIGNATURE_NAME, trusted_keys


@pytest.fixture(autouse=True)
def _no_device_keys(monkeypatch, tmp_path):
    """No test sees this machine's own trusted-keys folders."""
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv(ENV_TRUSTED_KEYS, "")  # recorded, so what --trusted-keys sets is undone after the test
    monkeypatch.delenv(ENV_TRUSTED_KEYS)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    return keygen(d / "release.key"), keygen(d / "other.key")


@pytest.fixture()
def signed(llama_artifact, keys, tmp_path) -> Path:
    art = tmp_path / "art"
    shutil.copytree(llama_artifact, art)
    sign_artifact(art, keys[0].private)
    return art


def _forge(art: Path) -> None:
    """The issue's forgery: flip 4 KiB in the middle of model.onnx.data and recompute its sha256 in manifest.json."""
    data = art / "model.onnx.data"
    blob = bytearray(data.read_bytes())
    mid = len(blob) // 2
    blob[mid : mid + 4096] = bytes(b ^ 0xFF for b in blob[mid : mid + 4096])
    data.write_bytes(bytes(blob))
    m = json.loads((art / "manifest.json").read_text())
    m["files"]["model.onnx.data"]["sha256"] = hashlib.sha256(bytes(blob)).hexdigest()
    (art / "manifest.json").write_text(json.dumps(m, indent=2))


def test_keygen_writes_a_p256_pair(keys):
    pair = keys[0]
    assert pair.private.stat().st_mode & 0o777 == 0o600
    assert pair.public.read_text().startswith("-----BEGIN PUBLIC KEY-----")
    assert len(pair.key_id) == 64 and pair.key_id != keys[1].key_id
    with pytest.raises(InputError, match="exists"):
        keygen(pair.private)


def test_good_signature_accepted(signed, keys):
    m, sig = check_artifact(signed, trusted_keys=str(keys[0].public))
    assert sig.status == "verified" and sig.key_id == keys[0].key_id and m.files
    # a folder of keys, or the environment variable, work the same way
    assert check_artifact(signed, trusted_keys=str(keys[0].public.parent))[1].status == "verified"
    keys_env = {ENV_TRUSTED_KEYS: str(keys[0].public)}
    assert trusted_keys(environ=keys_env).files == (keys[0].public,)


def test_refusals_each_say_why(signed, keys, tmp_path):
    trust = str(keys[0].public)
    reasons = {}

    modified = tmp_path / "modified"
    shutil.copytree(signed, modified)
    with open(modified / "model.onnx.data", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02\x03")
    reasons["modified"] = "does not match its sha256 in the manifest"

    forged = tmp_path / "forged"
    shutil.copytree(signed, forged)
    _forge(forged)
    reasons["forged"] = "manifest was rewritten after signing"

    other = tmp_path / "other"
    shutil.copytree(signed, other)
    sign_artifact(other, keys[1].private)
    reasons["other"] = "which this device does not trust"

    unsigned = tmp_path / "unsigned"
    shutil.copytree(signed, unsigned)
    (unsigned / SIGNATURE_NAME).unlink()
    reasons["unsigned"] = "is not signed (no model.sig)"

    older = tmp_path / "older"  # the signature of an earlier build of the same files
    shutil.copytree(signed, older)
    m = json.loads((older / "manifest.json").read_text())
    m["created"] = "2099-01-01T00:00:00Z"
    (older / "manifest.json").write_text(json.dumps(m, indent=2))
    reasons["older"] = "the signature is over an older or other manifest"

    extra = tmp_path / "extra"
    shutil.copytree(signed, extra)
    (extra / "evil.so").write_bytes(b"\x7fELF")
    reasons["extra"] = "evil.so is in"

    messages = set()
    for case, needle in reasons.items():
        with pytest.raises(ArtifactError) as info:
            verify_artifact(tmp_path / case, trusted_keys=trust)
        msg = str(info.value)
        assert needle in msg and "\n" not in msg, (case, msg)
        messages.add(msg.replace(str(tmp_path / case), "ART"))
        if case != "modified":
            assert isinstance(info.value, SignatureError)
    assert len(messages) == len(reasons)


def test_forged_artifact_refused_by_the_cli_before_loading(signed, keys, monkeypatch):
    """The issue's forgery passes the hashes; the signature catches it, in run and verify alike (exit 2)."""
    _forge(signed)
    runner = CliRunner()
    ok = runner.invoke(main, ["verify", str(signed), "--trusted-keys", ""])
    assert ok.exit_code == 0 and "unsigned" not in ok.output and "not checked" in ok.output
    for args in (["verify", str(signed)], ["run", str(signed), "--prompt", "hi", "--max-new-tokens", "2"]):
        res = runner.invoke(main, [*args, "--trusted-keys", str(keys[0].public)])
        assert res.exit_code == 2, res.output
        assert "rewritten after signing" in res.output and "Traceback" not in res.output
    monkeypatch.setenv(ENV_TRUSTED_KEYS, str(keys[0].public))
    proc = subprocess.run([sys.executable, "-m", "edgepipe.runtime", "run", str(signed), "--prompt", "hi"], capture_output=True, text=True)
    assert proc.returncode == 2 and proc.stdout == "" and "rewritten after signing" in proc.stderr


def test_without_trusted_keys_it_runs_and_says_unsigned(llama_artifact, caplog):
    caplog.set_level(logging.WARNING)
    lm, m = open_artifact(llama_artifact, generates=True)
    assert lm is not None
    assert any("unsigned" in r.getMessage() for r in caplog.records)
    res = CliRunner().invoke(main, ["verify", str(llama_artifact)])
    assert res.exit_code == 0 and res.output.strip().endswith("files verified)")
    proc = subprocess.run([sys.executable, "-m", "edgepipe.runtime", "verify", str(llama_artifact)], capture_output=True, text=True)
    assert proc.returncode == 0 and json.loads(proc.stdout)["signature"] == "unsigned"


def test_cli_keygen_sign_verify(llama_artifact, tmp_path):
    runner = CliRunner()
    res = runner.invoke(main, ["keygen", "--out", str(tmp_path / "k")])
    assert res.exit_code == 0 and (tmp_path / "k.pub").is_file(), res.output
    art = tmp_path / "art"
    shutil.copytree(llama_artifact, art)
    res = runner.invoke(main, ["sign", str(art), "--key", str(tmp_path / "k"), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert doc["signature"] == str(art / SIGNATURE_NAME) and doc["files"] == len(json.loads((art / "manifest.json").read_text())["files"]) + 1
    res = runner.invoke(main, ["verify", str(art), "--trusted-keys", str(tmp_path / "k.pub")])
    assert res.exit_code == 0 and "signed by trusted key" in res.output
    bad = runner.invoke(main, ["sign", str(art), "--key", str(tmp_path / "k.pub")])
    assert bad.exit_code == 2 and "private key" in bad.output
    missing = runner.invoke(main, ["verify", str(art), "--trusted-keys", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "does not exist" in missing.output


def test_model_signing_agrees(signed, keys, tmp_path):
    """model_signing (the reference implementation) accepts our signatures and refuses the same
    forgeries; we accept its signatures."""
    ms = pytest.importorskip("model_signing")

    def theirs(art: Path, pub: Path) -> bool:
        try:
            ms.verifying.Config().use_elliptic_key_verifier(public_key=pub).verify(art, art / SIGNATURE_NAME)
        except Exception:  # ValueError for a mismatch, cryptography's InvalidSignature for a bad signature
            return False
        return True

    def ours(art: Path, pub: Path) -> bool:
        try:
            verify_artifact(art, trusted_keys=str(pub))
        except ArtifactError:
            return False
        return True

    good, other = keys[0].public, keys[1].public
    assert theirs(signed, good) and ours(signed, good)
    assert not theirs(signed, other) and not ours(signed, other)
    forged = tmp_path / "forged"
    shutil.copytree(signed, forged)
    _forge(forged)
    assert not theirs(forged, good) and not ours(forged, good)

    by_them = tmp_path / "by-them"
    shutil.copytree(signed, by_them)
    (by_them / SIGNATURE_NAME).unlink()
    hashing = ms.hashing.Config().set_ignored_paths(paths=[SIGNATURE_NAME])
    ms.signing.Config().use_elliptic_key_signer(private_key=keys[0].private).set_hashing_config(hashing).sign(
        by_them, by_them / SIGNATURE_NAME
    )
    assert ours(by_them, good) and not ours(by_them, other) and theirs(by_them, good)
    assert sha256_file(by_them / "manifest.json") == sha256_file(signed / "manifest.json")
