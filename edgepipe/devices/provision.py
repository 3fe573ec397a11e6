"""The device's Python runtime: pinned wheels for its platform, this checkout's wheel, a board venv.

``venv-<key>/`` on a board holds the torch-free runtime: a wheel of *this* checkout (``pip wheel
--no-deps``), plus the pinned base dependencies (``[project] dependencies`` of ``pyproject.toml``)
and what they need, downloaded on the host for the board's platform (``pip download
--only-binary=:all: --platform manylinux_2_X_<machine> --python-version X.Y``), copied over and
installed with ``pip install --no-index --find-links``: the board needs no network and no
``python3-venv``/``ensurepip`` (the venv is made ``--without-pip``, pip runs from its wheel).
``<key>`` covers the board's Python and machine, glibc and the pins; the venv is complete only
when ``edgepipe-venv.json`` is in it, which also records the checkout's source hash, so a changed
checkout reinstalls only the edgepipe wheel.

Host cache: ``$EDGEPIPE_CACHE`` or ``~/.cache/edgepipe``, ``wheels/<key>/`` (dependency wheels)
and ``wheels/edgepipe-<source-hash>/`` (the checkout's wheel). Each is built in a temporary
folder and renamed into place, so a half-built one is never used.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

from edgepipe.devices.base import Progress, run_tool
from edgepipe.errors import DeviceError
from edgepipe.models import cache_root

logger = logging.getLogger(__name__)

#: Bump when the board's venv recipe changes.
LAYOUT_VERSION = 1
#: The base dependencies a board venv gets, at the versions ``pyproject.toml`` pins.
BASE_DEPENDENCIES: tuple[str, ...] = ("onnxruntime", "numpy", "tokenizers", "click", "pyyaml", "cryptography", "jinja2", "markupsafe")
VENV_MARKER = "edgepipe-venv.json"
MIN_PYTHON = (3, 10)


def package_dir() -> Path:
    """The ``edgepipe`` package folder this process imports (a checkout or site-packages)."""
    import edgepipe.errors

    return Path(edgepipe.errors.__file__).resolve().parent


def checkout_root() -> Path:
    """The source checkout this edgepipe is imported from (``pyproject.toml`` next to the package)."""
    root = package_dir().parent
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or 'name = "edgepipe"' not in pyproject.read_text(encoding="utf-8"):
        raise DeviceError(
            f"the ssh runner builds the board's wheel from an edgepipe checkout, and {root} is none; "
            "install edgepipe from a checkout (`pip install -e .`)"
        )
    return root


def _parse_pins(requirements: Iterable[str], names: Sequence[str]) -> dict[str, str]:
    pins: dict[str, str] = {}
    for req in requirements:
        m = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*==\s*([A-Za-z0-9_.+!-]+)\s*(;.*)?$", req)
        if not m or (m.group(3) and "extra" in m.group(3)):
            continue
        name = m.group(1).lower().replace("_", "-")
        if name in names:
            pins[name] = m.group(2)
    return pins


def read_pins(names: Sequence[str]) -> dict[str, str]:
    """``{name: version}`` for ``names`` (in that order), the exact pins of the checkout's
    ``pyproject.toml`` next to the package, else of the installed metadata: the device gets the
    versions the host was tested with."""
    pyproject = package_dir().parent / "pyproject.toml"
    pins: dict[str, str] = {}
    if pyproject.is_file():
        try:
            import tomllib

            data = tomllib.loads(pyproject.read_text(encoding="utf-8"))
            if data.get("project", {}).get("name") == "edgepipe":
                pins = _parse_pins(data["project"].get("dependencies", []), names)
        except (ImportError, OSError, ValueError, KeyError) as exc:  # py3.10 or a broken file
            logger.debug("could not read pins from %s: %s", pyproject, exc)
    if len(pins) != len(names):
        from importlib import metadata

        try:
            pins = _parse_pins(metadata.requires("edgepipe") or [], names)
        except metadata.PackageNotFoundError:
            pass
    missing = [n for n in names if n not in pins]
    if missing:
        raise DeviceError(
            f"cannot find the pinned versions of {', '.join(missing)} (pyproject.toml or installed "
            "metadata): reinstall edgepipe with `pip install -e .`"
        )
    return {n: pins[n] for n in names}


def base_pins() -> dict[str, str]:
    """``{"onnxruntime": "1.31.1", "numpy": ..., "tokenizers": ..., "click": ..., "pyyaml": ..., "cryptography": ..., "jinja2": ..., "markupsafe": ...}``."""
    return read_pins(BASE_DEPENDENCIES)


def source_hash(root: Path | None = None) -> str:
    """sha256 (16 hex) over what goes into the checkout's wheel: pyproject.toml, edgepipe/, targets/."""
    root = root or checkout_root()
    h = hashlib.sha256()
    files = [root / "pyproject.toml"]
    for sub in ("edgepipe", "targets"):
        for dirpath, dirnames, filenames in os.walk(root / sub):
            dirnames[:] = sorted(d for d in dirnames if d != "__pycache__" and not d.startswith("."))
            files += [Path(dirpath) / f for f in sorted(filenames) if not f.endswith((".pyc", ".pyo"))]
    for f in files:
        if f.is_file():
            h.update(f.relative_to(root).as_posix().encode() + b"\0")
            h.update(hashlib.sha256(f.read_bytes()).digest())
    return h.hexdigest()[:16]


