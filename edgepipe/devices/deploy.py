"""Deploy an artifact to a board over SSH, switch to it only once it is healthy, and roll back.

A field board must never be left without a working model, so a deploy changes nothing the board
runs until the new version has proved itself there:

1. the artifact is verified here, the board's runtime venv made ready (:mod:`.provision`);
2. ``remote/deploy_prepare.py`` cleans up what an interrupted deploy left (other ``incoming/``
   folders, a ``current.*`` link of a killed switch) and seeds the incoming folder from the
   versions already on the board, by sha256;
3. only the files still missing or different are sent (rsync resumes a file cut off mid-copy),
   and hashed again on arrival;
4. the health check runs on the board, in the incoming folder: ``python -m edgepipe.runtime
   verify`` (hashes, and the signature against the board's trusted keys), ``validate
   --max-tokens N`` (the artifact's own ``reference.npz`` self-check: its top-1 agreement with
   the build host's tokens must reach ``min_agreement``) and a short ``run``;
5. ``remote/deploy_switch.py`` renames the folder to ``versions/NNNN-<sha12>`` and points
   ``current`` at it by renaming a new symlink over the old one. Earlier versions stay.

A deploy interrupted anywhere before step 5 leaves ``current`` untouched; one killed inside step
5 leaves ``current`` on the old or the new complete version. The next deploy cleans up.
On the board: ``python -m edgepipe.runtime run ~/.cache/edgepipe/deploy/NAME/current --prompt ...``.
"""

from __future__ import annotations

import logging
import math
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from edgepipe.devices.base import Progress, entry_output, verified_files
from edgepipe.devices.provision import ensure_venv
from edgepipe.devices.ssh import SshRunner
from edgepipe.errors import DeviceError, InputError

logger = logging.getLogger(__name__)

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
HEALTH_PROMPT = "Hello"


@dataclass(frozen=True)
class HealthCheck:
    """What the board's health check asks of a new version."""

    max_tokens: int = 64
    min_agreement: float = 0.9
    new_tokens: int = 8
    prompt: str = HEALTH_PROMPT


@dataclass(frozen=True)
class Deployed:
    """A finished deploy: the version now current on the board, and what it took."""

    name: str
    board: str
    version: str
    previous: str | None
    path: str
    files_copied: tuple[str, ...]
    bytes_copied: int
    files_seeded: tuple[str, ...]
    cleaned: tuple[str, ...]
    signature: str
    health: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Switched:
    """A rollback: ``current`` moved from ``previous`` to ``current``."""

    name: str
    board: str
    current: str
    previous: str | None


def check_name(name: str) -> str:
    if not _NAME.match(name):
        raise InputError(f"bad deployment name {name!r}: use letters, digits, '.', '_' and '-' (at most 64), e.g. --name smollm2")
    return name


def _runner(device: str) -> SshRunner:
    if not device.startswith("ssh://"):
        raise InputError(f"deploy needs a board as ssh://user@host[:port], not {device!r}")
    return SshRunner.from_spec(device)


def deploy(
    artifact: Path | str, device: str, *, name: str | None = None, health: HealthCheck | None = None, progress: Progress | None = None
) -> Deployed:
    """Copy ``artifact`` to the board ``device`` as a new version of deployment ``name`` (default:
    the artifact folder's name), health-check it there, then make it current (module docstring).
    Raises InputError, ArtifactError (the artifact, or its health check) or DeviceError; on any
    error the board stays on the version it had."""
    say = progress or (lambda msg: logger.info("%s", msg))
    health = health or HealthCheck()
    art = Path(artifact).resolve()
    name = check_name(name or art.name)
    runner = _runner(device)
    t0 = time.monotonic()
    say(f"verifying {art} before copying")
    files = verified_files(art)
    say(f"connecting to {runner.spec.destination} port {runner.spec.port}")
    probe = runner.probe()
    method = runner.copy_method or ("rsync" if probe.get("rsync") and shutil.which("rsync") else "scp")
    venv, _ = ensure_venv(runner, probe, method=method, say=say)
    from edgepipe.runtime.manifest import MANIFEST_NAME

    sha = files[MANIFEST_NAME]
    prep = runner.call(
        "deploy_prepare", {"base": runner.spec.remote_dir, "name": name, "incoming": sha[:16], "files": files}, what="deploy prepare"
    )
    if prep["cleaned"]:
        say(f"cleaned up after an interrupted deploy: {', '.join(prep['cleaned'])}")
    before = prep["current"]
    todo = sorted(rel for rel, digest in files.items() if prep["hashes"].get(rel) != digest)
    nbytes = sum((art / rel).stat().st_size for rel in todo)
    say(f"copying {len(todo)} of {len(files)} files ({nbytes / 2**20:.1f} MB) with {method}"
        + (f"; {len(prep['seeded'])} found on the board" if prep["seeded"] else ""))  # fmt: skip
    copied = runner.sync_files(art, files, prep["hashes"], prep["incoming"], method=method, what="deploy copy")
    t_copy = time.monotonic()
    say(f"health check on {runner.spec.host} (the board stays on {before or 'no version'} until it passes)")
    checked = _health_check(runner, venv, prep["incoming"], _kind_of(art), health, before)
    t_health = time.monotonic()
    say("switching current")
    switched = runner.call("deploy_switch", {"base": runner.spec.remote_dir, "name": name, "incoming": sha[:16], "sha12": sha[:12]},
                           what="deploy switch")  # fmt: skip
    say(f"{name} on {runner.spec.host} is now {switched['current']} (was {switched['previous'] or 'nothing'})")
    return Deployed(
        name=name, board=str(runner.spec), version=switched["current"], previous=switched["previous"],
        path=f"{prep['root']}/current", files_copied=tuple(copied), bytes_copied=nbytes, files_seeded=tuple(prep["seeded"]),
        cleaned=tuple(prep["cleaned"]), signature=checked.pop("signature"), health=checked,
        seconds={"copy": round(t_copy - t0, 2), "health": round(t_health - t_copy, 2), "total": round(time.monotonic() - t0, 2)},
    )  # fmt: skip


