"""Serving throughput of ``llmlab serve`` (continuous batching): aggregate generated tokens/s and request latency for
1, 8 and 32 concurrent streaming clients against the same server, on a ~25M-parameter llama-style random model.
Every request generates exactly ``--max-tokens`` tokens (no end-of-sequence token), so the rows compare equal work.
Prints a markdown table; the target is ≥ 3× the one-client throughput at 8 clients.

    python bench/serve.py [--clients 1 8 32] [--requests-per-client 2] [--max-tokens 64] [--device cpu]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import math
import sys
import threading
import time
from pathlib import Path

import httpx
import torch
import uvicorn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine  # noqa: E402

from llmlab.infer.engine import Engine  # noqa: E402
from llmlab.infer.server import create_app  # noqa: E402
from llmlab.model.config import preset  # noqa: E402
from llmlab.model.decoder import build_model  # noqa: E402
from llmlab.tokenizer import train_bpe  # noqa: E402

TEXT = ["the quick brown fox jumps over the lazy dog", "a journey of a thousand miles begins with one step",
        "to be or not to be, that is the question", "all that glitters is not gold"] * 50


def build_engine(device: str) -> Engine:
    """Random llama-style model, d_model 512, 8 layers, SwiGLU, GQA: about 25M parameters."""
    tokenizer = train_bpe(TEXT, vocab_size=1024)
    torch.manual_seed(0)
    cfg = preset("llama", vocab_size=len(tokenizer), d_model=512, n_layer=8, n_head=8, n_kv_head=4, max_seq_len=512)
    return Engine(build_model(cfg, device=device).eval(), tokenizer, eos_token_ids=[])


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile: the smallest value with at least q% of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


async def one_request(http: httpx.AsyncClient, url: str, prompt: str, max_tokens: int) -> tuple[float, float, int]:
    """(latency, time to first token, generated tokens) of one streamed completion."""
    body = {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    first, tokens = None, 0
    async with http.stream("POST", url + "/v1/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk["choices"] and chunk["choices"][0]["text"] and first is None:
                first = time.perf_counter() - start
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    return time.perf_counter() - start, first or 0.0, tokens


async def run_clients(url: str, clients: int, per_client: int, max_tokens: int) -> dict:
    async def client(c: int, http: httpx.AsyncClient) -> list[tuple[float, float, int]]:
        return [await one_request(http, url, f"client {c} request {i}: {TEXT[(c + i) % 4]}", max_tokens)
                for i in range(per_client)]

    limits = httpx.Limits(max_connections=clients + 4)
    async with httpx.AsyncClient(timeout=600, limits=limits) as http:
        start = time.perf_counter()
        results = [r for rs in await asyncio.gather(*(client(c, http) for c in range(clients))) for r in rs]
        wall = time.perf_counter() - start
    latencies = [r[0] for r in results]
    tokens = sum(r[2] for r in results)
    return {"clients": clients, "requests": len(results), "tokens": tokens, "wall": wall,
            "tokens_per_s": tokens / wall, "p50": percentile(latencies, 50), "p95": percentile(latencies, 95),
            "ttft_p50": percentile([r[1] for r in results], 50)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--requests-per-client", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()

    engine = build_engine(args.device)
    n_params = sum(p.numel() for p in engine.model.parameters())
    app = create_app(engine, model_name="bench", max_batch=max(args.clients))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
    try:
        asyncio.run(run_clients(url, 1, 1, 8))                       # warm-up
        rows = [asyncio.run(run_clients(url, c, args.requests_per_client, args.max_tokens)) for c in args.clients]
    finally:
        server.should_exit = True
        thread.join(30)

    device = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"machine: {machine()}; device: {device}")
    print(f"model: llama-style, {n_params / 1e6:.1f}M parameters, random weights; {args.max_tokens} tokens per "
          f"request, {args.requests_per_client} requests per client, greedy, streamed\n")
    base = rows[0]["tokens_per_s"]
    print("| clients | requests | tokens | wall (s) | tokens/s | × 1 client | p50 latency (s) | p95 latency (s) "
          "| p50 first token (s) |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['clients']} | {r['requests']} | {r['tokens']} | {r['wall']:.2f} | {r['tokens_per_s']:.1f} | "
              f"{r['tokens_per_s'] / base:.2f} | {r['p50']:.2f} | {r['p95']:.2f} | {r['ttft_p50']:.3f} |")


if __name__ == "__main__":
    main()
