"""``edgepipe package ARTIFACT --oci OUT``: OCI image layouts written without a daemon.

Fast tests check the layout against the OCI image-spec schemas, the digests and diff_ids, the
reproducibility and the model-only (ModelPack) form, on a small hand-made artifact; the
runnable-image test there stands a small local tree in for the Debian root (which needs the
mirror; the slow test uses the real one). The slow test builds the real arm64 image from
Debian's packages, checks it with ``skopeo inspect``, unpacks its layers and runs its entrypoint
under ``qemu-aarch64 -cpu cortex-a76``: it verifies the artifact and generates the host's text.
Another slow test runs the amd64 image natively in a chroot (root only).
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
from pathlib import Path

import pytest
from click.testing import CliRunner
from oci_support import check_schema, layer_tar, read_layout, unpack
from serve_support import ask_server

from edgepipe.cli import main
from edgepipe.devices import pyroot
from edgepipe.errors import ArtifactError, InputError
from edgepipe.package import oci_layout as ol
from edgepipe.package.manifest import write_manifest
from edgepipe.package.oci import ENTRYPOINT, MODEL_ARTIFACT_TYPE, MODEL_LAYER, SITE_DIR, package_oci
from edgepipe.runtime.kinds import ArtifactKind
from edgepipe.runtime.manifest import Manifest

HAS_SKOPEO = shutil.which("skopeo") is not None


def _toy_artifact(folder: Path) -> Path:
    """A verifiable artifact folder (files + manifest.json); its model bytes are not a model."""
    folder.mkdir(parents=True)
    (folder / "model.onnx").write_bytes(b"not really onnx " * 64)
    (folder / "model.onnx.data").write_bytes(bytes(range(256)) * 16)
    (folder / "tokenizer.json").write_text("{}")
    write_manifest(folder, Manifest(ArtifactKind.CPU_DECODER, {}, target={"name": "raspberrypi5"}, verdict="pass"))
    return folder


def _toy_root(base: Path, arch: str) -> pyroot.PythonRoot:
    """A small stand-in for the Debian tree: an ELF-less python, a lib symlink, a wheel, a pip script."""
    root, site = base / "root", base / "site"
    meta = {"packages": ["python3.11-minimal_toy.deb"]}
    if base.is_dir():  # made by an earlier call of this test
        return pyroot.PythonRoot(base, pyroot.deb_arch(arch), meta)
    (root / "usr" / "bin").mkdir(parents=True)
    (root / "usr" / "bin" / "python3.11").write_bytes(b"\x7fELF toy")
    (root / "usr" / "bin" / "python3.11").chmod(0o775)
    (root / "usr" / "share" / "doc" / "libc6").mkdir(parents=True)
    (root / "usr" / "share" / "doc" / "libc6" / "copyright").write_text("docs are dropped")
    (root / "lib").mkdir()
    (root / "lib" / "ld-linux-aarch64.so.1").symlink_to("/lib/aarch64-linux-gnu/ld-linux-aarch64.so.1")
    (site / "numpy").mkdir(parents=True)
    (site / "numpy" / "__init__.py").write_text("__version__ = 'toy'\n")
    (site / "bin").mkdir()
    (site / "bin" / "f2py").write_text("#!/usr/bin/python3.11-host\n")
    return pyroot.PythonRoot(base, pyroot.deb_arch(arch), meta)


@pytest.fixture
def toy(tmp_path, monkeypatch):
    monkeypatch.setattr(pyroot, "cached_root", lambda arch, pins, say: _toy_root(tmp_path / f"root-{arch.debian}", arch.debian))
    return _toy_artifact(tmp_path / "toy-artifact")


def _members(raw: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return tar.getmembers()


# --------------------------------------------------------------------------- fast


def test_layer_is_reproducible_and_its_digests_are_right(tmp_path):
    src = tmp_path / "tree"
    (src / "b" / "c").mkdir(parents=True)
    (src / "b" / "c" / "f.txt").write_text("hello")
    (src / "a.bin").write_bytes(os.urandom(1000))
    (src / "link").symlink_to("b/c/f.txt")
    blobs = []
    for i in range(2):
        os.utime(src / "a.bin", (1e9 + i, 1e9 + i))  # mtimes differ between the two runs: the digests must not
        blobs.append(ol.BlobStore(tmp_path / f"layout{i}").put_layer(ol.tree_entries(src, "opt/x")))
    assert blobs[0] == blobs[1]
    data = (tmp_path / "layout0" / "blobs" / "sha256" / blobs[0].digest.split(":")[1]).read_bytes()
    assert f"sha256:{hashlib.sha256(data).hexdigest()}" == blobs[0].digest and len(data) == blobs[0].size
    raw = gzip.decompress(data)
    assert f"sha256:{hashlib.sha256(raw).hexdigest()}" == blobs[0].diff_id
    members = _members(raw)
    names = [m.name for m in members]
    assert names == sorted(names) == ["opt", "opt/x", "opt/x/a.bin", "opt/x/b", "opt/x/b/c", "opt/x/b/c/f.txt", "opt/x/link"]
    assert {(m.mtime, m.uid, m.gid, m.uname, m.gname) for m in members} == {(0, 0, 0, "", "")}
    assert next(m for m in members if m.name == "opt/x/link").linkname == "b/c/f.txt"
    assert data[4:8] == b"\0\0\0\0"  # gzip header: no timestamp


def test_runnable_image_layout(toy, tmp_path):
    res = package_oci(toy, tmp_path / "img", platform="linux/arm64")
    doc = read_layout(res.out)  # schemas, digests, sizes
    check_schema("config-schema.json", doc["config"])
    assert doc["descriptor"]["platform"] == {"architecture": "arm64", "os": "linux", "variant": "v8"}
    assert doc["descriptor"]["annotations"] == {"org.opencontainers.image.ref.name": "latest"}
    cfg = doc["config"]
    assert (cfg["architecture"], cfg["os"]) == ("arm64", "linux")
    assert cfg["config"]["Entrypoint"] == list(ENTRYPOINT) == ["/usr/bin/python3", "-m", "edgepipe.runtime"]
    assert cfg["config"]["Cmd"][:2] == ["run", "/model"] and "--prompt" in cfg["config"]["Cmd"]
    assert cfg["config"]["ExposedPorts"] == {"8080/tcp": {}}  # `serve /model --host 0.0.0.0`
    assert [m["mediaType"] for m in doc["manifest"]["layers"]] == [ol.MEDIA_LAYER_GZIP] * 3
    assert len(cfg["rootfs"]["diff_ids"]) == 3 and len(cfg["history"]) == 3
    assert res.manifest_digest == doc["descriptor"]["digest"] and res.layers == tuple(m["digest"] for m in doc["manifest"]["layers"])

    rootfs, site, model = (_members(layer_tar(res.out, m)) for m in doc["manifest"]["layers"])
    root_names = {m.name: m for m in rootfs}
    assert root_names["usr/bin/python3"].linkname == "python3.11" and root_names["usr/bin/python3.11"].mode == 0o755
    assert root_names["tmp"].mode == 0o1777 and {"proc", "sys", "dev"} <= set(root_names)
    assert not [n for n in root_names if n.startswith("usr/share/doc")]
    site_names = {m.name for m in site}
    for rel in ("numpy/__init__.py", "edgepipe/__init__.py", "edgepipe/errors.py", "edgepipe/runtime/__main__.py", "edgepipe/runtime/model.py"):
        assert f"{SITE_DIR}/{rel}" in site_names, rel
    assert not [n for n in site_names if n.startswith(f"{SITE_DIR}/bin") or n.endswith(".pyc") or "edgepipe/cli" in n]
    assert sorted(m.name for m in model if m.isfile()) == ["model/manifest.json", "model/model.onnx", "model/model.onnx.data", "model/tokenizer.json"]


def test_same_inputs_same_digests_and_archive(toy, tmp_path):
    a = package_oci(toy, tmp_path / "a")
    b = package_oci(toy, tmp_path / "b.tar")
    assert (a.manifest_digest, a.layers) == (b.manifest_digest, b.layers)
    again = package_oci(toy, tmp_path / "a")  # replaces an earlier layout
    assert again.manifest_digest == a.manifest_digest
    with tarfile.open(tmp_path / "b.tar") as tar:
        names = tar.getnames()
        assert {"oci-layout", "index.json", f"blobs/sha256/{a.manifest_digest.split(':')[1]}"} <= set(names)
    amd = package_oci(toy, tmp_path / "amd", platform="linux/amd64")
    assert amd.manifest_digest != a.manifest_digest and amd.layers[2] == a.layers[2]  # same artifact layer, other root
    assert read_layout(amd.out)["config"]["architecture"] == "amd64"


def test_model_only_is_a_modelpack_artifact(toy, tmp_path):
    res = package_oci(toy, tmp_path / "model-only", model_only=True)
    doc = read_layout(res.out)
    assert doc["manifest"]["artifactType"] == MODEL_ARTIFACT_TYPE == doc["descriptor"]["artifactType"]
    assert "platform" not in doc["descriptor"]
    assert doc["manifest"]["config"]["mediaType"] == "application/vnd.cncf.model.config.v1+json"
    (layer,) = doc["manifest"]["layers"]
    assert layer["mediaType"] == MODEL_LAYER
    raw = layer_tar(res.out, layer)
    assert doc["config"]["modelfs"] == {"type": "layers", "diffIds": [f"sha256:{hashlib.sha256(raw).hexdigest()}"]}
    assert doc["config"]["config"]["format"] == "onnx" and doc["config"]["descriptor"]["name"] == "toy-artifact"
    files = {m.name: m for m in _members(raw) if m.isfile()}
    assert sorted(files) == ["manifest.json", "model.onnx", "model.onnx.data", "tokenizer.json"]  # at the layer root: mount at /model
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        assert tar.extractfile(files["model.onnx.data"]).read() == (toy / "model.onnx.data").read_bytes()


def test_refuses_tampered_artifact_and_bad_outputs(toy, tmp_path):
    with pytest.raises(InputError, match="--platform"):
        package_oci(toy, tmp_path / "x", platform="linux/riscv64")
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "precious.txt").write_text("keep")
    with pytest.raises(InputError, match="no OCI layout"):
        package_oci(toy, tmp_path / "busy")
    assert (tmp_path / "busy" / "precious.txt").read_text() == "keep"
    data = bytearray((toy / "model.onnx.data").read_bytes())
    data[100] ^= 0xFF
    (toy / "model.onnx.data").write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="sha256"):
        package_oci(toy, tmp_path / "y")
    assert not (tmp_path / "y").exists() and not list(tmp_path.glob(".y-*"))


def test_cli_package(toy, tmp_path):
    out = tmp_path / "cli-img"
    r = CliRunner().invoke(main, ["package", str(toy), "--oci", str(out), "--platform", "linux/amd64", "--json"])
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["platform"] == "linux/amd64" and res["manifest_digest"].startswith("sha256:")
    bad = CliRunner().invoke(main, ["package", str(tmp_path / "missing"), "--oci", str(tmp_path / "z")])
    assert bad.exit_code == 2 and bad.output.startswith("error: ")


@pytest.mark.skipif(not HAS_SKOPEO, reason="skopeo not installed (`apt-get install skopeo`, see .ci/oci-deps.sh)")
def test_skopeo_reads_the_layouts(toy, tmp_path):
    img = package_oci(toy, tmp_path / "img")
    info = json.loads(subprocess.run(["skopeo", "inspect", f"oci:{img.out}:latest"], capture_output=True, text=True, check=True).stdout)
    assert info["Digest"] == img.manifest_digest and info["Architecture"] == "arm64" and info["Layers"] == list(img.layers)
    arch = package_oci(toy, tmp_path / "img.tar")
    info = json.loads(subprocess.run(["skopeo", "inspect", f"oci-archive:{arch.out}"], capture_output=True, text=True, check=True).stdout)
    assert info["Digest"] == img.manifest_digest
    model = package_oci(toy, tmp_path / "model", model_only=True)
    raw = json.loads(subprocess.run(["skopeo", "inspect", "--raw", f"oci:{model.out}"], capture_output=True, text=True, check=True).stdout)
    assert raw["artifactType"] == MODEL_ARTIFACT_TYPE
    # skopeo copies (and so re-checks every blob against its digest) into a plain directory
    subprocess.run(["skopeo", "copy", "-q", f"oci:{img.out}:latest", f"dir:{tmp_path / 'copied'}"], capture_output=True, text=True, check=True)
    assert (tmp_path / "copied" / "manifest.json").is_file()


def test_no_heavy_imports():
    code = "import sys, edgepipe.package.oci, edgepipe.cli; print(','.join(m for m in ('torch', 'onnx', 'transformers') if m in sys.modules))"
    assert subprocess.run([os.sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == ""


# --------------------------------------------------------------------------- slow: the real arm64 image under qemu


def _guest_env(config: dict) -> dict[str, str]:
    env = dict(e.split("=", 1) for e in config["config"]["Env"])
    env["HOME"] = "/tmp"
    return env


@pytest.mark.slow
def test_arm64_image_runs_under_qemu_cortex_a76(zoo, tmp_path):
    from edgepipe.devices.qemu import QemuRunner

    artifact = zoo.artifact("llama", "raspberrypi5")[0]
    img = package_oci(artifact, tmp_path / "img", platform="linux/arm64")
    if HAS_SKOPEO:
        info = json.loads(subprocess.run(["skopeo", "inspect", f"oci:{img.out}"], capture_output=True, text=True, check=True).stdout)
        assert info["Architecture"] == "arm64" and info["Digest"] == img.manifest_digest
    assert package_oci(artifact, tmp_path / "again.tar").manifest_digest == img.manifest_digest  # reproducible

    root = tmp_path / "rootfs"
    root.mkdir()
    doc = unpack(img.out, root)
    cfg = doc["config"]
    check_schema("config-schema.json", cfg)
    qemu = QemuRunner("cortex-a76").ensure_env().qemu  # the runner's own qemu >= 8 (fetched once)
    entry = cfg["config"]["Entrypoint"]

    def run(cmd: list[str]) -> subprocess.CompletedProcess[str]:
        # -L ROOT: the guest's loader and libraries resolve inside the unpacked image, as the qemu runner
        # runs its guest. /model is given as ROOT/model, the folder a container sees at /model:
        # onnxruntime canonicalizes the external data path, which -L's redirection makes ROOT/model/...,
        # and would refuse it as outside "/model".
        args = [str(root / a.lstrip("/")) if a.startswith("/model") else a for a in cmd]
        argv = [str(qemu), "-cpu", "cortex-a76", "-L", str(root), str(root / entry[0].lstrip("/")), *entry[1:], *args]
        return subprocess.run(argv, capture_output=True, text=True, timeout=1800, env=_guest_env(cfg), cwd=root)

    verified = run(["verify", "/model"])
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout.strip().splitlines()[-1])["verified"] is True

    cmd = list(cfg["config"]["Cmd"])
    assert cmd[:2] == ["run", "/model"] and "--prompt" in cmd
    # the tiny model was trained on calib.txt (Emma): from its first line it writes letters, not only newlines
    prompt = "Emma Woodhouse, handsome, clever, and"
    cmd[cmd.index("--prompt") + 1] = prompt
    generated = run([*cmd, "--max-new-tokens", "12"])
    assert generated.returncode == 0, generated.stderr
    host = subprocess.run([os.sys.executable, "-m", "edgepipe.runtime", "run", str(artifact), "--prompt", prompt, "--max-new-tokens", "12"],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert generated.stdout.strip(), f"no text generated: {generated.stdout!r}"
    assert generated.stdout == host  # greedy: the aarch64 kernels in the image pick the host's tokens
    print(f"arm64 image {img.manifest_digest} ({img.bytes / 2**20:.1f} MB) under qemu cortex-a76: {prompt}{generated.stdout!r} (host: {host!r})")

    # a tampered model inside the image is refused before anything is generated
    data = root / "model" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    refused = run(cmd)
    assert refused.returncode == 2 and "sha256" in refused.stderr and refused.stdout == ""


@pytest.mark.slow
@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("chroot"), reason="needs root and chroot")
def test_amd64_image_runs_in_a_chroot(zoo, tmp_path):
    """The x86-64 image, unpacked, runs natively as a container would run it: its own root, /proc mounted."""
    artifact = zoo.artifact("llama", "x86-avx2")[0]
    img = package_oci(artifact, tmp_path / "img.tar", platform="linux/amd64")
    layout, root = tmp_path / "layout", tmp_path / "rootfs"
    layout.mkdir()
    root.mkdir()
    with tarfile.open(img.out) as tar:
        tar.extractall(layout, filter="tar")
    cfg = unpack(layout, root)["config"]
    assert cfg["architecture"] == "amd64"
    if subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], capture_output=True).returncode != 0:
        pytest.skip("cannot mount /proc in the chroot here")
    try:
        prompt = "Emma Woodhouse, handsome, clever, and"
        cmd = [*cfg["config"]["Entrypoint"], "run", "/model", "--prompt", prompt, "--max-new-tokens", "12"]
        env = {**_guest_env(cfg), "PATH": "/usr/bin:/bin:/usr/sbin:/sbin"}
        ran = subprocess.run([shutil.which("chroot"), str(root), *cmd], capture_output=True, text=True, timeout=600, env=env)
        cmd = [shutil.which("chroot"), str(root), *cfg["config"]["Entrypoint"], "serve", "/model", "--host", "127.0.0.1", "--port", "0"]
        served = ask_server(cmd, prompt, env=env)
    finally:
        subprocess.run(["umount", str(root / "proc")], capture_output=True)
    assert ran.returncode == 0, ran.stderr
    host = subprocess.run([os.sys.executable, "-m", "edgepipe.runtime", "run", str(artifact), "--prompt", prompt, "--max-new-tokens", "12"],
                          capture_output=True, text=True, check=True).stdout  # fmt: skip
    assert ran.stdout.strip() and ran.stdout == host
    # the image serves too: completions equal `run`'s greedy text; a chat request renders the artifact's template (jinja2 in the image)
    assert served["completion"] == host.strip(), served
    assert served["chat_status"] == 200 and served["chat_text"], served
