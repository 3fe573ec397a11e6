"""The qemu device runner.

Fast tests need no aarch64 environment. The ``slow`` ones build it on first use (about a
minute, ~260 MB under ``$EDGEPIPE_CACHE``/qemu, needs the Debian mirror and PyPI) and run a
tiny MatMul + MatMulNBits model on the aarch64 onnxruntime under ``qemu-aarch64 -cpu``.
"""

from __future__ import annotations

import json
import os
import stat
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from edgepipe.devices import apt, get_runner
from edgepipe.devices import qemu as q
from edgepipe.devices import qemu_env as qe
from edgepipe.devices.base import strip_throughput
from edgepipe.devices.remote.guest_probe import parse_cpu_features
from edgepipe.errors import ArtifactError, DeviceError, InputError
from edgepipe.models import cache_root

# --------------------------------------------------------------------------- fast


def test_spec_parsing():
    r = get_runner("qemu:cortex-a72")
    assert isinstance(r, q.QemuRunner) and r.cpu == "cortex-a72" and r.name == "qemu"
    target = SimpleNamespace(cpu=SimpleNamespace(qemu_cpu="cortex-a76"))
    assert get_runner("qemu", target=target).cpu == "cortex-a76"
    with pytest.raises(InputError, match="qemu:cortex-a76"):
        get_runner("qemu", target=SimpleNamespace(cpu=SimpleNamespace(qemu_cpu=None)))


@pytest.mark.parametrize("cpu", ["max", "MAX", "host", "", "cortex a76", "-cpu"])
def test_refuses_cpu_models(cpu):
    with pytest.raises(InputError):
        q.QemuRunner(cpu)


def test_pins_follow_pyproject():
    import tomllib

    deps = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]["dependencies"]
    expected = {d.split("==")[0]: d.split("==")[1] for d in deps if d.split("==")[0] in qe.RUNTIME_WHEELS}
    assert qe.runtime_pins() == expected
    assert list(qe.runtime_pins()) == list(qe.RUNTIME_WHEELS)


def test_cache_key_and_location(monkeypatch, tmp_path):
    pins = {"onnxruntime": "1.31.1", "numpy": "2.4.6", "tokenizers": "0.23.3"}
    key = qe.env_key(pins)
    assert key.startswith("py3.11-ort1.31.1-") and key == qe.env_key(dict(reversed(list(pins.items()))))
    assert qe.env_key({**pins, "numpy": "2.4.7"}) != key
    assert qe.env_key(pins, guest_python="3.12") != key
    monkeypatch.setenv("EDGEPIPE_CACHE", str(tmp_path))
    assert cache_root() == tmp_path
    assert q.QemuRunner("cortex-a76").env_dir() == tmp_path / "qemu" / qe.env_key(qe.runtime_pins())
    monkeypatch.delenv("EDGEPIPE_CACHE")
    assert cache_root() == Path.home() / ".cache" / "edgepipe"


def test_parsers():
    assert qe.parse_qemu_version("qemu-aarch64 version 10.0.2 (Debian 1:10.0.2+ds-2)\nCopyright") == (10, 0, 2)
    assert qe.parse_qemu_version("qemu-aarch64 version 7.2.0") == (7, 2, 0)
    assert qe.parse_qemu_version("nonsense") is None
    arm = "processor\t: 0\nBogoMIPS\t: 125.00\nFeatures\t: fp asimd asimddp\nCPU implementer\t: 0x41\n"
    assert parse_cpu_features(arm) == ["fp", "asimd", "asimddp"]
    x86 = "processor\t: 0\nvendor_id\t: GenuineIntel\nflags\t\t: fpu vme avx2\n"
    assert parse_cpu_features(x86) is None


