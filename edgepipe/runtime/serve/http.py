"""The HTTP layer: the standard library's threading HTTP server, OpenAI's routes and shapes.

``http.server`` is enough here and adds nothing to install on the device: one thread per
connection (the model itself is serialized by :class:`Engine`), HTTP/1.1 keep-alive, server-sent
events written as chunked transfer encoding and flushed per token, and a client that hangs up is
seen between two tokens (a failed write, or a zero-byte peek on its socket).
"""

from __future__ import annotations

import hmac
import json
import logging
import select
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from edgepipe.runtime.serve.api import ApiError, CompletionRequest, parse_json, parse_request
from edgepipe.runtime.serve.engine import Engine, Finish, Job

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 1 << 20
DISCARD_BYTES = 64 << 20  # a refused body up to this size is read and dropped
IDLE_TIMEOUT_S = 60.0  # a connection that sends nothing for this long is closed
MAX_CONNECTIONS = 64  # open connections (one thread each); beyond, a new one gets 503 and is closed
_BUSY_BODY = b'{"error": {"message": "too many open connections", "type": "server_error", "code": 503}}'
_BUSY = (
    b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nRetry-After: 1\r\nConnection: close\r\n"
    b"Content-Length: %d\r\n\r\n%s" % (len(_BUSY_BODY), _BUSY_BODY)
)
_HUNG_UP = (BrokenPipeError, ConnectionResetError, ConnectionAbortedError, socket.timeout)


