"""llmlab serve: continuous batching (rows joining and leaving a running batch compute what they compute alone),
the OpenAI-compatible API through the official ``openai`` client, error shapes for 200+ bad requests, 32 concurrent
streams, and a client that disconnects mid-stream."""
import asyncio
import functools
import json
import threading
import time

import httpx
import openai
import pytest
import torch
import uvicorn
from transformers import LlamaConfig, LlamaForCausalLM

from llmlab import chat
from llmlab.hub.save import save_model
from llmlab.infer.batcher import Batcher, DecoderRows, RecomputeRows
from llmlab.infer.engine import Engine, SamplingParams
from llmlab.model.config import preset
from llmlab.model.decoder import build_model
from llmlab.infer.server import ChatRequest, CompletionRequest, create_app
from llmlab.tokenizer import train_bpe

KEY = "test-key-123"
CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, how are you today?",
          "one two three four five six seven eight nine ten"] * 20


@pytest.fixture(scope="module")
def tokenizer():
    return train_bpe(CORPUS, vocab_size=300)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tokenizer):
    torch.manual_seed(0)
    cfg = preset("llama", vocab_size=len(tokenizer), n_layer=2, d_model=64, n_head=4, n_kv_head=2, max_seq_len=160)
    out = tmp_path_factory.mktemp("model") / "tiny-chat"
    save_model(build_model(cfg).eval(), out, tokenizer=tokenizer, chat_template=chat.TEMPLATES["llmlab"])
    return out


@pytest.fixture(scope="module")
def engine(model_dir):
    return Engine.from_path(str(model_dir))


class ServerThread:
    """uvicorn on a free port of 127.0.0.1 (port 0: the system picks it), in a background thread."""

    def __init__(self, app):
        self.server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self):
        self.thread.start()
        deadline = time.time() + 20
        while not self.server.started:
            assert time.time() < deadline, "server did not start"
            time.sleep(0.02)
        port = self.server.servers[0].sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(scope="module")
def server(engine, model_dir):
    app = create_app(engine, model_name="tiny-chat", template=chat.load_template(model_dir), api_key=KEY)
    with ServerThread(app) as s:
        s.state = app.state.server
        yield s


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0)


def solo(engine, ids, max_tokens, stops):
    """Reference: the engine alone, greedy, one request."""
    return engine.generate([ids], SamplingParams(max_new_tokens=max_tokens, temperature=0, stop=stops))[0]


# ------------------------------------------------------------------------------------------ the batcher itself

def full_logits(model, ids):
    """Reference: next-token logits of a whole sequence, no cache, no padding."""
    return model(torch.tensor([ids]))[0, -1]


@torch.inference_mode()
def test_rows_joining_and_leaving_compute_what_they_compute_alone(engine):
    model = engine.model
    rows = DecoderRows(model, engine.pad_id, engine.device)
    seqs = [[10, 11, 12, 13]]
    logits = rows.admit([seqs[0]])
    for step in range(6):
        if step == 2:                                      # a longer prompt joins: every running row shifts right
            new = [list(range(20, 31)), [40, 41]]
            logits = torch.cat([logits, rows.admit(new)])
            seqs += [list(p) for p in new]
        if step == 4:                                      # the first (now longest) row leaves: columns are cut
            rows.keep([1, 2])
            seqs, logits = seqs[1:], logits[1:]
        for s, row in zip(seqs, logits):
            torch.testing.assert_close(row, full_logits(model, s), atol=1e-4, rtol=1e-4)
        tokens = logits.argmax(-1)
        for s, t in zip(seqs, tokens.tolist()):
            s.append(t)
        logits = rows.decode(tokens)
    assert rows.cache.length == max(len(s) for s in seqs)  # the cut kept the cache as short as its longest row


def run_batcher(engine, prompts, params, stagger=0.0):
    """Submit prompts (one every ``stagger`` seconds) and collect (text, finish_reason, tokens) per prompt."""
    batcher = Batcher(engine, max_batch=3)
    batcher.start()
    texts, results, done = {}, {}, threading.Semaphore(0)

    def sink(i, ev):
        texts[i] = texts.get(i, "") + ev.text
        if ev.finish_reason:
            results[i] = (texts[i], ev.finish_reason, ev.completion_tokens)
            done.release()
    try:
        for i, p in enumerate(prompts):
            batcher.submit(p, params, functools.partial(sink, i))
            time.sleep(stagger)
        for _ in prompts:
            assert done.acquire(timeout=20)
        wait_until_idle(batcher)
    finally:
        batcher.stop()
    return [results[i] for i in range(len(prompts))]


