"""Validate an artifact on the real aarch64 onnxruntime under qemu user-mode emulation.

The runner keeps a self-contained aarch64 environment in the user's cache
(``$EDGEPIPE_CACHE`` or ``~/.cache/edgepipe``, subfolder ``qemu/<key>/``)::

    root/   an aarch64 Python 3.11 file tree (Debian bookworm arm64 packages, ``dpkg-deb -x``)
    site/   aarch64 wheels of onnxruntime, numpy, tokenizers (``pip install --target --platform``)
    bin/qemu-aarch64   qemu >= 8 from Debian (bookworm-backports ``qemu-user``), unless a usable
                       one is on PATH
    env.json           what was built, with which versions

Everything is fetched through a *private* apt configuration (own sources file, lists and
cache folders): the system's apt sources, lists and dpkg architectures are never changed.
The environment is built in a temporary folder and renamed into place when complete, so a
half-built one is never used. Its key covers the wheel versions (read from the edgepipe
package's own pins), the guest Python and the layout.

The guest then runs ``qemu-aarch64 -cpu CPU -L ROOT ROOT/usr/bin/python3.11 -m edgepipe.runtime
validate ARTIFACT --json ...`` with the checkout's ``edgepipe`` package on its PYTHONPATH. qemu's
default ``-cpu max`` (SVE/SME, slow paths, no real board has it) is never used. Emulated timings
are not throughput figures: throughput keys in the guest's JSON are nulled.
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
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepipe.devices import last_json_object
from edgepipe.errors import ArtifactError, DeviceError, InputError
from edgepipe.models import cache_root

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]

#: Bump when the layout or the build recipe of the cached environment changes.
LAYOUT_VERSION = 1
GUEST_PYTHON = "3.11"
#: Debian suite the aarch64 Python root comes from (the last one with python3.11).
GUEST_SUITE = "bookworm"
#: Debian arm64 packages whose files make a working python3.11 + the libraries wheels need.
GUEST_PACKAGES: tuple[str, ...] = (
    "python3.11-minimal",
    "libpython3.11-minimal",
    "libpython3.11-stdlib",
    "libc6",
    "zlib1g",
    "libexpat1",
    "libffi8",
    "libssl3",
    "libbz2-1.0",
    "liblzma5",
    "libsqlite3-0",
    "libgcc-s1",
    "libstdc++6",
    "libuuid1",
    "libncursesw6",
    "libtinfo6",
    "libreadline8",
    "libcrypt1",
    "libnsl2",
    "libtirpc3",
    "libdb5.3",
    "libgdbm6",
)
#: The device runtime's wheels; their versions are the package's own pins.
RUNTIME_WHEELS: tuple[str, ...] = ("onnxruntime", "numpy", "tokenizers")
WHEEL_PLATFORMS: tuple[str, ...] = ("manylinux_2_28_aarch64", "manylinux2014_aarch64")
MIN_QEMU = (8, 0)
#: Where qemu >= 8 comes from, per host Debian codename (default: the codename itself).
QEMU_SUITES = {"bookworm": "bookworm-backports"}
QEMU_PACKAGE = "qemu-user"
DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
DEFAULT_MIRROR = "http://deb.debian.org/debian"
#: CPU models that are not a real board: qemu's ``max`` turns on SVE/SME and very slow paths.
REFUSED_CPUS = frozenset({"max", "host", "any"})
CLAIMS = "accuracy on the aarch64 onnxruntime kernels under emulation; timings are emulated and are not throughput figures"
DEPS_HINT = "run `sudo bash .ci/qemu-deps.sh` (Debian: apt, dpkg-deb, debian-archive-keyring)"
_THROUGHPUT_KEY = re.compile(r"tok_s|tok/s|toks?_per_s|tokens_per_s|per_sec|per_second|throughput|(^|_)tps($|_)", re.I)
_CPU_NAME = re.compile(r"^[a-z0-9][a-z0-9._+-]*$", re.I)


# --------------------------------------------------------------------------- small helpers




def check_cpu(cpu: str) -> str:
    """Validate a qemu ``-cpu`` model name; refuse ``max``/``host``."""
    cpu = (cpu or "").strip()
    if not cpu or not _CPU_NAME.match(cpu):
        raise InputError(f"bad qemu CPU model {cpu!r}; use e.g. --device qemu:cortex-a76")
    if cpu.lower() in REFUSED_CPUS:
        raise InputError(
            f"qemu CPU model {cpu!r} is no real board (SVE/SME, slow paths); "
            "use e.g. --device qemu:cortex-a72 (Pi 4) or qemu:cortex-a76 (Pi 5)"
        )
    return cpu


def _parse_pins(requirements: Iterable[str]) -> dict[str, str]:
    pins: dict[str, str] = {}
    for req in requirements:
        m = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*==\s*([A-Za-z0-9_.+!-]+)\s*(;.*)?$", req)
        if not m or (m.group(3) and "extra" in m.group(3)):
            continue
        name = m.group(1).lower().replace("_", "-")
        if name in RUNTIME_WHEELS:
            pins[name] = m.group(2)
    return pins


def runtime_pins() -> dict[str, str]:
    """``{"onnxruntime": "1.31.1", ...}``: the base dependencies' pins, from the checkout's
    ``pyproject.toml`` if there is one next to the package, else from the installed metadata."""
    pyproject = _package_dir().parent / "pyproject.toml"
    pins: dict[str, str] = {}
    if pyproject.is_file():
        try:
            import tomllib

            data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
            if data.get("project", {}).get("name") == "edgepipe":
                pins = _parse_pins(data["project"].get("dependencies", []))
        except (ImportError, ValueError, KeyError) as exc:  # py3.10 or a broken file
            logger.debug("could not read pins from %s: %s", pyproject, exc)
    if len(pins) != len(RUNTIME_WHEELS):
        from importlib import metadata

        try:
            pins = _parse_pins(metadata.requires("edgepipe") or [])
        except metadata.PackageNotFoundError:
            pass
    missing = [w for w in RUNTIME_WHEELS if w not in pins]
    if missing:
        raise DeviceError(
            f"cannot find the pinned versions of {', '.join(missing)} (pyproject.toml or installed "
            "metadata): reinstall edgepipe with `pip install -e .`"
        )
    return {w: pins[w] for w in RUNTIME_WHEELS}


def env_key(pins: dict[str, str], *, guest_python: str = GUEST_PYTHON) -> str:
    """Name of the cached environment folder, e.g. ``py3.11-ort1.31.1-0123456789ab``."""
    payload = json.dumps(
        {
            "layout": LAYOUT_VERSION,
            "python": guest_python,
            "suite": GUEST_SUITE,
            "packages": list(GUEST_PACKAGES),
            "wheels": dict(sorted(pins.items())),
            "platforms": list(WHEEL_PLATFORMS),
        },
        sort_keys=True,
    )
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


def parse_cpu_features(cpuinfo: str) -> list[str] | None:
    """The ``Features`` line of an aarch64 /proc/cpuinfo, or ``None`` (e.g. an x86 cpuinfo
    leaked through by qemu < 8, which has ``flags`` instead)."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "Features":
            return value.split()
    return None


