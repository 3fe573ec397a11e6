"""A Python 3.11 file tree for a device architecture, from Debian's packages and PyPI's wheels,
made without running anything of the target architecture.

Two users: the qemu environment (:mod:`.qemu_env`, arm64, run under ``qemu-aarch64 -L ROOT``) and
the OCI images (:mod:`edgepipe.package.oci`, arm64 or amd64, whose root filesystem this is). Both
get the same packages through a private apt (:mod:`.apt`), unpacked with ``dpkg-deb -x`` (no
maintainer script runs), and the same pinned wheels through the host's pip with ``--platform``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepipe.devices.apt import PrivateApt, host_arch, os_release
from edgepipe.devices.base import Progress, run_tool
from edgepipe.errors import DeviceError, InputError
from edgepipe.models import cache_root

PYTHON = "3.11"
#: Debian suite the Python root comes from (the last one with python3.11).
SUITE = "bookworm"
#: Debian packages whose files make a working python3.11 + the libraries the wheels need.
PYTHON_PACKAGES: tuple[str, ...] = (
    "python3.11-minimal", "libpython3.11-minimal", "libpython3.11-stdlib", "libc6", "zlib1g", "libexpat1",
    "libffi8", "libssl3", "libbz2-1.0", "liblzma5", "libsqlite3-0", "libgcc-s1", "libstdc++6", "libuuid1",
    "libncursesw6", "libtinfo6", "libreadline8", "libcrypt1", "libnsl2", "libtirpc3", "libdb5.3", "libgdbm6",
)  # fmt: skip
#: Bump when what :func:`cached_root` holds changes.
ROOT_LAYOUT = 1
DEPS_HINT = "run `sudo bash .ci/qemu-deps.sh` (Debian: apt, dpkg-deb, debian-archive-keyring)"


@dataclass(frozen=True)
class DebArch:
    """One device architecture under its three names: Debian's, the kernel's and pip's wheel tags."""

    debian: str
    machine: str
    wheel_platforms: tuple[str, ...]


ARCHES: dict[str, DebArch] = {
    "arm64": DebArch("arm64", "aarch64", ("manylinux_2_28_aarch64", "manylinux2014_aarch64")),
    "amd64": DebArch("amd64", "x86_64", ("manylinux_2_28_x86_64", "manylinux2014_x86_64")),
}


def deb_arch(name: str) -> DebArch:
    """``arm64``/``aarch64`` or ``amd64``/``x86_64`` -> its :class:`DebArch`."""
    for arch in ARCHES.values():
        if name in (arch.debian, arch.machine):
            return arch
    raise InputError(f"unsupported architecture {name!r}; use one of {', '.join(ARCHES)}")


def private_apt(workdir: Path, suites: Sequence[tuple[str, Sequence[str]]]) -> PrivateApt:
    """A private apt over the system's Debian mirror serving ``(suite, architectures)`` pairs."""
    codename = os_release().get("VERSION_CODENAME") or SUITE
    return PrivateApt.for_suites(workdir, suites, codename=codename, host_arch=host_arch(DEPS_HINT), fix=DEPS_HINT)


def unpack_python_root(apt: PrivateApt, arch: DebArch, work: Path, root: Path, say: Progress) -> list[Path]:
    """:data:`PYTHON_PACKAGES` of ``arch`` downloaded into ``work`` and unpacked into ``root``
    with ``dpkg-deb -x``; the .debs it took, sorted."""
    say(f"downloading {len(PYTHON_PACKAGES)} {arch.debian} packages for Python {PYTHON}")
    debs = apt.download([f"{p}:{arch.debian}" for p in PYTHON_PACKAGES], work)
    for deb in debs:
        run_tool(["dpkg-deb", "-x", str(deb), str(root)], what=f"dpkg-deb -x {deb.name}", fix=DEPS_HINT, timeout=1800)
    if not (root / "usr" / "bin" / f"python{PYTHON}").is_file():
        raise DeviceError(f"the {arch.debian} packages gave no usr/bin/python{PYTHON}; {DEPS_HINT}")
    return debs


