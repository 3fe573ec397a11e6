"""Validate an artifact on a real board over SSH: ``--device ssh://user@host[:port]``.

Spec and options
----------------
``ssh://user@host[:port][?identity=PATH&known_hosts=PATH&dir=REMOTE_DIR]``

- ``user`` is required; no password may appear in the spec (the runner runs ``ssh`` with
  ``BatchMode=yes``: key authentication only, never a prompt).
- ``host`` is a host name, an IPv4 address or a bracketed IPv6 address (``[fe80::1]``).
- ``port`` defaults to 22.
- ``identity`` (or the environment variable ``EDGEPIPE_SSH_IDENTITY``): the private key to use
  (``ssh -i PATH -o IdentitiesOnly=yes``). Default: ssh's own (``~/.ssh/id_*``, agent, config).
- ``known_hosts`` (or ``EDGEPIPE_SSH_KNOWN_HOSTS``): the known_hosts file to check the board's
  host key against (``-o UserKnownHostsFile=PATH``). Default: ``~/.ssh/known_hosts``.
  Host-key checking is always strict (``StrictHostKeyChecking=yes``): an unknown board is
  refused with the ``ssh-keyscan`` line that adds it.
- ``dir`` (or ``EDGEPIPE_SSH_REMOTE_DIR``): the runner's folder on the board, default
  ``~/.cache/edgepipe`` (a relative path is taken from the remote home).
  A query parameter wins over its environment variable. The user's ``~/.ssh/config`` applies
  (ProxyJump, aliases, ...).

What happens on the board (all under the remote folder)
--------------------------------------------------------
``artifacts/<manifest-hash>/``
    the artifact. The remote is asked for the sha256 of the files it already holds (one
    ``python3`` script over ssh); a file another artifact folder on the board holds with the same
    sha256 is copied there on the board; only files still differing are sent (``rsync`` when
    both ends have it, else ``scp``); copied files are hashed again on arrival, and the device
    entry verifies the whole manifest before it loads anything.
``venv-<key>/``
    a venv with the torch-free runtime: a wheel of *this* checkout (``pip wheel --no-deps``),
    plus the pinned base dependencies (``[project] dependencies`` of ``pyproject.toml``) and
    what they need, downloaded on the host for the board's platform (``pip download
    --only-binary=:all: --platform manylinux_2_X_<machine> --python-version X.Y``), copied over
    and installed with ``pip install --no-index --find-links``: the board needs no network and
    no ``python3-venv``/``ensurepip`` (the venv is made ``--without-pip``, pip runs from its
    wheel). ``<key>`` covers the board's Python and machine, glibc and the pins; the venv is
    complete only when ``edgepipe-venv.json`` is in it, which also records the checkout's source
    hash, so a changed checkout reinstalls only the edgepipe wheel.
``eval/<sha>.txt``
    an ``--eval`` file.

Host cache: ``$EDGEPIPE_CACHE`` or ``~/.cache/edgepipe``, ``wheels/<key>/`` (dependency wheels)
and ``wheels/edgepipe-<source-hash>/`` (the checkout's wheel).

Then ``VENV/bin/python -I -m edgepipe.runtime validate ARTIFACT --json [--eval F] [--max-tokens N]``
runs on the board. Its accuracy *and* throughput are measured on that device.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlsplit

from edgepipe.devices import last_json_object
from edgepipe.errors import ArtifactError, DeviceError, InputError
from edgepipe.models import cache_root

logger = logging.getLogger(__name__)

Progress = Callable[[str], None]

#: Bump when the remote layout or the venv recipe changes.
LAYOUT_VERSION = 1
DEFAULT_REMOTE_DIR = "~/.cache/edgepipe"
ENV_IDENTITY = "EDGEPIPE_SSH_IDENTITY"
ENV_KNOWN_HOSTS = "EDGEPIPE_SSH_KNOWN_HOSTS"
ENV_REMOTE_DIR = "EDGEPIPE_SSH_REMOTE_DIR"
#: The base dependencies the board venv gets, at the versions ``pyproject.toml`` pins.
BASE_DEPENDENCIES: tuple[str, ...] = ("onnxruntime", "numpy", "tokenizers", "click", "pyyaml")
VENV_MARKER = "edgepipe-venv.json"
MIN_PYTHON = (3, 10)
CONNECT_TIMEOUT_S = 15
_USER = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._-]*$")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
_IPV6 = re.compile(r"^[0-9A-Fa-f:.]+(%[A-Za-z0-9_.-]+)?$")
_QUERY_KEYS = ("identity", "known_hosts", "dir")


# --------------------------------------------------------------------------- the spec


@dataclass(frozen=True)
class SshSpec:
    user: str
    host: str
    port: int = 22
    identity: str | None = None
    known_hosts: str | None = None
    remote_dir: str = DEFAULT_REMOTE_DIR

    @property
    def destination(self) -> str:
        """``user@host`` for ssh (an IPv6 address goes without brackets)."""
        return f"{self.user}@{self.host}"

    @property
    def remote_prefix(self) -> str:
        """``user@host:`` for scp / rsync (IPv6 in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.user}@{host}:"

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ssh://{self.user}@{host}:{self.port}"


