"""``llmlab dpo``: direct preference optimisation on (prompt, chosen, rejected) pairs.

With sequence log-probabilities of the answers under the policy π and the frozen reference π_ref (the starting
model), h = [log π(y_w|x) − log π_ref(y_w|x)] − [log π(y_l|x) − log π_ref(y_l|x)] and the loss is
−log σ(β·h) (``loss_type: sigmoid``, β = 0.1 by default) or (h − 1/(2β))² (``ipo``, with each log-probability
divided by its answer's token count, as TRL does); see ``losses.dpo_loss``.
``rpo_alpha`` = α adds α times the chosen answers' per-token NLL (RPO, as TRL's ``rpo_alpha``).

The reference log-probabilities are computed once, before training, in one pass of the starting model over every
pair (train and held-out), kept in memory and saved to ``DIR/ref_logps.safetensors`` (reloaded on ``--resume``),
so no second model is held or run during training. Dropout is switched off for the whole stage (TRL's
``disable_dropout``), so that at step 0 the policy's log-probabilities equal the cached reference. Each step runs
chosen and rejected answers of the batch in one forward pass: with ``data.padding_free`` (the default, for our decoder) the 2B sequences are packed into rows of up to
``data.max_length`` tokens (and twice the batch's longest sequence), each attending only to itself (``segment_ids``),
so almost no compute goes to padding and the log-probabilities equal those of 2B right-padded rows (what a
``transformers`` model gets). Logged beside the loss: the implicit rewards β·(log π − log π_ref) of the chosen and
rejected answers, their margin, and the accuracy (share of pairs with margin > 0).

The log-probability of an answer covers its tokens and the end-of-turn token after it (the last assistant span
of ``chat.encode_chat``'s mask); a pair whose answer would be cut away entirely by ``data.max_length`` is dropped.
"""
from __future__ import annotations

import contextlib
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .. import chat
from ..config import from_dict, to_dict
from ..data.batching import Example, pad_collate, pad_id_of, truncate_example
from ..data.chat_data import load_pairs
from ..device import autocast_dtype
from ..errors import LLMLabError
from ..hub.folder import ModelDir
from ..losses import dpo_loss
from ..lora import LoRAConfig
from ..train import dist
from ..train.loop import refuse_existing_checkpoints, to_device, train
from .common import (ExampleData, add_stage_args, batches_for, context_of, deep_merge, disable_dropout, load_trainable,
                     resolve_max_length, save_trained, split_heldout, stage_recipe, start_run, train_config)
from .logprobs import sequence_logps

REF_FILE = "ref_logps.safetensors"
DEFAULTS = {
    "template": None,
    "data": {"max_length": None, "batch_size": 8, "val_fraction": 0.05, "eval_path": None, "padding_free": True},
    "dpo": {"beta": 0.1, "loss_type": "sigmoid", "label_smoothing": 0.0, "rpo_alpha": 0.0},
    "lora": to_dict(LoRAConfig()),
    "train": {"max_steps": 200, "lr": 5e-6, "warmup_steps": 10, "weight_decay": 0.0, "eval_every": 50,
              "log_every": 10},
}


@dataclass
class DPOConfig:
    beta: float = 0.1
    loss_type: str = "sigmoid"       # sigmoid (DPO) | ipo
    label_smoothing: float = 0.0     # cDPO's ε
    rpo_alpha: float = 0.0           # weight α of the NLL of the chosen answers (RPO; TRL's rpo_alpha)

    def __post_init__(self):
        if self.loss_type not in ("sigmoid", "ipo") or self.beta <= 0:
            raise LLMLabError(f"dpo: need beta > 0 and loss_type sigmoid or ipo; got {self.beta}, {self.loss_type!r}")
        if self.rpo_alpha < 0:
            raise LLMLabError(f"dpo.rpo_alpha = {self.rpo_alpha}: must be ≥ 0")


# --- data -------------------------------------------------------------------------------------------------------

def encode_answer(tokenizer, template: str, prompt: list[dict], answer: str, max_length: int) -> Example | None:
    """(ids, mask) of prompt + answer with the mask on the answer only, truncated; None if no answer token is left."""
    ids, mask = chat.encode_chat(tokenizer, prompt + [{"role": "assistant", "content": answer}], template)
    return truncate_example((ids, chat.last_turn_mask(mask)), max_length)


def encode_pairs(pairs: list[dict], tokenizer, template: str, max_length: int) -> tuple[list[dict], int]:
    """Rows ``{"index", "chosen": Example, "rejected": Example}`` and the number of pairs dropped by truncation."""
    rows, dropped = [], 0
    for pair in pairs:
        chosen = encode_answer(tokenizer, template, pair["prompt"], pair["chosen"], max_length)
        rejected = encode_answer(tokenizer, template, pair["prompt"], pair["rejected"], max_length)
        if chosen is None or rejected is None:
            dropped += 1
            continue
        rows.append({"index": len(rows), "chosen": chosen, "rejected": rejected})
    return rows, dropped


