"""The ``--device ssh://...`` spec, and what a failed ``ssh`` says about it.

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
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import SplitResult, parse_qsl, urlsplit

from edgepipe.devices.base import last_line
from edgepipe.errors import InputError

DEFAULT_REMOTE_DIR = "~/.cache/edgepipe"
ENV_IDENTITY = "EDGEPIPE_SSH_IDENTITY"
ENV_KNOWN_HOSTS = "EDGEPIPE_SSH_KNOWN_HOSTS"
ENV_REMOTE_DIR = "EDGEPIPE_SSH_REMOTE_DIR"
_USER = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._-]*$")
_HOSTNAME = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$")
_IPV6 = re.compile(r"^[0-9A-Fa-f:.]+(%[A-Za-z0-9_.-]+)?$")
_QUERY_KEYS = ("identity", "known_hosts", "dir")
_FORM = "use ssh://user@host[:port], e.g. ssh://pi@raspberrypi.local:22"
_IDENTITY_MISSING = f"ssh identity file {{path}} does not exist (from ?identity= or ${ENV_IDENTITY})"
_KNOWN_HOSTS_MISSING = (
    f"known_hosts file {{path}} does not exist (from ?known_hosts= or ${ENV_KNOWN_HOSTS}); create it with ssh-keyscan"
)


@dataclass(frozen=True)
class SshSpec:
    """A parsed ``--device ssh://...`` spec, with the environment's defaults filled in."""

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
    parts, port = _split_url(spec)
    user, hostpart = _user_and_hostpart(spec, parts)
    host = _host(spec, parts, hostpart)
    _check_port(spec, port, hostpart)
    query = _query_options(spec, parts.query)
    identity = _existing_file(query.get("identity") or env.get(ENV_IDENTITY) or None, _IDENTITY_MISSING)
    known_hosts = _existing_file(query.get("known_hosts") or env.get(ENV_KNOWN_HOSTS) or None, _KNOWN_HOSTS_MISSING)
    remote_dir = _remote_dir(query.get("dir") or env.get(ENV_REMOTE_DIR) or DEFAULT_REMOTE_DIR)
    return SshSpec(user, host, port or 22, identity, known_hosts, remote_dir)


def _split_url(spec: str) -> tuple[SplitResult, int | None]:
    """The spec split as a URL, and its port. Checked before any part of it is looked at: the
    scheme, white space (``urlsplit`` quietly drops tabs, newlines and leading spaces), a port that
    is no number or out of range, and a path or #fragment (both would be ignored otherwise)."""
    if not isinstance(spec, str) or not spec.startswith("ssh://"):
        raise InputError(f"bad device spec {spec!r}; {_FORM}")
    if any(c.isspace() for c in spec):
        raise InputError(f"bad device spec {spec!r}: it contains white space; {_FORM}")
    try:
        parts = urlsplit(spec)
        port = parts.port
    except ValueError as exc:
        raise InputError(f"bad device spec {spec!r} ({exc}); {_FORM}") from None
    if parts.fragment or parts.path not in ("", "/"):
        raise InputError(f"bad device spec {spec!r}: no path or #fragment allowed; {_FORM}")
    return parts, port


def _user_and_hostpart(spec: str, parts: SplitResult) -> tuple[str, str]:
    """The user (required, no password: ssh runs with key authentication only) and the
    ``host[:port]`` text after the last ``@``."""
    netloc = parts.netloc
    if "@" not in netloc:
        raise InputError(f"device spec {spec!r} has no user; {_FORM}")
    user, hostpart = netloc.rsplit("@", 1)
    if parts.password is not None or ":" in user:
        raise InputError(
            f"device spec {spec!r} has a password: edgepipe uses key authentication only; "
            "drop it and set up a key (ssh-copy-id user@host)"
        )
    if not _USER.match(user):
        raise InputError(f"bad user {user!r} in device spec {spec!r}; {_FORM}")
    return user, hostpart


def _host(spec: str, parts: SplitResult, hostpart: str) -> str:
    """A bracketed IPv6 address (without the brackets) or a host name / IPv4 address."""
    if hostpart.startswith("["):
        return _ipv6_host(spec, parts.hostname or "", hostpart)
    host = parts.hostname or ""
    if not _HOSTNAME.match(host):
        raise InputError(f"bad host {host!r} in device spec {spec!r}; {_FORM}")
    return host


def _ipv6_host(spec: str, host: str, hostpart: str) -> str:
    """The address between the brackets, taken from the spec's own text: ``urlsplit`` lower-cases
    the hostname, which would change the case of a ``%zone`` (an interface name)."""
    if not host or not _IPV6.match(host) or ":" not in host:
        raise InputError(f"bad IPv6 address in device spec {spec!r}; use ssh://user@[fe80::1]:22")
    return hostpart[1:].split("]", 1)[0]


def _check_port(spec: str, port: int | None, hostpart: str) -> None:
    """Refuse ``host:`` (``urlsplit`` reads an empty port as no port) and port 0."""
    if port is None and hostpart.rstrip("]").endswith(":"):
        raise InputError(f"device spec {spec!r} has an empty port; {_FORM}")
    if port is not None and not 1 <= port <= 65535:
        raise InputError(f"bad port {port} in device spec {spec!r}; {_FORM}")


def _query_options(spec: str, query: str) -> dict[str, str]:
    """The ``?key=value`` options: only the known keys, each at most once and never empty."""
    if not query:
        return {}
    try:
        pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        raise InputError(f"bad query in device spec {spec!r}; use ?identity=PATH&known_hosts=PATH&dir=DIR") from None
    out: dict[str, str] = {}
    for k, v in pairs:
        _check_option(spec, k, v, seen=out)
        out[k] = v
    return out


def _check_option(spec: str, key: str, value: str, *, seen: dict[str, str]) -> None:
    """One query option: a typo or a repeated key would otherwise be ignored without a word."""
    if key not in _QUERY_KEYS:
        raise InputError(f"unknown option {key!r} in device spec {spec!r}; known: {', '.join(_QUERY_KEYS)}")
    if key in seen:
        raise InputError(f"option {key!r} given twice in device spec {spec!r}")
    if not value:
        raise InputError(f"option {key!r} is empty in device spec {spec!r}")


def _existing_file(path: str | None, missing: str) -> str | None:
    """``path`` with ``~`` expanded, refused with ``missing`` (formatted with the path) when it is
    not a file: ssh would only fall back to its defaults and fail later with a vaguer message."""
    if not path:
        return path
    expanded = str(Path(path).expanduser())
    if not Path(expanded).is_file():
        raise InputError(missing.format(path=expanded))
    return expanded


def _remote_dir(remote_dir: str) -> str:
    """The runner's folder on the board: a newline or NUL would break the remote shell commands."""
    if "\n" in remote_dir or "\x00" in remote_dir:
        raise InputError(f"bad remote dir {remote_dir!r}")
    return remote_dir


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
    return f"ssh to {where} failed: {last_line(text) or 'no message'}; try `ssh -p {spec.port} {spec.destination}` by hand"
