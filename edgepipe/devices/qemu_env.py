"""The cached aarch64 environment the qemu transport runs in, and how a guest Python runs there.

It lives in the user's cache (``$EDGEPIPE_CACHE`` or ``~/.cache/edgepipe``) as ``qemu/<key>/``::

    root/   an aarch64 Python 3.11 file tree (Debian bookworm arm64 packages, ``dpkg-deb -x``)
    site/   aarch64 wheels of onnxruntime, numpy, tokenizers (``pip install --target --platform``)
    bin/qemu-aarch64   qemu >= 8 (bookworm-backports ``qemu-user``), unless a usable one is on PATH
    env.json           what was built, with which versions

Everything is fetched through a private apt (:mod:`.apt`): the system's apt is never changed. It is
built in a temporary folder and renamed into place when complete, so a half-built one is never
used. Its key covers the wheel versions (edgepipe's own pins), the guest Python and the layout.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepipe.devices import pyroot
from edgepipe.devices.apt import PrivateApt, host_arch, os_release
from edgepipe.devices.base import Progress, last_json_object, last_line, run_tool
from edgepipe.devices.provision import package_dir as edgepipe_package_dir
from edgepipe.devices.provision import read_pins
from edgepipe.devices.remote import with_call
from edgepipe.errors import DeviceError

logger = logging.getLogger(__name__)

#: Bump when the layout or the build recipe of the cached environment changes.
LAYOUT_VERSION = 1
GUEST_PYTHON = pyroot.PYTHON
#: Debian suite the aarch64 Python root comes from (the last one with python3.11).
GUEST_SUITE = pyroot.SUITE
#: Debian arm64 packages whose files make a working python3.11 + the libraries wheels need.
GUEST_PACKAGES: tuple[str, ...] = pyroot.PYTHON_PACKAGES
GUEST_ARCH = pyroot.ARCHES["arm64"]
#: The device runtime's wheels (jinja2 + markupsafe: ``serve``'s chat templates); their versions are the package's own pins.
RUNTIME_WHEELS: tuple[str, ...] = ("onnxruntime", "numpy", "tokenizers", "jinja2", "markupsafe")
WHEEL_PLATFORMS: tuple[str, ...] = GUEST_ARCH.wheel_platforms
MIN_QEMU = (8, 0)
#: Where qemu >= 8 comes from, per host Debian codename (default: the codename itself).
QEMU_SUITES = {"bookworm": "bookworm-backports"}
QEMU_PACKAGE = "qemu-user"
DEPS_HINT = pyroot.DEPS_HINT


@dataclass(frozen=True)
class QemuEnv:
    """A complete cached aarch64 environment."""

    path: Path
    qemu: Path
    qemu_version: str

    @property
    def root(self) -> Path:
        return self.path / "root"

    @property
    def site(self) -> Path:
        return self.path / "site"

    @property
    def python(self) -> Path:
        return self.root / "usr" / "bin" / f"python{GUEST_PYTHON}"


def runtime_pins() -> dict[str, str]:
    """``{"onnxruntime": "1.31.1", ...}``: the versions of the guest's wheels."""
    return read_pins(RUNTIME_WHEELS)


def env_key(pins: dict[str, str], *, guest_python: str = GUEST_PYTHON) -> str:
    """Name of the cached environment folder, e.g. ``py3.11-ort1.31.1-0123456789ab``."""
    payload = json.dumps(
        {"layout": LAYOUT_VERSION, "python": guest_python, "suite": GUEST_SUITE, "packages": list(GUEST_PACKAGES),
         "wheels": dict(sorted(pins.items())), "platforms": list(WHEEL_PLATFORMS)},
        sort_keys=True,
    )  # fmt: skip
    digest = hashlib.sha256(payload.encode()).hexdigest()[:12]
    return f"py{guest_python}-ort{pins.get('onnxruntime', 'none')}-{digest}"


def parse_qemu_version(text: str) -> tuple[int, ...] | None:
    """``qemu-aarch64 version 10.0.2 (Debian ...)`` -> ``(10, 0, 2)``."""
    m = re.search(r"version\s+(\d+)\.(\d+)(?:\.(\d+))?", text)
    if not m:
        return None
    return tuple(int(g) for g in m.groups() if g is not None)