def strip_throughput(obj: Any) -> Any:
    """Copy of the guest JSON with every throughput figure set to ``None``: emulated speed
    says nothing about a board."""
    if isinstance(obj, dict):
        return {
            k: (None if _THROUGHPUT_KEY.search(str(k)) and not isinstance(v, (dict, list)) else strip_throughput(v))
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [strip_throughput(v) for v in obj]
    return obj


def _package_dir() -> Path:
    """The ``edgepipe`` package folder this process imports (a checkout or site-packages)."""
    import edgepipe.errors

    return Path(edgepipe.errors.__file__).resolve().parent


def _os_release() -> dict[str, str]:
    out: dict[str, str] = {}
    for path in ("/etc/os-release", "/usr/lib/os-release"):
        try:
            text = Path(path).read_text(encoding="utf-8")
        except OSError:
            continue
        for line in text.splitlines():
            k, sep, v = line.partition("=")
            if sep:
                out[k.strip()] = v.strip().strip('"')
        break
    return out


@dataclass(frozen=True)
class AptSource:
    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: str | None = None


def parse_apt_sources(text: str, *, deb822: bool) -> list[AptSource]:
    """Binary (``deb``) entries of a one-line ``.list`` or a deb822 ``.sources`` file."""
    out: list[AptSource] = []
    if deb822:
        for stanza in re.split(r"\n\s*\n", text):
            fields: dict[str, str] = {}
            last = None
            for line in stanza.splitlines():
                if not line.strip() or line.lstrip().startswith("#"):
                    continue
                if line[0] in " \t" and last:
                    fields[last] += " " + line.strip()
                    continue
                k, sep, v = line.partition(":")
                if sep:
                    last = k.strip().lower()
                    fields[last] = v.strip()
            if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
                continue
            for uri in fields.get("uris", "").split():
                out.append(
                    AptSource(
                        uri,
                        tuple(fields.get("suites", "").split()),
                        tuple(fields.get("components", "").split()),
                        fields.get("signed-by") or None,
                    )
                )
        return out
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.match(r"^deb\s+(?:\[([^\]]*)\]\s+)?(\S+)\s+(\S+)\s*(.*)$", line)
        if not m:
            continue
        opts = dict(o.split("=", 1) for o in (m.group(1) or "").split() if "=" in o)
        out.append(AptSource(m.group(2), (m.group(3),), tuple(m.group(4).split()), opts.get("signed-by")))
    return out


def system_debian_mirror(codename: str, etc_apt: Path = Path("/etc/apt")) -> AptSource:
    """The system's own Debian mirror (the entry serving ``codename`` ``main``)."""
    files: list[tuple[Path, bool]] = [(etc_apt / "sources.list", False)]
    parts = etc_apt / "sources.list.d"
    if parts.is_dir():
        files += [(p, False) for p in sorted(parts.glob("*.list"))]
        files += [(p, True) for p in sorted(parts.glob("*.sources"))]
    for path, deb822 in files:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError:
            continue
        for src in parse_apt_sources(text, deb822=deb822):
            if codename in src.suites and "main" in src.components and "security" not in src.uri:
                return src
    logger.warning("no %s main entry in %s; using %s", codename, etc_apt, DEFAULT_MIRROR)
    return AptSource(DEFAULT_MIRROR, (codename,), ("main",), None)


def _run(cmd: Sequence[str], *, what: str, fix: str, cwd: Path | None = None, timeout: float = 1800) -> str:
    logger.debug("running %s", " ".join(cmd))
    try:
        proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as exc:
        raise DeviceError(f"{what}: {cmd[0]} not found; {fix}") from exc
    except subprocess.TimeoutExpired as exc:
        raise DeviceError(f"{what}: `{' '.join(cmd[:3])} ...` timed out after {timeout:.0f} s; {fix}") from exc
    if proc.returncode != 0:
        tail = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        detail = tail[-1].strip() if tail else f"exit {proc.returncode}"
        logger.debug("%s failed:\n%s", what, proc.stderr)
        raise DeviceError(f"{what} failed ({detail}); {fix}")
    return proc.stdout


class _PrivateApt:
    """apt-get with its own sources file, lists and cache: the system's apt is left alone."""

    def __init__(self, workdir: Path, lines: Sequence[str], archs: Sequence[str]):
        self.dir = workdir
        (workdir / "lists" / "partial").mkdir(parents=True, exist_ok=True)
        (workdir / "cache" / "archives" / "partial").mkdir(parents=True, exist_ok=True)
        self.sources = workdir / "sources.list"
        self.sources.write_text("".join(line + "\n" for line in lines), encoding="utf-8")
        self.mirrors = ", ".join(sorted({" ".join(line.split("] ", 1)[-1].split()[:2]) for line in lines}))
        self.opts = [
            "-o", f"Dir::Etc::sourcelist={self.sources}",
            "-o", "Dir::Etc::sourceparts=-",
            "-o", f"Dir::State::Lists={workdir / 'lists'}",
            "-o", f"Dir::Cache={workdir / 'cache'}",
            "-o", "Dir::Etc::preferencesparts=-",
            "-o", "Acquire::Languages=none",
            "-o", "Debug::NoLocking=true",
        ]  # fmt: skip
        for arch in archs:
            self.opts += ["-o", f"APT::Architectures::={arch}"]
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # apt would drop to _apt, who may not read a private folder under root's home
            self.opts += ["-o", "APT::Sandbox::User=root"]

    def update(self) -> None:
        _run(
            ["apt-get", "-q", *self.opts, "update"],
            what="apt-get update (private lists)",
            fix=f"check that the Debian mirror ({self.mirrors}) is reachable, or {DEPS_HINT}",
            timeout=900,
        )

    def download(self, specs: Sequence[str], dest: Path) -> list[Path]:
        dest.mkdir(parents=True, exist_ok=True)
        _run(
            ["apt-get", "-q", *self.opts, "download", *specs],
            cwd=dest,
            what=f"apt-get download {' '.join(specs[:3])}{' ...' if len(specs) > 3 else ''}",
            fix=f"check that the Debian mirror ({self.mirrors}) is reachable, or {DEPS_HINT}",
            timeout=1800,
        )
        return sorted(dest.glob("*.deb"))


# --------------------------------------------------------------------------- the environment


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


_PROBE = r"""
import json, platform, sys
features = None
try:
    with open("/proc/cpuinfo") as f:
        for line in f:
            key, sep, value = line.partition(":")
            if sep and key.strip() == "Features":
                features = value.split()
                break
except OSError:
    pass
try:
    import onnxruntime
    ort = onnxruntime.__version__
except Exception as exc:  # reported, the caller decides
    ort = "import failed: %s" % exc
print(json.dumps({"machine": platform.machine(), "cpu_features": features, "onnxruntime": ort,
                  "python": platform.python_version()}))
"""


class QemuRunner:
    """Runs ``python -m edgepipe.runtime`` on the aarch64 onnxruntime under ``qemu-aarch64 -cpu CPU``."""

    name = "qemu"

    def __init__(
        self,
        cpu: str,
        *,
        cache_dir: Path | None = None,
        timeout: float | None = None,
        package_dir: Path | None = None,
    ):
        """``cache_dir`` defaults to :func:`cache_root`; ``timeout`` (seconds) bounds each guest
        run (default: none); ``package_dir`` is the ``edgepipe`` package folder the guest imports
        (default: the one this process imports)."""
        self.cpu = check_cpu(cpu)
        self.package_dir = Path(package_dir) if package_dir else None
        self._cache_dir = Path(cache_dir) if cache_dir else None
        self.timeout = timeout
        self._env: QemuEnv | None = None

    # ------------------------------------------------------------------ paths
    @property
    def cache_dir(self) -> Path:
        return (self._cache_dir or cache_root()) / "qemu"

    def env_dir(self) -> Path:
        return self.cache_dir / env_key(runtime_pins())

    # ------------------------------------------------------------------ qemu
    @staticmethod
    def _usable_qemu_on_path() -> tuple[Path, str] | None:
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

    def _check_tools(self, need_qemu: bool) -> None:
        """Fail early, before any download, with the command that fixes it."""
        missing = [t for t in ("apt-get", "dpkg-deb") if not shutil.which(t)]
        if need_qemu and (missing or _os_release().get("ID") != "debian"):
            raise DeviceError(
                "no qemu-aarch64 >= 8 on PATH and no Debian apt to fetch one: install qemu-user >= 8 "
                "(Debian bookworm: `apt-get install -t bookworm-backports qemu-user`) or "
                + DEPS_HINT
            )
        if missing:
            raise DeviceError(f"{' and '.join(missing)} not found (needed for the aarch64 Python root); {DEPS_HINT}")

    def ensure_env(self, progress: Progress | None = None) -> QemuEnv:
        """The cached environment, built on first use (see the module doc)."""
        if self._env is not None:
            return self._env
        say = progress or (lambda msg: logger.info("%s", msg))
        final = self.env_dir()
        if not (final / "env.json").is_file():
            on_path = self._usable_qemu_on_path()
            self._check_tools(need_qemu=on_path is None)
            self._build(final, say, fetch_qemu=on_path is None)
        meta = json.loads((final / "env.json").read_text(encoding="utf-8"))
        own = final / "bin" / "qemu-aarch64"
        if own.is_file():
            env = QemuEnv(final, own, meta.get("qemu_version", "?"))
        else:
            on_path = self._usable_qemu_on_path()
            if on_path is None:  # built with a PATH qemu that has gone since: fetch our own
                self._check_tools(need_qemu=True)
                self._add_qemu(final, say)
                env = QemuEnv(final, own, ".".join(map(str, qemu_version(own) or ())))
            else:
                env = QemuEnv(final, on_path[0], on_path[1])
        self._env = env
        return env

    # ------------------------------------------------------------------ build
    def _apt(self, workdir: Path, *, guest: bool, qemu: bool) -> tuple[_PrivateApt, str]:
        osr = _os_release()
        codename = osr.get("VERSION_CODENAME") or GUEST_SUITE
        mirror = system_debian_mirror(codename)
        signed = mirror.signed_by or (DEBIAN_KEYRING if Path(DEBIAN_KEYRING).is_file() else None)
        host_arch = _run(["dpkg", "--print-architecture"], what="dpkg --print-architecture", fix=DEPS_HINT).strip()
        qemu_suite = QEMU_SUITES.get(codename, codename)
        lines = []
        if guest:
            lines.append(_deb_line(mirror.uri, GUEST_SUITE, ["arm64"], signed))
        if qemu:
            lines.append(_deb_line(mirror.uri, qemu_suite, [host_arch], signed))
        archs = sorted({host_arch, *(["arm64"] if guest else [])})
        return _PrivateApt(workdir, lines, archs), qemu_suite

    def _fetch_qemu(self, apt: _PrivateApt, suite: str, work: Path, dest_bin: Path) -> str:
        debs = apt.download([f"{QEMU_PACKAGE}/{suite}"], work / "qemu-debs")
        unpack = work / "qemu-x"
        _run(["dpkg-deb", "-x", str(debs[0]), str(unpack)], what=f"dpkg-deb -x {debs[0].name}", fix=DEPS_HINT)
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

    def _add_qemu(self, final: Path, say: Progress) -> None:
        with tempfile.TemporaryDirectory(prefix=".qemu-", dir=final) as tmp:
            work = Path(tmp)
            apt, suite = self._apt(work / "apt", guest=False, qemu=True)
            say(f"apt-get update (private lists, {suite})")
            apt.update()
            say(f"downloading {QEMU_PACKAGE} from {suite}")
            self._fetch_qemu(apt, suite, work, work / "qemu-aarch64")
            (final / "bin").mkdir(exist_ok=True)
            os.replace(work / "qemu-aarch64", final / "bin" / "qemu-aarch64")

    def _build(self, final: Path, say: Progress, *, fetch_qemu: bool) -> None:
        base = final.parent
        base.mkdir(parents=True, exist_ok=True)
        _clean_stale_builds(base)
        work = Path(tempfile.mkdtemp(prefix=f".build-{final.name}-", dir=base))
        t0 = time.monotonic()
        try:
            pins = runtime_pins()
            apt, suite = self._apt(work / "apt", guest=True, qemu=fetch_qemu)
            say(f"qemu env: apt-get update (private lists: {GUEST_SUITE} arm64" + (f", {suite})" if fetch_qemu else ")"))
            apt.update()
            qemu_ver = None
            if fetch_qemu:
                say(f"qemu env: downloading {QEMU_PACKAGE} from {suite} and unpacking qemu-aarch64")
                qemu_ver = self._fetch_qemu(apt, suite, work, work / "bin" / "qemu-aarch64")
            say(f"qemu env: downloading {len(GUEST_PACKAGES)} arm64 packages for Python {GUEST_PYTHON}")
            debs = apt.download([f"{p}:arm64" for p in GUEST_PACKAGES], work / "debs")
            root = work / "root"
            for deb in debs:
                _run(["dpkg-deb", "-x", str(deb), str(root)], what=f"dpkg-deb -x {deb.name}", fix=DEPS_HINT)
            if not (root / "usr" / "bin" / f"python{GUEST_PYTHON}").is_file():
                raise DeviceError(f"the arm64 packages gave no usr/bin/python{GUEST_PYTHON}; {DEPS_HINT}")
            wheels = [f"{name}=={ver}" for name, ver in pins.items()]
            say(f"qemu env: pip install aarch64 wheels {' '.join(wheels)}")
            platforms = [a for p in WHEEL_PLATFORMS for a in ("--platform", p)]
            _run(
                [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile",
                 "--target", str(work / "site"), *platforms, "--only-binary=:all:",
                 "--python-version", GUEST_PYTHON, "--implementation", "cp", *wheels],
                what="pip install (aarch64 wheels)",
                fix="check that PyPI is reachable (`pip download onnxruntime`) and pip is installed "
                "(`python -m ensurepip`)",
                timeout=1800,
            )  # fmt: skip
            if sys.version_info[:2] == tuple(int(x) for x in GUEST_PYTHON.split(".")):
                # bytecode is architecture-independent: compiling on the host saves emulated time
                say("qemu env: precompiling bytecode on the host")
                import compileall

                for d in (root / "usr" / "lib" / f"python{GUEST_PYTHON}", work / "site"):
                    compileall.compile_dir(str(d), quiet=2, workers=0)
            shutil.rmtree(work / "apt", ignore_errors=True)
            shutil.rmtree(work / "debs", ignore_errors=True)
            shutil.rmtree(work / "qemu-debs", ignore_errors=True)
            qemu = work / "bin" / "qemu-aarch64" if fetch_qemu else (self._usable_qemu_on_path() or (None,))[0]
            if qemu is None:
                raise DeviceError("qemu-aarch64 vanished from PATH during set-up; " + DEPS_HINT)
            say("qemu env: smoke test (import onnxruntime in the guest)")
            probe = _probe(QemuEnv(work, Path(qemu), qemu_ver or "?"), "cortex-a72", timeout=600)
            meta = {
                "layout": LAYOUT_VERSION,
                "key": final.name,
                "python": GUEST_PYTHON,
                "suite": GUEST_SUITE,
                "packages": [d.name for d in debs],
                "wheels": pins,
                "qemu_version": qemu_ver,
                "qemu_package": QEMU_PACKAGE if fetch_qemu else None,
                "guest_python": probe.get("python"),
                "built_seconds": round(time.monotonic() - t0, 1),
            }
            (work / "env.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
            try:
                os.rename(work, final)
            except OSError:
                if not (final / "env.json").is_file():
                    raise
                logger.info("another process finished %s first; using it", final)
                shutil.rmtree(work, ignore_errors=True)
            say(f"qemu env: ready in {time.monotonic() - t0:.0f} s at {final}")
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise

    # ------------------------------------------------------------------ running
    def guest_command(self, env: QemuEnv, args: Sequence[str]) -> list[str]:
        """``qemu-aarch64 -cpu CPU -L ROOT ROOT/usr/bin/python3.11 ARGS...``."""
        return [str(env.qemu), "-cpu", self.cpu, "-L", str(env.root), str(env.python), *args]

    def run_python(
        self,
        args: Sequence[str],
        *,
        progress: Progress | None = None,
        timeout: float | None = None,
        extra_env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run the guest Python with ``args`` (e.g. ``["-m", "edgepipe.runtime", ...]``), with
        the aarch64 wheels and this edgepipe package importable. Does not check the exit code."""
        env = self.ensure_env(progress)
        return _run_guest(
            env, self.cpu, args, timeout=timeout or self.timeout, extra_env=extra_env, package_dir=self.package_dir
        )

    def probe(self, progress: Progress | None = None) -> dict[str, Any]:
        """``{"machine", "cpu_features", "onnxruntime", "python"}`` as the guest sees them."""
        return _probe(self.ensure_env(progress), self.cpu, timeout=600)

    def validate(
        self,
        artifact: Path,
        *,
        eval_file: Path | None = None,
        max_tokens: int | None = None,
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        artifact = Path(artifact).resolve()
        if not artifact.exists():
            raise InputError(f"artifact {artifact} does not exist")
        # --no-bench: an emulated benchmark takes long and measures nothing about a board
        args = ["-m", "edgepipe.runtime", "validate", str(artifact), "--json", "--no-bench"]
        if eval_file is not None:
            eval_file = Path(eval_file).resolve()
            if not eval_file.is_file():
                raise InputError(f"eval file {eval_file} does not exist")
            args += ["--eval", str(eval_file)]
        if max_tokens is not None:
            args += ["--max-tokens", str(int(max_tokens))]
        say = progress or (lambda msg: logger.info("%s", msg))
        env = self.ensure_env(say)
        say(f"qemu {self.cpu}: probing the guest CPU")
        device = _probe(env, self.cpu, timeout=600)
        say(f"qemu {self.cpu}: running edgepipe.runtime validate (emulated, 200-1000x slower than a board)")
        t0 = time.monotonic()
        proc = _run_guest(env, self.cpu, args, timeout=self.timeout, package_dir=self.package_dir)
        elapsed = time.monotonic() - t0
        guest = last_json_object(proc.stdout)
        if guest is None:
            msg = _last_line(proc.stderr) or _last_line(proc.stdout) or "no output"
            if msg.startswith("error: "):  # an edgepipe error the runtime reported (bad artifact, ...)
                err = ArtifactError if proc.returncode == 2 else DeviceError
                raise err(f"validation in the qemu guest ({self.cpu}): {msg.removeprefix('error: ')}")
            raise DeviceError(
                f"`python -m edgepipe.runtime validate` in the qemu guest ({self.cpu}) exited {proc.returncode} "
                f"without JSON: {msg}"
            )
        result = strip_throughput(guest)
        result["device"] = {
            **(guest.get("device") if isinstance(guest.get("device"), dict) else {}),
            "runner": "qemu",
            "cpu": self.cpu,
            "machine": device.get("machine"),
            "cpu_features": device.get("cpu_features") or [],
            "onnxruntime": device.get("onnxruntime"),
            "python": device.get("python"),
            "qemu": env.qemu_version,
            "exit_code": proc.returncode,
            "emulated_seconds": round(elapsed, 1),
        }
        result["runner"] = "qemu"  # as the local runner reports it
        result["claims"] = CLAIMS
        return result


# --------------------------------------------------------------------------- module internals


def _deb_line(uri: str, suite: str, archs: Sequence[str], signed_by: str | None) -> str:
    opts = [f"arch={','.join(archs)}"] + ([f"signed-by={signed_by}"] if signed_by else [])
    return f"deb [{' '.join(opts)}] {uri} {suite} main"


def _clean_stale_builds(base: Path, max_age_s: float = 6 * 3600) -> None:
    now = time.time()
    for p in base.glob(".build-*"):
        try:
            if now - p.stat().st_mtime > max_age_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


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


def _run_guest(
    env: QemuEnv,
    cpu: str,
    args: Sequence[str],
    *,
    timeout: float | None,
    extra_env: dict[str, str] | None = None,
    package_dir: Path | None = None,
) -> subprocess.CompletedProcess[str]:
    cmd = [str(env.qemu), "-cpu", cpu, "-L", str(env.root), str(env.python), *args]
    # Only the edgepipe package goes on the guest path (not the host's site-packages next to it).
    with tempfile.TemporaryDirectory(prefix="edgepipe-qemu-") as code:
        (Path(code) / "edgepipe").symlink_to(package_dir or _package_dir(), target_is_directory=True)
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
            f"{_last_line(proc.stderr) or 'no message'}; qemu {env.qemu_version} may be too old (need >= 8)"
        )
    return proc


def _probe(env: QemuEnv, cpu: str, *, timeout: float) -> dict[str, Any]:
    proc = _run_guest(env, cpu, ["-c", _PROBE], timeout=timeout)
    data = last_json_object(proc.stdout)
    if proc.returncode != 0 or data is None:
        raise DeviceError(
            f"the qemu guest Python ({cpu}) does not start: {_last_line(proc.stderr) or 'no output'}; "
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




def _last_line(text: str | None) -> str:
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else ""