def parse_spec(spec: str, *, environ: dict[str, str] | None = None) -> SshSpec:
    """Parse ``ssh://user@host[:port][?identity=..&known_hosts=..&dir=..]`` strictly.

    Raises :class:`InputError` (one line, with the expected form) on anything else."""
    env = os.environ if environ is None else environ
    form = "use ssh://user@host[:port], e.g. ssh://pi@raspberrypi.local:22"
    if not isinstance(spec, str) or not spec.startswith("ssh://"):
        raise InputError(f"bad device spec {spec!r}; {form}")
    if any(c.isspace() for c in spec):
        raise InputError(f"bad device spec {spec!r}: it contains white space; {form}")
    try:
        parts = urlsplit(spec)
        port = parts.port
    except ValueError as exc:
        raise InputError(f"bad device spec {spec!r} ({exc}); {form}") from None
    if parts.fragment or parts.path not in ("", "/"):
        raise InputError(f"bad device spec {spec!r}: no path or #fragment allowed; {form}")
    netloc = parts.netloc
    if "@" not in netloc:
        raise InputError(f"device spec {spec!r} has no user; {form}")
    if parts.password is not None or ":" in netloc.rsplit("@", 1)[0]:
        raise InputError(
            f"device spec {spec!r} has a password: edgepipe uses key authentication only; "
            "drop it and set up a key (ssh-copy-id user@host)"
        )
    user = netloc.rsplit("@", 1)[0]
    if not _USER.match(user):
        raise InputError(f"bad user {user!r} in device spec {spec!r}; {form}")
    host = parts.hostname or ""
    hostpart = netloc.rsplit("@", 1)[1]
    if hostpart.startswith("["):
        if not host or not _IPV6.match(host) or ":" not in host:
            raise InputError(f"bad IPv6 address in device spec {spec!r}; use ssh://user@[fe80::1]:22")
        host = hostpart[1:].split("]", 1)[0]  # keep the case of a %zone
    elif not _HOSTNAME.match(host):
        raise InputError(f"bad host {host!r} in device spec {spec!r}; {form}")
    if port is None and hostpart.rstrip("]").endswith(":"):
        raise InputError(f"device spec {spec!r} has an empty port; {form}")
    if port is not None and not 1 <= port <= 65535:
        raise InputError(f"bad port {port} in device spec {spec!r}; {form}")
    query: dict[str, str] = {}
    if parts.query:
        try:
            pairs = parse_qsl(parts.query, keep_blank_values=True, strict_parsing=True)
        except ValueError:
            raise InputError(f"bad query in device spec {spec!r}; use ?identity=PATH&known_hosts=PATH&dir=DIR") from None
        for k, v in pairs:
            if k not in _QUERY_KEYS:
                raise InputError(f"unknown option {k!r} in device spec {spec!r}; known: {', '.join(_QUERY_KEYS)}")
            if k in query:
                raise InputError(f"option {k!r} given twice in device spec {spec!r}")
            if not v:
                raise InputError(f"option {k!r} is empty in device spec {spec!r}")
            query[k] = v
    identity = query.get("identity") or env.get(ENV_IDENTITY) or None
    known_hosts = query.get("known_hosts") or env.get(ENV_KNOWN_HOSTS) or None
    remote_dir = query.get("dir") or env.get(ENV_REMOTE_DIR) or DEFAULT_REMOTE_DIR
    if identity:
        identity = str(Path(identity).expanduser())
        if not Path(identity).is_file():
            raise InputError(f"ssh identity file {identity} does not exist (from ?identity= or ${ENV_IDENTITY})")
    if known_hosts:
        known_hosts = str(Path(known_hosts).expanduser())
        if not Path(known_hosts).is_file():
            raise InputError(
                f"known_hosts file {known_hosts} does not exist (from ?known_hosts= or ${ENV_KNOWN_HOSTS}); "
                "create it with ssh-keyscan"
            )
    if "\n" in remote_dir or "\x00" in remote_dir:
        raise InputError(f"bad remote dir {remote_dir!r}")
    return SshSpec(user, host, port or 22, identity, known_hosts, remote_dir)


# --------------------------------------------------------------------------- host side helpers




