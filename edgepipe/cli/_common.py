"""What every command shares: progress on stderr, one-line errors with their exit codes, signals,
``--json`` output, the trusted-keys option."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import click

from edgepipe.errors import EdgepipeError, Interrupted, path_error

EXIT_BUDGET = 3


def _progress(enabled: bool) -> Callable[[str], None]:
    start = time.time()

    def say(msg: str) -> None:
        if enabled:
            click.echo(f"[{time.time() - start:7.1f}s] {msg}", err=True)

    return say


def _fail(e: EdgepipeError) -> None:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    click.echo(f"error: {msg}", err=True)
    sys.exit(e.exit_code)


class _Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so every stage's clean-up runs as it does for Ctrl-C.

    Python's default SIGTERM action ends the process without unwinding: a stage's temporary
    folder stayed behind (12 GB of GPTQ Hessians for Granite 2B) until a later sweep.
    """


def _on_sigterm(signum: int, frame: Any) -> None:
    raise _Terminated()


def _guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Turn the project's own errors into a one-line message and its exit code; no traceback."""
    import functools

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except EdgepipeError as e:
            _fail(e)
        except OSError as e:
            known = path_error(e)
            if known is None:
                raise
            _fail(known)
        except Interrupted as e:  # held back while the build published: the new artifact is in place, whole
            what = "terminated" if e.signum == signal.SIGTERM else "interrupted"
            click.echo(f"error: {what} as the build finished; the new artifact was published to {e.published} (complete)", err=True)
            sys.exit(143 if e.signum == signal.SIGTERM else 130)
        except _Terminated:
            click.echo("error: terminated; nothing was published (run the same command again to resume)", err=True)
            sys.exit(143)
        except KeyboardInterrupt:
            click.echo("error: interrupted; nothing was published (run the same command again to resume)", err=True)
            sys.exit(130)
        except MemoryError:
            click.echo("error: out of memory; build on a machine with more RAM or a smaller model", err=True)
            sys.exit(1)

    return wrapper


@contextlib.contextmanager
def _native_stdout_to_stderr(enabled: bool) -> Iterator[None]:
    """Send what native libraries write to file descriptor 1 to stderr while ``enabled``.

    ``--json`` promises one JSON object on stdout; the QNN SDK prints banner lines straight to
    fd 1 from C++, past Python's sys.stdout.
    """
    if not enabled:
        yield
        return
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no real fd 1 (embedded interpreters)
        yield
        return
    try:
        os.dup2(2, 1)
        yield
    finally:
        try:
            sys.stdout.flush()
        except (OSError, ValueError):
            pass
        os.dup2(saved, 1)
        os.close(saved)


def _set_trusted_keys(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """``--trusted-keys`` stands for ``$EDGEPIPE_TRUSTED_KEYS`` in this process and the device entries it starts."""
    if value is not None:
        from edgepipe.runtime.signing import ENV_TRUSTED_KEYS

        os.environ[ENV_TRUSTED_KEYS] = value
    return value


def _trusted_keys_option(fn: Callable[..., Any]) -> Callable[..., Any]:
    return click.option(
        "--trusted-keys", expose_value=False, callback=_set_trusted_keys, is_eager=True,
        help="Public key file(s) or folder(s) to check signatures with, ':'-separated; '' for none "
        "(default: $EDGEPIPE_TRUSTED_KEYS, ~/.config/edgepipe/trusted-keys, /etc/edgepipe/trusted-keys).",
    )(fn)  # fmt: skip


def _emit_json(obj: Any) -> None:
    click.echo(json.dumps(obj, indent=None, sort_keys=True, default=str))


