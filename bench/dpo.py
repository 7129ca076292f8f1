"""Seconds per optimizer step of ``llmlab dpo`` against TRL's ``DPOTrainer``, same tiny model, pairs and batch, in
the same run, plus each one's set-up time (loading, tokenizing, the reference pass) up to its first step.

Both run float32 on CPU, no gradient checkpointing, no evaluation, no saving during training, logging off.
llmlab computes the reference log-probs once up front; TRL is measured in its fast configuration as it ships
(the reference model runs every step) and, as a second row, with ``precompute_ref_log_probs=True``.

    python bench/dpo.py [--steps 30] [--batch 8] [--threads 1]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from common import machine
from llmlab import chat
from llmlab.data.chat_data import load_pairs
from llmlab.hub.save import save_model
from llmlab.model.config import preset
from llmlab.model.decoder import build_model
from llmlab.stages import dpo as dpo_stage
from llmlab.stages.common import deep_merge
from llmlab.tokenizer import train_bpe
from llmlab.world.build import build_world, preset as world_preset

WARMUP = 3


def make_model(root: Path) -> Path:
    """The task world (test preset) and a tiny Llama with a BPE tokenizer trained on it."""
    world = build_world(world_preset("test", n_pairs_train=200))
    world.write(root / "world")
    tokenizer = train_bpe(world.pretrain_texts + [m["content"] for r in world.sft_train for m in r["messages"]], 512)
    torch.manual_seed(0)
    model = build_model(preset("llama", vocab_size=len(tokenizer), n_layer=4, n_head=4, d_model=128, max_seq_len=256))
    save_model(model, root / "model", tokenizer=tokenizer, chat_template=chat.TEMPLATES["llmlab"])
    return root / "model"


def step_times(marks: list[float], steps: int) -> float:
    return (marks[WARMUP + steps - 1] - marks[WARMUP - 1]) / steps


def run_ours(model_dir: Path, pairs: Path, out: Path, steps: int, batch: int) -> tuple[float, float]:
    """(set-up seconds, seconds per step) of the real stage: ``train`` is wrapped to record each step's end."""
    marks: list[float] = []
    real_train = dpo_stage.train

    def timed_train(*args, **kwargs):
        return real_train(*args, on_step=lambda step, record: marks.append(time.perf_counter()), **kwargs)

    recipe = deep_merge(dpo_stage.DEFAULTS, {
        "data": {"max_length": 256, "batch_size": batch, "val_fraction": 0.0},
        "train": {"max_steps": WARMUP + steps, "lr": 1e-4, "warmup_steps": 0, "progress": False,
                  "checkpoint_every": 0, "eval_every": 0, "log_every": 1000, "device": "cpu"}})
    dpo_stage.train = timed_train
    try:
        start = time.perf_counter()
        dpo_stage.run(str(model_dir), str(pairs), str(out), recipe)
    finally:
        dpo_stage.train = real_train
    per_step = step_times(marks, steps)
    return marks[0] - per_step - start, per_step


def run_trl(model_dir: Path, pairs: Path, out: Path, steps: int, batch: int,
            precompute: bool) -> tuple[float, float]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())

    start = time.perf_counter()
    rows = [{"prompt": p["prompt"], "chosen": [{"role": "assistant", "content": p["chosen"]}],
             "rejected": [{"role": "assistant", "content": p["rejected"]}]} for p in load_pairs(pairs)]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    args = DPOConfig(output_dir=str(out), per_device_train_batch_size=batch, max_steps=WARMUP + steps,
                     learning_rate=1e-4, lr_scheduler_type="constant", beta=0.1, max_length=256,
                     precompute_ref_log_probs=precompute, gradient_checkpointing=False, bf16=False, fp16=False,
                     use_cpu=True, report_to=[], logging_strategy="no", save_strategy="no", eval_strategy="no",
                     disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = DPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(rows), processing_class=tokenizer,
                         callbacks=[Clock()])
    trainer.train()
    per_step = step_times(marks, steps)
    return marks[0] - per_step - start, per_step


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=8, help="pairs per step")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both (1: steadiest on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = make_model(root)
        pairs = root / "world" / "pairs_train.jsonl"
        ours = run_ours(model_dir, pairs, root / "ours", args.steps, args.batch)
        trl = run_trl(model_dir, pairs, root / "trl", args.steps, args.batch, precompute=False)
        trl_cached = run_trl(model_dir, pairs, root / "trl-cached", args.steps, args.batch, precompute=True)
    print(f"machine: {machine()}\n")
    print(f"DPO, tiny Llama (4 layers, d=128), 200 task-world pairs, {args.batch} pairs per step, "
          f"{args.steps} timed steps after {WARMUP} warm-up steps\n")
    print("| | llmlab dpo | trl DPOTrainer | ratio | trl, precompute_ref_log_probs | ratio |")
    print("|---|---|---|---|---|---|")
    print(f"| seconds per step | {ours[1]:.4f} | {trl[1]:.4f} | {trl[1] / ours[1]:.2f}× | {trl_cached[1]:.4f} "
          f"| {trl_cached[1] / ours[1]:.2f}× |")
    print(f"| set-up seconds (load, tokenize, reference pass) | {ours[0]:.2f} | {trl[0]:.2f} | {trl[0] / ours[0]:.2f}× "
          f"| {trl_cached[0]:.2f} | {trl_cached[0] / ours[0]:.2f}× |")


if __name__ == "__main__":
    main()
