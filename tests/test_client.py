"""The hosted-chat client against a fake OpenAI-compatible upstream on 127.0.0.1 (no internet)."""
import email.utils
import json
import logging
import socket
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from llmlab import cli
from llmlab.errors import LLMLabError
from llmlab.infer import client
from llmlab.infer.client import chat, retry_after_seconds

SECRET = "sk-test-SECRET-0123456789abcdef"
FAST = {"backoff_base": 0.001, "backoff_max": 0.01}


def completion(text):
    return {"id": "c1", "object": "chat.completion", "created": 0, "model": "fake",
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]}


def sse(pieces):
    chunks = [{"id": "c1", "object": "chat.completion.chunk", "created": 0, "model": "fake",
               "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]} for p in pieces]
    return "".join(f"data: {json.dumps(c)}\n\n" for c in chunks) + "data: [DONE]\n\n"


def full_traceback(error):
    return "".join(traceback.format_exception(error))


def error_body(message):
    return {"error": {"message": message, "type": "error"}}


class FakeUpstream:
    """Answers POST /v1/chat/completions from a script of (status, headers, body); the last entry repeats."""

    def __init__(self, script):
        self.script, self.requests = list(script), []
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                upstream.requests.append({"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "json": body})
                status, headers, payload = upstream.script.pop(0) if len(upstream.script) > 1 else upstream.script[0]
                data = payload.encode() if isinstance(payload, str) else json.dumps(payload).encode()
                self.send_response(status)
                for name, value in {"Content-Type": "application/json", **headers}.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def upstream():
    servers = []

    def start(*script):
        servers.append(FakeUpstream(script))
        return servers[-1]

    yield start
    for s in servers:
        s.close()


@pytest.fixture
def no_leak(caplog, capsys):
    """After the test: the secret appears in no log record, no stdout/stderr."""
    caplog.set_level(logging.DEBUG)
    yield
    out, err = capsys.readouterr()
    assert SECRET not in caplog.text and SECRET not in out and SECRET not in err


def test_retries_429_then_500_then_succeeds(upstream, no_leak, caplog):
    fake = upstream((429, {"Retry-After": "0"}, error_body("slow down")), (500, {}, error_body("boom")),
                    (200, {}, completion("hello there")))
    text = chat("hi", provider="openai", api_key=SECRET, base_url=fake.url, temperature=0.5, max_tokens=7, **FAST)
    assert text == "hello there"
    assert len(fake.requests) == 3  # exactly our three attempts: the SDK's own retries are off
    sent = fake.requests[-1]
    assert sent["path"] == "/v1/chat/completions"
    assert sent["headers"]["authorization"] == f"Bearer {SECRET}"
    assert sent["json"]["model"] == "gpt-4o-mini"
    assert sent["json"]["messages"] == [{"role": "user", "content": "hi"}]
    assert sent["json"]["temperature"] == 0.5 and sent["json"]["max_tokens"] == 7
    retries = [r for r in caplog.records if r.name == "llmlab.infer.client"]
    assert [r.levelname for r in retries] == ["WARNING", "WARNING"]
    assert "attempt 1/6" in retries[0].getMessage() and "429" in retries[0].getMessage()


def test_always_503_gives_up_with_a_clear_error(upstream, no_leak):
    fake = upstream((503, {}, error_body(f"overloaded (key {SECRET})")))
    with pytest.raises(LLMLabError, match="gave up after 3 attempts") as info:
        chat("hi", provider="zhipu", api_key=SECRET, base_url=fake.url, max_retries=2, **FAST)
    assert len(fake.requests) == 3
    assert "503" in str(info.value) and "overloaded" in str(info.value)
    assert SECRET not in str(info.value) and SECRET not in repr(info.value)
    assert SECRET not in full_traceback(info.value)


def test_rejected_key_fails_at_once(upstream, no_leak):
    fake = upstream((401, {}, error_body(f"Incorrect API key provided: {SECRET}")))
    with pytest.raises(LLMLabError, match=r"rejected the API key \(HTTP 401\); check ZHIPUAI_API_KEY") as info:
        chat("hi", provider="zhipu", api_key=SECRET, base_url=fake.url, **FAST)
    assert len(fake.requests) == 1
    assert SECRET not in full_traceback(info.value)  # the SDK's exception is not chained in


def test_other_client_errors_are_not_retried(upstream, no_leak):
    fake = upstream((400, {}, error_body(f"bad model; your key was {SECRET}")))
    with pytest.raises(LLMLabError, match="failed: BadRequestError") as info:
        chat("hi", provider="openai", api_key=SECRET, base_url=fake.url, **FAST)
    assert len(fake.requests) == 1
    assert "***" in str(info.value) and SECRET not in str(info.value)


def test_streaming_returns_the_concatenated_text(upstream, no_leak):
    fake = upstream((500, {}, error_body("boom")),
                    (200, {"Content-Type": "text/event-stream"}, sse(["Hel", "lo, ", "world"])))
    pieces = []
    text = chat([{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi"}], provider="local",
                base_url=fake.url, stream=True, on_text=pieces.append, **FAST)
    assert text == "Hello, world" and pieces == ["Hel", "lo, ", "world"]
    assert fake.requests[-1]["json"]["stream"] is True
    assert fake.requests[-1]["headers"]["authorization"] == f"Bearer {client.LOCAL_PLACEHOLDER_KEY}"


def test_connection_errors_are_retried_then_reported(no_leak):
    with socket.socket() as s:  # a port with nobody listening
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(LLMLabError, match="gave up after 2 attempts.*APIConnectionError"):
        chat("hi", provider="openai", api_key=SECRET, base_url=f"http://127.0.0.1:{port}/v1", max_retries=1, **FAST)


def test_missing_key_names_the_variable(monkeypatch):
    monkeypatch.delenv("ZHIPUAI_API_KEY", raising=False)
    with pytest.raises(LLMLabError, match="ZHIPUAI_API_KEY"):
        chat("hi", provider="zhipu")
    with pytest.raises(LLMLabError, match="unknown provider"):
        chat("hi", provider="nope")


def test_key_comes_from_the_environment(upstream, monkeypatch):
    fake = upstream((200, {}, completion("ok")))
    monkeypatch.setenv("ZHIPUAI_API_KEY", SECRET)
    assert chat("hi", base_url=fake.url) == "ok"
    assert fake.requests[0]["headers"]["authorization"] == f"Bearer {SECRET}"
    assert fake.requests[0]["json"]["model"] == "glm-4-flash"


def test_retry_after_is_honoured_and_jitter_is_bounded(upstream, monkeypatch):
    slept = []
    monkeypatch.setattr(client.time, "sleep", slept.append)
    fake = upstream((429, {"Retry-After": "7"}, error_body("wait")), (503, {}, error_body("busy")),
                    (503, {}, error_body("busy")), (200, {}, completion("done")))
    assert chat("hi", provider="local", base_url=fake.url, backoff_base=0.1, backoff_max=60) == "done"
    assert slept[0] == 7.0
    assert 0 <= slept[1] <= 0.2 and 0 <= slept[2] <= 0.4  # uniform(0, base · 2^k) for retries k = 1, 2


def test_retry_after_parsing():
    assert retry_after_seconds("3") == 3.0
    assert retry_after_seconds(None) is None and retry_after_seconds("soon") is None
    now = time.time()
    assert retry_after_seconds(email.utils.formatdate(now + 120, usegmt=True), now=now) == pytest.approx(120, abs=1)
    assert retry_after_seconds(email.utils.formatdate(now - 120, usegmt=True), now=now) == 0.0


def test_cli_ask_streams_to_stdout(upstream, capsys):
    fake = upstream((200, {"Content-Type": "text/event-stream"}, sse(["4", "2"])),
                    (200, {}, completion("forty-two")))
    assert cli.main(["ask", "what is 6*7?", "--provider", "local", "--base-url", fake.url,
                     "--system", "be brief", "--max-tokens", "5"]) == 0
    assert capsys.readouterr().out == "42\n"
    sent = fake.requests[0]["json"]
    assert sent["messages"][0] == {"role": "system", "content": "be brief"} and sent["max_tokens"] == 5
    assert cli.main(["ask", "again", "--provider", "local", "--base-url", fake.url, "--no-stream"]) == 0
    assert capsys.readouterr().out == "forty-two\n"
