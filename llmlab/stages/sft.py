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

The helpers ``causal_logits``, ``token_logps``, ``sequence_logps`` and ``pad_collate`` are shared with the
preference stages (DPO, reward model, PPO).
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from torch import nn

from .. import chat
from ..config import from_dict, to_dict
from ..errors import LLMLabError
from ..hub.folder import ModelDir
from ..hub.load import load_our_model
from ..hub.save import generation_settings, save_model
from ..losses import IGNORE_INDEX, token_logprobs
from ..lora import LoRAConfig, apply_lora, import_peft, merge_lora
from ..model.decoder import Decoder
from ..train import dist
from ..train.loop import to_device, train
from .common import resolve_recipe, start_run, train_config

Example = tuple[list[int], list[int]]      # (token ids, assistant mask), same length
# a packed row is (ids, mask, segments): segments[t] numbers the example token t belongs to (0, 1, … in the row)

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
class ExampleData:
    """The ``data:`` section shared by SFT and DPO: rows of at most ``max_length`` tokens; ``eval_path`` a held-out
    file (else ``val_fraction`` of the training examples is held out); ``padding_free``: each batch's sequences
    packed into segment-masked rows (``pack_batch``; our decoder only) instead of right-padded ones."""
    max_length: int | None = None   # None: the model's context
    padding_free: bool = True
    batch_size: int = 8
    val_fraction: float = 0.05
    eval_path: str | None = None
    path: str | None = None        # the training file (recorded in run.yaml)

    def __post_init__(self):
        self.max_length = None if self.max_length is None else int(self.max_length)
        self.batch_size, self.val_fraction = int(self.batch_size), float(self.val_fraction)
        if (self.max_length is not None and self.max_length < 2) or self.batch_size < 1 \
                or not 0 <= self.val_fraction < 1:
            raise LLMLabError(f"data: need max_length ≥ 2, batch_size ≥ 1, val_fraction in [0, 1); got "
                              f"{self.max_length}, {self.batch_size}, {self.val_fraction}")


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


# --- log-probabilities (shared with DPO / reward / PPO) ---------------------------------------------------------