def test_apt_sources_parsing(tmp_path):
    etc = tmp_path / "apt"
    (etc / "sources.list.d").mkdir(parents=True)
    (etc / "sources.list.d" / "debian.sources").write_text(
        textwrap.dedent(
            """\
            Types: deb
            # a comment
            URIs: http://mirror.example/debian
            Suites: bookworm bookworm-updates
            Components: main
            Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

            Types: deb
            URIs: http://mirror.example/debian-security
            Suites: bookworm-security
            Components: main
            """
        )
    )
    src = apt.system_debian_mirror("bookworm", etc)
    assert src.uri == "http://mirror.example/debian"
    assert src.signed_by == "/usr/share/keyrings/debian-archive-keyring.gpg"
    one = apt.parse_apt_sources("deb [arch=amd64 signed-by=/k.gpg] http://m/debian bookworm main contrib\n", deb822=False)
    assert one == [apt.AptSource("http://m/debian", ("bookworm",), ("main", "contrib"), "/k.gpg")]
    line = apt.deb_line(src.uri, "bookworm-backports", ["amd64"], src.signed_by)
    assert line == (
        "deb [arch=amd64 signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] "
        "http://mirror.example/debian bookworm-backports main"
    )
    # no matching entry: the default mirror
    assert apt.system_debian_mirror("bookworm", tmp_path / "nothing").uri == apt.DEFAULT_MIRROR


def test_strip_throughput():
    out = strip_throughput(
        {"accuracy": {"perplexity": 3.0, "top1_agreement": 0.9},
         "throughput": {"prefill_tok_s": 5.0, "decode_tok_s": 2.0, "ttft_ms": 9.0, "peak_rss_mb": 100.0},
         "tokens_per_second": 1.0, "throughput_note": "x"}
    )  # fmt: skip
    assert out["accuracy"] == {"perplexity": 3.0, "top1_agreement": 0.9}
    assert out["throughput"] == {"prefill_tok_s": None, "decode_tok_s": None, "ttft_ms": 9.0, "peak_rss_mb": 100.0}
    assert out["tokens_per_second"] is None