def wait_until_idle(batcher, timeout=10):
    """The last event goes out just before its row leaves the batch: wait for the batch to empty."""
    deadline = time.time() + timeout
    while batcher.active and time.time() < deadline:
        time.sleep(0.005)
    assert batcher.active == 0


PROMPTS = [[10, 11, 12], [20, 21, 22, 23, 24, 25, 26, 27], [30], [40, 41, 42, 43], [50, 51]]


def test_staggered_requests_equal_solo_greedy_with_our_model(engine):
    params = SamplingParams(max_new_tokens=24, temperature=0)
    got = run_batcher(engine, PROMPTS, params, stagger=0.01)   # 5 prompts, 3 slots: joins mid-flight
    for p, (text, reason, n) in zip(PROMPTS, got):
        ref = solo(engine, p, 24, [])
        assert (text, reason) == (ref.text, ref.finish_reason)
        assert n == len(ref.token_ids) + (reason == "stop")  # the end-of-sequence token counts too


def test_staggered_requests_equal_solo_greedy_with_a_transformers_model(tokenizer):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64)).eval()
    engine = Engine(hf, tokenizer, eos_token_ids=[])
    assert isinstance(Batcher(engine).rows, RecomputeRows)
    got = run_batcher(engine, PROMPTS, SamplingParams(max_new_tokens=12, temperature=0), stagger=0.01)
    for p, (text, reason, n) in zip(PROMPTS, got):
        assert (text, reason, n) == (solo(engine, p, 12, []).text, "length", 12)


def test_seeded_sampling_in_a_batch_is_reproducible(engine):
    params = SamplingParams(max_new_tokens=16, temperature=1.0, top_p=0.9, seed=7)
    first = run_batcher(engine, PROMPTS[:3], params)
    again = run_batcher(engine, PROMPTS[:3][::-1], params)[::-1]   # other rows, other order: same draws
    assert first == again


# ------------------------------------------------------------------------------------------ the API

def render_ids(engine, model_dir, messages):
    text = chat.render(messages, chat.load_template(model_dir), add_generation_prompt=True,
                       bos_token=engine.tokenizer.bos_token, eos_token=engine.tokenizer.eos_token)
    return engine.tokenizer.encode(text, add_special_tokens=False)


def test_openai_client_chat_stream_equals_non_stream(client, server, engine, model_dir):
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}]
    out = client.chat.completions.create(model="tiny-chat", messages=messages, temperature=0, max_tokens=20)
    ids = render_ids(engine, model_dir, messages)
    ref = solo(engine, ids, 20, server.state.chat_stops)
    assert out.choices[0].message.content == ref.text and out.choices[0].message.role == "assistant"
    assert out.choices[0].finish_reason == ref.finish_reason
    assert out.usage.prompt_tokens == len(ids)
    assert out.usage.total_tokens == len(ids) + out.usage.completion_tokens
    stream = client.chat.completions.create(model="tiny-chat", messages=messages, temperature=0, max_tokens=20,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == ref.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == ref.finish_reason
    assert chunks[-1].usage.completion_tokens == out.usage.completion_tokens


def test_openai_client_completions_n_seed_and_stop(client, server, engine):
    prompt = "the quick brown"
    ref = solo(engine, engine.tokenizer.encode(prompt), 12, [])
    out = client.completions.create(model="tiny-chat", prompt=prompt, temperature=0, max_tokens=12)
    assert out.choices[0].text == ref.text and out.object == "text_completion"
    cut = ref.text[3:5]                                    # a stop string taken from the greedy answer
    stopped = client.completions.create(model="tiny-chat", prompt=prompt, temperature=0, max_tokens=12, stop=[cut])
    assert stopped.choices[0].text == ref.text[:ref.text.find(cut)] and stopped.choices[0].finish_reason == "stop"
    sampled = [client.completions.create(model="tiny-chat", prompt=[prompt, "hello"], temperature=1.0, n=2,
                                         seed=3, max_tokens=8) for _ in range(2)]
    assert [c.text for c in sampled[0].choices] == [c.text for c in sampled[1].choices]
    assert [c.index for c in sampled[0].choices] == [0, 1, 2, 3] and 4 <= sampled[0].usage.completion_tokens <= 4 * 8
    streamed = client.completions.create(model="tiny-chat", prompt=prompt, temperature=0, max_tokens=12, stream=True)
    assert "".join(c.choices[0].text for c in streamed if c.choices) == ref.text


def test_ask_the_local_server_without_naming_its_model(server, engine, model_dir):
    from llmlab.infer.client import chat as ask
    messages = [{"role": "user", "content": "hello"}]
    text = ask(messages, provider="local", base_url=server.url + "/v1", api_key=KEY, temperature=0, max_tokens=8)
    assert text == solo(engine, render_ids(engine, model_dir, messages), 8, server.state.chat_stops).text


def test_models_health_and_page(client, server):
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]
    assert httpx.get(server.url + "/health").json()["status"] == "ok"
    page = httpx.get(server.url + "/")
    assert page.status_code == 200 and "/v1/chat/completions" in page.text


