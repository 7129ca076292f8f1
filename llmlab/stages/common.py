"""What every training stage shares: its command-line flags and recipe, its run directory, the model it trains
(loaded, with LoRA, and saved), its held-out split, and the one ``max_length`` rule.

A stage's recipe is built in three layers, later ones winning: the stage's own defaults, the recipe file
(``--config NAME|PATH``), and the ``--set key=value`` overrides. The resolved recipe is saved as ``run.yaml``.

``data.max_length`` means the same in every stage: the most tokens of one training row (a packed row in
pre-training, one conversation, answer or pair side elsewhere). Unset, it is the model's context; larger than
the context, it is an error (``resolve_max_length``). What happens to a longer example is the stage's own rule,
tabled in the README.
"""
from __future__ import annotations

import argparse
import copy
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import chat
from ..config import apply_overrides, from_dict, load_recipe, save_yaml
from ..data.shards import BatchSampler
from ..errors import LLMLabError
from ..lora import LoRAConfig, apply_lora, import_peft, merge_lora
from ..hub.folder import ModelDir
from ..hub.load import load_our_model
from ..hub.save import generation_settings, save_model
from ..model.config import context_length
from ..train import dist
from ..train.loop import TrainConfig


# --- command line -----------------------------------------------------------------------------------------------

def add_config_args(p: argparse.ArgumentParser) -> None:
    """The flags every training stage shares: ``--config NAME|PATH`` and repeated ``--set key=value``."""
    p.add_argument("--config", default=None, help="recipe name (llmlab/configs/NAME.yaml) or path")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key with dotted names, e.g. --set train.lr=1e-3 (repeatable)")


def add_stage_args(p: argparse.ArgumentParser) -> None:
    """``--model --data --out --config --set --resume --template --eval-data``: the flags of the post-training
    stages (SFT, reward model, DPO, PPO)."""
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


# --- recipe and run directory -----------------------------------------------------------------------------------


def deep_merge(base: dict, over: dict) -> dict:
    """``base`` updated by ``over``, recursing into nested sections."""
    out = copy.deepcopy(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def resolve_recipe(defaults: dict, config: str | None = None, sets: list[str] | None = None) -> dict:
    return apply_overrides(deep_merge(defaults, load_recipe(config)), sets or [])


def start_run(out_dir: str | Path, recipe: dict) -> Path:
    """Create the run directory and write the resolved recipe to ``run.yaml``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_yaml(recipe, out / "run.yaml")
    return out


def train_config(recipe: dict, compile_ok: bool = False) -> TrainConfig:
    """The recipe's ``train:`` section. ``compile_ok``: the stage's loss is one call of the model's forward, which
    ``train.compile`` can compile (only ``llmlab pretrain``'s is)."""
    cfg = from_dict(TrainConfig, recipe.get("train"), "train")
    if cfg.compile and not compile_ok:
        raise LLMLabError("train.compile=true is supported by `llmlab pretrain` only (its loss is one forward call "
                          "of the model); remove it from this stage's recipe")
    return cfg


def disable_dropout(model: nn.Module) -> nn.Module:
    """Set every dropout of ``model`` to 0 (TRL's ``disable_dropout``, on by default in its DPO and reward trainers):
    ``nn.Dropout`` modules and the attention-dropout rates that attention modules keep as numbers (llmlab's
    ``dropout``, transformers' ``attention_dropout``). Preference losses compare log-probabilities of two answers,
    and DPO compares them with a reference computed without dropout; random masks would only add noise to both.
    The model's config keeps its dropout, so a saved model trains as before in other stages."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
        for name in ("dropout", "attention_dropout"):
            if isinstance(getattr(module, name, None), float):
                setattr(module, name, 0.0)
    return model


# --- data -------------------------------------------------------------------------------------------------------

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
        if (self.max_length is not None and self.max_length < 2) or self.batch_size < 1 \
                or not 0 <= self.val_fraction < 1:
            raise LLMLabError(f"data: need max_length ≥ 2, batch_size ≥ 1, val_fraction in [0, 1); got "
                              f"{self.max_length}, {self.batch_size}, {self.val_fraction}")


def resolve_max_length(max_length: int | None, context: int, where: str = "data.max_length") -> int:
    """The one ``max_length`` rule: unset means the model's ``context``; more than the context is an error."""
    if max_length is None:
        return context
    if max_length > context:
        raise LLMLabError(f"{where}={max_length} exceeds the model's context length of {context} tokens; "
                          f"set {where} to at most {context}")
    return max_length


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


def batches_for(rows: list, batch_size: int, collate, seed: int) -> BatchSampler:
    """A shuffled, resumable sampler of this process's share of each batch (``drop_last``)."""
    return BatchSampler(rows, batch_size, seed=seed, shuffle=True, rank=dist.rank(), world_size=dist.world_size(),
                        drop_last=True, collate=collate)


# --- the model trained ------------------------------------------------------------------------------------------

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
    """The context length of a loaded model (ours, ``transformers``', or either inside peft)."""
    return context_length(model.config)


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