def _kind_of(art: Path) -> Any:
    from edgepipe.runtime.kinds import spec_of
    from edgepipe.runtime.manifest import read_manifest

    return spec_of(read_manifest(art).kind)


def _entry(runner: SshRunner, venv: str, args: list[str], what: str) -> subprocess.CompletedProcess[str]:
    """``python -m edgepipe.runtime ARGS`` in the board's venv."""
    return runner.exec_remote([f"{venv}/bin/python", "-I", "-m", "edgepipe.runtime", *args], what=what)


def _health_check(runner: SshRunner, venv: str, remote: str, spec: Any, health: HealthCheck, before: str | None) -> dict[str, Any]:
    """Verify, self-check and generate on the board; raise naming what failed and that nothing changed."""
    what = f"deploy health check on {runner.spec.host} (the board stays on {before or 'no version'})"

    def crash(rc: int, msg: str) -> str:
        return f"{what}: the runtime exited {rc}: {msg}"

    verified = entry_output(_entry(runner, venv, ["verify", remote], what), what=what, crash=crash)
    out: dict[str, Any] = {"signature": str(verified.get("signature", "unknown"))}
    if spec.has_reference:
        args = ["validate", remote, "--no-bench", "--max-tokens", str(health.max_tokens), "--json"]
        acc = entry_output(_entry(runner, venv, args, what), what=what, crash=crash).get("accuracy") or {}
        _check_agreement(acc, health, what)
        out["accuracy"] = acc
    if spec.generates:
        proc = _entry(runner, venv, ["run", remote, "--prompt", health.prompt, "--max-new-tokens", str(health.new_tokens)], what)
        if proc.returncode != 0:
            entry_output(proc, what=what, crash=crash)
        out["sample"] = proc.stdout.strip()
    return out


def _check_agreement(acc: dict[str, Any], health: HealthCheck, what: str) -> None:
    """The board must reproduce the build host's greedy tokens on the artifact's own reference windows."""
    agree, ppl = acc.get("host_top1_agreement"), acc.get("perplexity")
    ok = isinstance(ppl, (int, float)) and math.isfinite(ppl) and isinstance(agree, (int, float)) and agree >= health.min_agreement
    if not ok:
        raise DeviceError(
            f"{what}: the model disagrees with its own reference on the board (top-1 agreement with the build host "
            f"{agree}, perplexity {ppl}; needs >= {health.min_agreement}); the artifact is broken or wrong for this board"
        )


def rollback(device: str, *, name: str, to: str | None = None) -> Switched:
    """Point deployment ``name`` back at ``to`` (default: the newest version older than the current one)."""
    runner = _runner(device)
    dep = deployments(device, name=check_name(name))
    if not dep:
        raise InputError(f"no deployment {name!r} on {runner.spec.destination}; see `edgepipe deployments {device}`")
    versions = [v["version"] for v in dep[0]["versions"]]
    current = dep[0]["current"]
    if to is None:
        older = [v for v in versions if current is None or v < current]
        if not older:
            raise InputError(f"{name} on {runner.spec.host} has no version older than {current} to roll back to")
        to = older[-1]
    elif to not in versions:
        raise InputError(f"{name} on {runner.spec.host} has no version {to!r}; it has {', '.join(versions) or 'none'}")
    res = runner.call("deploy_switch", {"base": runner.spec.remote_dir, "name": name, "incoming": None, "version": to}, what="rollback")
    return Switched(name, str(runner.spec), res["current"], res["previous"])


def deployments(device: str, *, name: str | None = None) -> list[dict[str, Any]]:
    """The deployments on the board (or only ``name``): ``[{"name", "root", "current", "versions": [...]}]``."""
    runner = _runner(device)
    args = {"base": runner.spec.remote_dir, "name": check_name(name) if name else None}
    return list(runner.call("deploy_list", args, what="deployments")["deployments"])
