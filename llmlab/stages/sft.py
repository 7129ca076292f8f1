"""``llmlab sft``: supervised fine-tuning on chat conversations, the loss on assistant tokens only.

Each conversation is rendered with the model's chat template and tokenized by ``chat.encode_chat``, which also
gives the assistant mask m (assistant contents and the end-of-turn token after each, so the model learns to stop).
With inputs x_0 … x_{T-2} and targets x_1 … x_{T-1}, the loss is

    L = −(1 / Σ_t m_{t+1}) · Σ_t m_{t+1} · log p(x_{t+1} | x_≤t)

over the micro-batch. How the batch's conversations fill rows:

- ``data.padding_free=true`` (the default, our decoder): each batch's conversations are packed into rows of up to
  twice the longest one (``pack_batch``), so almost no compute goes to padding. A packed row carries
  ``segment_ids``: each conversation attends only to itself and its positions start at 0 (document masking), so
  the batch, its loss and its gradient are those of the same conversations right-padded (TRL's ``padding_free``).
- ``data.padding_free=false``, or a ``transformers`` model (no ``segment_ids`` input): right-padded rows (padding
  is never a target).
- ``data.packing=true``: the whole data set is packed, in order, into rows of up to ``data.max_length`` tokens and
  a batch is ``batch_size`` such rows (more conversations per step). Our decoder masks them by segment as above;
  a ``transformers`` model's packed rows are plain causal (a conversation also sees the ones packed before it, as
  TRL's packing without ``padding_free``).

A conversation longer than ``data.max_length`` is cut at the end; one whose assistant tokens would all be cut is
dropped (counted in the log), so no row has an empty mask and the loss is never 0/0.

"""
from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from torch import nn

from .. import chat
from ..config import from_dict, to_dict
from ..data.batching import Example, pack, pad_collate, pad_id_of, truncate_example
from ..data.chat_data import load_conversations, load_heldout_conversations, load_prompts
from ..errors import LLMLabError
from ..hub.folder import ModelDir
from ..infer.engine import Engine
from ..infer.replies import exact_match_rate
from ..lora import LoRAConfig
from ..train import dist
from ..train.loop import to_device, train
from .common import (ExampleData, add_stage_args, batches_for, context_of, deep_merge,
                     load_trainable, resolve_max_length, save_trained, split_heldout, stage_recipe, start_run,
                     train_config)
from .logprobs import token_logps

DEFAULTS = {
    "template": None,          # built-in name or .jinja path; default: the model folder's template
    "data": {"max_length": None, "packing": False, "padding_free": True, "batch_size": 8, "val_fraction": 0.05,
             "eval_path": None},
    "lora": to_dict(LoRAConfig()),
    "eval": {"max_new_tokens": 64, "max_items": 200, "batch_size": 32},
    "train": {"max_steps": 300, "lr": 1e-4, "warmup_steps": 20, "weight_decay": 0.0, "eval_every": 100,
              "log_every": 10},
}


@dataclass
class SFTData(ExampleData):
    """SFT's ``data:`` section; ``eval_path`` holds OpenAI ``messages`` or ``prompt`` + ``reference`` lines."""
    packing: bool = False


@dataclass
class GenEval:
    """The ``eval:`` section: greedy generation on held-out prompts with references, after training."""
    max_new_tokens: int = 64
    max_items: int = 200
    batch_size: int = 32


# --- data -------------------------------------------------------------------------------------------------------

def encode_conversations(conversations: list[list[dict]], tokenizer, template: str,
                         max_length: int) -> tuple[list[Example], dict]:
    """Tokenize and truncate; returns the kept examples and counts ``{"truncated", "dropped"}``."""
    examples, counts = [], {"truncated": 0, "dropped": 0}
    for messages in conversations:
        example = chat.encode_chat(tokenizer, messages, template)
        if len(example[0]) > max_length:
            counts["truncated"] += 1
            example = truncate_example(example, max_length)
        if example is None:
            counts["dropped"] += 1
        else:
            examples.append(example)
    return examples, counts


