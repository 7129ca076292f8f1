"""A tiny language model, a deterministic batch sampler and a command line around ``llmlab.train.train``.

Imported by the training tests, and run as a subprocess (plain ``python`` or ``torchrun``) for the resume and
distributed tests. The final weights go to ``OUT/final.safetensors``.
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from llmlab.train import TrainConfig, cleanup, init_distributed, train  # noqa: E402
from llmlab.train.checkpoint import save_safetensors  # noqa: E402

VOCAB, DIM, SEQ = 32, 16, 8


class TinyLM(nn.Module):
    """Embedding → dropout → linear head tied to the embedding (plus a bias): enough to exercise weight decay
    groups, tied-weight checkpoints and the RNG state that dropout consumes."""

    def __init__(self, dropout: float = 0.1):
        super().__init__()
        self.embed = nn.Embedding(VOCAB, DIM)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(DIM, VOCAB)
        self.head.weight = self.embed.weight
        nn.init.normal_(self.embed.weight, std=0.3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.embed(ids)))


def lm_loss(model, batch: torch.Tensor):
    """Next-token cross-entropy, mean over the micro-batch's tokens."""
    logits = model(batch[:, :-1])
    targets = batch[:, 1:]
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), targets.reshape(-1))
    accuracy = (logits.argmax(-1) == targets).float().mean()
    return loss, targets.numel(), {"accuracy": accuracy.item()}


class TinySampler:
    """Rows of a fixed pseudo-random table (token t is followed by t+1 mod VOCAB, with 25% noise). Each call
    takes the next ``batch_size`` rows of the global batch; rank r keeps its contiguous 1/world_size share."""

    def __init__(self, batch_size: int, rank: int = 0, world_size: int = 1, rows: int = 512, seed: int = 0):
        if batch_size % world_size:
            raise ValueError("batch_size must divide by world_size")
        g = torch.Generator().manual_seed(seed)
        start = torch.randint(0, VOCAB, (rows, 1), generator=g)
        table = (start + torch.arange(SEQ + 1)) % VOCAB
        noise = torch.rand(table.shape, generator=g) < 0.25
        self.table = torch.where(noise, torch.randint(0, VOCAB, table.shape, generator=g), table)
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.position = 0

    def next_batch(self) -> torch.Tensor:
        rows = (self.position + torch.arange(self.batch_size)) % len(self.table)
        self.position += self.batch_size
        share = self.batch_size // self.world_size
        return self.table[rows[self.rank * share:(self.rank + 1) * share]]

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = state["position"]


def save_final(model: nn.Module, out_dir: Path) -> None:
    save_safetensors(model.state_dict(), Path(out_dir) / "final.safetensors")


def run(out: str, steps: int, batch: int = 8, grad_accum: int = 1, checkpoint_every: int = 0, kill_at: int = 0,
        resume: bool = False, parallel: str = "ddp", dropout: float = 0.1, lr: float = 3e-2) -> dict:
    rank, world, _, _ = init_distributed("cpu")
    torch.manual_seed(0)
    model = TinyLM(dropout)
    sampler = TinySampler(batch, rank, world)
    cfg = TrainConfig(max_steps=steps, lr=lr, warmup_steps=2, grad_accum=grad_accum, log_every=1,
                      checkpoint_every=checkpoint_every, keep_checkpoints=2, parallel=parallel, device="cpu",
                      progress=False, seed=1)

    def on_step(step: int, record: dict) -> None:
        if step == kill_at:                       # die hard, right after this step's checkpoint
            os.kill(os.getpid(), signal.SIGKILL)

    return train(model, lm_loss, sampler, cfg, out, save_fn=save_final, resume=resume, on_step=on_step)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True, help="run directory; with several --parallel modes, OUT/MODE each")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--checkpoint-every", type=int, default=0)
    p.add_argument("--kill-at", type=int, default=0)
    p.add_argument("--resume", action="store_true")
    p.add_argument("--parallel", default="ddp", help="comma-separated modes, run one after the other")
    p.add_argument("--dropout", type=float, default=0.1)
    a = p.parse_args()
    modes = a.parallel.split(",")
    for mode in modes:
        out = a.out if len(modes) == 1 else str(Path(a.out) / mode)
        run(out, a.steps, a.batch, a.grad_accum, a.checkpoint_every, a.kill_at, a.resume, mode, a.dropout)
    cleanup()


if __name__ == "__main__":
    main()
