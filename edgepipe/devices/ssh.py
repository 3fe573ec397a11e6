"""A real board over SSH: ``--device ssh://user@host[:port]`` (the spec: :mod:`.ssh_spec`).

The transport uses the system ``ssh``/``scp``/``rsync`` only. What happens on the board, all
under the remote folder (``?dir=``, default ``~/.cache/edgepipe``):

``artifacts/<manifest-hash>/``
    the artifact, verified on the host first. The board is asked for the sha256 of the files it
    already holds (``remote/board_probe.py``, one ``python3`` run over ssh); a file another
    artifact folder on the board holds with the same sha256 is copied there on the board; only
    files still differing are sent (``rsync`` when both ends have it, else ``scp``); copied
    files are hashed again on arrival (``remote/file_hashes.py``), and the device entry verifies
    the whole manifest before it loads anything.
``venv-<key>/``
    the runtime, installed from wheels made on the host (:mod:`.provision`).
``eval/<sha>.txt``
    an ``--eval`` file.

Then ``VENV/bin/python -I -m edgepipe.runtime validate ARTIFACT --json [--eval F] [--max-tokens N]``
runs on the board. Its accuracy *and* throughput are measured on that device.
"""

from __future__ import annotations

import logging
import os
import re
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepipe.devices.base import Claims, Job, Placed, Progress, Ran, Runner, last_json_object, last_line
from edgepipe.devices.provision import ensure_venv
from edgepipe.devices.remote import with_call
from edgepipe.devices.ssh_spec import SshSpec, classify_ssh_failure, parse_spec
from edgepipe.errors import DeviceError, InputError

logger = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 15
#: Where rsync keeps a file cut off mid-copy, inside the destination folder (removed when done).
PARTIAL_DIR = ".rsync-partial"
#: What ssh, scp or rsync print when the connection itself failed (as opposed to the disk).
_LINK_FAILURES = ("permission denied (", "host key verification", "connection refused", "could not resolve",
                  "no route", "timed out", "host key is known")  # fmt: skip


@dataclass(frozen=True)
class Board:
    """One validation's view of the board: its probe (facts, remote hashes), the copy method and the venv."""

    probe: Mapping[str, Any]
    method: str
    venv: str
    venv_action: str
    eval_sha: str | None
    eval_name: str | None
    seconds: Mapping[str, float]


