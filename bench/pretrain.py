"""Training throughput of ``llmlab pretrain``'s step (our Llama-style model, its CausalLM objective and the shared
training loop: AdamW, clipping, logging) against a plain PyTorch loop over transformers' ``LlamaForCausalLM`` of the
same configuration, in the same run and on the same batches; each eager, then each under ``torch.compile``
(llmlab: ``train.compile=true``; the plain loop: ``torch.compile(model)``).

The last column is a ceiling: transformers' eager step time divided by llmlab's compiled forward and backward
alone (no optimizer, no clipping, no loop). It is the most any change to the optimizer, the clipping or the loop
could give; beyond it only the model's own kernels count.

    python bench/pretrain.py [--steps 30] [--warmup 5] [--rounds 3]

tokens/s = batch · block / the median step time over ``--steps`` steps after ``--warmup`` untimed ones (the median:
a few steps slowed by other work on a shared machine do not move it). The load average is printed because this
machine may be shared: compare the ratio, not the absolute numbers, across runs.
"""
from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.nn.functional as F
from transformers import LlamaForCausalLM

from common import machine, median_gap, timed
from llmlab.data.shards import BatchSampler
from llmlab.hub.mapping import config_to_hf
from llmlab.model.config import preset
from llmlab.model.decoder import build_model, num_params
from llmlab.stages.pretrain import CausalLM, loss_fn
from llmlab.train.loop import TrainConfig, train

SIZES = {  # name: (model overrides, block, batch)
    "shakespeare-char (≈0.8M)": (dict(vocab_size=71, n_layer=4, n_head=4, d_model=128, max_seq_len=64), 64, 12),
    "≈10M, BPE 8k": (dict(vocab_size=8192, n_layer=8, n_head=8, d_model=256, max_seq_len=256), 256, 8),
}


def random_rows(vocab: int, block: int, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(0, vocab, (n, block + 1), generator=g)
    return [(r[:-1].clone(), r[1:].clone()) for r in rows]


def ours_tokens_per_s(cfg, rows, batch: int, block: int, steps: int, warmup: int, compile: bool) -> float:
    """Our model + objective through ``llmlab.train.loop.train``, timed from the end of step ``warmup``."""
    marks = []
    tc = TrainConfig(max_steps=warmup + steps, lr=1e-3, warmup_steps=0, eval_every=0, log_every=10 ** 6,
                     checkpoint_every=0, progress=False, device="cpu", compile=compile)

    def on_step(step, record):
        if step >= warmup:
            marks.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as out:
        train(CausalLM(build_model(cfg)), loss_fn, BatchSampler(rows, batch, seed=0), tc, out, on_step=on_step)
    return batch * block / median_gap(marks)


def hf_tokens_per_s(cfg, rows, batch: int, block: int, steps: int, warmup: int, compile: bool) -> float:
    """The plain loop: forward, cross-entropy, backward, clip, AdamW step, on the same batches."""
    model = LlamaForCausalLM(config_to_hf(cfg)).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), weight_decay=0.1,
                                  fused=True)      # as llmlab's loop and transformers' Trainer
    sampler = BatchSampler(rows, batch, seed=0)

    def loss_of(x, y):
        logits = model(input_ids=x).logits
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1))
    loss_of = torch.compile(loss_of) if compile else loss_of

    def step():
        loss = loss_of(*sampler.next_batch())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return batch * block / timed(step, warmup, steps)


def ours_forward_backward_tokens_per_s(cfg, rows, batch: int, block: int, steps: int, warmup: int) -> float:
    """llmlab's compiled forward and backward alone, gradients dropped after each: the ceiling of the whole step."""
    objective = torch.compile(CausalLM(build_model(cfg)))
    sampler = BatchSampler(rows, batch, seed=0)

    def step():
        loss, _, _ = loss_fn(objective, sampler.next_batch())
        loss.backward()
        objective.zero_grad(set_to_none=True)

    return batch * block / timed(step, warmup, steps)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    torch.manual_seed(0)
    print(f"machine: {machine()}\nload average at start (1, 5, 15 min): {os.getloadavg()}\n")
    print(f"Each round measures the five loops one after the other; the table gives the median over {args.rounds} "
          "rounds of each figure and of each round's ratios (this machine's speed drifts by up to 25% over minutes, "
          "so a ratio is only taken between neighbouring measurements).\n")
    print("| size | params | block × batch | llmlab pretrain tok/s | transformers loop tok/s | ratio "
          "| llmlab, compiled | transformers, compiled | compiled vs eager transformers | compiled vs compiled "
          "| ceiling: compiled forward + backward alone vs eager transformers |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, (over, block, batch) in SIZES.items():
        cfg = preset("llama", **over)
        rows = random_rows(cfg.vocab_size, block, 64 * batch)
        rounds = []
        for _ in range(args.rounds):
            measure = dict(cfg=cfg, rows=rows, batch=batch, block=block, steps=args.steps, warmup=args.warmup)
            rounds.append({"ours": ours_tokens_per_s(**measure, compile=False),
                           "hf": hf_tokens_per_s(**measure, compile=False),
                           "ours_c": ours_tokens_per_s(**measure, compile=True),
                           "hf_c": hf_tokens_per_s(**measure, compile=True),
                           "ours_fb": ours_forward_backward_tokens_per_s(**measure)})

        def med(f):
            return statistics.median(f(r) for r in rounds)
        print(f"| {name} | {num_params(cfg) / 1e6:.2f} M | {block} × {batch} | {med(lambda r: r['ours']):,.0f} "
              f"| {med(lambda r: r['hf']):,.0f} | {med(lambda r: r['ours'] / r['hf']):.2f}× "
              f"| {med(lambda r: r['ours_c']):,.0f} | {med(lambda r: r['hf_c']):,.0f} "
              f"| {med(lambda r: r['ours_c'] / r['hf']):.2f}× | {med(lambda r: r['ours_c'] / r['hf_c']):.2f}× "
              f"| {med(lambda r: r['ours_fb'] / r['hf']):.2f}× |")
    print(f"\nload average at end: {os.getloadavg()}")


if __name__ == "__main__":
    main()
