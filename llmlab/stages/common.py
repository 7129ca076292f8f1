"""Plumbing every training stage shares: resolving its recipe, opening its run directory, switching dropout off.

A stage's recipe is built in three layers, later ones winning: the stage's own defaults, the recipe file
(``--config NAME|PATH``), and the ``--set key=value`` overrides. The resolved recipe is saved as ``run.yaml``.
"""
from __future__ import annotations

import copy
from pathlib import Path

from torch import nn

from ..config import apply_overrides, from_dict, load_recipe, save_yaml
from ..errors import LLMLabError
from ..train.loop import TrainConfig


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
