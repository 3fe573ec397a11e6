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
from urllib.parse import parse_qsl, urlsplit

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