class SshRunner(Runner[Board]):
    """A real board reached with the system ``ssh``/``scp``/``rsync`` (see the module docstring)."""

    name = "ssh"
    ships = True

    def __init__(self, spec: SshSpec, *, timeout: float = 3600.0, copy_method: str | None = None):
        if copy_method not in (None, "rsync", "scp"):
            raise InputError(f"copy_method must be rsync, scp or None (auto), not {copy_method!r}")
        self.spec = spec
        self.timeout = timeout
        self.copy_method = copy_method
        self.where = f"on {spec.host}"
        self.claims = Claims(f"accuracy and throughput measured on the device {spec.host}", throughput=True, on_board=True)

    @classmethod
    def from_spec(cls, spec: str, **kwargs: Any) -> SshRunner:
        """``SshRunner.from_spec("ssh://pi@raspberrypi.local:22?identity=~/.ssh/pi")``."""
        return cls(parse_spec(spec), **kwargs)

    def __repr__(self) -> str:
        return f"SshRunner({self.spec})"

    @property
    def destination(self) -> str:
        return self.spec.destination

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

    def call(self, program: str, args: dict[str, Any], *, what: str, timeout: float = 300) -> dict[str, Any]:
        """Run ``remote/PROGRAM.py`` with ``args`` on the board's ``python3`` and return its JSON."""
        proc = self._exec(self.ssh_command("python3 -"), what=what, timeout=timeout, input=with_call(program, args))
        if proc.returncode == 127 or re.search(r"python3: (command )?not found|python3: No such file", proc.stderr):
            raise DeviceError(
                f"the board {self.spec.destination} has no python3 on its PATH; install it "
                "(`sudo apt-get install python3`) and retry"
            )
        data = last_json_object(proc.stdout)
        if proc.returncode != 0 or data is None:
            raise DeviceError(
                f"{what} on {self.spec.destination} failed (exit {proc.returncode}): "
                f"{last_line(proc.stderr) or last_line(proc.stdout) or 'no output'}"
            )
        if data.get("error"):
            raise DeviceError(f"{what} on {self.spec.destination}: {data['error']}")
        return data

    def send(self, local_dir: Path, rels: list[str], remote_dir: str, *, method: str, what: str) -> None:
        """Copy ``local_dir/rel`` to ``remote_dir/rel`` for each rel (remote parents exist)."""
        if not rels:
            return
        if method == "rsync":
            ssh = shlex.join(["ssh", "-p", str(self.spec.port), *self._options()])
            # --ignore-times: the files listed differ by hash, whatever their size and mtime say;
            # --copy-links: the staged wheel / eval folders hold symlinks to the host cache;
            # --partial-dir: a file cut off by a dropped link is resumed from where it stopped
            argv = ["rsync", "--ignore-times", "--copy-links", "--protect-args", f"--partial-dir={PARTIAL_DIR}", "--files-from=-",
                    "-e", ssh, "--", f"{local_dir}/", f"{self.spec.remote_prefix}{remote_dir}/"]  # fmt: skip
            proc = self._exec(argv, what=what, timeout=self.timeout, input="\n".join(rels) + "\n")
        else:
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
        if proc.returncode != 0:
            msg = last_line(proc.stderr) or "no message"
            low = msg.lower()
            if any(n in low for n in _LINK_FAILURES):
                raise DeviceError(classify_ssh_failure(proc.stderr, self.spec))
            fix = "free space on the board (df -h)" if "space" in low else "check the board's disk and permissions"
            raise DeviceError(f"{what} to {self.spec.destination} failed ({method}): {msg}; {fix}")

    def exec_remote(self, argv: Sequence[str], *, what: str, timeout: float | None = None) -> subprocess.CompletedProcess[str]:
        """Run ``argv`` on the board (quoted for its shell); the exit code is not checked here."""
        return self._exec(self.ssh_command(shlex.join(argv)), what=what, timeout=self.timeout if timeout is None else timeout)

    def sync_files(
        self, local_dir: Path, wanted: Mapping[str, str], have: Mapping[str, str | None], remote_dir: str, *,
        method: str, what: str,
    ) -> list[str]:  # fmt: skip
        """Copy the files whose remote sha256 differs, then check their hashes on arrival."""
        todo = sorted(rel for rel, sha in wanted.items() if have.get(rel) != sha)
        if not todo:
            return []
        self.send(local_dir, todo, remote_dir, method=method, what=what)
        got = self.call("file_hashes", {"dir": remote_dir, "files": todo}, what="hash check")["hashes"]
        bad = [rel for rel in todo if got.get(rel) != wanted[rel]]
        if bad:
            raise DeviceError(
                f"{', '.join(bad[:3])} arrived on {self.spec.destination} with a different sha256 (copy damaged or "
                "disk full); check the board's storage (df -h, dmesg) and retry"
            )
        return todo

    # ------------------------------------------------------------------ public
    def probe(
        self, *, artifact_hash: str | None = None, files: Mapping[str, str] | None = None, eval_name: str | None = None
    ) -> dict[str, Any]:
        """Connect and describe the board: ``machine`` (uname -m), ``python``, ``libc``, ``cpu_model``,
        ``ram_total_mb``, ``board``, ``base`` (the remote folder, absolute), ``rsync``, ``venvs`` (their
        markers) and, for an artifact, ``artifact_dir`` and the remote ``hashes`` of ``files`` (``{rel: sha256}``)
        after seeding missing ones from other artifacts on the board with the same sha256 (``seeded``).
        Raises :class:`DeviceError` naming the problem (unreachable, unknown host key, auth, no python3)."""
        return self.call(
            "board_probe",
            {"base": self.spec.remote_dir, "artifact": artifact_hash, "files": dict(files or {}), "eval": eval_name},
            what="probe",
        )

    # ------------------------------------------------------------------ transport steps
    def provision(self, job: Job, say: Progress) -> Board:
        from edgepipe.runtime.manifest import MANIFEST_NAME, sha256_file

        files = dict(job.files or {})
        eval_sha = sha256_file(job.eval_file) if job.eval_file is not None else None
        say(f"connecting to {self.spec.destination} port {self.spec.port}")
        t0 = time.monotonic()
        eval_name = f"{eval_sha[:16]}.txt" if eval_sha else None
        probe = self.probe(artifact_hash=files[MANIFEST_NAME][:16], files=files, eval_name=eval_name)
        t_probe = round(time.monotonic() - t0, 2)
        say(
            f"board: {probe.get('board') or probe.get('cpu_model') or '?'} ({probe.get('machine')}, "
            f"Python {probe.get('python_full')}, {probe.get('ram_total_mb')} MB RAM)"
        )
        method = self.copy_method or ("rsync" if probe.get("rsync") and shutil.which("rsync") else "scp")
        t0 = time.monotonic()
        venv, action = ensure_venv(self, probe, method=method, say=say)
        seconds = {"probe": t_probe, "venv": round(time.monotonic() - t0, 2)}
        return Board(probe, method, venv, action, eval_sha, eval_name, seconds)

    def copy(self, job: Job, session: Board, say: Progress) -> Placed:
        probe, method = session.probe, session.method
        wanted = dict(job.files or {})
        todo = sorted(rel for rel, sha in wanted.items() if probe["hashes"].get(rel) != sha)
        if probe.get("seeded"):
            say(f"{len(probe['seeded'])} artifact files were already on the board in another artifact folder")
        nbytes = sum((job.artifact / rel).stat().st_size for rel in todo)
        if todo:
            say(f"copying {len(todo)} of {len(wanted)} artifact files ({nbytes / 2**20:.1f} MB) with {method}")
        else:
            say(f"all {len(wanted)} artifact files are already on the board")
        remote_art = probe["artifact_dir"]
        copied = self.sync_files(job.artifact, wanted, probe["hashes"], remote_art, method=method, what="artifact copy")
        remote_eval = None
        if job.eval_file is not None and session.eval_name is not None:
            name = session.eval_name
            remote_eval = f"{probe['base']}/eval/{name}"
            with tempfile.TemporaryDirectory(prefix="edgepipe-ssh-") as tmp:
                os.symlink(job.eval_file, Path(tmp) / name)
                self.sync_files(Path(tmp), {name: session.eval_sha or ""}, {name: probe.get("eval_sha256")},
                           f"{probe['base']}/eval", method=method, what="eval file copy")  # fmt: skip
        return Placed(remote_art, remote_eval, {"copied": copied, "bytes": nbytes, "files": len(wanted)})

    def run(self, session: Board, args: Sequence[str], say: Progress) -> subprocess.CompletedProcess[str]:
        say(f"running edgepipe.runtime validate on {self.spec.host} (accuracy, then throughput)")
        argv = self.ssh_command(shlex.join([f"{session.venv}/bin/python", "-I", *args]))
        return self._exec(argv, what="validation", timeout=self.timeout)

    def crash_message(self, session: Board, returncode: int, msg: str) -> str:
        return (
            f"`python -m edgepipe.runtime validate` on {self.spec.destination} exited {returncode}: {msg}; "
            f"delete {session.venv} on the board to reinstall the runtime"
        )

    def device_facts(self, session: Board, reported: dict[str, Any], ran: Ran) -> dict[str, Any]:
        probe = session.probe
        return {
            **reported,
            "runner": "ssh",
            "host": self.spec.host,
            "port": self.spec.port,
            "user": self.spec.user,
            "uname_m": probe.get("machine"),
            "kernel": probe.get("kernel"),
            "board": probe.get("board"),
            "cpu_model": reported.get("cpu_model") or probe.get("cpu_model"),
            "ram_total_mb": reported.get("ram_total_mb") or probe.get("ram_total_mb"),
            "venv": session.venv,
        }

    def report(self, session: Board, placed: Placed, ran: Ran, say: Progress) -> dict[str, Any]:
        copied = placed.details["copied"]
        seconds = {**session.seconds, "copy": ran.seconds["copy"], "validate": ran.seconds["run"], "total": ran.seconds["total"]}
        transfer = {
            "method": session.method,
            "files_copied": copied,
            "bytes_copied": placed.details["bytes"],
            "files_unchanged": placed.details["files"] - len(copied),
            "files_seeded_on_board": list(session.probe.get("seeded") or []),
            "venv": session.venv_action,
            "seconds": seconds,
        }
        say(f"validated on {self.spec.host} in {seconds['total']:.0f} s (copied {len(copied)} files, venv {session.venv_action})")
        return {"remote_artifact": placed.artifact, "transfer": transfer}