def causal_logits(model: nn.Module, input_ids: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token logits (B, T, V) from our ``Decoder`` or a ``transformers`` causal LM (also inside DDP or peft).
    No attention mask is passed: batches are right-padded, so causal attention never lets a real token see a pad.
    ``segment_ids`` (packed rows) reach our decoder only; a ``transformers`` model sees plain causal rows."""
    if segment_ids is not None and isinstance(getattr(model, "module", model), Decoder):
        return model(input_ids, segment_ids=segment_ids)
    out = model(input_ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def token_logps(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(y_t | x_≤t) for every target of ``batch["labels"]`` that is not ``IGNORE_INDEX``.

    Returns the flat log-probs (N,) in row-major order and the boolean target mask (B, T). Only the N target
    positions go through log-softmax, so the float32 (B·T·V) log-probabilities are never materialised; for our
    (unwrapped) Decoder only they go through the LM head at all."""
    labels, segments = batch["labels"], batch.get("segment_ids")
    keep = labels != IGNORE_INDEX
    if isinstance(model, Decoder):     # not wrapped (DDP must be called whole): project only the targets
        logits = model.logits(model.hidden_states(batch["input_ids"], segment_ids=segments)[keep])
    else:
        logits = causal_logits(model, batch["input_ids"], segments)[keep]
    return token_logprobs(logits, labels[keep]), keep


def sequence_logps(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(y | x) = Σ_t log p(y_t | x, y_<t) over each sequence's targets, and the number of targets; both (B,).
    A sequence is a row, or in packed batches a segment (``segment_ids`` numbers the B sequences 0 … B − 1)."""
    logps, keep = token_logps(model, batch)
    segments = batch.get("segment_ids")
    owner = segments[keep] if segments is not None else keep.nonzero(as_tuple=True)[0]
    n = int(segments.max()) + 1 if segments is not None else keep.shape[0]
    sums = torch.zeros(n, dtype=logps.dtype, device=logps.device).index_add(0, owner, logps)
    counts = torch.zeros(n, dtype=torch.long, device=logps.device).index_add(0, owner, torch.ones_like(owner))
    return sums, counts


def pad_collate(examples: list, pad_id: int, pack_length: int | None = None) -> dict:
    """Right-pad ``(ids, mask)`` examples, or packed ``(ids, mask, segments)`` rows, into a batch for next-token
    prediction; with ``pack_length`` the examples are first packed into rows of at most that many tokens
    (``pack_batch``: padding-free batches).

    ``input_ids`` = ids[:-1]; ``labels`` = ids[1:] where mask[1:] is 1, else ``IGNORE_INDEX`` (pads too);
    ``attention_mask`` = 1 on real input tokens. All (B, max len − 1) tensors of dtype long. Packed rows add
    ``segment_ids``: the example of each input token, numbered across the whole batch, −1 on padding. (The last
    token of a packed example predicts the next example's first token, which is never a target.)"""
    if pack_length:
        examples = pack_batch(examples, pack_length)
    width = max(len(e[0]) for e in examples) - 1
    input_ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention = torch.zeros((len(examples), width), dtype=torch.long)
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention}
    packed = len(examples[0]) == 3
    if packed:
        batch["segment_ids"] = torch.full((len(examples), width), -1, dtype=torch.long)
    seen = 0
    for row, example in enumerate(examples):
        ids, mask = example[0], example[1]
        n = len(ids) - 1
        ids_t, mask_t = torch.tensor(ids), torch.tensor(mask, dtype=torch.bool)
        input_ids[row, :n] = ids_t[:-1]
        labels[row, :n] = torch.where(mask_t[1:], ids_t[1:], IGNORE_INDEX)
        attention[row, :n] = 1
        if packed:
            segments = example[2]
            batch["segment_ids"][row, :n] = torch.tensor(segments[:-1]) + seen
            seen += segments[-1] + 1
    return batch


def pad_id_of(tokenizer) -> int:
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0


# --- data -------------------------------------------------------------------------------------------------------

def truncate(example: Example, max_length: int) -> Example | None:
    """The first ``max_length`` tokens, or None when no target is left (mask[1:] all zero)."""
    ids, mask = example[0][:max_length], example[1][:max_length]
    return (ids, mask) if any(mask[1:]) else None


def encode_conversations(conversations: list[list[dict]], tokenizer, template: str,
                         max_length: int) -> tuple[list[Example], dict]:
    """Tokenize and truncate; returns the kept examples and counts ``{"truncated", "dropped"}``."""
    examples, counts = [], {"truncated": 0, "dropped": 0}
    for messages in conversations:
        example = chat.encode_chat(tokenizer, messages, template)
        if len(example[0]) > max_length:
            counts["truncated"] += 1
            example = truncate(example, max_length)
        if example is None:
            counts["dropped"] += 1
        else:
            examples.append(example)
    return examples, counts


def pack(examples: list[Example], max_length: int) -> list[tuple[list[int], list[int], list[int]]]:
    """Concatenate examples, in order, into rows of at most ``max_length`` tokens (a new row when the next one
    does not fit): ``(ids, mask, segments)``, every example keeping its own mask, ``segments`` numbering the
    examples of the row 0, 1, …"""
    rows = []
    for e_ids, e_mask in examples:
        if not rows or len(rows[-1][0]) + len(e_ids) > max_length:
            rows.append(([], [], []))
        ids, mask, segments = rows[-1]
        segment = segments[-1] + 1 if segments else 0
        ids += e_ids
        mask += e_mask
        segments += [segment] * len(e_ids)
    return rows


def pack_batch(examples: list, max_length: int) -> list[tuple[list[int], list[int], list[int]]]:
    """One batch's examples ``pack``ed into rows of at most ``max_length`` tokens and twice the longest example:
    a packed row's attention grows with its length, so rows much longer than the examples cost more than they
    save (on the task world's DPO pairs, rows of twice the longest ran 1.4× faster than rows of 256)."""
    return pack(examples, min(max_length, 2 * max(len(e[0]) for e in examples)))


def split_heldout(items: list, fraction: float, seed: int) -> tuple[list, list]:
    """(train, held-out): a seeded shuffle, the last ``fraction`` (at least one item when fraction > 0) held out."""
    if fraction <= 0:
        return items, []
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_held = max(1, int(len(items) * fraction))
    if n_held >= len(items):
        raise LLMLabError(f"data.val_fraction={fraction} leaves no training data ({len(items)} items); lower it "
                          "or give data.eval_path")
    return [items[i] for i in order[:-n_held]], [items[i] for i in order[-n_held:]]


def batches_for(rows: list, batch_size: int, collate, seed: int):
    from ..data.shards import BatchSampler
    return BatchSampler(rows, batch_size, seed=seed, shuffle=True, rank=dist.rank(), world_size=dist.world_size(),
                        drop_last=True, collate=collate)


def heldout_loss(model: nn.Module, rows: list[Example], collate, batch_size: int, max_batches: int) -> float:
    """Token-weighted mean of −log p over the held-out targets (first ``max_batches`` batches)."""
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for start in range(0, min(len(rows), batch_size * max_batches), batch_size):
        logps, _ = token_logps(model, to_device(collate(rows[start:start + batch_size]), device))
        total, count = total - float(logps.sum()), count + logps.numel()
    return total / max(count, 1)


# --- models -----------------------------------------------------------------------------------------------------

def load_trainable(model_dir: ModelDir, lora: LoRAConfig) -> tuple[nn.Module, bool]:
    """(model, is_ours). Our Decoder (LoRA from ``llmlab.lora`` when ``lora.r > 0``); with LoRA, a Hugging Face
    architecture we do not implement is loaded with ``transformers`` and adapted with ``peft``."""
    try:
        model = load_our_model(model_dir)
    except LLMLabError as ours_error:
        if not lora.r:
            raise
        return _peft_model(model_dir.path, lora, ours_error), False
    if lora.r:
        apply_lora(model, lora)
    return model, True


def _peft_model(model_dir: Path, lora: LoRAConfig, ours_error: LLMLabError) -> nn.Module:
    from transformers import AutoModelForCausalLM
    peft = import_peft()
    try:
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    except Exception as e:
        raise LLMLabError(f"{ours_error}; transformers cannot load it either ({type(e).__name__}: {e})") from e
    config = peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout,
                             target_modules=list(lora.targets), task_type="CAUSAL_LM")
    try:
        return peft.get_peft_model(base, config)
    except ValueError as e:
        raise LLMLabError(f"lora.targets {lora.targets}: {e}") from None


def context_of(model: nn.Module) -> int:
    cfg = model.config
    return getattr(cfg, "max_seq_len", None) or getattr(cfg, "max_position_embeddings", None) or 2048


def save_trained(model: nn.Module, out_dir: Path, tokenizer, template: str, is_ours: bool) -> Path:
    """Merge LoRA adapters into the weights and write a plain Hugging Face model directory with the template."""
    if is_ours:
        return save_model(merge_lora(model), out_dir, tokenizer=tokenizer, chat_template=template)
    merged = model.merge_and_unload() if hasattr(model, "merge_and_unload") else model
    out_dir.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    chat.save_template(out_dir, template)
    settings = generation_settings(merged.config, tokenizer, template)
    (out_dir / "generation_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    return out_dir


# --- the stage --------------------------------------------------------------------------------------------------

def sft_loss(model: nn.Module, batch: dict):
    """Mean −log p over the assistant targets; the token count is the real (non-pad) input tokens."""
    logps, _ = token_logps(model, batch)
    return -logps.mean(), int(batch["attention_mask"].sum()), {}


def run_sft(model_dir: str, data_path: str, out_dir: str, recipe: dict, *, resume: bool = False) -> dict:
    """Fine-tune ``model_dir`` on the conversations of ``data_path``; writes ``out_dir/model`` and the run files.
    Returns the loop's summary plus ``exact_match`` when the held-out file has references."""
    from ..data.chat_data import load_conversations, load_heldout_conversations

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
    data.max_length = data.max_length or context_of(model)
    if data.max_length > context_of(model):
        raise LLMLabError(f"data.max_length={data.max_length} exceeds the model's context of {context_of(model)}")

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
    from ..infer.engine import Engine
    from .evaluate import exact_match_rate, load_prompts

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

def add_stage_args(p: argparse.ArgumentParser) -> None:
    """``--model --data --out --config --set --resume --template --eval-data``: the flags of SFT and DPO."""
    from ..cli import add_config_args
    p.add_argument("--model", required=True, metavar="DIR", help="model directory (ours or Hugging Face)")
    p.add_argument("--data", required=True, metavar="PATH", help="training data (.jsonl / .jsonl.gz)")
    p.add_argument("--out", required=True, metavar="DIR", help="run directory; the model goes to DIR/model")
    p.add_argument("--eval-data", default=None, metavar="PATH", help="held-out data (sets data.eval_path)")
    p.add_argument("--template", default=None, help=f"chat template: {', '.join(chat.TEMPLATES)} or a .jinja file")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    add_config_args(p)


def stage_recipe(args, defaults: dict) -> dict:
    """Defaults ← --config ← --set, then the paths and flags given on the command line."""
    recipe = resolve_recipe(defaults, args.config, args.sets)
    if args.eval_data:
        recipe["data"]["eval_path"] = args.eval_data
    if args.template:
        recipe["template"] = args.template
    return recipe


def register(subparsers) -> None:
    p = subparsers.add_parser("sft", help="supervised fine-tuning on chat conversations",
                              description="Fine-tune a model on conversations; loss on assistant tokens only.")
    add_stage_args(p)
    p.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    summary = run_sft(args.model, args.data, args.out, stage_recipe(args, DEFAULTS), resume=args.resume)
    print(f"sft: {summary['steps']} steps, final loss {summary['final_loss']:.4f}; model in {Path(args.out) / 'model'}")
    return 0
