"""The runner base (edgepipe/devices/base.py) with real transports on this host.

The base owns the checks, the host-side verification before a transport ships files, the device
entry's command, reading its JSON, mapping failures to one-line typed errors and the claims. The
transports here are real: the local one, a local one that "ships" the artifact to another folder,
and ones whose device Python runs a small program instead of the entry (to make it fail in each
way a device can).
"""

from __future__ import annotations

import ast
import hashlib
import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from edgepipe.devices import Claims, Runner, get_runner
from edgepipe.devices.base import Job, Placed, Progress
from edgepipe.devices.local import CLAIMS, LocalRunner, run_entry
from edgepipe.devices.remote import program, with_call
from edgepipe.errors import ArtifactError, DeviceError, InputError

REMOTE = Path(__file__).resolve().parents[1] / "edgepipe" / "devices" / "remote"


class FolderRunner(LocalRunner):
    """The host CPU reading the artifact from another folder: a transport that ships files."""

    ships = True

    def __init__(self, device_dir: Path):
        self.device_dir = device_dir
        self.copied: list[str] = []

    def copy(self, job: Job, session: None, say: Progress) -> Placed:
        for rel in sorted(job.files or {}):
            (self.device_dir / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(job.artifact / rel, self.device_dir / rel)
            self.copied.append(rel)
        return Placed(str(self.device_dir), str(job.eval_file) if job.eval_file else None)


class ProgramRunner(Runner[None]):
    """A device whose Python runs ``code`` (whatever the arguments): how an entry fails, on demand."""

    name = "program"
    where = "in a test program"
    claims = Claims("nothing", throughput=True, on_board=False)

    def __init__(self, code: str):
        self.code = code

    def provision(self, job: Job, say: Progress) -> None:
        return None

    def run(self, session: None, args: Sequence[str], say: Progress) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-c", self.code, *args], capture_output=True, text=True)


class NoBenchRunner(LocalRunner):
    """The host CPU stating that its timings mean nothing (as the emulator does)."""

    claims = Claims("accuracy only", throughput=False, on_board=False)


def test_command_and_claims_per_transport():
    local, qemu, ssh = get_runner("local"), get_runner("qemu:cortex-a76"), get_runner("ssh://pi@board:2222")
    assert local.command(Placed("/a", "/e.txt"), 32) == [
        "-m", "edgepipe.runtime", "validate", "/a", "--json", "--eval", "/e.txt", "--max-tokens", "32",
    ]  # fmt: skip
    # emulated timings mean nothing: no benchmark
    assert qemu.command(Placed("/a"), None) == ["-m", "edgepipe.runtime", "validate", "/a", "--json", "--no-bench"]
    assert ssh.command(Placed("/b/art"), 64) == ["-m", "edgepipe.runtime", "validate", "/b/art", "--json", "--max-tokens", "64"]
    assert (local.claims.throughput, local.claims.on_board) == (True, False) and "host's CPU" in local.claims.text
    assert (qemu.claims.throughput, qemu.claims.on_board) == (False, False) and "emulat" in qemu.claims.text
    assert (ssh.claims.throughput, ssh.claims.on_board) == (True, True) and ssh.claims.text.endswith("board")
    assert (local.ships, qemu.ships, ssh.ships) == (False, False, True)
    assert all(isinstance(r, Runner) for r in (local, qemu, ssh))


def test_local_validate(llama_artifact):
    said: list[str] = []
    res = LocalRunner().validate(llama_artifact, max_tokens=32, progress=said.append)
    assert res["runner"] == "local" and res["claims"] == CLAIMS.text
    assert res["artifact"] == str(llama_artifact.resolve()) and res["verified"] is True
    assert res["accuracy"]["eval_tokens"] <= 32 and res["accuracy"]["perplexity"] > 0
    assert res["throughput"]["decode_tok_s"] > 0 and res["device"]["machine"]
    assert said == ["validating on the host CPU"]


def test_no_throughput_claim_skips_the_benchmark(llama_artifact):
    res = NoBenchRunner().validate(llama_artifact, max_tokens=16)
    assert "throughput" not in res and res["accuracy"]["perplexity"] > 0 and res["claims"] == "accuracy only"


def test_shipping_transport_gets_a_verified_artifact(llama_artifact, tmp_path):
    runner = FolderRunner(tmp_path / "device")
    said: list[str] = []
    res = runner.validate(llama_artifact, max_tokens=16, progress=said.append)
    manifest = json.loads((llama_artifact / "manifest.json").read_text())
    assert sorted(runner.copied) == sorted([*manifest["files"], "manifest.json"])
    assert res["artifact"] == str(llama_artifact.resolve()) and res["accuracy"]["perplexity"] > 0
    assert said[0] == "verifying the artifact on the host before copying"

    # a damaged file is refused on the host, before anything is copied
    damaged = tmp_path / "damaged"
    shutil.copytree(llama_artifact, damaged)
    data = damaged / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    runner = FolderRunner(tmp_path / "device2")
    with pytest.raises(ArtifactError, match="model.onnx.data does not match its sha256"):
        runner.validate(damaged)
    assert runner.copied == [] and not (tmp_path / "device2").exists()


def test_bad_inputs_before_the_device(tmp_path, llama_artifact):
    runner = ProgramRunner("raise SystemExit('never run')")
    with pytest.raises(InputError, match="does not exist"):
        runner.validate(tmp_path / "nope")
    with pytest.raises(InputError, match="eval file .* does not exist"):
        runner.validate(llama_artifact, eval_file=tmp_path / "nope.txt")
    with pytest.raises(InputError, match="at least 2"):
        runner.validate(llama_artifact, max_tokens=1)


def test_entry_failures_map_to_one_line_errors(tmp_path, llama_artifact):
    # the real entry on this host: an edgepipe error (exit 2) is an ArtifactError named after the device
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ArtifactError) as info:
        LocalRunner().validate(empty)
    assert str(info.value).startswith("validation on the host: ") and "\n" not in str(info.value)
    short = tmp_path / "short.txt"
    short.write_text("a", encoding="utf-8")
    with pytest.raises(ArtifactError, match="^validation on the host: the eval text has fewer than 2 tokens"):
        LocalRunner().validate(llama_artifact, eval_file=short)

    # an edgepipe error with another exit code is a DeviceError
    code = "import sys; print('loading'); print('error: out of disk on the device', file=sys.stderr); sys.exit(1)"
    with pytest.raises(DeviceError) as info:
        ProgramRunner(code).validate(llama_artifact)
    assert not isinstance(info.value, ArtifactError)
    assert str(info.value) == "validation in a test program: out of disk on the device"
    # a crash, or no JSON at all: a DeviceError naming the exit code and the last line
    code = "import sys; sys.stderr.write('Traceback (most recent call last):\\nImportError: no numpy\\n'); sys.exit(1)"
    with pytest.raises(DeviceError, match=r"^`python -m edgepipe.runtime validate` in a test program exited 1: ImportError: no numpy$"):
        ProgramRunner(code).validate(llama_artifact)
    with pytest.raises(DeviceError, match=r"exited 0: not json$"):
        ProgramRunner("print('not json')").validate(llama_artifact)
    # the entry's JSON after stray lines is the result; the base adds artifact, runner and claims
    code = "import json, sys; print('warming up'); print(json.dumps({'verified': True, 'args': sys.argv[1:]}))"
    res = ProgramRunner(code).validate(llama_artifact, max_tokens=8)
    assert res["args"] == ["-m", "edgepipe.runtime", "validate", str(llama_artifact.resolve()), "--json", "--max-tokens", "8"]
    assert (res["runner"], res["claims"], res["device"]) == ("program", "nothing", {})


