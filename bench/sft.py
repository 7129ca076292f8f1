"""Training tokens/s of ``llmlab sft`` against TRL's ``SFTTrainer``, same tiny model, conversations and batch, in the
same run: float32 on CPU, loss on the answers only (TRL: prompt/completion data, ``completion_only_loss``), no
evaluation, no saving during training, logging off. Tokens/s counts the real (non-pad) tokens of the average
batch: batch × mean conversation length / seconds per step. Each trainer runs as shipped (llmlab: padding-free
batches, each conversation attending only to itself; TRL: right-padded batches), then both padded, then both
padding-free (TRL's ``padding_free=True``: one flattened row with position ids, which ``transformers`` turns into
a block-diagonal attention mask).

    python bench/sft.py [--steps 30] [--batch 16] [--threads 1]
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from common import machine
from dpo import WARMUP, make_model, step_times
from llmlab import chat
from llmlab.data.chat_data import load_conversations
from llmlab.hub.folder import ModelDir
from llmlab.stages import sft as sft_stage
from llmlab.stages.common import deep_merge


def run_ours(model_dir: Path, data: Path, out: Path, steps: int, batch: int, padding_free: bool) -> float:
    """Seconds per step of the real stage (``train`` wrapped to record each step's end)."""
    marks: list[float] = []
    real_train = sft_stage.train

    def timed_train(*args, **kwargs):
        return real_train(*args, on_step=lambda step, record: marks.append(time.perf_counter()), **kwargs)

    recipe = deep_merge(sft_stage.DEFAULTS, {
        "data": {"max_length": 256, "batch_size": batch, "val_fraction": 0.0,
                 "padding_free": padding_free},
        "train": {"max_steps": WARMUP + steps, "lr": 1e-4, "warmup_steps": 0, "progress": False,
                  "checkpoint_every": 0, "eval_every": 0, "log_every": 1000, "device": "cpu"}})
    sft_stage.train = timed_train
    try:
        sft_stage.run(str(model_dir), str(data), str(out), recipe)
    finally:
        sft_stage.train = real_train
    return step_times(marks, steps)


def run_trl(model_dir: Path, data: Path, out: Path, steps: int, batch: int, padding_free: bool) -> float:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    marks: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            marks.append(time.perf_counter())

    rows = [{"prompt": c[:-1], "completion": c[-1:]} for c in load_conversations(data)]
    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=batch, max_steps=WARMUP + steps,
                     learning_rate=1e-4, lr_scheduler_type="constant", packing=False, padding_free=padding_free,
                     max_length=None if padding_free else 256,     # TRL: padding-free does not truncate
                     completion_only_loss=True, gradient_checkpointing=False, bf16=False, fp16=False, use_cpu=True,
                     report_to=[], logging_strategy="no", save_strategy="no", eval_strategy="no",
                     disable_tqdm=True, dataloader_num_workers=0, seed=0)
    trainer = SFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), args=args,
                         train_dataset=Dataset.from_list(rows),
                         processing_class=AutoTokenizer.from_pretrained(model_dir), callbacks=[Clock()])
    trainer.train()
    return step_times(marks, steps)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads for both (1: steadiest on a shared machine)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        model_dir = make_model(root)
        data = root / "world" / "sft_train.jsonl"
        tok, template = ModelDir(model_dir).tokenizer(), chat.load_template(model_dir)
        lengths = [len(chat.encode_chat(tok, c, template)[0]) for c in load_conversations(data)]
        tokens = args.batch * sum(lengths) / len(lengths)
        times = {(who, free): run(model_dir, data, root / f"{who}-{free}", args.steps, args.batch, free)
                 for who, run in (("llmlab", run_ours), ("trl", run_trl)) for free in (True, False)}
    print(f"machine: {machine()}\n")
    print(f"SFT, tiny Llama (4 layers, d=128), {len(lengths)} task-world conversations (mean "
          f"{sum(lengths) / len(lengths):.0f} tokens), batch {args.batch}, {args.steps} timed steps after {WARMUP} "
          f"warm-up steps\n")
    print("| batches (llmlab, TRL) | llmlab s/step | TRL s/step | llmlab tokens/s | TRL tokens/s | ratio |")
    print("|---|---|---|---|---|---|")
    for label, ours, trl in (("as shipped (padding-free, padded)", True, False), ("both padded", False, False),
                             ("both padding-free", True, True)):
        t_ours, t_trl = times["llmlab", ours], times["trl", trl]
        print(f"| {label} | {t_ours:.4f} | {t_trl:.4f} | {tokens / t_ours:,.0f} | {tokens / t_trl:,.0f} "
              f"| {t_trl / t_ours:.2f}× |")


if __name__ == "__main__":
    main()