def wheel_platforms(machine: str, libc: Sequence[str] | None) -> list[str]:
    """pip ``--platform`` tags a glibc Linux board accepts, newest first."""
    arch = {"arm64": "aarch64", "amd64": "x86_64"}.get(machine, machine)
    name, version = (list(libc or []) + ["", ""])[:2]
    m = re.match(r"^(\d+)\.(\d+)", version or "")
    if name != "glibc" or not m:
        raise DeviceError(
            f"the board's C library is {name or 'unknown'} {version}: onnxruntime ships wheels for glibc "
            "Linux only; use a glibc distribution (Raspberry Pi OS, Debian, Ubuntu) on the board"
        )
    major, minor = int(m.group(1)), int(m.group(2))
    tags = [f"manylinux_{major}_{k}_{arch}" for k in range(minor, 16, -1)] if major == 2 else []
    if major == 2 and minor >= 17:
        tags.append(f"manylinux2014_{arch}")
    if arch in ("x86_64", "i686") and major == 2:
        tags += [f"manylinux2010_{arch}"] * (minor >= 12) + [f"manylinux1_{arch}"] * (minor >= 5)
    return tags


def venv_key(pins: dict[str, str], python: str, machine: str, libc: Sequence[str]) -> str:
    """``py3.11-aarch64-0123456789ab``: names the board venv and the host's wheel folder."""
    payload = json.dumps(
        {"layout": LAYOUT_VERSION, "pins": dict(sorted(pins.items())), "python": python, "machine": machine,
         "libc": list(libc)},
        sort_keys=True,
    )  # fmt: skip
    return f"py{python}-{machine}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


def _publish(work: Path, final: Path, done: str) -> None:
    """Rename a finished build folder into place; if another process won the race (``final`` holds
    its ``done`` file), keep theirs."""
    try:
        os.rename(work, final)
    except OSError:
        if not any(final.glob(done)):
            raise
        shutil.rmtree(work, ignore_errors=True)


