"""The ssh device runner.

Fast tests: spec parsing, error classification, wheel platform tags and keys. The real tests
start Debian's OpenSSH server on 127.0.0.1 (a free port, host and client keys made here, a
known_hosts file written from the host key) and use this machine as the "board".

- ``test_validate_on_loopback_board`` (default suite): validate five times (again, after damaging a
  file on the board, a rebuilt artifact, with an eval file) and once with a failure on the board. Its host cache (the
  runner's wheels) and board folder are kept between sessions (``$EDGEPIPE_TEST_CACHE/ssh`` or
  ``$TMPDIR/edgepipe-ssh-test``; the board's venv is kept, its artifacts are not), so with cached
  wheels this takes ~20 s; the first run on a machine downloads the wheels (~50 MB), builds the
  checkout's wheel and creates the venv (~1-2 min), and a changed checkout reinstalls its wheel (~30 s).
- ``test_first_time_setup`` (slow): the same from nothing (empty host cache, empty board), over scp.

Needs ``ssh``, ``scp``, ``rsync`` and ``sshd``: ``bash .ci/ssh-deps.sh``.
"""

from __future__ import annotations

import fcntl
import getpass
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from edgepipe.devices import get_runner
from edgepipe.devices import provision as P
from edgepipe.devices import ssh as S
from edgepipe.devices import ssh_spec as SP
from edgepipe.errors import ArtifactError, DeviceError, InputError

SSHD = shutil.which("sshd") or ("/usr/sbin/sshd" if os.path.exists("/usr/sbin/sshd") else None)
HAVE_TOOLS = SSHD is not None and all(shutil.which(t) for t in ("ssh", "scp", "ssh-keygen"))
needs_sshd = pytest.mark.skipif(not HAVE_TOOLS, reason="OpenSSH server/client missing: bash .ci/ssh-deps.sh")


@pytest.fixture(autouse=True)
def _no_ssh_env(monkeypatch):
    for k in (SP.ENV_IDENTITY, SP.ENV_KNOWN_HOSTS, SP.ENV_REMOTE_DIR):
        monkeypatch.delenv(k, raising=False)


# --------------------------------------------------------------------------- fast


def test_spec_parsing(tmp_path):
    r = get_runner("ssh://pi@raspberrypi.local")
    assert isinstance(r, S.SshRunner) and r.name == "ssh"
    assert (r.spec.user, r.spec.host, r.spec.port) == ("pi", "raspberrypi.local", 22)
    assert r.spec.remote_dir == "~/.cache/edgepipe" and r.spec.identity is None and r.spec.known_hosts is None
    s = SP.parse_spec("ssh://root@10.0.0.5:2222")
    assert (s.user, s.host, s.port, str(s)) == ("root", "10.0.0.5", 2222, "ssh://root@10.0.0.5:2222")
    v6 = SP.parse_spec("ssh://pi@[fe80::1%eth0]:22")
    assert v6.host == "fe80::1%eth0" and v6.destination == "pi@fe80::1%eth0" and v6.remote_prefix == "pi@[fe80::1%eth0]:"
    key, kh = tmp_path / "id", tmp_path / "kh"
    key.write_text("k")
    kh.write_text("")
    q = SP.parse_spec(f"ssh://pi@board?identity={key}&known_hosts={kh}&dir=/opt/ep")
    assert (q.identity, q.known_hosts, q.remote_dir) == (str(key), str(kh), "/opt/ep")
    env = {SP.ENV_IDENTITY: str(key), SP.ENV_KNOWN_HOSTS: str(kh), SP.ENV_REMOTE_DIR: "edge"}
    e = SP.parse_spec("ssh://pi@board", environ=env)
    assert (e.identity, e.known_hosts, e.remote_dir) == (str(key), str(kh), "edge")
    assert SP.parse_spec("ssh://pi@board?dir=/x", environ=env).remote_dir == "/x"  # the query wins