def qemu_version(qemu: Path | str) -> tuple[int, ...] | None:
    try:
        out = subprocess.run([str(qemu), "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return parse_qemu_version(out.stdout)


def usable_qemu_on_path() -> tuple[Path, str] | None:
    """A ``qemu-aarch64`` >= 8 on PATH and its version; an older one is ignored with a warning."""
    for name in ("qemu-aarch64", "qemu-aarch64-static"):
        found = shutil.which(name)
        if not found:
            continue
        ver = qemu_version(found)
        if ver and ver[:2] >= MIN_QEMU:
            return Path(found), ".".join(map(str, ver))
        logger.warning(
            "ignoring %s (version %s): qemu < %d.%d shows the host's x86 /proc/cpuinfo to the "
            "guest and onnxruntime crashes",
            found, ".".join(map(str, ver)) if ver else "unknown", *MIN_QEMU,
        )  # fmt: skip
    return None


def check_tools(need_qemu: bool) -> None:
    """Fail early, before any download, with the command that fixes it."""
    missing = [t for t in ("apt-get", "dpkg-deb") if not shutil.which(t)]
    if need_qemu and (missing or os_release().get("ID") != "debian"):
        raise DeviceError(
            "no qemu-aarch64 >= 8 on PATH and no Debian apt to fetch one: install qemu-user >= 8 "
            "(Debian bookworm: `apt-get install -t bookworm-backports qemu-user`) or " + DEPS_HINT
        )
    if missing:
        raise DeviceError(f"{' and '.join(missing)} not found (needed for the aarch64 Python root); {DEPS_HINT}")


def ensure_env(final: Path, say: Progress) -> QemuEnv:
    """The environment in ``final``, built on first use (see the module doc)."""
    if not (final / "env.json").is_file():
        on_path = usable_qemu_on_path()
        check_tools(need_qemu=on_path is None)
        _build(final, say, fetch_qemu=on_path is None)
    meta = json.loads((final / "env.json").read_text(encoding="utf-8"))
    own = final / "bin" / "qemu-aarch64"
    if own.is_file():
        return QemuEnv(final, own, meta.get("qemu_version", "?"))
    on_path = usable_qemu_on_path()
    if on_path is not None:
        return QemuEnv(final, on_path[0], on_path[1])
    check_tools(need_qemu=True)  # built with a PATH qemu that has gone since: fetch our own
    _add_qemu(final, say)
    return QemuEnv(final, own, ".".join(map(str, qemu_version(own) or ())))


# --------------------------------------------------------------------------- building


def _apt(workdir: Path, *, guest: bool, qemu: bool) -> tuple[PrivateApt, str]:
    """A private apt for the guest's arm64 packages and/or qemu, and the suite qemu comes from."""
    codename = os_release().get("VERSION_CODENAME") or GUEST_SUITE
    qemu_suite = QEMU_SUITES.get(codename, codename)
    arch = host_arch(DEPS_HINT)
    suites: list[tuple[str, Sequence[str]]] = []
    if guest:
        suites.append((GUEST_SUITE, ["arm64"]))
    if qemu:
        suites.append((qemu_suite, [arch]))
    return PrivateApt.for_suites(workdir, suites, codename=codename, host_arch=arch, fix=DEPS_HINT), qemu_suite


def _fetch_qemu(apt: PrivateApt, suite: str, work: Path, dest_bin: Path) -> str:
    debs = apt.download([f"{QEMU_PACKAGE}/{suite}"], work / "qemu-debs")
    unpack = work / "qemu-x"
    run_tool(["dpkg-deb", "-x", str(debs[0]), str(unpack)], what=f"dpkg-deb -x {debs[0].name}", fix=DEPS_HINT, timeout=1800)
    binary = unpack / "usr" / "bin" / "qemu-aarch64"
    if not binary.is_file():
        raise DeviceError(f"{debs[0].name} has no usr/bin/qemu-aarch64; install qemu-user >= 8 and put it on PATH")
    dest_bin.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(binary, dest_bin)
    shutil.rmtree(unpack, ignore_errors=True)
    ver = qemu_version(dest_bin)
    if not ver or ver[:2] < MIN_QEMU:
        raise DeviceError(
            f"{debs[0].name} gives qemu {ver}, need >= {MIN_QEMU[0]} (older ones show the host's x86 "
            "/proc/cpuinfo to the guest); install qemu-user >= 8 and put qemu-aarch64 on PATH"
        )
    return ".".join(map(str, ver))


def _add_qemu(final: Path, say: Progress) -> None:
    with tempfile.TemporaryDirectory(prefix=".qemu-", dir=final) as tmp:
        work = Path(tmp)
        apt, suite = _apt(work / "apt", guest=False, qemu=True)
        say(f"apt-get update (private lists, {suite})")
        apt.update()
        say(f"downloading {QEMU_PACKAGE} from {suite}")
        _fetch_qemu(apt, suite, work, work / "qemu-aarch64")
        (final / "bin").mkdir(exist_ok=True)
        os.replace(work / "qemu-aarch64", final / "bin" / "qemu-aarch64")


def _build(final: Path, say: Progress, *, fetch_qemu: bool) -> None:
    """Build in a temporary sibling renamed to ``final`` when complete: never seen half-built, nothing left on failure."""
    base = final.parent
    base.mkdir(parents=True, exist_ok=True)
    _clean_stale_builds(base)
    work = Path(tempfile.mkdtemp(prefix=f".build-{final.name}-", dir=base))
    t0 = time.monotonic()
    try:
        meta = _fill(work, final.name, say, fetch_qemu=fetch_qemu)
        meta["built_seconds"] = round(time.monotonic() - t0, 1)
        (work / "env.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        _move_into_place(work, final)
        say(f"qemu env: ready in {time.monotonic() - t0:.0f} s at {final}")
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise


def _fill(work: Path, key: str, say: Progress, *, fetch_qemu: bool) -> dict[str, Any]:
    """Fetch and smoke-test everything in ``work``; what was built (for ``env.json``)."""
    pins = runtime_pins()
    apt, suite = _apt(work / "apt", guest=True, qemu=fetch_qemu)
    say(f"qemu env: apt-get update (private lists: {GUEST_SUITE} arm64" + (f", {suite})" if fetch_qemu else ")"))
    apt.update()
    qemu_ver = None
    if fetch_qemu:
        say(f"qemu env: downloading {QEMU_PACKAGE} from {suite} and unpacking qemu-aarch64")
        qemu_ver = _fetch_qemu(apt, suite, work, work / "bin" / "qemu-aarch64")
    debs = _unpack_guest_root(apt, work, say)
    _install_wheels(work / "site", pins, say)
    _precompile([work / "root" / "usr" / "lib" / f"python{GUEST_PYTHON}", work / "site"], say)
    for sub in ("apt", "debs", "qemu-debs"):
        shutil.rmtree(work / sub, ignore_errors=True)
    qemu = _build_qemu(work, fetch_qemu=fetch_qemu)
    say("qemu env: smoke test (import onnxruntime in the guest)")
    probe = probe_guest(QemuEnv(work, qemu, qemu_ver or "?"), "cortex-a72", timeout=600)
    return {
        "layout": LAYOUT_VERSION, "key": key, "python": GUEST_PYTHON, "suite": GUEST_SUITE,
        "packages": [d.name for d in debs], "wheels": pins, "qemu_version": qemu_ver,
        "qemu_package": QEMU_PACKAGE if fetch_qemu else None, "guest_python": probe.get("python"),
    }  # fmt: skip


def _unpack_guest_root(apt: PrivateApt, work: Path, say: Progress) -> list[Path]:
    """The guest's arm64 packages unpacked into ``work/root`` (the .debs it took)."""
    return pyroot.unpack_python_root(apt, GUEST_ARCH, work / "debs", work / "root", lambda msg: say(f"qemu env: {msg}"))


def _install_wheels(site: Path, pins: dict[str, str], say: Progress) -> None:
    """The pinned aarch64 wheels into ``site``, by the host's pip (nothing runs emulated)."""
    pyroot.install_wheels(site, pins, GUEST_ARCH, lambda msg: say(f"qemu env: {msg}"))


def _precompile(dirs: Sequence[Path], say: Progress) -> None:
    """Bytecode is architecture-independent: if the host runs the guest's Python, compiling here saves emulated time."""
    if sys.version_info[:2] != tuple(int(x) for x in GUEST_PYTHON.split(".")):
        return
    say("qemu env: precompiling bytecode on the host")
    import compileall

    for d in dirs:
        compileall.compile_dir(str(d), quiet=2, workers=0)


def _build_qemu(work: Path, *, fetch_qemu: bool) -> Path:
    """The qemu for the smoke test: the fetched one, or the one on PATH (checked again: it may have gone meanwhile)."""
    qemu = work / "bin" / "qemu-aarch64" if fetch_qemu else (usable_qemu_on_path() or (None,))[0]
    if qemu is None:
        raise DeviceError("qemu-aarch64 vanished from PATH during set-up; " + DEPS_HINT)
    return Path(qemu)


def _move_into_place(work: Path, final: Path) -> None:
    """Rename ``work`` to ``final``; if another process got there first, its environment is as good: use it, drop ours."""
    try:
        os.rename(work, final)
    except OSError:
        if not (final / "env.json").is_file():
            raise
        logger.info("another process finished %s first; using it", final)
        shutil.rmtree(work, ignore_errors=True)


def _clean_stale_builds(base: Path, max_age_s: float = 6 * 3600) -> None:
    now = time.time()
    for p in base.glob(".build-*"):
        try:
            if now - p.stat().st_mtime > max_age_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


# --------------------------------------------------------------------------- running the guest


def _guest_environ(env: QemuEnv, code_dir: Path, extra: dict[str, str] | None) -> dict[str, str]:
    """A clean environment: nothing of the host's Python or loader settings reaches the guest."""
    out = {
        "PATH": "/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/tmp"),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "PYTHONPATH": f"{env.site}{os.pathsep}{code_dir}",
        "PYTHONNOUSERSITE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
        "PYTHONUNBUFFERED": "1",
    }
    for k in ("TMPDIR", "OMP_NUM_THREADS"):
        if k in os.environ:
            out[k] = os.environ[k]
    out.update(extra or {})
    return out


def run_guest(
    env: QemuEnv,
    cpu: str,
    args: Sequence[str],
    *,
    timeout: float | None,
    extra_env: dict[str, str] | None = None,
    package_dir: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    """``qemu-aarch64 -cpu CPU -L ROOT ROOT/usr/bin/python3.11 ARGS...`` with the aarch64 wheels and
    the ``edgepipe`` package importable. A crash (signal) is a :class:`DeviceError`; the exit code is not checked."""
    cmd = [str(env.qemu), "-cpu", cpu, "-L", str(env.root), str(env.python), *args]
    # Only the edgepipe package goes on the guest path (not the host's site-packages next to it).
    with tempfile.TemporaryDirectory(prefix="edgepipe-qemu-") as code:
        (Path(code) / "edgepipe").symlink_to(package_dir or edgepipe_package_dir(), target_is_directory=True)
        logger.debug("guest: %s", " ".join(cmd))
        try:
            proc = subprocess.run(
                cmd,
                cwd=code,  # not the caller's cwd: `-m` puts it first on sys.path
                capture_output=True,
                text=True,
                timeout=timeout,
                env=_guest_environ(env, Path(code), extra_env),
            )
        except FileNotFoundError as exc:
            raise DeviceError(f"{env.qemu} not found; delete {env.path} and retry, or {DEPS_HINT}") from exc
        except subprocess.TimeoutExpired as exc:
            raise DeviceError(
                f"the qemu guest ({cpu}) ran over {timeout:.0f} s; use a smaller --max-tokens or a longer timeout"
            ) from exc
    if proc.stderr:
        logger.debug("guest stderr:\n%s", proc.stderr)
    if proc.returncode < 0 or proc.returncode in (128 + 11, 139):
        raise DeviceError(
            f"the qemu guest ({cpu}) crashed (signal {-proc.returncode if proc.returncode < 0 else 11}): "
            f"{last_line(proc.stderr) or 'no message'}; qemu {env.qemu_version} may be too old (need >= 8)"
        )
    return proc


def probe_guest(env: QemuEnv, cpu: str, *, timeout: float) -> dict[str, Any]:
    """What the guest sees (``remote/guest_probe.py``), refused unless it is an aarch64 with a
    working onnxruntime."""
    proc = run_guest(env, cpu, ["-c", with_call("guest_probe", {})], timeout=timeout)
    data = last_json_object(proc.stdout)
    if proc.returncode != 0 or data is None:
        raise DeviceError(
            f"the qemu guest Python ({cpu}) does not start: {last_line(proc.stderr) or 'no output'}; "
            f"delete {env.path} to rebuild it"
        )
    if data.get("machine") != "aarch64" or not data.get("cpu_features"):
        raise DeviceError(
            f"qemu {env.qemu_version} shows the guest machine {data.get('machine')!r} without an aarch64 "
            "/proc/cpuinfo Features line (qemu < 8 leaks the host's x86 cpuinfo); install qemu-user >= 8 "
            "(`apt-get install -t bookworm-backports qemu-user`) or remove the old one from PATH"
        )
    if not str(data.get("onnxruntime", "")).split(".")[0].isdigit():
        raise DeviceError(f"onnxruntime does not import in the qemu guest ({data.get('onnxruntime')}); delete {env.path}")
    return data
