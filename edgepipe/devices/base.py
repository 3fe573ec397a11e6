"""The device runner base: everything a validation does the same way on every device.

A runner validates an artifact by running the torch-free device entry point
``python -m edgepipe.runtime validate ARTIFACT --json [--no-bench] [--eval FILE] [--max-tokens N]``
on the device. Only reaching the device differs from one device to the next, so :class:`Runner`
owns the rest:

- checking the inputs, and verifying the artifact on the host against its manifest before a
  transport ships it to another file system (a file damaged on the way is then the link's fault,
  never the build's, and the verified hashes tell the transport what to send);
- building the entry point's arguments (:meth:`Runner.command`);
- reading its JSON and mapping a failure to one typed one-line error (:func:`entry_output`);
- stating what the figures can claim (:class:`Claims`) and nulling the throughput figures of a
  device whose timings mean nothing (emulation).

A transport (:mod:`.local`, :mod:`.qemu`, :mod:`.ssh`) subclasses :class:`Runner` and provides
only :meth:`~Runner.provision` (the device's environment), :meth:`~Runner.copy` (the files where the
device reads them), :meth:`~Runner.run` (the device's Python with arguments) and, when it knows more
about the device than the entry reports, :meth:`~Runner.device_facts` / :meth:`~Runner.report`.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Generic, TypeVar

from edgepipe.errors import ArtifactError, DeviceError, InputError
from edgepipe.runtime.progress import Progress

logger = logging.getLogger(__name__)

#: What a transport keeps between its steps of one validation (an environment, a probed board).
Session = TypeVar("Session")
#: The device entry point, after the device's Python (``python [-I] -m edgepipe.runtime validate``).
ENTRY: tuple[str, ...] = ("-m", "edgepipe.runtime", "validate")
_THROUGHPUT_KEY = re.compile(r"tok_s|tok/s|toks?_per_s|tokens_per_s|per_sec|per_second|throughput|(^|_)tps($|_)", re.I)


@dataclass(frozen=True)
class Claims:
    """What the figures of a runner's result can claim.

    ``text`` is the result's ``claims`` line. ``throughput``: the device's timings mean something,
    so the entry benchmarks and its speed figures are kept (else ``--no-bench`` and every speed
    figure is nulled). ``on_board``: the figures come from the target board itself, so its
    throughput may be held against the target's budgets."""

    text: str
    throughput: bool
    on_board: bool


@dataclass(frozen=True)
class Job:
    """One validation as the base has checked it. ``files`` (``{relative path: sha256}``, the
    manifest included) is set when the transport ships the artifact: the host verified them."""

    artifact: Path
    eval_file: Path | None
    max_tokens: int | None
    files: Mapping[str, str] | None


@dataclass(frozen=True)
class Placed:
    """Where the device reads the job's files; ``details`` is the transport's own record of the copy."""

    artifact: str
    eval_file: str | None = None
    details: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Ran:
    """How the entry ran: its exit code and the seconds of each step (provision, copy, run, total)."""

    returncode: int
    seconds: Mapping[str, float]


def last_line(text: str | None) -> str:
    """The last non-blank line, stripped: where a failing program says why."""
    lines = [ln.strip() for ln in (text or "").splitlines() if ln.strip()]
    return lines[-1] if lines else ""


