"""The OpenAI request bodies the server accepts, checked field by field into one typed request.

A bad field is answered with HTTP 400 naming the field (OpenAI's error shape), before the request
takes a place in the queue. Fields the server does not act on (``logprobs``, ``user``, ...) are
ignored, as other OpenAI-compatible servers do; ``n`` other than 1 is refused, not ignored,
because the client would wait for choices that never come.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

MAX_STOP = 4  # OpenAI's limit on stop sequences
ROLES = ("system", "developer", "user", "assistant", "tool")


class ApiError(Exception):
    """An answer other than 200: its HTTP status and the JSON error body clients parse."""

    def __init__(self, status: int, message: str, *, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type_
        self.param = param
        self.code = code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass(frozen=True)
class Message:
    role: str
    content: str


@dataclass(frozen=True)
class CompletionRequest:
    """One ``/v1/completions`` (``prompt``) or ``/v1/chat/completions`` (``messages``) request."""

    model: str
    chat: bool
    prompt: str = ""
    prompt_ids: tuple[int, ...] = ()  # /v1/completions' token-id form of the prompt
    messages: tuple[Message, ...] = ()
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None  # None: until EOS or the end of the context
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # an extension (as llama.cpp's and vLLM's servers have): decode max_tokens whatever comes


def parse_json(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise ApiError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, not {type(body).__name__}")
    return body


def _bad(param: str, want: str, got: Any) -> ApiError:
    return ApiError(400, f"'{param}' must be {want}, got {json.dumps(got)[:80]}", param=param)


def _number(body: dict[str, Any], name: str, default: float, lo: float, hi: float, *, lo_open: bool = False) -> float:
    v = body.get(name)
    if v is None:
        return default
    ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    if not ok or v > hi or v < lo or (lo_open and v == lo):
        raise _bad(name, f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}]", v)
    return float(v)


def _int(body: dict[str, Any], name: str, lo: int, hi: int) -> int | None:
    v = body.get(name)
    if v is None:
        return None
    if not isinstance(v, int) or isinstance(v, bool) or not lo <= v <= hi:
        raise _bad(name, f"an integer in [{lo}, {hi}]", v)
    return v


def _bool(body: dict[str, Any], name: str) -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise _bad(name, "true or false", v)
    return v


def _stop(body: dict[str, Any]) -> tuple[str, ...]:
    v = body.get("stop")
    if v is None:
        return ()
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or len(items) > MAX_STOP or not all(isinstance(s, str) and s for s in items):
        raise _bad("stop", f"a non-empty string or a list of at most {MAX_STOP} of them", v)
    return tuple(items)


def _content(v: Any, i: int) -> str:
    """A message's content: a string, or a list of text parts (images and audio are refused)."""
    if isinstance(v, str):
        return v
    if v is None:
        return ""
    if isinstance(v, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in v):
        return "".join(p["text"] for p in v)
    raise _bad(f"messages[{i}].content", "a string or a list of text parts", v)


def _messages(body: dict[str, Any]) -> tuple[Message, ...]:
    v = body.get("messages")
    if not isinstance(v, list) or not v:
        raise _bad("messages", "a non-empty list of messages", v)
    out = []
    for i, m in enumerate(v):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise _bad(f"messages[{i}]", f"an object with a role in {list(ROLES)}", m)
        out.append(Message(role=m["role"], content=_content(m.get("content"), i)))
    return tuple(out)


def _prompt(body: dict[str, Any], vocab_size: int) -> tuple[str, tuple[int, ...]]:
    """A string, a list of one string, or a list of token ids (OpenAI's forms of one prompt)."""
    v = body.get("prompt")
    if isinstance(v, list) and len(v) == 1 and isinstance(v[0], str):
        v = v[0]
    if isinstance(v, str) and v:
        return v, ()
    if isinstance(v, list) and v and all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab_size for t in v):
        return "", tuple(v)
    raise _bad("prompt", f"a non-empty string or a list of token ids below {vocab_size} (one prompt per request)", v)


def _stream(body: dict[str, Any]) -> tuple[bool, bool]:
    stream = _bool(body, "stream")
    opts = body.get("stream_options")
    if opts is None:
        return stream, False
    if not isinstance(opts, dict):
        raise _bad("stream_options", "an object", opts)
    return stream, _bool(opts, "include_usage")


def parse_request(body: dict[str, Any], *, chat: bool, model_id: str, context_length: int, vocab_size: int) -> CompletionRequest:
    """The typed request, or :class:`ApiError` (400 for a bad field, 404 for another model)."""
    model = body.get("model")
    if not isinstance(model, str):
        raise _bad("model", "a string", model)
    if model != model_id:
        raise ApiError(404, f"the model '{model[:80]}' does not exist; this server has '{model_id}'", param="model", code="model_not_found")
    n = _int(body, "n", 1, 1)
    del n  # only one choice per request: the device generates one sequence at a time
    max_tokens = _int(body, "max_completion_tokens" if chat and "max_completion_tokens" in body else "max_tokens", 1, context_length)
    stream, include_usage = _stream(body)
    prompt, prompt_ids = ("", ()) if chat else _prompt(body, vocab_size)
    return CompletionRequest(
        model=model,
        chat=chat,
        prompt=prompt,
        prompt_ids=prompt_ids,
        messages=_messages(body) if chat else (),
        stream=stream,
        include_usage=include_usage,
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, lo_open=True),
        seed=_int(body, "seed", 0, 2**63 - 1),
        stop=_stop(body),
        ignore_eos=_bool(body, "ignore_eos"),
    )