def install_wheels(site: Path, pins: dict[str, str], arch: DebArch, say: Progress) -> None:
    """The pinned wheels for ``arch`` (and what they need) into ``site``, by the host's pip
    (``--target --platform``): nothing runs on the target architecture."""
    wheels = [f"{name}=={ver}" for name, ver in pins.items()]
    say(f"pip install {arch.machine} wheels {' '.join(wheels)}")
    platforms = [a for p in arch.wheel_platforms for a in ("--platform", p)]
    run_tool(
        [sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-compile",
         "--target", str(site), *platforms, "--only-binary=:all:",
         "--python-version", PYTHON, "--implementation", "cp", *wheels],
        what=f"pip install ({arch.machine} wheels)",
        fix="check that PyPI is reachable (`pip download onnxruntime`) and pip is installed (`python -m ensurepip`)",
        timeout=1800,
    )  # fmt: skip


@dataclass(frozen=True)
class PythonRoot:
    """A cached Python tree of one architecture: ``root/`` (the unpacked packages) and ``site/``
    (the wheels); ``meta`` says what went in (the .deb names, the pins)."""

    path: Path
    arch: DebArch
    meta: dict[str, Any]

    @property
    def root(self) -> Path:
        return self.path / "root"

    @property
    def site(self) -> Path:
        return self.path / "site"


def root_key(arch: DebArch, pins: dict[str, str]) -> str:
    """``py3.11-arm64-0123456789ab``: the cached root's folder name; covers everything that goes in."""
    payload = json.dumps(
        {"layout": ROOT_LAYOUT, "python": PYTHON, "suite": SUITE, "packages": list(PYTHON_PACKAGES), "arch": arch.debian,
         "platforms": list(arch.wheel_platforms), "wheels": dict(sorted(pins.items()))},
        sort_keys=True,
    )  # fmt: skip
    return f"py{PYTHON}-{arch.debian}-{hashlib.sha256(payload.encode()).hexdigest()[:12]}"


def cached_root(arch: DebArch, pins: dict[str, str], say: Progress) -> PythonRoot:
    """The Python tree of ``arch`` with ``pins`` under ``$EDGEPIPE_CACHE/pyroot/<key>``, built on
    first use in a temporary sibling renamed into place when complete (never seen half-built)."""
    final = cache_root() / "pyroot" / root_key(arch, pins)
    if not (final / "root.json").is_file():
        for tool in ("apt-get", "dpkg-deb"):
            if not shutil.which(tool):
                raise DeviceError(f"{tool} not found (needed for the {arch.debian} Python root); {DEPS_HINT}")
        final.parent.mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f".build-{final.name}-", dir=final.parent))
        try:
            apt = private_apt(work / "apt", [(SUITE, [arch.debian])])
            say(f"apt-get update (private lists: {SUITE} {arch.debian})")
            apt.update()
            debs = unpack_python_root(apt, arch, work / "debs", work / "root", say)
            install_wheels(work / "site", pins, arch, say)
            meta = {"key": final.name, "arch": arch.debian, "packages": [d.name for d in debs], "wheels": pins}
            for sub in ("apt", "debs"):
                shutil.rmtree(work / sub, ignore_errors=True)
            (work / "root.json").write_text(json.dumps(meta, indent=1) + "\n", encoding="utf-8")
            _rename_or_keep(work, final)
        except BaseException:
            shutil.rmtree(work, ignore_errors=True)
            raise
    return PythonRoot(final, arch, json.loads((final / "root.json").read_text(encoding="utf-8")))


def _rename_or_keep(work: Path, final: Path) -> None:
    """Rename ``work`` to ``final``; if another process finished first, keep theirs."""
    try:
        os.rename(work, final)
    except OSError:
        if not (final / "root.json").is_file():
            raise
        shutil.rmtree(work, ignore_errors=True)