class Server(ThreadingHTTPServer):
    daemon_threads = True  # idle keep-alive connections never hold up shutdown
    engine: Engine
    api_key: str | None
    max_body: int

    def __init__(
        self, address: tuple[str, int], engine: Engine, api_key: str | None, max_body: int = MAX_BODY_BYTES, max_connections: int = MAX_CONNECTIONS,
    ) -> None:
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        self.engine, self.api_key, self.max_body = engine, api_key, max_body
        self._inflight = 0
        self._idle = threading.Condition()
        # a thread per connection: without a cap, a client opening connections by the thousand
        # (or a slow-loris one) exhausts threads and memory on a small board
        self._slots = threading.BoundedSemaphore(max_connections)
        self.max_connections = max_connections
        super().__init__(address, Handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            log.warning("refused a connection from %s: %d already open", client_address[0], self.max_connections)
            try:
                request.sendall(_BUSY)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        super().process_request(request, client_address)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    @contextmanager
    def inflight(self) -> Iterator[None]:
        with self._idle:
            self._inflight += 1
        try:
            yield
        finally:
            with self._idle:
                self._inflight -= 1
                self._idle.notify_all()

    def wait_idle(self, timeout: float) -> bool:
        """Wait until no request is being answered (idle keep-alive connections do not count)."""
        with self._idle:
            return self._idle.wait_for(lambda: self._inflight == 0, timeout)


def _completion_body(job: Job, rid: str, created: int, text: str, fin: Finish) -> dict[str, Any]:
    req = job.request
    if req.chat:
        choice: dict[str, Any] = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": fin.reason, "logprobs": None}
    else:
        choice = {"index": 0, "text": text, "finish_reason": fin.reason, "logprobs": None}
    return {
        "id": rid, "object": "chat.completion" if req.chat else "text_completion", "created": created, "model": req.model,
        "choices": [choice], "usage": _usage(fin),
    }


def _usage(fin: Finish) -> dict[str, int]:
    return {"prompt_tokens": fin.prompt_tokens, "completion_tokens": fin.completion_tokens, "total_tokens": fin.prompt_tokens + fin.completion_tokens}


def _chunk_body(req: CompletionRequest, rid: str, created: int, text: str | None, reason: str | None) -> dict[str, Any]:
    if req.chat:
        delta: dict[str, Any] = {} if text is None else {"content": text}
        choice: dict[str, Any] = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}
    else:
        choice = {"index": 0, "text": text or "", "finish_reason": reason, "logprobs": None}
    return {"id": rid, "object": "chat.completion.chunk" if req.chat else "text_completion", "created": created, "model": req.model, "choices": [choice]}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "edgepipe-serve"
    timeout = IDLE_TIMEOUT_S
    server: Server
    _consumed = True  # the request's body has been read (or it has none)

    # -- plumbing -------------------------------------------------------------------------
    def setup(self) -> None:
        super().setup()
        # one small write per token: without this, Nagle's algorithm holds a token back until the
        # previous one is acknowledged, and the stream arrives in bursts
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        log.info("%s %s", self.address_string(), format % args)

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """The base class's own refusals (bad request line, unsupported method) as JSON too."""
        self.close_connection = True
        self._json(code, ApiError(code, message or explain or "bad request").body())

    def _json(self, status: int, body: Any, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.server.engine.metrics.request(self._endpoint(), status)

    def _endpoint(self) -> str:
        path = str(getattr(self, "path", "")).split("?", 1)[0]  # unset when the request line itself was refused
        return path if path in ROUTES else "other"

    def _gone(self) -> bool:
        """The client closed its end (a readable socket with nothing to read) or reset it."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except (OSError, ValueError):
            return True

    def _authorized(self) -> bool:
        key = self.server.api_key
        if key is None:
            return True
        got = self.headers.get("Authorization", "")
        scheme, _, token = got.partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())

    def _body(self) -> dict[str, Any]:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise ApiError(411, "send the body with a Content-Length (chunked request bodies are not accepted)")
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            self.close_connection = True
            raise ApiError(411, "a Content-Length header is required") from None
        if length < 0 or length > self.server.max_body:
            self._discard(length)
            raise ApiError(413, f"the request body is {length} bytes; the limit is {self.server.max_body}")
        raw = self.rfile.read(length)
        self._consumed = True
        return parse_json(raw)

    def _discard(self, length: int) -> None:
        """Read a refused body away, so the client (which sends it all before it reads) gets the
        413 rather than a broken pipe; a body far over the limit just closes the connection."""
        if 0 < length <= DISCARD_BYTES:
            while length > 0:
                got = self.rfile.read(min(length, 1 << 16))
                if not got:
                    break
                length -= len(got)
            self._consumed = length == 0
        self.close_connection = not self._consumed

    # -- dispatch -------------------------------------------------------------------------
    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        with self.server.inflight():
            self._answer(method)

    def _answer(self, method: str) -> None:
        self._consumed = method != "POST"
        try:
            if not self._authorized():
                raise ApiError(401, "a valid API key is required: send 'Authorization: Bearer KEY'", code="invalid_api_key",
                               headers={"WWW-Authenticate": "Bearer"})
            route = ROUTES.get(self.path.split("?", 1)[0])
            if route is None:
                raise ApiError(404, f"no such endpoint: {self.path[:100]}", code="not_found")
            want, fn = route
            if method != want:
                raise ApiError(405, f"{self.path} takes {want}", headers={"Allow": want})
            fn(self)
        except ApiError as e:
            if not self._consumed:
                self.close_connection = True  # the unread body would be taken for the next request
            self._json(e.status, e.body(), e.headers)
        except _HUNG_UP:
            self.close_connection = True
            log.info("%s hung up", self.address_string())
        except Exception:
            log.exception("internal error on %s %s", method, self.path)
            self.close_connection = True
            self._json(500, ApiError(500, "internal server error", type_="server_error").body())

    # -- routes ---------------------------------------------------------------------------
    def health(self) -> None:
        eng = self.server.engine
        status = 503 if eng.draining else 200
        self._json(status, {"status": "shutting_down" if eng.draining else "ok", "model": eng.model_id, "queue_depth": eng.queue_depth()})

    def models(self) -> None:
        eng = self.server.engine
        self._json(200, {"object": "list", "data": [{"id": eng.model_id, "object": "model", "created": 0, "owned_by": "edgepipe"}]})

    def metrics(self) -> None:
        data = self.server.engine.metrics.render().encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        self.server.engine.metrics.request("/metrics", 200)

    def completions(self) -> None:
        self._generate(chat=False)

    def chat_completions(self) -> None:
        self._generate(chat=True)

    def _generate(self, *, chat: bool) -> None:
        eng = self.server.engine
        body = self._body()
        req = parse_request(body, chat=chat, model_id=eng.model_id, context_length=eng.lm.context_length, vocab_size=eng.lm.vocab_size)
        job = eng.prepare(req)
        with eng.turn(self._gone):
            events = eng.run(job, self._gone)
            try:
                (self._stream if req.stream else self._whole)(job, events)
            finally:
                events.close()  # a write that failed mid-stream stops the generation here

    def _whole(self, job: Job, events: Iterator[str | Finish]) -> None:
        parts: list[str] = []
        for ev in events:
            if isinstance(ev, Finish):
                if ev.reason == "cancelled":
                    raise ConnectionAbortedError("the client hung up")
                if ev.reason == "shutdown":
                    raise ApiError(503, "the server is shutting down; the generation was cut", type_="server_error")
                self._json(200, _completion_body(job, f"{'chatcmpl' if job.request.chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time()), "".join(parts), ev))
            else:
                parts.append(ev)

    def _stream(self, job: Job, events: Iterator[str | Finish]) -> None:
        req = job.request
        rid, created = f"{'chatcmpl' if req.chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        send = self._sse
        if req.chat:
            send({**_chunk_body(req, rid, created, None, None), "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]})
        for ev in events:
            if isinstance(ev, str):
                send(_chunk_body(req, rid, created, ev, None))
            elif ev.reason == "shutdown":  # the final event of a cut stream
                send(ApiError(503, "the server is shutting down; the generation was cut", type_="server_error").body())
            elif ev.reason != "cancelled":
                send(_chunk_body(req, rid, created, None, ev.reason))
                if req.include_usage:
                    send({"id": rid, "object": "chat.completion.chunk" if req.chat else "text_completion", "created": created,
                          "model": req.model, "choices": [], "usage": _usage(ev)})
        self._write_chunk(b"data: [DONE]\n\n")
        self._write_chunk(b"")
        self.server.engine.metrics.request(self._endpoint(), 200)

    def _sse(self, obj: dict[str, Any]) -> None:
        self._write_chunk(b"data: " + json.dumps(obj).encode() + b"\n\n")

    def _write_chunk(self, data: bytes) -> None:
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))


ROUTES: dict[str, tuple[str, Callable[[Handler], None]]] = {
    "/health": ("GET", Handler.health),
    "/v1/models": ("GET", Handler.models),
    "/metrics": ("GET", Handler.metrics),
    "/v1/completions": ("POST", Handler.completions),
    "/v1/chat/completions": ("POST", Handler.chat_completions),
}
