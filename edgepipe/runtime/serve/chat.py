"""The artifact's chat template, applied to a request's messages the way ``transformers`` does.

Hugging Face chat templates are Jinja2 programs (``chat_template.jinja``, or ``chat_template`` in
``tokenizer_config.json``); a hand-written subset would mis-render the first template that uses a
filter or a macro, so they run in Jinja2's immutable sandbox (no attribute tricks, no writes),
with the same globals ``transformers`` gives them. An artifact without a template gets ChatML
(what llama.cpp's server falls back to), so ``/v1/chat/completions`` still answers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from edgepipe.errors import ArtifactError, InputError
from edgepipe.runtime.serve.api import ApiError, Message

log = logging.getLogger(__name__)

TEMPLATE_FILE = "chat_template.jinja"
TOKENIZER_CONFIG = "tokenizer_config.json"


def chatml(messages: Sequence[Message]) -> str:
    """The fallback template, ending with the assistant's turn opened."""
    turns = "".join(f"<|im_start|>{m.role}\n{m.content}<|im_end|>\n" for m in messages)
    return turns + "<|im_start|>assistant\n"


def _token_text(v: Any) -> str:
    """``bos_token`` / ``eos_token`` as tokenizer_config.json writes them: a string or an AddedToken dict."""
    if isinstance(v, dict):
        v = v.get("content")
    return v if isinstance(v, str) else ""


def _read_config(root: Path) -> dict[str, Any]:
    path = root / TOKENIZER_CONFIG
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ArtifactError(f"{path} cannot be read ({e}); rebuild the artifact") from None
    return data if isinstance(data, dict) else {}


def _template_source(root: Path, config: dict[str, Any]) -> str | None:
    path = root / TEMPLATE_FILE
    if path.is_file():
        return path.read_text(encoding="utf-8")
    t = config.get("chat_template")
    if isinstance(t, list):  # named templates: the default one answers chat requests
        t = next((x.get("template") for x in t if isinstance(x, dict) and x.get("name") == "default"), None)
    return t if isinstance(t, str) and t.strip() else None


def _raise(message: str) -> None:
    raise ApiError(400, f"the chat template refused these messages: {message}", param="messages")


def _compile(source: str) -> Any:
    try:
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise InputError("this artifact has a chat template and rendering it needs jinja2: pip install 'edgepipe[serve]'") from None
    import jinja2

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.filters["tojson"] = lambda x, indent=None, ensure_ascii=False: json.dumps(x, indent=indent, ensure_ascii=ensure_ascii)
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    try:
        return env.from_string(source)
    except jinja2.TemplateError as e:
        raise ArtifactError(f"the artifact's chat template does not compile ({e}); rebuild the artifact") from None


@dataclass(frozen=True)
class ChatTemplate:
    """A compiled template (``None``: ChatML) and the special tokens it may print."""

    template: Any
    bos_token: str = ""
    eos_token: str = ""

    @property
    def source(self) -> str:
        return "artifact" if self.template is not None else "chatml"

    @classmethod
    def from_artifact(cls, root: Path) -> ChatTemplate:
        config = _read_config(root)
        source = _template_source(root, config)
        if source is None:
            log.warning("%s has no chat template; chat requests are rendered as ChatML", root)
        return cls(
            template=_compile(source) if source is not None else None,
            bos_token=_token_text(config.get("bos_token")),
            eos_token=_token_text(config.get("eos_token")),
        )

    def render(self, messages: Sequence[Message]) -> str:
        if self.template is None:
            return chatml(messages)
        import jinja2

        try:
            text = self.template.render(
                messages=[{"role": m.role, "content": m.content} for m in messages],
                add_generation_prompt=True,
                bos_token=self.bos_token,
                eos_token=self.eos_token,
            )
        except ApiError:
            raise
        except (jinja2.TemplateError, TypeError, ValueError) as e:
            raise ApiError(400, f"the chat template failed on these messages: {e}", param="messages") from None
        return str(text)
