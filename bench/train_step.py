"""Tokens/s of one training step (forward + backward + AdamW) for llmlab's llama preset against
transformers' LlamaForCausalLM with the identical configuration, in the same run, plus model FLOP utilisation
against a measured float32 matmul ceiling. llmlab's step is the one ``llmlab pretrain`` takes (its ``CausalLM``
objective: the fused, chunked LM-head cross-entropy); transformers' is logits then ``F.cross_entropy``. Both run
eager, then under ``torch.compile`` (llmlab: ``train.compile=true``).

The last column bounds what any implementation built on torch's CPU kernels can reach: the time llmlab's eager
step spends inside its matrix products and attention kernels alone (measured with ``torch.profiler``; the
element-wise work, the optimizer and Python are left out), and transformers' eager step time divided by it.

    python bench/train_step.py [--repeats 10]
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch.profiler import ProfilerActivity, profile
from transformers import LlamaForCausalLM

from common import machine, matmul_ceiling, timed
from llmlab.hub.mapping import config_to_hf
from llmlab.model.config import preset
from llmlab.model.decoder import build_model
from llmlab.stages.pretrain import CausalLM

SIZES = {  # name: (model overrides, block, batch)
    "≈1M": (dict(vocab_size=65, n_layer=4, n_head=4, d_model=128, max_seq_len=64), 64, 12),
    "≈10M": (dict(vocab_size=8192, n_layer=8, n_head=8, d_model=256, max_seq_len=256), 256, 8),
}


def step_fn(model, loss_of, x, y, compile: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.1, fused=True)   # both: one fused kernel
    loss_of = torch.compile(loss_of) if compile else loss_of

    def step():
        loss = loss_of(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


KERNELS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::_scaled_dot_product_flash_attention_for_cpu",
           "aten::_scaled_dot_product_flash_attention_for_cpu_backward")


def kernel_seconds(step, repeats: int = 3) -> float:
    """Seconds per call of ``step`` spent inside matrix-product and attention kernels (their self time)."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(repeats):
            step()
    return sum(e.self_cpu_time_total for e in prof.key_averages() if e.key in KERNELS) / 1e6 / repeats


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    torch.manual_seed(0)
    ceiling = matmul_ceiling()
    print(f"machine: {machine()}\nfloat32 matmul ceiling: {ceiling / 1e9:.1f} GFLOP/s\n")
    print("| size | params | block × batch | llmlab tok/s | transformers tok/s | ratio | llmlab MFU "
          "| llmlab compiled | transformers compiled | llmlab compiled vs transformers eager "
          "| matmul + attention kernels alone | bound |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for name, (over, block, batch) in SIZES.items():
        cfg = preset("llama", **over)
        x = torch.randint(0, cfg.vocab_size, (batch, block))
        y = torch.randint(0, cfg.vocab_size, (batch, block))
        t_ours, t_hf = {}, {}
        for compile in (False, True):
            ours = CausalLM(build_model(cfg)).train()
            hf = LlamaForCausalLM(config_to_hf(cfg)).train()

            def hf_loss(ids, targets):
                logits = hf(input_ids=ids).logits
                return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))
            ours_step = step_fn(ours, ours, x, y, compile)
            t_ours[compile] = timed(ours_step, 3, args.repeats)
            t_hf[compile] = timed(step_fn(hf, hf_loss, x, y, compile), 3, args.repeats)
            if not compile:
                floor = kernel_seconds(ours_step)
        tokens = batch * block
        mfu = ours.lm.flops_per_token(block) * tokens / t_ours[False] / ceiling
        n = sum(p.numel() for p in ours.parameters())
        print(f"| {name} | {n / 1e6:.2f} M | {block} × {batch} | {tokens / t_ours[False]:,.0f} "
              f"| {tokens / t_hf[False]:,.0f} | {t_hf[False] / t_ours[False]:.2f}× | {mfu:.0%} "
              f"| {tokens / t_ours[True]:,.0f} | {tokens / t_hf[True]:,.0f} | {t_hf[False] / t_ours[True]:.2f}× "
              f"| {floor * 1e3:.0f} of {t_ours[False] * 1e3:.0f} ms | {t_hf[False] / floor:.2f}× |")


if __name__ == "__main__":
    main()
