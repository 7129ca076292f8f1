"""The chat page at / in headless Chromium: it shows the model's name, sends a message with the API key, and the
streamed answer that appears equals the server's greedy answer."""
import shutil
import threading
import time

import pytest
import torch
import uvicorn

from llmlab import chat
from llmlab.infer.engine import Engine, SamplingParams
from llmlab.infer.server import create_app
from llmlab.model.config import preset
from llmlab.model.decoder import build_model
from llmlab.tokenizer import train_bpe

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run"]
sync_api = pytest.importorskip("playwright.sync_api",
                               reason="the Python package playwright is not installed (pip install playwright)")
if not shutil.which(CHROMIUM):
    pytest.skip("chromium is not installed (apt-get install -y chromium)", allow_module_level=True)

KEY = "page-key"


@pytest.fixture(scope="module")
def served():
    """A tiny model behind a key-protected server on a free port; yields (url, engine, template)."""
    tokenizer = train_bpe(["the quick brown fox jumps over the lazy dog"] * 20, vocab_size=280)
    torch.manual_seed(0)
    cfg = preset("llama", vocab_size=len(tokenizer), n_layer=2, d_model=32, n_head=4, n_kv_head=2, max_seq_len=128)
    engine = Engine(build_model(cfg).eval(), tokenizer, eos_token_ids=[tokenizer.eos_token_id])
    template = chat.TEMPLATES["llmlab"]
    server = uvicorn.Server(uvicorn.Config(create_app(engine, model_name="page-model", template=template,
                                                      api_key=KEY), host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}", engine, template
    server.should_exit = True
    thread.join(10)


def greedy_answer(engine, template, messages):
    tok = engine.tokenizer
    text = chat.render(messages, template, add_generation_prompt=True, bos_token=tok.bos_token,
                       eos_token=tok.eos_token)
    ids = tok.encode(text, add_special_tokens=False)
    params = SamplingParams(max_new_tokens=engine.context - len(ids), temperature=0,
                            stop=chat.stop_strings(template, tok.eos_token))
    return engine.generate([ids], params)[0].text


def test_page_streams_an_answer(served):
    url, engine, template = served
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.fill("#apikey", KEY)
            page.dispatch_event("#apikey", "change")
            page.wait_for_function("document.getElementById('model').textContent.includes('page-model')")
            page.fill("#system", "be brief")
            page.fill("#temperature", "0")
            page.fill("#input", "hello fox")
            page.evaluate("""() => {                      // count the text updates of the answer as they land
                window.updates = 0;
                new MutationObserver(() => { window.updates += 1; })
                    .observe(document.getElementById('log'), {subtree: true, childList: true, characterData: true});
            }""")
            page.click("#send")
            page.wait_for_function("document.getElementById('send').textContent === 'Send' && "
                                   "document.querySelectorAll('.assistant').length === 1", timeout=30000)
            user = page.inner_text(".msg.user")
            answer = page.eval_on_selector(".msg.assistant", "e => e.textContent")
            errors = page.query_selector_all(".msg.error")
            updates = page.evaluate("window.updates")
        finally:
            browser.close()
    assert user == "hello fox" and not errors
    assert updates > 3                                    # the answer grew piece by piece
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello fox"}]
    assert answer == greedy_answer(engine, template, messages) and answer