def bad_requests(url):
    """(method, path, headers, body, expected status) for a scripted mix of at least 200 bad requests."""
    auth = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    chat_url, cmpl_url = url + "/v1/chat/completions", url + "/v1/completions"
    good = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    cases = []
    for body in ["{", "not json", "", "[1, 2", '{"model": "tiny-chat", "messages": [}', "\x00\x01", "{'a': 1}"]:
        cases += [("POST", chat_url, auth, body, 400), ("POST", cmpl_url, auth, body, 400)]
    missing = [{k: v for k, v in good.items() if k != "messages"}, {k: v for k, v in good.items() if k != "model"},
               {**good, "messages": []}, {"model": "tiny-chat", "prompt": []}]
    cases += [("POST", chat_url if "prompt" not in b else cmpl_url, auth, b, 400) for b in missing]
    for role in ["robot", "", "USER", "tool", "function", "developer", None, 7, ["user"]]:
        cases.append(("POST", chat_url, auth, {**good, "messages": [{"role": role, "content": "hi"}]}, 400))
    for bad in [[{"role": "user", "content": "   "}], [{"role": "user", "content": "a"}, {"role": "system",
                                                                                         "content": "late"}],
                [{"role": "user"}], [{"content": "hi"}]]:
        cases.append(("POST", chat_url, auth, {**good, "messages": bad}, 400))
    both = [(chat_url, good), (cmpl_url, {"model": "tiny-chat", "prompt": "hi", "max_tokens": 4})]
    for field, value in [("max_tokens", -1), ("max_tokens", 0), ("max_tokens", -100), ("temperature", -0.5),
                         ("temperature", 3), ("top_p", 0), ("top_p", 1.5), ("n", 0), ("n", 100),
                         ("stop", ["a", "b", "c", "d", "e"]), ("stop", [""]), ("max_tokens", 10 ** 6),
                         ("max_tokens", 159), ("max_completion_tokens", -3), ("seed", 2 ** 64 - 1),
                         ("seed", 2 ** 63), ("seed", -2 ** 64)]:
        cases += [("POST", u, auth, {**b, field: value}, 400) for u, b in both]
    wrong_types = [("model", 5), ("model", None), ("max_tokens", "many"), ("max_tokens", 2.5),
                   ("temperature", "hot"), ("temperature", [1]), ("stream", "yes"), ("n", "two"), ("seed", "x"),
                   ("stop", 5), ("stop", [1, 2]), ("top_p", {}), ("stream_options", 3)]
    wrong_types += [(f, v) for f in ("max_tokens", "temperature", "top_p", "n", "seed") for v in ("x", [], {})]
    wrong_types += [(f, v) for f in ("model", "stream", "stop") for v in ({}, [[]], 2.5)]
    cases += [("POST", u, auth, {**b, f: v}, 422) for f, v in wrong_types for u, b in both]
    cases += [("POST", chat_url, auth, {**good, "messages": v}, 422)
              for v in ["hi", {"role": "user"}, [5], [{"role": "user", "content": 5}], None]]
    cases += [("POST", u, auth, body, 422) for u, b in both for body in ([b], "5", "null", '"text"')]
    cases += [("POST", cmpl_url, auth, {"model": "tiny-chat", "prompt": p}, s)
              for p, s in [(5, 422), ([1, "a"], 422), ("", 400), ([""], 400)]]
    for name in ["gpt-4", "", "tiny", "TINY-CHAT", "tiny-chat ", "../etc/passwd"]:
        cases += [("POST", chat_url, auth, {**good, "model": name}, 404),
                  ("POST", cmpl_url, auth, {"model": name, "prompt": "hi"}, 404)]
    for words in (40, 60, 200, 1000):                      # prompts over the context of 160 tokens
        long = "the quick brown fox " * words
        cases += [("POST", chat_url, auth, {**good, "messages": [{"role": "user", "content": long}]}, 400),
                  ("POST", chat_url, auth, {**good, "messages": [{"role": "system", "content": long},
                                                                 {"role": "user", "content": "hi"}]}, 400),
                  ("POST", cmpl_url, auth, {"model": "tiny-chat", "prompt": long}, 400),
                  ("POST", cmpl_url, auth, {"model": "tiny-chat", "prompt": ["hi", long]}, 400)]
    for headers in [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": "Bearer"},
                    {"Authorization": f"Basic {KEY}"}, {"Authorization": f"Bearer {KEY}x"}]:
        cases += [("POST", chat_url, headers, good, 401), ("POST", cmpl_url, headers, "{", 401),
                  ("POST", cmpl_url, headers, both[1][1], 401), ("GET", url + "/v1/models", headers, None, 401)]
    cases += [("GET", url + "/v1/nothing", auth, None, 404), ("GET", chat_url, auth, None, 405),
              ("DELETE", url + "/v1/models", auth, None, 405)]
    return cases