def _fake_tool(folder: Path, name: str, script: str) -> None:
    path = folder / name
    path.write_text("#!/bin/sh\n" + script)
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_missing_qemu_and_apt_names_the_fix(monkeypatch, tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("EDGEPIPE_CACHE", str(tmp_path / "cache"))
    with pytest.raises(DeviceError) as e:
        q.QemuRunner("cortex-a76").ensure_env()
    msg = str(e.value)
    assert "\n" not in msg and "qemu-deps.sh" in msg and "apt-get install -t bookworm-backports qemu-user" in msg
    assert not (tmp_path / "cache" / "qemu").exists() or not any((tmp_path / "cache" / "qemu").iterdir())


def test_old_qemu_on_path_is_refused(monkeypatch, tmp_path, caplog):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    _fake_tool(bin_dir, "qemu-aarch64", 'echo "qemu-aarch64 version 7.2.19 (Debian 1:7.2+dfsg-7+deb12u18)"\n')
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setenv("EDGEPIPE_CACHE", str(tmp_path / "cache"))
    assert qe.usable_qemu_on_path() is None
    assert "7.2.19" in caplog.text
    with pytest.raises(DeviceError, match="qemu-aarch64 >= 8"):
        q.QemuRunner("cortex-a76").ensure_env()
    _fake_tool(bin_dir, "qemu-aarch64", 'echo "qemu-aarch64 version 10.0.2"\n')
    found = qe.usable_qemu_on_path()
    assert found is not None and found[1] == "10.0.2"


def _fake_env(tmp_path: Path) -> qe.QemuEnv:
    return qe.QemuEnv(tmp_path, tmp_path / "qemu-aarch64", "10.0.2")


def test_validate_merges_device_facts_and_claims(monkeypatch, tmp_path):
    artifact = tmp_path / "art"
    artifact.mkdir()
    runner = q.QemuRunner("cortex-a76")
    calls = []

    def fake_run(env, cpu, args, *, timeout, extra_env=None, package_dir=None):
        calls.append((cpu, list(args)))
        if args[0] == "-c":  # the probe
            out = {"machine": "aarch64", "cpu_features": ["fp", "asimd", "asimddp"], "onnxruntime": "1.31.1",
                   "python": "3.11.2"}  # fmt: skip
        else:
            out = {"verified": True, "accuracy": {"perplexity": 7.0}, "device": {"machine": "aarch64", "ram_mb": 1},
                   "throughput": {"decode_tok_s": 0.1}}  # fmt: skip
        return SimpleNamespace(returncode=0, stdout=json.dumps(out) + "\n", stderr="")

    monkeypatch.setattr(runner, "ensure_env", lambda progress=None: _fake_env(tmp_path))
    monkeypatch.setattr(qe, "run_guest", fake_run)
    msgs: list[str] = []
    res = runner.validate(artifact, eval_file=None, max_tokens=32, progress=msgs.append)
    assert calls[1] == (
        "cortex-a76",
        ["-m", "edgepipe.runtime", "validate", str(artifact.resolve()), "--json", "--no-bench", "--max-tokens", "32"],
    )
    assert all("max" != c for c, _ in calls)
    assert res["accuracy"] == {"perplexity": 7.0}
    assert res["throughput"] == {"decode_tok_s": None}
    dev = res["device"]
    assert dev["runner"] == "qemu" and dev["cpu"] == "cortex-a76" and dev["machine"] == "aarch64"
    assert dev["cpu_features"] == ["fp", "asimd", "asimddp"] and dev["onnxruntime"] == "1.31.1"
    assert dev["ram_mb"] == 1  # the guest's own facts are kept
    assert res["claims"] == q.CLAIMS and res["runner"] == "qemu" and msgs

    # a runtime error in the guest becomes a one-line DeviceError
    def failing(env, cpu, args, *, timeout, extra_env=None, package_dir=None):
        if args[0] == "-c":
            return fake_run(env, cpu, args, timeout=timeout)
        return SimpleNamespace(returncode=2, stdout="", stderr="error: manifest.json is missing; rebuild\n")

    monkeypatch.setattr(qe, "run_guest", failing)
    with pytest.raises(ArtifactError, match=r"^validation in the qemu guest \(cortex-a76\): manifest.json is missing"):
        runner.validate(artifact)
    with pytest.raises(InputError):
        runner.validate(tmp_path / "nope")


def test_probe_refuses_x86_cpuinfo(monkeypatch, tmp_path):
    """What qemu 7.2 does: the guest sees no aarch64 Features line."""

    def fake_run(env, cpu, args, *, timeout, extra_env=None, package_dir=None):
        out = {"machine": "aarch64", "cpu_features": None, "onnxruntime": "1.31.1", "python": "3.11.2"}
        return SimpleNamespace(returncode=0, stdout=json.dumps(out), stderr="")

    monkeypatch.setattr(qe, "run_guest", fake_run)
    with pytest.raises(DeviceError, match="qemu-user >= 8"):
        qe.probe_guest(_fake_env(tmp_path), "cortex-a76", timeout=10)


def test_no_heavy_imports():
    for path in sorted(Path(q.__file__).parent.rglob("*.py")):  # the transport, its environment, the remote programs
        src = path.read_text()
        for mod in ("torch", "transformers", "click", "yaml"):
            assert f"import {mod}" not in src and f"from {mod}" not in src, path


# --------------------------------------------------------------------------- slow (builds the env)

K, N, BLOCK = 64, 32, 32


def _tiny_model(path: Path, accuracy_level: int) -> None:
    """x[M,K] -> MatMul(W1[K,K]) -> MatMulNBits(4-bit W2[K,N], block 32)."""
    onnx = pytest.importorskip("onnx")
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((K, K)).astype(np.float32) / 8
    n_blocks = K // BLOCK
    q4 = rng.integers(0, 16, size=(N, n_blocks, BLOCK), dtype=np.uint8)
    packed = (q4[..., 0::2] | (q4[..., 1::2] << 4)).astype(np.uint8)  # [N, n_blocks, BLOCK/2]
    scales = (rng.random((N, n_blocks)).astype(np.float32) + 0.5) / 16
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h"]),
        helper.make_node(
            "MatMulNBits", ["h", "w2", "s2"], ["y"], domain="com.microsoft",
            K=K, N=N, bits=4, block_size=BLOCK, accuracy_level=accuracy_level,
        ),
    ]  # fmt: skip
    graph = helper.make_graph(
        nodes,
        "tiny",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", K])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", N])],
        initializer=[
            numpy_helper.from_array(w1, "w1"),
            numpy_helper.from_array(packed, "w2"),
            numpy_helper.from_array(scales.reshape(-1), "s2"),
        ],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid("com.microsoft", 1)]
    )
    model.ir_version = 10
    onnx.save(model, str(path))


