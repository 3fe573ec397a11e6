"""Typed errors. Every user-facing failure is one of these: the CLI prints the one-line
message and exits with ``exit_code``; anything else is a bug and keeps its traceback."""

from __future__ import annotations

import errno


class EdgepipeError(Exception):
    """Base of all errors edgepipe reports to a user. The message names the problem and the fix."""

    exit_code = 2


class InputError(EdgepipeError):
    """Bad input: a flag, a file, a model folder, a target name."""


class TargetError(InputError):
    """A target profile is unknown or does not match the schema."""


class ModelError(InputError):
    """A model folder is missing, half-written, corrupt or of an unsupported architecture."""


class ArtifactError(EdgepipeError):
    """An artifact folder failed verification (manifest, hashes, sizes, paths)."""


class SignatureError(ArtifactError):
    """An artifact's signature is missing, made by an untrusted key, or does not cover what is there."""


class DeviceError(EdgepipeError):
    """A device runner could not be set up or reached."""


class StageError(EdgepipeError):
    """A build stage failed for a reason outside the user's input (disk full, out of memory)."""

    exit_code = 1


class NpuUnavailableError(InputError):
    """onnxruntime-qnn is not installed or its HTP backend cannot be loaded."""


class NpuCoverageError(EdgepipeError):
    """The model does not run wholly on the NPU and the target forbids CPU fallback."""

    exit_code = 3


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM that arrived while a build published its artifact: held back until the swap
    was whole, then raised. ``published``: the folder that now holds the new, complete artifact."""

    def __init__(self, signum: int, published: str) -> None:
        super().__init__(signum, published)
        self.signum = signum
        self.published = published


def cannot_read(what: str, path: object, e: OSError) -> str:
    """The one line for a file that is there but cannot be read: what, where, why, and the fix."""
    if e.errno in (errno.EACCES, errno.EPERM):
        fix = "make it readable by this user (check its permissions and its folders')"
    elif e.errno == errno.EISDIR:
        fix = "it is a folder; pass a file"
    else:
        fix = "check the file and its disk"
    return f"cannot read {what} {path} ({e.strerror or type(e).__name__}); {fix}"


def path_error(e: OSError) -> InputError | None:
    """The user-input error an OSError stands for, wherever it surfaced: a path too long for the
    filesystem (``Path.exists`` raises it rather than saying no). None for any other OSError."""
    if e.errno == errno.ENAMETOOLONG:
        name = str(e.filename)[:80] + ("..." if len(str(e.filename)) > 80 else "")
        return InputError(f"the path {name} is too long for the filesystem (a name over 255 bytes or a path over 4096); use a shorter one")
    return None