def test_bad_requests_get_openai_shaped_4xx_and_the_server_keeps_working(server, client):
    cases = bad_requests(server.url)
    assert len(cases) >= 200
    with httpx.Client(timeout=10) as http:
        for method, url, headers, body, status in cases:
            content = body if isinstance(body, str) or body is None else json.dumps(body)
            r = http.request(method, url, headers=headers, content=content)
            assert r.status_code == status, (method, url, body, r.status_code, r.text)
            error = r.json()["error"]
            assert set(error) == {"message", "type", "param", "code"} and error["message"], r.text
    out = client.chat.completions.create(model="tiny-chat", messages=[{"role": "user", "content": "hi"}],
                                         max_tokens=3, temperature=0)
    assert out.choices[0].finish_reason in ("stop", "length")
    long = "the quick brown fox " * 200
    for route, body, param in [("chat/completions", {"messages": [{"role": "user", "content": long}]}, "messages"),
                               ("completions", {"prompt": long}, "prompt")]:
        r = httpx.post(f"{server.url}/v1/{route}", json={"model": "tiny-chat", **body},
                       headers={"Authorization": f"Bearer {KEY}"}, timeout=10)
        assert r.json()["error"]["param"] == param and r.json()["error"]["code"] == "context_length_exceeded"
    seeded = client.completions.create(model="tiny-chat", prompt="hi", max_tokens=2, n=2, seed=2 ** 63 - 16)
    assert len(seeded.choices) == 2


def test_32_concurrent_streams_equal_solo_greedy(server, engine, model_dir):
    contents = [f"hello {i} world" + " fox" * (i % 5) for i in range(32)]
    refs = [solo(engine, render_ids(engine, model_dir, [{"role": "user", "content": c}]), 24,
                 server.state.chat_stops).text for c in contents]

    async def one(http, content):
        body = {"model": "tiny-chat", "messages": [{"role": "user", "content": content}], "max_tokens": 24,
                "temperature": 0, "stream": True}
        text = ""
        async with http.stream("POST", server.url + "/v1/chat/completions", json=body,
                               headers={"Authorization": f"Bearer {KEY}"}) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    chunk = json.loads(line[6:])
                    assert "error" not in chunk
                    text += chunk["choices"][0]["delta"].get("content") or ""
        return text

    async def all_clients():
        async with httpx.AsyncClient(timeout=60) as http:
            return await asyncio.gather(*(one(http, c) for c in contents))

    assert asyncio.run(all_clients()) == refs
    wait_until_idle(server.state.batcher)


def test_disconnect_mid_stream_frees_the_slot(server):
    batcher = server.state.batcher
    before = batcher.cancelled
    body = {"model": "tiny-chat", "messages": [{"role": "user", "content": "hi"}], "temperature": 0, "stream": True}
    with httpx.Client(timeout=10) as http:
        with http.stream("POST", server.url + "/v1/chat/completions", json=body,
                         headers={"Authorization": f"Bearer {KEY}"}) as r:
            lines = r.iter_lines()
            while '"content": ""' in next(lines) or not batcher.active:   # until the first token arrived
                pass
            assert batcher.active == 1        # greedy on this prompt runs to the context's end without a stop
    wait_until_idle(batcher)
    assert batcher.cancelled == before + 1


def test_chat_replies_drop_the_templates_leading_space_and_completions_keep_it():
    chat_req = ChatRequest(model="m", messages=[{"role": "user", "content": "hi"}])
    completion_req = CompletionRequest(model="m", prompt="The capital of France is")
    assert chat_req.sampling(8, [], 0).lstrip and not completion_req.sampling(8, [], 0).lstrip