def test_run_entry_bench_errors(tmp_path):
    with pytest.raises(ArtifactError, match="^bench: "):
        run_entry([sys.executable, "-m", "edgepipe.runtime", "bench", str(tmp_path), "--json"], "bench")


# --------------------------------------------------------------------------- remote programs


def test_remote_programs_use_the_standard_library_only():
    names = sorted(p.stem for p in REMOTE.glob("*.py") if p.stem != "__init__")
    assert {"board_probe", "file_hashes", "install_venv", "make_dir", "guest_probe"} <= set(names)
    for name in names:
        tree = ast.parse(program(name))
        imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert imported - {"onnxruntime"} <= sys.stdlib_module_names, (name, imported)
        assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body), name


def _send(name: str, args: dict) -> dict:
    """What the ssh transport does, without ssh: the program on ``python3 -``'s stdin, isolated."""
    proc = subprocess.run([sys.executable, "-I", "-"], input=with_call(name, args), capture_output=True, text=True, check=True)
    return json.loads(proc.stdout)


def test_remote_programs_run_as_sent(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "x.bin").write_bytes(b"edgepipe")
    got = _send("file_hashes", {"dir": str(tmp_path), "files": ["a/x.bin", "missing"]})
    assert got == {"hashes": {"a/x.bin": hashlib.sha256(b"edgepipe").hexdigest(), "missing": None}}

    # the probe seeds a file another artifact folder on the board holds with the same sha256
    sha = hashlib.sha256(b"weights").hexdigest()
    other = tmp_path / "base" / "artifacts" / "old"
    other.mkdir(parents=True)
    (other / "model.bin").write_bytes(b"weights")
    (other / "manifest.json").write_text(json.dumps({"files": {"model.bin": {"sha256": sha}}}))
    probe = _send("board_probe", {"base": str(tmp_path / "base"), "artifact": "new", "files": {"model.bin": sha, "manifest.json": "0" * 64}, "eval": None})
    assert probe["seeded"] == ["model.bin"] and probe["hashes"] == {"model.bin": sha, "manifest.json": None}
    assert (tmp_path / "base" / "artifacts" / "new" / "model.bin").read_bytes() == b"weights"
    assert probe["python"] == f"{sys.version_info[0]}.{sys.version_info[1]}" and probe["venvs"] == {} and probe["ram_total_mb"] > 0

    _send("make_dir", {"d": str(tmp_path / "deep" / "er")})
    assert (tmp_path / "deep" / "er").is_dir()
    guest = _send("guest_probe", {})
    assert guest["machine"] and guest["onnxruntime"].split(".")[0].isdigit()
