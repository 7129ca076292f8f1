"""Low-rank adaptation (LoRA) of our own ``nn.Linear`` layers, and merging the adapters back into the weights.

A wrapped layer computes

    y = W x + b + (α / r) · B A x,        A ∈ R^{r×in} (small random), B ∈ R^{out×r} (zeros)

with the base ``W`` and ``b`` frozen, so at the start the model is exactly the base model and only ``A`` and ``B``
learn. ``merge_lora`` folds each adapter into its base weight, W ← W + (α / r) · B A, and puts the plain
``nn.Linear`` back, so a saved model needs no LoRA code to load. (Hugging Face models are adapted with ``peft``
in the stages, imported through ``import_peft``: it is the ``lora`` extra; this module covers our ``Decoder``.)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from .errors import LLMLabError

DEFAULT_TARGETS = ("qkv", "o_proj", "up", "down")
PEFT_INSTALL = "pip install 'llmlab[lora]'"


def import_peft():
    """The ``peft`` package, which LoRA on a ``transformers`` architecture needs; missing, an error that names the
    extra to install (our own models need no ``peft``)."""
    try:
        import peft
    except ImportError as e:
        raise LLMLabError(f"LoRA on a transformers model needs the peft package, which is not installed ({e}); "
                          f"install the lora extra: {PEFT_INSTALL}") from None
    return peft


@dataclass
class LoRAConfig:
    """The ``lora:`` section of a recipe; ``r = 0`` turns LoRA off (full fine-tuning)."""
    r: int = 0
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list = field(default_factory=lambda: list(DEFAULT_TARGETS))  # last name part of each nn.Linear

    def __post_init__(self):
        if isinstance(self.targets, str):
            self.targets = [t.strip() for t in self.targets.split(",") if t.strip()]
        if self.r < 0 or (self.r and self.alpha <= 0) or not 0 <= self.dropout < 1:
            raise LLMLabError(f"lora: need r ≥ 0, alpha > 0 and dropout in [0, 1); got r={self.r}, "
                              f"alpha={self.alpha}, dropout={self.dropout}")
        if self.r and not self.targets:
            raise LLMLabError("lora.targets is empty: name the linear layers to adapt, e.g. [qkv, o_proj, up, down]")


class LoRALinear(nn.Module):
    """``base(x) + (α/r) · B(A(dropout(x)))`` with ``base`` frozen; A ~ Kaiming-uniform, B = 0."""

    def __init__(self, base: nn.Linear, r: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base
        self.scale = alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=base.weight.device, dtype=base.weight.dtype))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=base.weight.device, dtype=base.weight.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout)
        for p in base.parameters():
            p.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scale * ((self.dropout(x) @ self.lora_A.T) @ self.lora_B.T)

    def merged(self) -> nn.Linear:
        """The base layer with W ← W + (α/r)·B A (a new module; this one is left unchanged)."""
        out = nn.Linear(self.base.in_features, self.base.out_features, bias=self.base.bias is not None,
                        device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.scale * (self.lora_B @ self.lora_A))
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out


def _set_child(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def apply_lora(model: nn.Module, cfg: LoRAConfig) -> list[str]:
    """Freeze every parameter of ``model`` and wrap each ``nn.Linear`` whose last name part is in ``cfg.targets``
    (e.g. ``blocks.0.attn.qkv``) in a ``LoRALinear``; returns the wrapped names. An unknown target is an error
    listing the linear layers the model has."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    chosen = [name for name in linears if name.rpartition(".")[2] in cfg.targets]
    found = {name.rpartition(".")[2] for name in chosen}
    missing = [t for t in cfg.targets if t not in found]
    if missing:
        known = sorted({name.rpartition(".")[2] for name in linears})
        raise LLMLabError(f"lora.targets: no linear layer named {', '.join(missing)}; this model has: "
                          f"{', '.join(known)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        _set_child(model, name, LoRALinear(linears[name], cfg.r, cfg.alpha, cfg.dropout))
    return chosen


def merge_lora(model: nn.Module) -> nn.Module:
    """Replace every ``LoRALinear`` in ``model`` by its merged ``nn.Linear`` (in place) and make all parameters
    trainable again; returns ``model``."""
    wrapped = [name for name, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in wrapped:
        _set_child(model, name, model.get_submodule(name).merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapter matrices (A and B of every ``LoRALinear``)."""
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_A, m.lora_B)]