GUEST_SCRIPT = """
import sys, numpy as np, onnxruntime as ort
so = ort.SessionOptions(); so.intra_op_num_threads = 1
x = np.load(sys.argv[1])
for model, out in zip(sys.argv[2::2], sys.argv[3::2]):
    sess = ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])
    np.save(out, sess.run(None, {"x": x})[0])
"""

#: max |guest - host| / max |host|: fp32 compute (level 0) is near bit-identical; level 4
#: quantizes activations to int8 per block with different kernels (sdot / neon vs AVX2/VNNI)
TOLERANCE = {0: 1e-5, 4: 2e-2}


@pytest.mark.slow
@pytest.mark.parametrize("cpu, dotprod", [("cortex-a76", True), ("cortex-a72", False)])
def test_tiny_model_in_guest_matches_host(cpu, dotprod, tmp_path):
    import onnxruntime as ort

    inp, script = tmp_path / "x.npy", tmp_path / "run.py"
    x = np.random.default_rng(1).standard_normal((5, K)).astype(np.float32)
    np.save(inp, x)
    script.write_text(GUEST_SCRIPT)
    so = ort.SessionOptions()
    so.intra_op_num_threads = 1
    args, host = [str(script), str(inp)], {}
    for level in TOLERANCE:
        model = tmp_path / f"tiny-acc{level}.onnx"
        _tiny_model(model, level)
        host[level] = ort.InferenceSession(str(model), so, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]
        args += [str(model), str(tmp_path / f"y{level}.npy")]

    runner = q.QemuRunner(cpu, timeout=900)
    runner.ensure_env()  # first time: builds the environment
    facts = runner.probe()
    assert facts["machine"] == "aarch64"
    assert facts["onnxruntime"] == qe.runtime_pins()["onnxruntime"]
    assert ("asimddp" in facts["cpu_features"]) is dotprod

    t0 = time.monotonic()
    proc = runner.run_python(args)
    elapsed = time.monotonic() - t0
    assert proc.returncode == 0, proc.stderr
    for level, tol in TOLERANCE.items():
        guest = np.load(tmp_path / f"y{level}.npy")
        assert guest.shape == host[level].shape == (5, N)
        diff = float(np.abs(guest - host[level]).max())
        scale = float(np.abs(host[level]).max())
        print(f"{cpu} accuracy_level {level}: guest {elapsed:.1f} s, max|diff| {diff:.3g}, max|y| {scale:.3g}")
        assert diff <= tol * scale, (level, diff, scale)


@pytest.mark.slow
def test_env_is_complete_and_reused(tmp_path):
    runner = q.QemuRunner("cortex-a76")
    env = runner.ensure_env()
    assert (env.path / "env.json").is_file() and env.python.is_file() and (env.site / "onnxruntime").is_dir()
    meta = json.loads((env.path / "env.json").read_text())
    assert meta["wheels"] == qe.runtime_pins() and meta["key"] == env.path.name
    t0 = time.monotonic()
    assert q.QemuRunner("cortex-a72").ensure_env().path == env.path
    assert time.monotonic() - t0 < 5
    assert os.access(env.qemu, os.X_OK)


@pytest.mark.slow
def test_device_entry_imports_only_runtime_deps():
    """``python -m edgepipe.runtime`` must import with onnxruntime, numpy, tokenizers and stdlib."""
    code = (
        "import sys, edgepipe.runtime, edgepipe.runtime.__main__\n"
        "heavy = ('yaml', 'click', 'torch', 'transformers', 'onnx', 'onnxruntime_genai', 'huggingface_hub')\n"
        "print(','.join(sorted(m for m in heavy if m in sys.modules)))\n"
    )
    proc = q.QemuRunner("cortex-a76", timeout=600).run_python(["-c", code])
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""


def test_qemu_for_an_x86_target_needs_an_explicit_cpu():
    """A target's own board is emulated only when it is an aarch64 board; an explicit CPU always works."""
    from edgepipe.targets import load_target

    with pytest.raises(InputError, match="x86-avx2 is x86_64"):
        get_runner("qemu", target=load_target("x86-avx2"))
    assert get_runner("qemu:cortex-a76", target=load_target("x86-avx2")).cpu == "cortex-a76"
    assert get_runner("qemu", target=load_target("raspberrypi5")).cpu == "cortex-a76"