@pytest.mark.parametrize(
    "spec, needle",
    [
        ("ssh://raspberrypi", "no user"),
        ("ssh://pi:secret@host", "password"),
        ("ssh://pi@host:0", "bad port"),
        ("ssh://pi@host:70000", "ssh://user@host[:port]"),
        ("ssh://pi@host:abc", "ssh://user@host[:port]"),
        ("ssh://pi@host:", "empty port"),
        ("ssh://pi@host/some/path", "no path"),
        ("ssh://pi@host#frag", "no path"),
        ("ssh://pi@ho_st", "bad host"),
        ("ssh://pi@-oProxyCommand=x", "bad host"),
        ("ssh://-oProxyCommand=x@host", "bad user"),
        ("ssh://@host", "bad user"),
        ("ssh://pi@", "bad host"),
        ("ssh://pi@host?port=22", "unknown option"),
        ("ssh://pi@host?dir=", "empty"),
        ("ssh://pi@host?dir=a&dir=b", "twice"),
        ("ssh://pi@host?identity=/nonexistent/key", "does not exist"),
        ("ssh://pi@host?known_hosts=/nonexistent/kh", "ssh-keyscan"),
        ("ssh://p i@host", "white space"),
        ("ssh:/pi@host", "ssh://user@host[:port]"),
    ],
)
def test_bad_specs(spec, needle):
    with pytest.raises(InputError) as info:
        SP.parse_spec(spec, environ={})
    msg = str(info.value)
    assert needle in msg and "\n" not in msg


def test_get_runner_raises_input_error():
    with pytest.raises(InputError, match="no user"):
        get_runner("ssh://board")


def test_ssh_command_options(tmp_path):
    key, kh = tmp_path / "id", tmp_path / "kh"
    key.write_text("k")
    kh.write_text("")
    r = S.SshRunner.from_spec(f"ssh://pi@board:2200?identity={key}&known_hosts={kh}")
    argv = r.ssh_command("python3 -")
    assert argv[:3] == ["ssh", "-p", "2200"] and argv[-3:] == ["--", "pi@board", "python3 -"]
    opts = " ".join(argv)
    for o in ("BatchMode=yes", "StrictHostKeyChecking=yes", f"-i {key}", "IdentitiesOnly=yes", f"UserKnownHostsFile={kh}"):
        assert o in opts
    with pytest.raises(InputError):
        S.SshRunner(r.spec, copy_method="ftp")


def test_classify_ssh_failure():
    spec = SP.parse_spec("ssh://pi@board.local:2222", environ={})
    unknown = SP.classify_ssh_failure(
        "No ED25519 host key is known for [board.local]:2222 and you have requested strict checking.\r\n"
        "Host key verification failed.\r\n",
        spec,
    )
    assert "ssh-keyscan -p 2222 board.local >> ~/.ssh/known_hosts" in unknown and "connect once" in unknown
    changed = SP.classify_ssh_failure("@@@ WARNING: REMOTE HOST IDENTIFICATION HAS CHANGED! @@@\nHost key verification failed.", spec)
    assert "CHANGED" in changed and "ssh-keygen" in changed
    auth = SP.classify_ssh_failure("pi@board.local: Permission denied (publickey).", spec)
    assert "authentication" in auth and "ssh-copy-id" in auth and SP.ENV_IDENTITY in auth
    refused = SP.classify_ssh_failure("ssh: connect to host board.local port 2222: Connection refused", spec)
    assert "cannot reach" in refused and "connection refused" in refused
    dns = SP.classify_ssh_failure("ssh: Could not resolve hostname board.local: Name or service not known", spec)
    assert "resolve" in dns
    other = SP.classify_ssh_failure("kex_exchange_identification: something odd", spec)
    assert "something odd" in other
    for msg in (unknown, changed, auth, refused, dns, other):
        assert "\n" not in msg