def _package_dir() -> Path:
    import edgepipe.errors

    return Path(edgepipe.errors.__file__).resolve().parent


def checkout_root() -> Path:
    """The source checkout this edgepipe is imported from (``pyproject.toml`` next to the package)."""
    root = _package_dir().parent
    pyproject = root / "pyproject.toml"
    if not pyproject.is_file() or 'name = "edgepipe"' not in pyproject.read_text(encoding="utf-8"):
        raise DeviceError(
            f"the ssh runner builds the board's wheel from an edgepipe checkout, and {root} is none; "
            "install edgepipe from a checkout (`pip install -e .`)"
        )
    return root


def base_pins(root: Path | None = None) -> dict[str, str]:
    """``{"onnxruntime": "1.31.1", "numpy": ..., "tokenizers": ..., "click": ..., "pyyaml": ...}``
    from the checkout's ``[project] dependencies``."""
    import tomllib

    path = (root or checkout_root()) / "pyproject.toml"
    try:
        deps = tomllib.loads(path.read_text(encoding="utf-8"))["project"]["dependencies"]
    except (OSError, ValueError, KeyError) as exc:
        raise DeviceError(f"cannot read [project] dependencies from {path} ({exc}); fix pyproject.toml") from None
    pins: dict[str, str] = {}
    for req in deps:
        m = re.match(r"^\s*([A-Za-z0-9_.-]+)\s*==\s*([A-Za-z0-9_.+!-]+)\s*$", req)
        if m:
            pins[m.group(1).lower().replace("_", "-")] = m.group(2)
    missing = [d for d in BASE_DEPENDENCIES if d not in pins]
    if missing:
        raise DeviceError(f"{path} pins no exact version (==) of {', '.join(missing)}; pin them")
    return {d: pins[d] for d in BASE_DEPENDENCIES}


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