def heldout_loss(model: nn.Module, rows: list[Example], collate, batch_size: int, max_batches: int) -> float:
    """Token-weighted mean of −log p over the held-out targets (first ``max_batches`` batches)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, min(len(rows), batch_size * max_batches), batch_size):
        logps, _ = token_logps(model, to_device(collate(rows[start:start + batch_size]), device))
        total, count = total - float(logps.sum()), count + logps.numel()
    return total / max(count, 1)


# --- the stage --------------------------------------------------------------------------------------------------

def sft_loss(model: nn.Module, batch: dict):
    """Mean −log p over the assistant targets; the token count is the real (non-pad) input tokens."""
    logps, _ = token_logps(model, batch)
    return -logps.mean(), int(batch["attention_mask"].sum()), {}


def run(model_dir, data_path, out_dir, recipe: dict | None = None, *, resume: bool = False) -> dict:
    """Fine-tune ``model_dir`` (a folder, hub id or .gguf) on the conversations of ``data_path``; ``recipe`` is laid
    over ``DEFAULTS``. Writes ``out_dir/model`` and the run files; returns the loop's summary plus ``exact_match``
    when the held-out file has references."""
    recipe = deep_merge(DEFAULTS, recipe or {})
    recipe = {**recipe, "model": str(model_dir), "data": {**recipe.get("data", {}), "path": str(data_path)}}
    data = from_dict(SFTData, recipe.get("data"), "data")
    lora = from_dict(LoRAConfig, recipe.get("lora"), "lora")
    gen = from_dict(GenEval, recipe.get("eval"), "eval")
    cfg = train_config(recipe)
    dist.init_distributed(cfg.device)      # before the sampler asks for this process's rank
    out = start_run(out_dir, recipe)
    model_dir = ModelDir(model_dir)
    tokenizer, template = model_dir.tokenizer(), model_dir.template(recipe.get("template"))
    model, is_ours = load_trainable(model_dir, lora)
    data.max_length = resolve_max_length(data.max_length, context_of(model))

    conversations = load_conversations(data_path)
    if data.eval_path:
        train_convs, held_convs = conversations, load_heldout_conversations(data.eval_path)
    else:
        train_convs, held_convs = split_heldout(conversations, data.val_fraction, cfg.seed)
    examples, counts = encode_conversations(train_convs, tokenizer, template, data.max_length)
    held, _ = encode_conversations(held_convs, tokenizer, template, data.max_length)
    pack_length = data.max_length if data.padding_free and is_ours and not data.packing else None
    _report_data(len(train_convs), examples, counts, data.max_length,
                 "packed" if data.packing else "padding-free" if pack_length else "padded")
    if not examples:
        raise LLMLabError(f"{data_path}: every conversation lost all its assistant tokens to data.max_length="
                          f"{data.max_length}; raise it")
    rows = pack(examples, data.max_length) if data.packing else examples
    collate = partial(pad_collate, pad_id=pad_id_of(tokenizer), pack_length=pack_length)

    def eval_fn(m):
        return {"val_loss": heldout_loss(m, held, collate, data.batch_size, cfg.eval_batches)} if held else {}

    def save_fn(m, run_dir):
        save_trained(m, Path(run_dir) / "model", tokenizer, template, is_ours)

    flops = model.flops_per_token(data.max_length) if is_ours else None
    summary = train(model, sft_loss, batches_for(rows, data.batch_size, collate, cfg.seed), cfg, out,
                    eval_fn=eval_fn, save_fn=save_fn, resume=resume, flops_per_token=flops)
    if dist.is_main() and data.eval_path:
        summary.update(_final_exact_match(out, data.eval_path, gen, summary["steps"]))
    return summary


def _report_data(n_conversations: int, examples: list[Example], counts: dict, max_length: int, rows: str) -> None:
    if not dist.is_main():
        return
    targets = sum(sum(mask[1:]) for _, mask in examples)
    print(f"sft: {len(examples)}/{n_conversations} conversations, {targets} assistant target tokens; "
          f"{counts['truncated']} truncated to {max_length} tokens, {counts['dropped']} dropped "
          f"(no assistant token left); {rows} rows", file=sys.stderr)


def _final_exact_match(out: Path, eval_path: str, gen: GenEval, step: int) -> dict:
    """Greedy exact match of the saved model on the held-out items that carry a ``reference``."""
    items = [item for item in load_prompts(eval_path) if "reference" in item][:gen.max_items]
    if not items:
        return {}
    engine = Engine.from_path(str(out / "model"))
    rate = exact_match_rate(engine, items, chat.load_template(out / "model"), gen.max_new_tokens, gen.batch_size)
    with open(out / "metrics.jsonl", "a", encoding="utf-8") as f:
        f.write(json.dumps({"step": step, "exact_match": rate, "exact_match_items": len(items)}) + "\n")
    print(f"sft: held-out exact match {rate:.3f} on {len(items)} items", file=sys.stderr)
    return {"exact_match": rate}


# --- command line -----------------------------------------------------------------------------------------------

def register(subparsers) -> None:
    p = subparsers.add_parser("sft", help="supervised fine-tuning on chat conversations",
                              description="Fine-tune a model on conversations; loss on assistant tokens only.")
    add_stage_args(p)
    p.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    summary = run(args.model, args.data, args.out, stage_recipe(args, DEFAULTS), resume=args.resume)
    print(f"sft: {summary['steps']} steps, final loss {summary['final_loss']:.4f}; model in {Path(args.out) / 'model'}")
    return 0