def test_wheel_platforms_and_keys():
    tags = P.wheel_platforms("aarch64", ["glibc", "2.36"])
    assert tags[0] == "manylinux_2_36_aarch64" and "manylinux_2_28_aarch64" in tags
    assert tags[-1] == "manylinux2014_aarch64" and "manylinux_2_17_aarch64" in tags
    assert "manylinux1_x86_64" in P.wheel_platforms("x86_64", ["glibc", "2.31"])
    assert P.wheel_platforms("arm64", ["glibc", "2.28"])[0] == "manylinux_2_28_aarch64"
    with pytest.raises(DeviceError, match="glibc"):
        P.wheel_platforms("aarch64", ["", ""])  # musl (Alpine)
    pins = P.base_pins()
    assert list(pins) == list(P.BASE_DEPENDENCIES)
    import tomllib

    deps = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    assert {f"{n}=={v}".lower() for n, v in pins.items()} <= {d.lower() for d in deps}
    k = P.venv_key(pins, "3.11", "aarch64", ["glibc", "2.36"])
    assert k.startswith("py3.11-aarch64-") and k == P.venv_key(dict(reversed(list(pins.items()))), "3.11", "aarch64", ["glibc", "2.36"])
    assert k != P.venv_key(pins, "3.12", "aarch64", ["glibc", "2.36"])
    assert k != P.venv_key({**pins, "numpy": "0"}, "3.11", "aarch64", ["glibc", "2.36"])
    assert P.checkout_root() == Path(__file__).resolve().parents[1]
    assert len(P.source_hash()) == 16


