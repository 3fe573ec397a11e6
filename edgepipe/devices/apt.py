"""A private apt: Debian packages fetched with the system's apt-get and mirror, but with an own
sources file, lists and cache folder. The system's apt sources, lists and dpkg architectures are
never changed, so the qemu environment needs no root and leaves the host as it was.
"""

from __future__ import annotations

import logging
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from edgepipe.devices.base import run_tool

logger = logging.getLogger(__name__)

DEBIAN_KEYRING = "/usr/share/keyrings/debian-archive-keyring.gpg"
DEFAULT_MIRROR = "http://deb.debian.org/debian"


@dataclass(frozen=True)
class AptSource:
    """One binary (``deb``) entry of an apt sources file."""

    uri: str
    suites: tuple[str, ...]
    components: tuple[str, ...]
    signed_by: str | None = None


def os_release() -> dict[str, str]:
    """The host's ``/etc/os-release`` as a dict (empty when there is none)."""
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


def parse_apt_sources(text: str, *, deb822: bool) -> list[AptSource]:
    """Binary (``deb``) entries of a one-line ``.list`` or a deb822 ``.sources`` file."""
    return _parse_deb822(text) if deb822 else _parse_one_line(text)


def _parse_deb822(text: str) -> list[AptSource]:
    """The ``deb`` entries of a deb822 ``.sources`` file: one per URI of each enabled stanza."""
    out: list[AptSource] = []
    for stanza in re.split(r"\n\s*\n", text):
        fields = _deb822_fields(stanza)
        if "deb" not in fields.get("types", "").split() or fields.get("enabled", "yes").lower() == "no":
            continue
        suites = tuple(fields.get("suites", "").split())
        components = tuple(fields.get("components", "").split())
        out += [AptSource(uri, suites, components, fields.get("signed-by") or None) for uri in fields.get("uris", "").split()]
    return out


def _deb822_fields(stanza: str) -> dict[str, str]:
    """A stanza's ``Key: value`` fields, keys lower-cased; an indented line continues the field
    above it (a multi-line ``Signed-By`` or ``URIs``)."""
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
    return fields


def _parse_one_line(text: str) -> list[AptSource]:
    """The ``deb [opts] URI SUITE COMPONENTS...`` lines of a one-line ``.list`` file."""
    out: list[AptSource] = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        m = re.match(r"^deb\s+(?:\[([^\]]*)\]\s+)?(\S+)\s+(\S+)\s*(.*)$", line)
        if not m:
            continue
        opts = dict(o.split("=", 1) for o in (m.group(1) or "").split() if "=" in o)
        out.append(AptSource(m.group(2), (m.group(3),), tuple(m.group(4).split()), opts.get("signed-by")))
    return out


def system_debian_mirror(codename: str, etc_apt: Path = Path("/etc/apt")) -> AptSource:
    """The system's own Debian mirror (the entry serving ``codename`` ``main``): the one the host
    is known to reach, perhaps a local proxy."""
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


def deb_line(uri: str, suite: str, archs: Sequence[str], signed_by: str | None) -> str:
    """A one-line ``deb [arch=.. signed-by=..] URI SUITE main`` entry."""
    opts = [f"arch={','.join(archs)}"] + ([f"signed-by={signed_by}"] if signed_by else [])
    return f"deb [{' '.join(opts)}] {uri} {suite} main"


class PrivateApt:
    """apt-get with its own sources file, lists and cache under ``workdir``: the system's apt is
    left alone. ``fix`` ends every error message (how to get the tools or reach the mirror)."""

    def __init__(self, workdir: Path, lines: Sequence[str], archs: Sequence[str], *, fix: str):
        self.dir = workdir
        self.fix = fix
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

    @classmethod
    def for_suites(
        cls, workdir: Path, suites: Sequence[tuple[str, Sequence[str]]], *, codename: str, host_arch: str, fix: str
    ) -> PrivateApt:
        """A private apt over the system's Debian mirror for ``codename``, serving each
        ``(suite, architectures)`` of ``suites`` (``main`` only); apt always knows ``host_arch``."""
        mirror = system_debian_mirror(codename)
        signed = mirror.signed_by or (DEBIAN_KEYRING if Path(DEBIAN_KEYRING).is_file() else None)
        lines = [deb_line(mirror.uri, suite, archs, signed) for suite, archs in suites]
        archs = sorted({host_arch, *(a for _, suite_archs in suites for a in suite_archs)})
        return cls(workdir, lines, archs, fix=fix)

    def update(self) -> None:
        run_tool(
            ["apt-get", "-q", *self.opts, "update"],
            what="apt-get update (private lists)",
            fix=f"check that the Debian mirror ({self.mirrors}) is reachable, or {self.fix}",
            timeout=900,
        )

    def download(self, specs: Sequence[str], dest: Path) -> list[Path]:
        """``apt-get download SPECS`` into ``dest``; the ``.deb`` files there, sorted."""
        dest.mkdir(parents=True, exist_ok=True)
        run_tool(
            ["apt-get", "-q", *self.opts, "download", *specs],
            cwd=dest,
            what=f"apt-get download {' '.join(specs[:3])}{' ...' if len(specs) > 3 else ''}",
            fix=f"check that the Debian mirror ({self.mirrors}) is reachable, or {self.fix}",
            timeout=1800,
        )
        return sorted(dest.glob("*.deb"))


def host_arch(fix: str) -> str:
    """The host's dpkg architecture (``amd64``, ``arm64``)."""
    return run_tool(["dpkg", "--print-architecture"], what="dpkg --print-architecture", fix=fix, timeout=60).strip()
