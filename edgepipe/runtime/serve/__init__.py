"""``edgepipe serve``: an OpenAI-compatible HTTP server for one artifact, on the device.

Torch-free like the rest of :mod:`edgepipe.runtime`: the standard library's HTTP server, the
runtime's generation, and jinja2 (the ``serve`` extra) for chat templates. The artifact is
verified and loaded before the port opens, so a corrupted model never answers a request.
"""

from __future__ import annotations

import ipaddress
import logging
import signal
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from edgepipe.errors import InputError

log = logging.getLogger(__name__)

SHUTDOWN_GRACE_S = 30.0


@dataclass(frozen=True)
class ServeConfig:
    artifact: Path
    host: str = "127.0.0.1"
    port: int = 8080  # 0: any free port (the announced URL names it)
    api_key_file: Path | None = None
    max_queue: int = 8  # requests that may wait while one generates
    threads: int = 0  # 0: the artifact's profile / one per core (runtime.threads)
    max_body_bytes: int = 1 << 20
    lookup: int = 0  # prompt-lookup decoding for every request: most tokens copied per step (0: off)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def read_api_key(path: Path | None) -> str | None:
    """The key is the file's first line; an unreadable or empty file is refused (serving without
    the key the operator meant to set would be worse than not starting)."""
    if path is None:
        return None
    from edgepipe.runtime.args import read_user_text

    lines = read_user_text(path, "--api-key-file").strip().splitlines()
    key = lines[0].strip() if lines else ""
    if not key:
        raise InputError(f"--api-key-file {path} is empty; write the key on its first line")
    return key


def _check(cfg: ServeConfig) -> None:
    if not 0 <= cfg.port <= 65535:
        raise InputError(f"--port {cfg.port} is not a TCP port (0-65535)")
    if cfg.max_queue < 0:
        raise InputError(f"--max-queue {cfg.max_queue} must be 0 or more")
    if cfg.threads < 0:
        raise InputError(f"--threads {cfg.threads} must be 0 or more")
    from edgepipe.runtime.args import lookup_tokens

    lookup_tokens(cfg.lookup)


def serve(cfg: ServeConfig, announce: Callable[[str], None]) -> None:
    """Verify and load the artifact, then answer requests until SIGTERM or SIGINT.

    ``announce`` receives the lines a person should see (the URL, warnings): only the command
    line prints. On a signal, new and queued requests get 503, a running generation is cut at its
    next token (a stream gets a final error event), and the function returns.
    """
    from edgepipe.runtime.artifact import load_tokenizer, open_artifact
    from edgepipe.runtime.serve.chat import ChatTemplate
    from edgepipe.runtime.serve.engine import Engine
    from edgepipe.runtime.serve.http import Server

    _check(cfg)
    key = read_api_key(cfg.api_key_file)
    artifact = Path(cfg.artifact)
    lm, _manifest = open_artifact(artifact, threads=cfg.threads, generates=True)  # hashes verified here
    if cfg.lookup:
        from edgepipe.runtime.speculative import check_capable

        check_capable(lm, str(artifact))
    engine = Engine(lm, load_tokenizer(artifact), ChatTemplate.from_artifact(artifact), artifact.resolve().name,
                    max_queue=cfg.max_queue, lookup=cfg.lookup)
    try:
        server = Server((cfg.host, cfg.port), engine, key, cfg.max_body_bytes)
    except OSError as e:
        raise InputError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}") from None
    if key is None and not is_loopback(cfg.host):
        announce(f"warning: serving on {cfg.host}, reachable from the network, without an API key; pass --api-key-file")
    host, port = str(server.server_address[0]), int(server.server_address[1])
    shown = f"[{host}]" if ":" in host else host
    lookup = f", lookup decoding up to {cfg.lookup} tokens" if cfg.lookup else ""
    announce(f"serving {engine.model_id} at http://{shown}:{port}/v1 (queue {cfg.max_queue}, chat template: {engine.template.source}{lookup})")
    _run(server, engine)
    announce("stopped")


def _run(server: Any, engine: Any) -> None:
    def stop(signum: int, frame: Any) -> None:
        log.info("signal %d: shutting down", signum)
        engine.drain()
        threading.Thread(target=server.shutdown, daemon=True).start()  # shutdown() waits for serve_forever

    previous: dict[signal.Signals, Any] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGTERM, signal.SIGINT):
            previous[sig] = signal.signal(sig, stop)
    try:
        server.serve_forever(poll_interval=0.2)
    finally:
        engine.drain()
        if not server.wait_idle(SHUTDOWN_GRACE_S):
            log.warning("a request was still being answered after %.0f s", SHUTDOWN_GRACE_S)
        server.server_close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