def test_missing_ssh_client(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # no ssh on PATH
    r = S.SshRunner.from_spec("ssh://pi@board")
    with pytest.raises(DeviceError, match="openssh-client"):
        r.probe()


# --------------------------------------------------------------------------- a real sshd on loopback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Sshd:
    """``sshd -D`` on 127.0.0.1 with keys under ``folder``; ``extra`` lines go into its config."""

    def __init__(self, folder: Path, extra: str = ""):
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.port = _free_port()
        self.user = getpass.getuser()
        self.host_key = folder / "host_key"
        self.client_key = folder / "client_key"
        for key in (self.host_key, self.client_key):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "edgepipe-test", "-f", str(key)], check=True)
        (folder / "authorized_keys").write_text(self.client_key.with_suffix(".pub").read_text())
        self.known_hosts = folder / "known_hosts"
        host_pub = " ".join(self.host_key.with_suffix(".pub").read_text().split()[:2])
        self.known_hosts.write_text(f"[127.0.0.1]:{self.port} {host_pub}\n")
        self.config = folder / "sshd_config"
        self.config.write_text(
            f"ListenAddress 127.0.0.1\nHostKey {self.host_key}\nAuthorizedKeysFile {folder / 'authorized_keys'}\n"
            "StrictModes no\nPubkeyAuthentication yes\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            f"UsePAM no\nPermitRootLogin prohibit-password\nPidFile {folder / 'sshd.pid'}\n"
            "Subsystem sftp internal-sftp\nMaxStartups 50\n" + extra
        )
        if os.geteuid() == 0:
            os.makedirs("/run/sshd", mode=0o755, exist_ok=True)  # privilege separation folder
        self.log = open(folder / "sshd.log", "w")
        self.proc = subprocess.Popen(
            [SSHD, "-D", "-e", "-f", str(self.config), "-p", str(self.port)], stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 15
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    break
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(f"sshd did not start: {(folder / 'sshd.log').read_text()[-2000:]}") from None
                time.sleep(0.1)

    def spec(self, *, identity: Path | None = None, known_hosts: Path | None = None, remote_dir: Path | None = None) -> str:
        q = f"identity={identity or self.client_key}&known_hosts={known_hosts or self.known_hosts}"
        if remote_dir:
            q += f"&dir={remote_dir}"
        return f"ssh://{self.user}@127.0.0.1:{self.port}?{q}"

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    if not HAVE_TOOLS:
        pytest.skip("OpenSSH server/client missing: bash .ci/ssh-deps.sh")
    server = Sshd(tmp_path_factory.mktemp("sshd"))
    yield server
    server.stop()


def _tiny_artifact(request, tmp_path_factory) -> Path:
    """The shared tiny Llama artifact (``llama_artifact`` of tests/conftest.py) when there is one, else one
    built here the same way (a random 2-layer Llama, hidden 64, byte-level BPE tokenizer; x86-avx2)."""
    try:
        return request.getfixturevalue("llama_artifact")
    except pytest.FixtureLookupError:
        pass
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from edgepipe.pipeline import build

    root = tmp_path_factory.mktemp("tiny-llama")
    model = root / "model"
    model.mkdir()
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    calib = (Path(__file__).resolve().parents[1] / "edgepipe" / "data" / "calib.txt").read_text(encoding="utf-8")
    trainer = trainers.BpeTrainer(
        vocab_size=512, special_tokens=["<unk>", "<s>", "</s>"], initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator([calib], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=len(fast), max_position_embeddings=1024, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2,
    )  # fmt: skip
    LlamaForCausalLM(cfg).save_pretrained(model)
    fast.save_pretrained(model)
    out = root / "artifact"
    build(target="x86-avx2", out=out, model=model)
    return out


@pytest.fixture(scope="module")
def tiny_artifact(request, tmp_path_factory) -> Path:
    return _tiny_artifact(request, tmp_path_factory)


@pytest.fixture()
def test_cache(monkeypatch) -> Iterator[Path]:
    """A host cache kept between test sessions for the runner's wheels and the test board (its venv):
    ``$EDGEPIPE_TEST_CACHE/ssh`` or ``$TMPDIR/edgepipe-ssh-test``; never ``~/.cache/edgepipe``."""
    keep = os.environ.get("EDGEPIPE_TEST_CACHE")
    root = Path(keep) / "ssh" if keep else Path(tempfile.gettempdir()) / "edgepipe-ssh-test"
    root.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("EDGEPIPE_CACHE", str(root))
    # the board folder is shared by every test session on this machine: two suites at once would
    # deploy over each other's `current` (seen with parallel worktrees), so they take turns
    with open(root / "board-in-use.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield root


def _check_result(res: dict, artifact: Path) -> None:
    assert res["runner"] == "ssh"
    assert res["claims"] == "accuracy and throughput measured on the device 127.0.0.1"
    dev = res["device"]
    assert dev["machine"] == "x86_64" and dev["uname_m"] == "x86_64"
    assert dev["host"] == "127.0.0.1" and isinstance(dev["port"], int) and dev["runner"] == "ssh"
    assert dev["cpu_model"] and dev["ram_total_mb"] > 0
    assert res["verified"] is True and res["artifact"] == str(artifact.resolve())
    acc = res["accuracy"]
    assert acc["eval_tokens"] > 0 and acc["perplexity"] > 0
    assert 0.0 <= acc["top1_agreement"] <= 1.0 and "kl_divergence_topk" in acc
    thr = res["throughput"]
    assert thr["decode_tok_s"] > 0 and thr["prefill_tok_s"] > 0 and thr["peak_rss_mb"] > 0


@needs_sshd
def test_validate_on_loopback_board(sshd, tiny_artifact, test_cache):
    board = test_cache / "board"
    shutil.rmtree(board / "artifacts", ignore_errors=True)  # the venv is kept: it is the slow part
    runner = get_runner(sshd.spec(remote_dir=board))
    said: list[str] = []
    n_files = len(json.loads((tiny_artifact / "manifest.json").read_text())["files"]) + 1

    t0 = time.monotonic()
    first = runner.validate(tiny_artifact, progress=said.append)
    t_first = time.monotonic() - t0
    _check_result(first, tiny_artifact)
    assert len(first["transfer"]["files_copied"]) == n_files and first["transfer"]["files_unchanged"] == 0
    assert first["transfer"]["method"] == "rsync"
    assert first["transfer"]["venv"] in ("created", "edgepipe-updated", "reused")
    remote = Path(first["remote_artifact"])
    assert remote.parent == board / "artifacts" and (remote / "manifest.json").read_bytes() == (tiny_artifact / "manifest.json").read_bytes()
    assert any("connecting to" in m for m in said)

    t0 = time.monotonic()
    second = runner.validate(tiny_artifact)
    t_second = time.monotonic() - t0
    _check_result(second, tiny_artifact)
    assert second["transfer"]["files_copied"] == [] and second["transfer"]["bytes_copied"] == 0
    assert second["transfer"]["files_unchanged"] == n_files
    assert second["transfer"]["venv"] == "reused"

    # a damaged file on the board is found by its hash and copied again, and only it
    data = remote / "model.onnx.data"
    size, mtime = data.stat().st_size, data.stat().st_mtime
    with open(data, "r+b") as f:
        f.seek(size // 2)
        b = f.read(1)
        f.seek(size // 2)
        f.write(bytes([b[0] ^ 0xFF]))
    os.utime(data, (mtime, mtime))  # same size and mtime: only the hash tells
    third = runner.validate(tiny_artifact)
    assert third["transfer"]["files_copied"] == ["model.onnx.data"] and third["transfer"]["venv"] == "reused"
    assert data.read_bytes() == (tiny_artifact / "model.onnx.data").read_bytes()
    _check_result(third, tiny_artifact)

    # a rebuilt artifact (new manifest, same model files) sends only what changed: the rest is
    # copied on the board from the artifact folder that holds it
    rebuilt = sshd.folder / "rebuilt"
    shutil.rmtree(rebuilt, ignore_errors=True)
    shutil.copytree(tiny_artifact, rebuilt)
    m = json.loads((rebuilt / "manifest.json").read_text())
    m["note"] = "same files, new manifest"
    (rebuilt / "manifest.json").write_text(json.dumps(m))
    again = runner.validate(rebuilt)
    assert again["transfer"]["files_copied"] == ["manifest.json"]
    assert sorted(again["transfer"]["files_seeded_on_board"]) == sorted(m["files"])
    assert Path(again["remote_artifact"]) != remote and again["accuracy"] == first["accuracy"]

    # an eval file is copied and scored on the board
    text = (Path(S.__file__).resolve().parents[1] / "data" / "eval.txt").read_text(encoding="utf-8")
    ev = sshd.folder / "eval.txt"
    ev.write_text(text[:3000], encoding="utf-8")
    fourth = runner.validate(tiny_artifact, eval_file=ev, max_tokens=64)
    assert fourth["accuracy"]["source"].startswith("eval text") and fourth["accuracy"]["eval_tokens"] <= 64
    assert fourth["transfer"]["files_copied"] == []
    print(f"\nssh loopback: first run {t_first:.1f} s ({first['transfer']['venv']}), second run {t_second:.1f} s")

    # a failure on the board comes back as a typed one-line error
    short = sshd.folder / "short.txt"
    short.write_text("a", encoding="utf-8")
    with pytest.raises((ArtifactError, DeviceError)) as info:
        runner.validate(tiny_artifact, eval_file=short)
    assert "fewer than 2 tokens" in str(info.value) and "127.0.0.1" in str(info.value)


@needs_sshd
def test_probe_reports_the_board(sshd, tmp_path):
    facts = get_runner(sshd.spec(remote_dir=tmp_path / "board")).probe()
    assert facts["machine"] == os.uname().machine and facts["implementation"] == "cpython"
    assert facts["base"] == str(tmp_path / "board") and (tmp_path / "board").is_dir()
    assert facts["libc"][0] == "glibc" and facts["ram_total_mb"] > 0 and facts["venvs"] == {}


@needs_sshd
def test_unknown_host_key(sshd, tmp_path):
    empty = tmp_path / "known_hosts"
    empty.write_text("")
    with pytest.raises(DeviceError) as info:
        get_runner(sshd.spec(known_hosts=empty)).probe()
    msg = str(info.value)
    assert f"ssh-keyscan -p {sshd.port} 127.0.0.1 >> {empty}" in msg and "\n" not in msg


@needs_sshd
def test_changed_host_key(sshd, tmp_path):
    other = tmp_path / "other"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(other)], check=True)
    kh = tmp_path / "known_hosts"
    kh.write_text(f"[127.0.0.1]:{sshd.port} {' '.join(other.with_suffix('.pub').read_text().split()[:2])}\n")
    with pytest.raises(DeviceError, match="CHANGED"):
        get_runner(sshd.spec(known_hosts=kh)).probe()


@needs_sshd
def test_auth_failure(sshd, tmp_path):
    stranger = tmp_path / "stranger"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(stranger)], check=True)
    with pytest.raises(DeviceError) as info:
        get_runner(sshd.spec(identity=stranger)).probe()
    assert "authentication" in str(info.value) and "ssh-copy-id" in str(info.value)


@needs_sshd
def test_unreachable(sshd):
    port = _free_port()  # nothing listens there
    spec = sshd.spec().replace(f":{sshd.port}?", f":{port}?")
    with pytest.raises(DeviceError) as info:
        get_runner(spec).probe()
    assert "cannot reach" in str(info.value) and "connection refused" in str(info.value)


@needs_sshd
def test_board_without_python3(tmp_path):
    # every command runs with a PATH where there is no python3
    server = Sshd(tmp_path / "sshd", 'ForceCommand /usr/bin/env PATH=/nonexistent /bin/sh -c "$SSH_ORIGINAL_COMMAND"\n')
    try:
        with pytest.raises(DeviceError) as info:
            get_runner(server.spec()).probe()
    finally:
        server.stop()
    assert "no python3" in str(info.value) and "apt-get install python3" in str(info.value)


@needs_sshd
@pytest.mark.slow
def test_first_time_setup(sshd, tiny_artifact, tmp_path, monkeypatch):
    """From nothing: an empty host cache (pip download + the checkout's wheel) and an empty board (new
    venv), copied with scp."""
    monkeypatch.setenv("EDGEPIPE_CACHE", str(tmp_path / "host-cache"))
    runner = S.SshRunner.from_spec(sshd.spec(remote_dir=tmp_path / "board"), copy_method="scp")
    t0 = time.monotonic()
    first = runner.validate(tiny_artifact)
    t_first = time.monotonic() - t0
    _check_result(first, tiny_artifact)
    assert first["transfer"]["venv"] == "created" and first["transfer"]["method"] == "scp"
    wheels = [p for p in (tmp_path / "host-cache" / "wheels").iterdir() if (p / "wheels.json").is_file()]
    assert len(wheels) == 1
    names = json.loads((wheels[0] / "wheels.json").read_text())["wheels"]
    for dep in ("onnxruntime-1.31", "numpy-", "tokenizers-", "click-", "pyyaml-", "pip-"):
        assert any(n.lower().startswith(dep) for n in names), dep
    venv = Path(first["device"]["venv"])
    marker = json.loads((venv / P.VENV_MARKER).read_text())
    assert marker["key"] == venv.name.removeprefix("venv-") and len(marker["edgepipe_source"]) == 16
    wheel = tmp_path / "host-cache" / "wheels" / f"edgepipe-{marker['edgepipe_source']}" / marker["edgepipe_wheel"]
    assert wheel.is_file()
    assert not (tmp_path / "board" / "wheels" / marker["key"]).exists()  # wheels removed after install
    t0 = time.monotonic()
    second = runner.validate(tiny_artifact)
    t_second = time.monotonic() - t0
    assert second["transfer"]["files_copied"] == [] and second["transfer"]["venv"] == "reused"
    print(f"\nssh first-time set-up: first run {t_first:.1f} s, second run {t_second:.1f} s")