def last_json_object(stdout: str | None) -> dict[str, Any] | None:
    """The device entry's JSON object: the whole output, or its last line that parses as one
    (stray lines a device prints before it are tolerated)."""
    text = (stdout or "").strip()
    if not text:
        return None
    try:
        obj = json.loads(text)
        return obj if isinstance(obj, dict) else None
    except ValueError:
        pass
    for line in reversed(text.splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                obj = json.loads(line)
            except ValueError:
                continue
            if isinstance(obj, dict):
                return obj
    return None


def entry_output(
    proc: subprocess.CompletedProcess[str], *, what: str, crash: Callable[[int, str], str]
) -> dict[str, Any]:
    """The JSON a device entry printed, or the one-line error its failure means.

    The entry prints ``error: MESSAGE`` and exits with the error's code for an edgepipe error:
    exit 2 (a bad artifact or input) becomes :class:`ArtifactError` ``WHAT: MESSAGE``, any other a
    :class:`DeviceError`. Anything else (a traceback, no JSON) is a broken device environment:
    :class:`DeviceError` with the message ``crash(exit code, last line)`` says what to do."""
    out = last_json_object(proc.stdout)
    if proc.returncode == 0 and out is not None:
        return out
    msg = last_line(proc.stderr) or last_line(proc.stdout) or "no output"
    if msg.startswith("error: "):
        err = ArtifactError if proc.returncode == 2 else DeviceError
        raise err(f"{what}: {msg.removeprefix('error: ')}")
    raise DeviceError(crash(proc.returncode, msg))


def strip_throughput(obj: Any) -> Any:
    """Copy of the entry's JSON with every throughput figure set to ``None``: an emulated speed
    says nothing about a board."""
    if isinstance(obj, dict):
        return {
            k: (None if _THROUGHPUT_KEY.search(str(k)) and not isinstance(v, (dict, list)) else strip_throughput(v))
            for k, v in obj.items()
        }
    if isinstance(obj, list):
        return [strip_throughput(v) for v in obj]
    return obj


def verified_files(artifact: Path) -> dict[str, str]:
    """``{relative path: sha256}`` of every file the device needs, the manifest and the signature
    (when there is one) included, after checking each listed file against the manifest here
    (raises :class:`ArtifactError`)."""
    from edgepipe.runtime.manifest import MANIFEST_NAME, sha256_file, verify_artifact
    from edgepipe.runtime.signing import SIGNATURE_NAME

    manifest = verify_artifact(artifact)
    files = {rel: entry.sha256 for rel, entry in manifest.files.items()}
    files[MANIFEST_NAME] = sha256_file(artifact / MANIFEST_NAME)
    if (artifact / SIGNATURE_NAME).is_file():
        files[SIGNATURE_NAME] = sha256_file(artifact / SIGNATURE_NAME)
    return files


def run_tool(cmd: Sequence[str], *, what: str, fix: str, timeout: float, cwd: Path | None = None) -> str:
    """Run a host tool the provisioning needs (pip, apt-get, dpkg-deb) and return its stdout;
    a missing tool, a timeout or a failure is one :class:`DeviceError` line ending in ``fix``."""
    logger.debug("host: %s", " ".join(cmd))
    try:
        proc = subprocess.run(list(cmd), cwd=cwd, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError:
        raise DeviceError(f"{what}: {cmd[0]} not found; {fix}") from None
    except subprocess.TimeoutExpired:
        raise DeviceError(f"{what} ran over {timeout:.0f} s; {fix}") from None
    if proc.returncode != 0:
        logger.debug("%s failed:\n%s", what, proc.stderr)
        errs = "\n".join(ln for ln in proc.stderr.splitlines() if "is ignored" not in ln)  # pip's noise
        detail = last_line(errs) or last_line(proc.stdout) or f"exit {proc.returncode}"
        raise DeviceError(f"{what} failed: {detail}; {fix}")
    return proc.stdout


class Runner(ABC, Generic[Session]):
    """A device that validates artifacts. Subclasses set ``name``, ``where`` (how messages name
    the device: ``on the host``, ``in the qemu guest (cortex-a76)``), ``claims`` and ``ships`` (the
    device reads another file system, so :meth:`copy` sends files), and implement the transport
    steps; :meth:`validate` is the same for all."""

    name: ClassVar[str]
    ships: ClassVar[bool] = False
    # tokens a build scores on this device when the caller names no limit (None: the whole reference)
    build_eval_tokens: ClassVar[int | None] = None
    where: str
    claims: Claims

    # ------------------------------------------------------------------ transport steps
    @abstractmethod
    def provision(self, job: Job, say: Progress) -> Session:
        """Make the device ready to run the entry (environment, runtime) and return what the
        later steps need."""

    def copy(self, job: Job, session: Session, say: Progress) -> Placed:
        """Put the job's files where the device reads them. Default: the device reads the host's
        file system, so they are used in place."""
        return Placed(str(job.artifact), str(job.eval_file) if job.eval_file else None)

    @abstractmethod
    def run(self, session: Session, args: Sequence[str], say: Progress) -> subprocess.CompletedProcess[str]:
        """Run the device's Python with ``args``; the exit code is not checked here."""

    def device_facts(self, session: Session, reported: dict[str, Any], ran: Ran) -> dict[str, Any]:
        """The result's ``device``: what the entry reported, plus what the transport knows."""
        return reported

    def report(self, session: Session, placed: Placed, ran: Ran, say: Progress) -> dict[str, Any]:
        """Extra keys of the result (e.g. how the files travelled)."""
        return {}

    def crash_message(self, session: Session, returncode: int, msg: str) -> str:
        """The one-line error when the entry failed without an edgepipe error of its own."""
        return f"`python -m edgepipe.runtime validate` {self.where} exited {returncode}: {msg}"

    # ------------------------------------------------------------------ the same for every device
    def command(self, placed: Placed, max_tokens: int | None) -> list[str]:
        """The entry's arguments after the device's Python."""
        args = [*ENTRY, placed.artifact, "--json"]
        if not self.claims.throughput:
            args.append("--no-bench")  # a benchmark whose timings mean nothing only costs time
        if placed.eval_file:
            args += ["--eval", placed.eval_file]
        if max_tokens is not None:
            args += ["--max-tokens", str(int(max_tokens))]
        return args

    def job(self, artifact: Path, eval_file: Path | None, max_tokens: int | None, say: Progress) -> Job:
        """Check the inputs (:class:`InputError`) and, for a shipping transport, verify the artifact
        here (:class:`ArtifactError`) before anything reaches the device."""
        artifact = Path(artifact).resolve()
        if not artifact.exists():
            raise InputError(f"artifact {artifact} does not exist")
        if eval_file is not None:
            eval_file = Path(eval_file).resolve()
            if not eval_file.is_file():
                raise InputError(f"eval file {eval_file} does not exist")
        if max_tokens is not None and int(max_tokens) < 2:
            raise InputError("--max-tokens must be at least 2")
        files = None
        if self.ships:
            say("verifying the artifact on the host before copying")
            files = verified_files(artifact)
        return Job(artifact, eval_file, None if max_tokens is None else int(max_tokens), files)

    def validate(
        self,
        artifact: Path,
        *,
        eval_file: Path | None = None,
        max_tokens: int | None = None,
        progress: Progress | None = None,
    ) -> dict[str, Any]:
        """The entry's JSON with ``device`` completed by the transport, ``artifact`` (the host
        folder), ``runner`` and ``claims``. Raises InputError, ArtifactError or DeviceError."""
        say = progress or (lambda msg: logger.info("%s", msg))
        t_start = time.monotonic()
        job = self.job(artifact, eval_file, max_tokens, say)
        seconds: dict[str, float] = {}
        t0 = time.monotonic()
        session = self.provision(job, say)
        seconds["provision"] = round(time.monotonic() - t0, 2)
        t0 = time.monotonic()
        placed = self.copy(job, session, say)
        seconds["copy"] = round(time.monotonic() - t0, 2)
        t0 = time.monotonic()
        proc = self.run(session, self.command(placed, job.max_tokens), say)
        seconds["run"] = round(time.monotonic() - t0, 2)
        out = entry_output(
            proc, what=f"validation {self.where}", crash=lambda rc, msg: self.crash_message(session, rc, msg)
        )
        seconds["total"] = round(time.monotonic() - t_start, 2)
        ran = Ran(proc.returncode, seconds)
        if not self.claims.throughput:
            out = strip_throughput(out)
        reported = out.get("device")
        out["device"] = self.device_facts(session, reported if isinstance(reported, dict) else {}, ran)
        out["artifact"] = str(job.artifact)
        out.update(self.report(session, placed, ran, say))
        out["runner"] = self.name
        out["claims"] = self.claims.text
        return out
