"""``llmlab rm``: a reward model trained on preference pairs with the Bradley–Terry loss.

The reward model is our decoder with a scalar head on the final hidden state of the last real token of
``prompt + reply + end-of-turn`` (the conversation rendered with the model's chat template):

    r(x, y) = w · h_last(x, y)  [+ λ · (1/|y|) Σ_{t ∈ y} log π(y_t | x, y_<t)],
    L = −mean log σ(r(x, y_chosen) − r(x, y_rejected) − m)

The head ``w`` starts at zero. With λ = ``rm.likelihood_weight`` = 0 (the default, as TRL's RewardTrainer) every
reward starts at 0 and the first loss is exactly log 2. With λ > 0 the reward also reads the mean log-likelihood
the network's own language-model head gives the reply's tokens (and its end-of-turn token), so training starts
from what the language model already knows, where a head-only reward learns only from the pairs it is shown (the
README compares the two on the task world). Chosen and rejected replies go through
the network in one forward pass (2B sequences, right-padded). Held-out pairs give the pairwise accuracy, the share
of pairs where r(chosen) > r(rejected).

The head is the decoder's ``score`` layer with ``num_labels = 1``, so the saved directory is a
``LlamaForSequenceClassification`` / ``GPT2ForSequenceClassification`` / ``Qwen3ForSequenceClassification`` folder
that ``transformers.AutoModelForSequenceClassification`` loads and scores identically when λ = 0 (it reads the last
token that is not the pad token, the same one as ours as long as pad is not the end-of-turn token). λ is stored in
``reward_config.json``; with λ > 0 the folder also keeps the language-model head, and the reward is that score plus
λ times the reply's mean log-probability under ``transformers.AutoModelForCausalLM`` loaded from the same folder.
"""
from __future__ import annotations

import random
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

from ..chat import encode_reply
from ..config import from_dict
from ..data.chat_data import iter_jsonl, load_pairs
from ..data.shards import BatchSampler
from ..errors import LLMLabError
from ..losses import bradley_terry_loss
from ..model.heads import RewardModel, check_likelihood_weight, reply_batch
from ..train import dist
from ..train.loop import train
from .common import (add_stage_args, deep_merge, disable_dropout, resolve_max_length, stage_recipe, start_run,
                     train_config)

DEFAULTS = {
    "data": {"eval_path": None, "val_fraction": 0.1, "max_length": None, "batch_size": 8},  # None: the model's context
    "rm": {"margin": 0.0, "likelihood_weight": 0.0},
    "template": None,     # a built-in chat template name or a .jinja file; None: the model folder's own
    "train": {"max_steps": 300, "lr": 1e-5, "warmup_steps": 10, "weight_decay": 0.0, "log_every": 10,
              "eval_every": 100, "checkpoint_every": 100},
}


@dataclass
class PairData:
    """The ``data:`` section: pairs of at most ``max_length`` tokens a side (longer pairs are dropped), ``batch_size``
    pairs a step; ``eval_path`` a held-out file, else ``val_fraction`` of the pairs is held out."""
    max_length: int | None = None   # None: the model's context
    batch_size: int = 8
    val_fraction: float = 0.1
    eval_path: str | None = None

    def __post_init__(self):
        if self.batch_size < 1 or not 0 <= self.val_fraction < 1:
            raise LLMLabError(f"data: need batch_size ≥ 1 and val_fraction in [0, 1); got {self.batch_size}, "
                              f"{self.val_fraction}")


@dataclass
class RewardConfig:
    """The ``rm:`` section: the loss −log σ(r_chosen − r_rejected − margin) (a pair's own ``margin`` field wins) and
    the weight λ of the reply's mean log-likelihood in the reward."""
    margin: float = 0.0
    likelihood_weight: float = 0.0

    def __post_init__(self):
        check_likelihood_weight(self.likelihood_weight, "rm.likelihood_weight")


# ------------------------------------------------------------------------------------------ encoding and batches

def reward_pair_collate(pad_id: int):
    """Collate for encoded pairs: the chosen sequences, then the rejected ones, in one right-padded batch."""
    def collate(pairs: list[dict]) -> dict:
        batch = reply_batch([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], pad_id)
        return {**batch, "margin": torch.tensor([p["margin"] for p in pairs], dtype=torch.float32)}
    return collate


def encode_reward_pairs(pairs: list[dict], tokenizer, template: str, max_length: int, margin: float,
                 where: str) -> list[dict]:
    """Encode each pair; pairs with a side longer than ``max_length`` tokens are dropped (with a warning).

    A pair's own ``margin`` field (a number) overrides the recipe's ``rm.margin``.
    """
    out = []
    for pair in pairs:
        chosen = encode_reply(tokenizer, template, pair["prompt"], pair["chosen"])
        rejected = encode_reply(tokenizer, template, pair["prompt"], pair["rejected"])
        if max(len(chosen[0]), len(rejected[0])) <= max_length:
            out.append({"chosen": chosen, "rejected": rejected, "margin": float(pair.get("margin", margin))})
    if not out:
        raise LLMLabError(f"{where}: every pair is longer than data.max_length={max_length} tokens")
    if len(out) < len(pairs):
        print(f"llmlab rm: {where}: skipped {len(pairs) - len(out)} of {len(pairs)} pairs longer than "
              f"data.max_length={max_length} tokens", file=sys.stderr)
    return out


