"""Tokens/s of one training step (forward + backward + AdamW) for llmlab's llama preset against
transformers' LlamaForCausalLM with the identical configuration, in the same run, plus model FLOP utilisation
against a measured float32 matmul ceiling.

    python bench/train_step.py [--repeats 10]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from common import machine, matmul_ceiling, timed
from llmlab.model.config import preset
from llmlab.model.decoder import build_model
from llmlab.model.hub import config_to_hf

SIZES = {  # name: (model overrides, block, batch)
    "≈1M": (dict(vocab_size=65, n_layer=4, n_head=4, d_model=128, max_seq_len=64), 64, 12),
    "≈10M": (dict(vocab_size=8192, n_layer=8, n_head=8, d_model=256, max_seq_len=256), 256, 8),
}


def step_fn(model, forward, x, y):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1)

    def step():
        logits = forward(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    torch.manual_seed(0)
    ceiling = matmul_ceiling()
    print(f"machine: {machine()}\nfloat32 matmul ceiling: {ceiling / 1e9:.1f} GFLOP/s\n")
    print("| size | params | block × batch | llmlab tok/s | transformers tok/s | ratio | llmlab MFU |")
    print("|---|---|---|---|---|---|---|")
    for name, (over, block, batch) in SIZES.items():
        cfg = preset("llama", **over)
        ours = build_model(cfg).train()
        hf = LlamaForCausalLM(config_to_hf(cfg)).train()
        x = torch.randint(0, cfg.vocab_size, (batch, block))
        y = torch.randint(0, cfg.vocab_size, (batch, block))
        t_ours = timed(step_fn(ours, ours, x, y), 3, args.repeats)
        t_hf = timed(step_fn(hf, lambda ids: hf(input_ids=ids).logits, x, y), 3, args.repeats)
        tokens = batch * block
        mfu = ours.flops_per_token(block) * tokens / t_ours / ceiling
        n = sum(p.numel() for p in ours.parameters())
        print(f"| {name} | {n / 1e6:.2f} M | {block} × {batch} | {tokens / t_ours:,.0f} | {tokens / t_hf:,.0f} "
              f"| {t_hf / t_ours:.2f}× | {mfu:.0%} |")


if __name__ == "__main__":
    main()
