"""Start ``serve`` from a command line (in a chroot, in a board's venv), ask it one completion and one
chat completion, stop it: what the image and the deploy tests check of a server they did not start
in-process."""

from __future__ import annotations

import http.client
import json
import re
import subprocess
from typing import Any


def ask_server(cmd: list[str], prompt: str, *, env: dict[str, str] | None = None, max_tokens: int = 12) -> dict[str, Any]:
    """``completion``: the greedy text for ``prompt`` (stripped); ``chat_status`` / ``chat_text``: a chat
    request's status and reply (the artifact's chat template rendered by the server)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        port, model = None, None
        assert proc.stderr is not None
        for line in proc.stderr:
            m = re.search(r"serving (\S+) at http://127\.0\.0\.1:(\d+)/v1", line)
            if m:
                model, port = m.group(1), int(m.group(2))
                break
        assert port, "the server did not announce its port"

        def post(path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
            try:
                conn.request("POST", path, json.dumps(body), {"Content-Type": "application/json"})
                resp = conn.getresponse()
                return resp.status, json.loads(resp.read())
            finally:
                conn.close()

        status, done = post("/v1/completions", {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0})
        assert status == 200, done
        chat_status, chat = post("/v1/chat/completions", {"model": model, "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 4})
        reply = chat["choices"][0]["message"]["content"] if chat_status == 200 else chat
        return {"completion": done["choices"][0]["text"].strip(), "chat_status": chat_status, "chat_text": reply}
    finally:
        proc.terminate()
        proc.wait(timeout=60)