def pair_collate(rows: list[dict], pad_id: int, ref: dict[str, torch.Tensor] | None = None,
                 pack_length: int | None = None) -> dict:
    """The B chosen answers then the B rejected ones as one padded batch of 2B rows (``pad_collate``), or packed
    (``pack_batch``; sequence i is segment i) into rows of up to ``pack_length`` tokens, plus the cached reference
    log-probs ``ref_chosen`` / ``ref_rejected`` (B,) of these pairs when ``ref`` is given."""
    batch = pad_collate([r["chosen"] for r in rows] + [r["rejected"] for r in rows], pad_id, pack_length)
    if ref is not None:
        index = torch.tensor([r["index"] for r in rows])
        batch["ref_chosen"], batch["ref_rejected"] = ref["chosen"][index], ref["rejected"][index]
    return batch


# --- reference log-probabilities --------------------------------------------------------------------------------

@torch.no_grad()
def reference_logps(model: nn.Module, rows: list[dict], pad_id: int, batch_size: int = 16,
                    pack_length: int | None = None) -> dict[str, torch.Tensor]:
    """``{"chosen", "rejected"}``: log π_ref of every pair's answers (float32, CPU), in one pass of ``model``, under
    the autocast the training loop uses on this device (so that at step 0 the policy equals the reference)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    dtype = autocast_dtype(device)
    amp = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    chosen, rejected = [], []
    with amp:
        for start in range(0, len(rows), batch_size):
            part = rows[start:start + batch_size]
            logps, _ = sequence_logps(model, to_device(pair_collate(part, pad_id, pack_length=pack_length), device))
            chosen.append(logps[:len(part)].float().cpu())
            rejected.append(logps[len(part):].float().cpu())
    model.train(was_training)
    return {"chosen": torch.cat(chosen), "rejected": torch.cat(rejected)}


def cached_reference(model: nn.Module, sets: dict[str, list[dict]], pad_id: int, path: Path,
                     reuse: bool, pack_length: int | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """Reference log-probs of each non-empty named row set (``train``, ``eval``), loaded from ``path`` when
    ``reuse`` and the sizes match, else computed with ``reference_logps`` and saved there (keys ``{set}.chosen``,
    ``{set}.rejected``)."""
    sets = {name: rows for name, rows in sets.items() if rows}
    if reuse and path.is_file():
        flat = load_file(str(path))
        if all(f"{name}.chosen" in flat and len(flat[f"{name}.chosen"]) == len(rows) for name, rows in sets.items()):
            return {name: {k: flat[f"{name}.{k}"] for k in ("chosen", "rejected")} for name in sets}
    cache = {name: reference_logps(model, rows, pad_id, pack_length=pack_length) for name, rows in sets.items()}
    if dist.is_main():
        save_file({f"{name}.{k}": v.contiguous() for name, d in cache.items() for k, v in d.items()}, str(path))
    return cache


# --- the stage --------------------------------------------------------------------------------------------------

def make_loss(cfg: DPOConfig):
    """``loss_fn(model, batch)`` for the loop: one forward over chosen + rejected, ``dpo_loss`` against the cache.

    With ``rpo_alpha`` = α > 0 (RPO, Pang et al. 2024) the loss adds α times the per-token negative log-likelihood
    of the chosen answers, −Σ log π(y_w|x) / Σ|y_w|, which keeps DPO from lowering the likelihood of the chosen
    answers along with the rejected ones (a refusal that is chosen for one prompt and rejected for another)."""
    def loss_fn(model: nn.Module, batch: dict):
        logps, counts = sequence_logps(model, batch)
        b = batch["ref_chosen"].shape[0]
        policy, ref = logps, torch.cat([batch["ref_chosen"], batch["ref_rejected"]])
        if cfg.loss_type == "ipo":      # IPO compares per-token means (TRL, as in the IPO paper's code)
            policy, ref = policy / counts, ref / counts
        loss, r_chosen, r_rejected = dpo_loss(policy[:b], policy[b:], ref[:b], ref[b:], beta=cfg.beta,
                                              loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing)
        margin = r_chosen - r_rejected
        metrics = {"reward_chosen": r_chosen.mean(), "reward_rejected": r_rejected.mean(),
                   "reward_margin": margin.mean(), "reward_accuracy": (margin > 0).float().mean()}
        if cfg.rpo_alpha > 0:
            nll = -logps[:b].sum() / counts[:b].sum()
            loss = loss + cfg.rpo_alpha * nll
            metrics["nll_chosen"] = nll.detach()
        return loss, int(batch["attention_mask"].sum()), metrics
    return loss_fn


def heldout_metrics(model: nn.Module, rows: list[dict], collate, loss_fn, batch_size: int,
                    max_batches: int) -> dict:
    """Mean DPO loss, reward margin and accuracy over the held-out pairs (first ``max_batches`` batches)."""
    device = next(model.parameters()).device
    sums, n = {"val_loss": 0.0, "val_reward_margin": 0.0, "val_reward_accuracy": 0.0}, 0
    for start in range(0, min(len(rows), batch_size * max_batches), batch_size):
        part = rows[start:start + batch_size]
        loss, _, m = loss_fn(model, to_device(collate(part), device))
        for key, value in (("val_loss", loss), ("val_reward_margin", m["reward_margin"]),
                           ("val_reward_accuracy", m["reward_accuracy"])):
            sums[key] += float(value) * len(part)
        n += len(part)
    return {k: v / n for k, v in sums.items()}


def run(model_dir, data_path, out_dir, recipe: dict | None = None, *, resume: bool = False) -> dict:
    """Train ``model_dir`` (a folder, hub id or .gguf) with DPO on the pairs of ``data_path``; ``recipe`` is laid over
    ``DEFAULTS``. Writes ``out_dir/model``, the reference cache and the run files; returns the loop's summary."""
    recipe = deep_merge(DEFAULTS, recipe or {})
    recipe = {**recipe, "model": str(model_dir), "data": {**recipe.get("data", {}), "path": str(data_path)}}
    data = from_dict(ExampleData, recipe.get("data"), "data")
    dpo = from_dict(DPOConfig, recipe.get("dpo"), "dpo")
    lora = from_dict(LoRAConfig, recipe.get("lora"), "lora")
    cfg = train_config(recipe)
    device = dist.init_distributed(cfg.device)[3]
    model_dir = ModelDir(model_dir)
    tokenizer, template = model_dir.tokenizer(), model_dir.template(recipe.get("template"))
    pairs = load_pairs(data_path)
    held_pairs = load_pairs(data.eval_path) if data.eval_path else []
    refuse_existing_checkpoints(out_dir, resume)         # before the reference pass overwrites the run's cache
    out = start_run(out_dir, recipe)
    model, is_ours = load_trainable(model_dir, lora)
    disable_dropout(model)
    model.to(device)
    data.max_length = resolve_max_length(data.max_length, context_of(model))
    if not data.eval_path:
        pairs, held_pairs = split_heldout(pairs, data.val_fraction, cfg.seed)
    rows, dropped = encode_pairs(pairs, tokenizer, template, data.max_length)
    held, _ = encode_pairs(held_pairs, tokenizer, template, data.max_length)
    if dist.is_main():
        print(f"dpo: {len(rows)} training pairs ({dropped} dropped: an answer cut away by data.max_length="
              f"{data.max_length}), {len(held)} held-out pairs", file=sys.stderr)
    if not rows:
        raise LLMLabError(f"{data_path}: no pair left after truncation to data.max_length={data.max_length}")

    pad_id = pad_id_of(tokenizer)
    pack_length = data.max_length if data.padding_free and is_ours else None     # transformers: padded rows
    ref = cached_reference(model, {"train": rows, "eval": held}, pad_id, out / REF_FILE, reuse=resume,
                           pack_length=pack_length)
    loss_fn = make_loss(dpo)

    def collate(part):
        return pair_collate(part, pad_id, ref["train"], pack_length)

    def eval_collate(part):
        return pair_collate(part, pad_id, ref.get("eval"), pack_length)

    def eval_fn(m):
        return heldout_metrics(m, held, eval_collate, loss_fn, data.batch_size, cfg.eval_batches) if held else {}

    def save_fn(m, run_dir):
        save_trained(m, Path(run_dir) / "model", tokenizer, template, is_ours)

    return train(model, loss_fn, batches_for(rows, data.batch_size, collate, cfg.seed), cfg, out,
                 eval_fn=eval_fn, save_fn=save_fn, resume=resume)


def register(subparsers) -> None:
    p = subparsers.add_parser("dpo", help="direct preference optimisation on chosen/rejected pairs",
                              description="DPO (or IPO) against the starting model as the frozen reference.")
    add_stage_args(p)
    p.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    summary = run(args.model, args.data, args.out, stage_recipe(args, DEFAULTS), resume=args.resume)
    print(f"dpo: {summary['steps']} steps, final loss {summary['final_loss']:.4f}; model in {Path(args.out) / 'model'}")
    return 0