def dependency_wheels(key: str, pins: dict[str, str], python: str, platforms: list[str], say: Progress) -> Path:
    """The host folder with the board's dependency wheels (and pip), downloaded once per key."""
    final = cache_root() / "wheels" / key
    if (final / "wheels.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".tmp-{key}-", dir=final.parent))
    try:
        reqs = [f"{n}=={v}" for n, v in pins.items()] + ["pip"]
        say(f"downloading wheels for the board (cp{python}, {platforms[0] if platforms else '?'}): {' '.join(reqs)}")
        t0 = time.monotonic()
        run_tool(
            [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check", "--only-binary=:all:",
             *[a for p in platforms for a in ("--platform", p)], "--python-version", python, "--implementation", "cp",
             "--dest", str(work), *reqs],
            what=f"pip download for the board (cp{python}, {platforms[0] if platforms else '?'})",
            fix="check that PyPI is reachable; a 32-bit OS (armv7l) or a Python older than the pins "
            "support has no onnxruntime/numpy wheels: use a 64-bit OS with Python >= 3.11 on the board",
            timeout=1800,
        )  # fmt: skip
        names = sorted(p.name for p in work.glob("*.whl"))
        meta = {"key": key, "pins": pins, "python": python, "platforms": platforms, "wheels": names,
                "seconds": round(time.monotonic() - t0, 1)}  # fmt: skip
        (work / "wheels.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
        _publish(work, final, "wheels.json")
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return final


def edgepipe_wheel(src_hash: str, say: Progress) -> Path:
    """This checkout's wheel (``pip wheel --no-deps``), built once per source hash."""
    base = cache_root() / "wheels"
    final = base / f"edgepipe-{src_hash}"
    found = sorted(final.glob("edgepipe-*.whl"))
    if found:
        return found[0]
    base.mkdir(parents=True, exist_ok=True)
    root = checkout_root()
    work = Path(tempfile.mkdtemp(prefix=f".tmp-edgepipe-{src_hash}-", dir=base))
    try:
        say(f"building the edgepipe wheel from {root}")
        run_tool(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps",
             "-w", str(work), str(root)],
            what=f"pip wheel {root}", fix="check that the checkout builds (`pip wheel --no-deps .`)", timeout=900,
        )  # fmt: skip
        if not list(work.glob("edgepipe-*.whl")):
            raise DeviceError(f"pip wheel {root} made no edgepipe wheel; check the checkout's pyproject.toml")
        _publish(work, final, "edgepipe-*.whl")
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    # keep the three newest checkout wheels
    olds = sorted(base.glob("edgepipe-*"), key=lambda p: p.stat().st_mtime, reverse=True)[3:]
    for old in olds:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return sorted(final.glob("edgepipe-*.whl"))[0]


class RemoteHost(Protocol):
    """What installing a venv needs of a transport: run a remote program, send files."""

    @property
    def destination(self) -> str: ...

    def call(self, program: str, args: dict[str, Any], *, what: str, timeout: float = 300) -> dict[str, Any]: ...

    def send(self, local_dir: Path, rels: list[str], remote_dir: str, *, method: str, what: str) -> None: ...


def ensure_venv(host: RemoteHost, probe: dict[str, Any], *, method: str, say: Progress) -> tuple[str, str]:
    """The board venv's path and what was done (``reused``, ``created``, ``edgepipe-updated``),
    from the facts and venv markers of the board's probe (``remote/board_probe.py``)."""
    python = probe["python"]
    if probe.get("implementation") != "cpython":
        raise DeviceError(
            f"the board's python3 is {probe.get('implementation')}; the runtime wheels need CPython: "
            "install python3 from the distribution"
        )
    if tuple(int(x) for x in python.split(".")) < MIN_PYTHON:
        raise DeviceError(
            f"the board has Python {probe.get('python_full')}; edgepipe needs >= "
            f"{'.'.join(map(str, MIN_PYTHON))}: upgrade the board's OS or install a newer python3"
        )
    pins = base_pins()
    key = venv_key(pins, python, probe["machine"], probe.get("libc") or [])
    src = source_hash()
    name = f"venv-{key}"
    venv = f"{probe['base']}/{name}"
    marker = probe.get("venvs", {}).get(name)
    fresh = not (isinstance(marker, dict) and marker.get("key") == key)
    if not fresh and marker.get("edgepipe_source") == src:
        say(f"board venv {name} is up to date")
        return venv, "reused"
    platforms = wheel_platforms(probe["machine"], probe.get("libc"))
    ewheel = edgepipe_wheel(src, say)
    deps = cache_root() / "wheels" / key
    if fresh or not (deps / "wheels.json").is_file():
        deps = dependency_wheels(key, pins, python, platforms, say)
    meta = json.loads((deps / "wheels.json").read_text(encoding="utf-8"))
    pip_wheel = next((w for w in meta["wheels"] if w.startswith("pip-")), None)
    if pip_wheel is None:
        raise DeviceError(f"{deps} has no pip wheel; delete the folder and retry")
    remote_wheels = f"{probe['base']}/wheels/{key}"
    files = {w: deps / w for w in (meta["wheels"] if fresh else [pip_wheel])}
    files[ewheel.name] = ewheel
    with tempfile.TemporaryDirectory(prefix="edgepipe-ssh-") as tmp:
        stage = Path(tmp)  # one folder to copy from: links to the cached wheels
        for n, p in files.items():
            os.symlink(p, stage / n)
        mb = sum(p.stat().st_size for p in files.values()) / 2**20
        say(f"copying {len(files)} wheels ({mb:.0f} MB) to {host.destination}:{remote_wheels}")
        host.call("make_dir", {"d": remote_wheels}, what="mkdir")
        host.send(stage, sorted(files), remote_wheels, method=method, what="wheel copy")
    say(f"installing the runtime into {venv} (pip --no-index, {'new venv' if fresh else 'edgepipe wheel only'})")
    res = host.call(
        "install_venv",
        {"venv": venv, "wheels": remote_wheels, "pip_wheel": pip_wheel, "edgepipe_wheel": ewheel.name,
         "fresh": fresh,
         "marker": {"key": key, "layout": LAYOUT_VERSION, "pins": pins, "edgepipe_source": src,
                    "edgepipe_wheel": ewheel.name}},
        what="venv install", timeout=1800,
    )  # fmt: skip
    say(f"board venv ready in {res.get('seconds')} s (onnxruntime {res.get('onnxruntime')})")
    return venv, "created" if fresh else "edgepipe-updated"