def _run_host(cmd: list[str], *, what: str, fix: str, timeout: float) -> subprocess.CompletedProcess[str]:
    logger.debug("host: %s", shlex.join(cmd))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as exc:
        raise DeviceError(f"{what}: {exc.filename} not found; {fix}") from None
    except subprocess.TimeoutExpired:
        raise DeviceError(f"{what} ran over {timeout:.0f} s; {fix}") from None
    if proc.returncode != 0:
        errs = [ln for ln in proc.stderr.splitlines() if ln.strip() and "is ignored" not in ln]
        raise DeviceError(f"{what} failed: {_last(errs) or _last(proc.stdout.splitlines()) or 'no output'}; {fix}")
    return proc


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
        _run_host(
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
        try:
            os.rename(work, final)
        except OSError:
            if not (final / "wheels.json").is_file():
                raise
            shutil.rmtree(work, ignore_errors=True)
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
        _run_host(
            [sys.executable, "-m", "pip", "wheel", "--quiet", "--disable-pip-version-check", "--no-deps",
             "-w", str(work), str(root)],
            what=f"pip wheel {root}", fix="check that the checkout builds (`pip wheel --no-deps .`)", timeout=900,
        )  # fmt: skip
        if not list(work.glob("edgepipe-*.whl")):
            raise DeviceError(f"pip wheel {root} made no edgepipe wheel; check the checkout's pyproject.toml")
        try:
            os.rename(work, final)
        except OSError:
            if not list(final.glob("edgepipe-*.whl")):
                raise
            shutil.rmtree(work, ignore_errors=True)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    # keep the three newest checkout wheels
    olds = sorted(base.glob("edgepipe-*"), key=lambda p: p.stat().st_mtime, reverse=True)[3:]
    for old in olds:
        if old != final:
            shutil.rmtree(old, ignore_errors=True)
    return sorted(final.glob("edgepipe-*.whl"))[0]




def classify_ssh_failure(stderr: str, spec: SshSpec) -> str:
    """One line naming what went wrong when ``ssh`` itself failed (exit 255), and the fix."""
    text = stderr or ""
    low = text.lower()
    where = f"{spec.destination} port {spec.port}"
    kh = spec.known_hosts or "~/.ssh/known_hosts"
    if "remote host identification has changed" in low or "host key for" in low and "has changed" in low:
        return (
            f"the host key of {spec.host}:{spec.port} has CHANGED since it was recorded in {kh} (a re-installed "
            f"board, or someone in between); if you trust the board: ssh-keygen -f {kh} -R '[{spec.host}]:{spec.port}' "
            f"then ssh-keyscan -p {spec.port} {spec.host} >> {kh}"
        )
    if "host key verification failed" in low or "no " in low and "host key is known" in low:
        return (
            f"the host key of {spec.host}:{spec.port} is not in {kh} (strict host-key checking is on): "
            f"run `ssh-keyscan -p {spec.port} {spec.host} >> {kh}` (check the fingerprint) or connect once by hand "
            f"with `ssh -p {spec.port} {spec.destination}`"
        )
    if "permission denied" in low or "too many authentication failures" in low:
        key = spec.identity or "your default key"
        return (
            f"ssh authentication to {where} failed with {key} (key login only, no password prompts): "
            f"add the public key on the board (`ssh-copy-id -p {spec.port} {spec.destination}`) or point "
            f"{ENV_IDENTITY} / ?identity= at the right key"
        )
    if "could not resolve hostname" in low or "name or service not known" in low:
        return f"cannot resolve the board's host name {spec.host!r}: check the spelling or use its IP address"
    for needle in ("connection refused", "connection timed out", "no route to host", "network is unreachable",
                   "operation timed out", "connection reset", "connection closed"):  # fmt: skip
        if needle in low:
            return (
                f"cannot reach {where} ({needle}): check that the board is on, on the network and runs sshd "
                f"on port {spec.port} (`ssh -p {spec.port} {spec.destination}` by hand)"
            )
    return f"ssh to {where} failed: {_last(text.splitlines()) or 'no message'}; try `ssh -p {spec.port} {spec.destination}` by hand"


# --------------------------------------------------------------------------- remote scripts

# Every remote script is sent on ssh's stdin to `python3 -`, with its arguments as a JSON literal
# appended (so no argument passes through the remote shell). Each prints one JSON line.

_PROBE = r'''
import hashlib, json, os, platform, shutil, sys
def sha(p):
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
def main(a):
    base = os.path.abspath(os.path.expanduser(a["base"]))
    art = os.path.join(base, "artifacts", a["artifact"]) if a.get("artifact") else None
    os.makedirs(art or base, exist_ok=True)
    hashes, seeded = {}, []
    want = a.get("files") or {}
    for rel in sorted(want):
        p = os.path.join(art, *rel.split("/"))
        os.makedirs(os.path.dirname(p), exist_ok=True)
        hashes[rel] = sha(p) if os.path.isfile(p) and not os.path.islink(p) else None
    # a file another artifact on the board already holds (same sha256 in its manifest) is copied
    # from there, on the board: a rebuilt artifact whose manifest changed does not re-send its model
    missing = {want[r]: r for r in want if hashes[r] != want[r] and r != "manifest.json"}
    top = os.path.join(base, "artifacts")
    for other in (sorted(os.listdir(top)) if missing and art else []):
        d = os.path.join(top, other)
        if d == art or not os.path.isfile(os.path.join(d, "manifest.json")):
            continue
        try:
            with open(os.path.join(d, "manifest.json")) as f:
                files = json.load(f).get("files") or {}
        except (OSError, ValueError):
            continue
        for orel, entry in files.items():
            rel = missing.get((entry or {}).get("sha256")) if isinstance(entry, dict) else None
            src = os.path.join(d, *str(orel).split("/"))
            if not rel or ".." in str(orel).split("/") or not os.path.isfile(src) or os.path.islink(src):
                continue
            dst = os.path.join(art, *rel.split("/"))
            try:
                shutil.copyfile(src, dst + ".seed")
                if sha(dst + ".seed") == want[rel]:
                    os.replace(dst + ".seed", dst)
                    hashes[rel] = want[rel]
                    seeded.append(rel)
                    del missing[want[rel]]
                else:
                    os.remove(dst + ".seed")
            except OSError:
                pass
    venvs = {}
    for name in (os.listdir(base) if os.path.isdir(base) else []):
        m = os.path.join(base, name, "edgepipe-venv.json")
        if name.startswith("venv-") and os.path.isfile(m):
            try:
                with open(m) as f:
                    venvs[name] = json.load(f)
            except ValueError:
                pass
    ev = None
    if a.get("eval"):
        os.makedirs(os.path.join(base, "eval"), exist_ok=True)
        p = os.path.join(base, "eval", a["eval"])
        ev = sha(p) if os.path.isfile(p) else None
    facts = {"board": None, "cpu_model": None, "ram_total_mb": None}
    try:
        with open("/proc/device-tree/model", "rb") as f:
            facts["board"] = f.read().rstrip(b"\0").decode("utf-8", "replace").strip() or None
    except OSError:
        pass
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                k, _, v = line.partition(":")
                k = k.strip().lower()
                if k in ("model name", "cpu part") and not facts["cpu_model"]:
                    facts["cpu_model"] = v.strip()
                if k == "model" and not facts["board"] and not v.strip().isdigit():
                    facts["board"] = v.strip()
        with open("/proc/meminfo") as f:
            facts["ram_total_mb"] = round(int(f.readline().split()[1]) / 1024)
    except (OSError, ValueError, IndexError):
        pass
    print(json.dumps({
        "machine": platform.machine(), "kernel": platform.release(), "system": platform.system(),
        "python": "%d.%d" % sys.version_info[:2], "python_full": platform.python_version(),
        "implementation": sys.implementation.name, "libc": list(platform.libc_ver()),
        "executable": sys.executable, "home": os.path.expanduser("~"), "base": base, "artifact_dir": art,
        "rsync": shutil.which("rsync") is not None, "hashes": hashes, "seeded": seeded, "venvs": venvs, "eval_sha256": ev,
        "cpu_count": os.cpu_count(), **facts}))
'''

_HASHES = r'''
import hashlib, json, os
def main(a):
    out = {}
    for rel in a["files"]:
        p = os.path.join(a["dir"], *rel.split("/"))
        if os.path.isfile(p):
            h = hashlib.sha256()
            with open(p, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
            out[rel] = h.hexdigest()
        else:
            out[rel] = None
    print(json.dumps({"hashes": out}))
'''

_INSTALL = r'''
import json, os, shutil, subprocess, sys, time
def main(a):
    t0 = time.time()
    venv, wheels = a["venv"], a["wheels"]
    py = os.path.join(venv, "bin", "python")
    marker = os.path.join(venv, "edgepipe-venv.json")
    pip = [py, os.path.join(wheels, a["pip_wheel"], "pip"), "install", "--no-index", "--find-links", wheels,
           "--no-cache-dir", "--disable-pip-version-check", "--no-input", "--quiet", "--no-compile"]
    if a["fresh"]:
        shutil.rmtree(venv, ignore_errors=True)
        r = subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], capture_output=True, text=True)
        if r.returncode != 0:
            print(json.dumps({"error": "python3 -m venv failed: " + (r.stderr.strip().splitlines() or ["?"])[-1]}))
            return
        cmd = pip + [os.path.join(wheels, a["edgepipe_wheel"])]
    else:
        cmd = pip + ["--no-deps", "--force-reinstall", os.path.join(wheels, a["edgepipe_wheel"])]
    r = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, PIP_NO_INPUT="1"))
    if r.returncode != 0:
        lines = [l for l in (r.stderr + r.stdout).splitlines() if l.strip()]
        print(json.dumps({"error": "pip install failed: " + (" | ".join(lines[-3:]) or "no output")}))
        return
    r = subprocess.run([py, "-I", "-c", "import edgepipe.runtime.device, onnxruntime; print(onnxruntime.__version__)"],
                       capture_output=True, text=True)
    if r.returncode != 0:
        print(json.dumps({"error": "the new venv does not import the runtime: " + (r.stderr.strip().splitlines() or ["?"])[-1]}))
        return
    meta = dict(a["marker"], onnxruntime=r.stdout.strip(), installed_seconds=round(time.time() - t0, 1))
    with open(marker + ".tmp", "w") as f:
        json.dump(meta, f)
    os.replace(marker + ".tmp", marker)
    shutil.rmtree(wheels, ignore_errors=True)
    print(json.dumps({"ok": True, "seconds": round(time.time() - t0, 1), "onnxruntime": r.stdout.strip()}))
'''


# --------------------------------------------------------------------------- the runner


class SshRunner:
    """A real board reached with the system ``ssh``/``scp``/``rsync`` (see the module docstring)."""

    name = "ssh"

    def __init__(self, spec: SshSpec, *, timeout: float = 3600.0, copy_method: str | None = None):
        if copy_method not in (None, "rsync", "scp"):
            raise InputError(f"copy_method must be rsync, scp or None (auto), not {copy_method!r}")
        self.spec = spec
        self.timeout = timeout
        self.copy_method = copy_method

    @classmethod
    def from_spec(cls, spec: str, **kwargs: Any) -> SshRunner:
        """``SshRunner.from_spec("ssh://pi@raspberrypi.local:22?identity=~/.ssh/pi")``."""
        return cls(parse_spec(spec), **kwargs)

    def __repr__(self) -> str:
        return f"SshRunner({self.spec})"

    # ------------------------------------------------------------------ ssh plumbing
    def _options(self) -> list[str]:
        s = self.spec
        opts = ["-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes", "-o", f"ConnectTimeout={CONNECT_TIMEOUT_S}",
                "-o", "ServerAliveInterval=15", "-o", "ServerAliveCountMax=4", "-o", "LogLevel=ERROR"]  # fmt: skip
        if s.identity:
            opts += ["-i", s.identity, "-o", "IdentitiesOnly=yes"]
        if s.known_hosts:
            opts += ["-o", f"UserKnownHostsFile={s.known_hosts}"]
        return opts

    def ssh_command(self, remote_command: str) -> list[str]:
        """The full ``ssh`` argv that runs ``remote_command`` (a shell string) on the board."""
        return ["ssh", "-p", str(self.spec.port), *self._options(), "--", self.spec.destination, remote_command]

    def _exec(
        self, argv: list[str], *, what: str, timeout: float, input: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        logger.debug("%s: %s", what, shlex.join(argv))
        try:
            proc = subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout,
                                  stdin=None if input is not None else subprocess.DEVNULL)  # fmt: skip
        except FileNotFoundError:
            raise DeviceError(
                f"{argv[0]} is not installed on this host; install the OpenSSH client (apt-get install openssh-client"
                + (" rsync" if argv[0] == "rsync" else "") + ")"
            ) from None
        except subprocess.TimeoutExpired:
            raise DeviceError(
                f"{what} on {self.spec.destination} ran over {timeout:.0f} s; check the board and the link, "
                "or use a smaller --max-tokens"
            ) from None
        if proc.stderr.strip():
            logger.debug("%s stderr:\n%s", what, proc.stderr)
        if proc.returncode == 255 and argv[0] == "ssh":
            raise DeviceError(classify_ssh_failure(proc.stderr, self.spec))
        return proc

    def _remote_python(self, script: str, args: dict[str, Any], *, what: str, timeout: float = 300) -> dict[str, Any]:
        source = f"{script}\nimport json as _json\nmain(_json.loads({json.dumps(args)!r}))\n"
        proc = self._exec(self.ssh_command("python3 -"), what=what, timeout=timeout, input=source)
        if proc.returncode == 127 or re.search(r"python3: (command )?not found|python3: No such file", proc.stderr):
            raise DeviceError(
                f"the board {self.spec.destination} has no python3 on its PATH; install it "
                "(`sudo apt-get install python3`) and retry"
            )
        data = last_json_object(proc.stdout)
        if proc.returncode != 0 or data is None:
            raise DeviceError(
                f"{what} on {self.spec.destination} failed (exit {proc.returncode}): "
                f"{_last(proc.stderr.splitlines()) or _last(proc.stdout.splitlines()) or 'no output'}"
            )
        if data.get("error"):
            raise DeviceError(f"{what} on {self.spec.destination}: {data['error']}")
        return data

    def _copy(self, local_dir: Path, rels: list[str], remote_dir: str, *, method: str, what: str) -> None:
        """Copy ``local_dir/rel`` to ``remote_dir/rel`` for each rel (remote parents exist)."""
        if not rels:
            return
        if method == "rsync":
            ssh = shlex.join(["ssh", "-p", str(self.spec.port), *self._options()])
            # --ignore-times: the files listed differ by hash, whatever their size and mtime say;
            # --copy-links: the staged wheel / eval folders hold symlinks to the host cache
            argv = ["rsync", "--ignore-times", "--copy-links", "--protect-args", "--files-from=-",
                    "-e", ssh, "--", f"{local_dir}/", f"{self.spec.remote_prefix}{remote_dir}/"]  # fmt: skip
            proc = self._exec(argv, what=what, timeout=self.timeout, input="\n".join(rels) + "\n")
        else:
            proc = None
            groups: dict[str, list[str]] = {}
            for rel in rels:
                groups.setdefault(rel.rsplit("/", 1)[0] if "/" in rel else "", []).append(rel)
            for sub, members in sorted(groups.items()):
                dest = f"{remote_dir}/{sub}/" if sub else f"{remote_dir}/"
                argv = ["scp", "-q", "-P", str(self.spec.port), *self._options(), "--",
                        *[str(local_dir / r) for r in members], f"{self.spec.remote_prefix}{dest}"]  # fmt: skip
                proc = self._exec(argv, what=what, timeout=self.timeout)
                if proc.returncode != 0:
                    break
        assert proc is not None
        if proc.returncode != 0:
            msg = _last(proc.stderr.splitlines()) or "no message"
            low = msg.lower()
            if any(n in low for n in ("permission denied (", "host key verification", "connection refused",
                                      "could not resolve", "no route", "timed out", "host key is known")):  # fmt: skip
                raise DeviceError(classify_ssh_failure(proc.stderr, self.spec))
            fix = "free space on the board (df -h)" if "space" in low else "check the board's disk and permissions"
            raise DeviceError(f"{what} to {self.spec.destination} failed ({method}): {msg}; {fix}")

    # ------------------------------------------------------------------ steps
    def _sync_files(
        self, local_dir: Path, wanted: dict[str, str], have: dict[str, str | None], remote_dir: str, *,
        method: str, what: str,
    ) -> list[str]:  # fmt: skip
        """Copy the files whose remote sha256 differs, then check their hashes on arrival."""
        todo = sorted(rel for rel, sha in wanted.items() if have.get(rel) != sha)
        if not todo:
            return []
        self._copy(local_dir, todo, remote_dir, method=method, what=what)
        got = self._remote_python(_HASHES, {"dir": remote_dir, "files": todo}, what="hash check")["hashes"]
        bad = [rel for rel in todo if got.get(rel) != wanted[rel]]
        if bad:
            raise DeviceError(
                f"{', '.join(bad[:3])} arrived on {self.spec.destination} with a different sha256 (copy damaged or "
                "disk full); check the board's storage (df -h, dmesg) and retry"
            )
        return todo

    def _ensure_venv(self, probe: dict[str, Any], method: str, say: Progress) -> tuple[str, str]:
        """The board venv's path and what was done (``reused``, ``created``, ``edgepipe-updated``)."""
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
        if fresh:
            deps = dependency_wheels(key, pins, python, platforms, say)
        else:
            deps = cache_root() / "wheels" / key
            if not (deps / "wheels.json").is_file():
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
            say(f"copying {len(files)} wheels ({mb:.0f} MB) to {self.spec.destination}:{remote_wheels}")
            self._remote_python("import os\ndef main(a):\n    os.makedirs(a['d'], exist_ok=True); print('{}')\n",
                                {"d": remote_wheels}, what="mkdir")  # fmt: skip
            self._copy(stage, sorted(files), remote_wheels, method=method, what="wheel copy")
        say(
            f"installing the runtime into {venv} (pip --no-index, {'new venv' if fresh else 'edgepipe wheel only'})"
        )
        res = self._remote_python(
            _INSTALL,
            {"venv": venv, "wheels": remote_wheels, "pip_wheel": pip_wheel, "edgepipe_wheel": ewheel.name,
             "fresh": fresh,
             "marker": {"key": key, "layout": LAYOUT_VERSION, "pins": pins, "edgepipe_source": src,
                        "edgepipe_wheel": ewheel.name}},
            what="venv install", timeout=1800,
        )  # fmt: skip
        say(f"board venv ready in {res.get('seconds')} s (onnxruntime {res.get('onnxruntime')})")
        return venv, "created" if fresh else "edgepipe-updated"

    # ------------------------------------------------------------------ public
    def probe(
        self, *, artifact_hash: str | None = None, files: dict[str, str] | None = None, eval_name: str | None = None
    ) -> dict[str, Any]:
        """Connect and describe the board: ``machine`` (uname -m), ``python``, ``libc``, ``cpu_model``,
        ``ram_total_mb``, ``board``, ``base`` (the remote folder, absolute), ``rsync``, ``venvs`` (their
        markers) and, for an artifact, ``artifact_dir`` and the remote ``hashes`` of ``files`` (``{rel: sha256}``)
        after seeding missing ones from other artifacts on the board with the same sha256 (``seeded``).
        Raises :class:`DeviceError` naming the problem (unreachable, unknown host key, auth, no python3)."""
        return self._remote_python(
            _PROBE,
            {"base": self.spec.remote_dir, "artifact": artifact_hash, "files": dict(files or {}), "eval": eval_name},
            what="probe",
        )

    def validate(
        self,
        artifact: Path,
        *,
        eval_file: Path | None = None,
        max_tokens: int | None = None,
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        from edgepipe.runtime.manifest import MANIFEST_NAME, sha256_file, verify_artifact

        say = progress or (lambda msg: logger.info("%s", msg))
        t_start = time.monotonic()
        artifact = Path(artifact).resolve()
        if not artifact.exists():
            raise InputError(f"artifact {artifact} does not exist")
        eval_sha = None
        if eval_file is not None:
            eval_file = Path(eval_file).resolve()
            if not eval_file.is_file():
                raise InputError(f"eval file {eval_file} does not exist")
            eval_sha = sha256_file(eval_file)
        if max_tokens is not None and int(max_tokens) < 2:
            raise InputError("--max-tokens must be at least 2")
        say("verifying the artifact on the host before copying")
        manifest = verify_artifact(artifact)
        mhash = sha256_file(artifact / MANIFEST_NAME)
        wanted = {rel: e["sha256"] for rel, e in manifest["files"].items()}
        wanted[MANIFEST_NAME] = mhash
        eval_name = f"{eval_sha[:16]}.txt" if eval_sha else None

        say(f"connecting to {self.spec.destination} port {self.spec.port}")
        t0 = time.monotonic()
        probe = self.probe(artifact_hash=mhash[:16], files=wanted, eval_name=eval_name)
        seconds: dict[str, float] = {"probe": round(time.monotonic() - t0, 2)}
        say(
            f"board: {probe.get('board') or probe.get('cpu_model') or '?'} ({probe.get('machine')}, "
            f"Python {probe.get('python_full')}, {probe.get('ram_total_mb')} MB RAM)"
        )
        method = self.copy_method or ("rsync" if probe.get("rsync") and shutil.which("rsync") else "scp")
        remote_art = probe["artifact_dir"]

        t0 = time.monotonic()
        venv, venv_action = self._ensure_venv(probe, method, say)
        seconds["venv"] = round(time.monotonic() - t0, 2)

        t0 = time.monotonic()
        todo = sorted(rel for rel, sha in wanted.items() if probe["hashes"].get(rel) != sha)
        if probe.get("seeded"):
            say(f"{len(probe['seeded'])} artifact files were already on the board in another artifact folder")
        if todo:
            nbytes = sum((artifact / rel).stat().st_size for rel in todo)
            say(f"copying {len(todo)} of {len(wanted)} artifact files ({nbytes / 2**20:.1f} MB) with {method}")
        else:
            nbytes = 0
            say(f"all {len(wanted)} artifact files are already on the board")
        copied = self._sync_files(artifact, wanted, probe["hashes"], remote_art, method=method, what="artifact copy")
        remote_eval = None
        if eval_file is not None and eval_name is not None:
            remote_eval = f"{probe['base']}/eval/{eval_name}"
            with tempfile.TemporaryDirectory(prefix="edgepipe-ssh-") as tmp:
                os.symlink(eval_file, Path(tmp) / eval_name)
                self._sync_files(
                    Path(tmp), {eval_name: eval_sha or ""}, {eval_name: probe.get("eval_sha256")},
                    f"{probe['base']}/eval", method=method, what="eval file copy",
                )  # fmt: skip
        seconds["copy"] = round(time.monotonic() - t0, 2)

        args = [f"{venv}/bin/python", "-I", "-m", "edgepipe.runtime", "validate", remote_art, "--json"]
        if remote_eval:
            args += ["--eval", remote_eval]
        if max_tokens is not None:
            args += ["--max-tokens", str(int(max_tokens))]
        say(f"running edgepipe.runtime validate on {self.spec.host} (accuracy, then throughput)")
        t0 = time.monotonic()
        proc = self._exec(self.ssh_command(shlex.join(args)), what="validation", timeout=self.timeout)
        seconds["validate"] = round(time.monotonic() - t0, 2)
        out = last_json_object(proc.stdout)
        if proc.returncode != 0 or out is None:
            msg = _last(proc.stderr.splitlines()) or _last(proc.stdout.splitlines()) or "no output"
            if msg.startswith("error: "):  # an edgepipe error the device entry reported
                err = ArtifactError if proc.returncode == 2 else DeviceError
                raise err(f"validation on {self.spec.host}: {msg.removeprefix('error: ')}")
            raise DeviceError(
                f"`python -m edgepipe.runtime validate` on {self.spec.destination} exited {proc.returncode}: {msg}; "
                f"delete {venv} on the board to reinstall the runtime"
            )
        seconds["total"] = round(time.monotonic() - t_start, 2)
        device = out.get("device") if isinstance(out.get("device"), dict) else {}
        out["device"] = {
            **device,
            "runner": "ssh",
            "host": self.spec.host,
            "port": self.spec.port,
            "user": self.spec.user,
            "uname_m": probe.get("machine"),
            "kernel": probe.get("kernel"),
            "board": probe.get("board"),
            "cpu_model": device.get("cpu_model") or probe.get("cpu_model"),
            "ram_total_mb": device.get("ram_total_mb") or probe.get("ram_total_mb"),
            "venv": venv,
        }
        out["artifact"] = str(artifact)
        out["remote_artifact"] = remote_art
        out["transfer"] = {
            "method": method,
            "files_copied": copied,
            "bytes_copied": nbytes,
            "files_unchanged": len(wanted) - len(copied),
            "files_seeded_on_board": list(probe.get("seeded") or []),
            "venv": venv_action,
            "seconds": seconds,
        }
        out["runner"] = "ssh"
        out["claims"] = f"accuracy and throughput measured on the device {self.spec.host}"
        say(
            f"validated on {self.spec.host} in {seconds['total']:.0f} s "
            f"(copied {len(copied)} files, venv {venv_action})"
        )
        return out


# --------------------------------------------------------------------------- internals




def _last(lines: Sequence[str]) -> str:
    lines = [ln.strip() for ln in lines if ln.strip()]
    return lines[-1] if lines else ""