def load_pair_records(path) -> list[dict]:
    """``chat_data.load_pairs``, plus a per-pair ``margin`` when every line of the file gives a number there."""
    pairs = load_pairs(path)
    margins = [(where, record.get("margin")) for where, record in iter_jsonl(path)]
    if all(m is None for _, m in margins):
        return pairs
    for where, m in margins:
        if not isinstance(m, (int, float)) or isinstance(m, bool):
            raise LLMLabError(f"{where}: field 'margin' must be a number on every pair (or on none), got {m!r}")
    if len(margins) != len(pairs):
        raise LLMLabError(f"{path}: per-pair margins need every line to be a usable pair")
    return [dict(p, margin=m) for p, (_, m) in zip(pairs, margins)]


# ------------------------------------------------------------------------------------------------ the model

# ------------------------------------------------------------------------------------------------ training

def pair_loss(model, batch: dict) -> tuple[torch.Tensor, int, dict]:
    """Bradley–Terry loss of one batch (chosen rows first, then rejected), with accuracy and reward stats."""
    rewards = model(batch["input_ids"], batch["attention_mask"], batch["reply_mask"])
    chosen, rejected = rewards.chunk(2)
    loss = bradley_terry_loss(chosen, rejected, batch["margin"])
    with torch.no_grad():
        metrics = {"accuracy": (chosen > rejected).float().mean().item(), "reward_chosen": chosen.mean().item(),
                   "reward_rejected": rejected.mean().item(), "reward_margin": (chosen - rejected).mean().item()}
    return loss, int(batch["attention_mask"].sum()), metrics


def pairwise_eval(model: RewardModel, pairs: list[dict], pad_id: int, batch_size: int) -> dict:
    """Loss and pairwise accuracy over every held-out pair."""
    device = next(model.parameters()).device
    collate = reward_pair_collate(pad_id)
    losses, correct = [], 0
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk).items()}
        loss, _, metrics = pair_loss(model, batch)
        losses.append(loss.item() * len(chunk))
        correct += metrics["accuracy"] * len(chunk)
    return {"val_loss": sum(losses) / len(pairs), "val_accuracy": correct / len(pairs)}


def split_pairs(pairs: list[dict], data: PairData, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval): eval from ``data.eval_path``, else a deterministic ``data.val_fraction`` of the pairs."""
    if data.eval_path:
        return pairs, load_pair_records(data.eval_path)
    fraction = data.val_fraction
    n_eval = round(len(pairs) * fraction)
    if fraction and n_eval == 0:
        n_eval = 1
    if n_eval >= len(pairs):
        raise LLMLabError(f"data.val_fraction={fraction} leaves no training pairs ({len(pairs)} pairs); lower it "
                          "or give data.eval_path")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [p for i, p in enumerate(pairs) if i not in held], [pairs[i] for i in sorted(held)]


def run(model_dir, data_path, out_dir, recipe: dict | None = None, *, resume: bool = False) -> dict:
    """Train a reward model from ``model_dir`` (a language-model folder) on the pairs in ``data_path``.

    ``recipe`` (sections ``data``, ``rm``, ``train``, key ``template``) is laid over ``DEFAULTS``. Writes the
    reward model to ``out_dir/model`` beside the run files; returns the training summary, whose
    ``eval["val_accuracy"]`` is the held-out pairwise accuracy.
    """
    recipe = deep_merge(DEFAULTS, recipe or {})
    cfg = train_config(recipe)
    data = from_dict(PairData, recipe["data"], "data")
    rm_cfg = from_dict(RewardConfig, recipe["rm"], "rm")
    rm = RewardModel.from_language_model(model_dir, recipe.get("template"), rm_cfg.likelihood_weight)
    disable_dropout(rm)
    tokenizer, template = rm.tokenizer, rm.chat_template
    max_length = resolve_max_length(data.max_length, rm.backbone.config.max_seq_len)
    train_pairs, eval_pairs = split_pairs(load_pair_records(data_path), data, cfg.seed)
    train_rows = encode_reward_pairs(train_pairs, tokenizer, template, max_length, rm_cfg.margin, str(data_path))
    eval_where = data.eval_path or f"{data_path} (the data.val_fraction held out)"
    eval_rows = (encode_reward_pairs(eval_pairs, tokenizer, template, max_length, rm_cfg.margin, str(eval_where))
                 if eval_pairs else [])
    out = start_run(out_dir, recipe)
    rank, world, _, _ = dist.init_distributed(cfg.device)
    batch_size = data.batch_size
    sampler = BatchSampler(train_rows, batch_size, seed=cfg.seed, rank=rank, world_size=world,
                           collate=reward_pair_collate(tokenizer.pad_token_id))

    def eval_fn(m):
        return pairwise_eval(m, eval_rows, tokenizer.pad_token_id, batch_size) if eval_rows else {}

    def save_fn(m, run_dir):
        m.save(Path(run_dir) / "model")

    return train(rm, pair_loss, sampler, cfg, out, eval_fn=eval_fn, save_fn=save_fn, resume=resume,
                 flops_per_token=rm.backbone.flops_per_token(max_length))


# ------------------------------------------------------------------------------------------------ CLI

def register(subparsers) -> None:
    p = subparsers.add_parser("rm", help="train a reward model on preference pairs (Bradley–Terry)",
                              description="Train a scalar reward head (and the network under it) on chosen/rejected "
                                          "pairs; --data is a .jsonl of prompt/chosen/rejected or HH-RLHF pairs.")
    add_stage_args(p)
    p.set_defaults(func=_command)


def _command(args) -> int:
    summary = run(args.model, args.data, args.out, stage_recipe(args, DEFAULTS), resume=args.resume)
    accuracy = summary["eval"].get("val_accuracy")
    shown = f", held-out pairwise accuracy {accuracy:.3f}" if accuracy is not None else ""
    print(f"rm: {summary['steps']} steps, final loss {summary['final_loss']:.4f}{shown}; "
          f"reward model in {Path(args.out) / 'model'}")
    return 0
