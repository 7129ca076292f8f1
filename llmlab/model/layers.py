"""The pieces of a Transformer block: normalisation, the feed-forward network, the block itself, and the
initialisation every model built from them starts with."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .attention import KVCache, MultiHeadAttention
from .config import ModelConfig


def init_weights(model: nn.Module, cfg: ModelConfig, only: set[str] | None = None) -> None:
    """Normal(0, init_std) for matrices and embeddings, zero biases, unit norm gains (GPT-2, Llama and BERT
    all start this way); GPT-2 also scales each residual output projection by 1/√(2·n_layer). ``only``: the
    names of the parameters to initialise (default: all)."""
    for name, module in model.named_modules():
        def wanted(param: str) -> bool:
            return getattr(module, param, None) is not None and (only is None or f"{name}.{param}" in only)

        if isinstance(module, (nn.Linear, nn.Embedding)):
            std = cfg.init_std
            if cfg.scale_residual_init and name.endswith(("attn.o_proj", "mlp.down")):
                std /= math.sqrt(2 * cfg.n_layer)
            if wanted("weight"):
                nn.init.normal_(module.weight, mean=0.0, std=std)
            if wanted("bias"):
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
            if wanted("weight"):
                nn.init.ones_(module.weight)
            if wanted("bias"):
                nn.init.zeros_(module.bias)


def make_norm(cfg: ModelConfig) -> nn.Module:
    """LayerNorm  y = (x − mean(x)) / √(var(x) + ε) · g + b   (GPT-2, BERT), or
    RMSNorm    y = x / √(mean(x²) + ε) · g                   (Llama: no centring, no bias; Gemma's · (1 + w) is
                                                             this with g = 1 + w, folded when its weights load)."""
    if cfg.norm == "rmsnorm":
        return nn.RMSNorm(cfg.d_model, eps=cfg.norm_eps)
    return nn.LayerNorm(cfg.d_model, eps=cfg.norm_eps, bias=True)


class MLP(nn.Module):
    """Feed-forward network applied to each position.

    GELU:   down(GELU(up(x)))                       (GPT-2 uses GELU's tanh approximation, BERT the exact one)
    SwiGLU: down(SiLU(gate(x)) ⊙ up(x))             (Llama; gate and up are one fused matrix ``up`` = [W_gate; W_up])
    GeGLU:  down(GELU_tanh(gate(x)) ⊙ up(x))        (Gemma; fused the same way)
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.kind = cfg.mlp
        n_up = 2 * cfg.d_ff if cfg.mlp in ("swiglu", "geglu") else cfg.d_ff
        self.up = nn.Linear(cfg.d_model, n_up, bias=cfg.bias)
        self.down = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        if self.kind in ("swiglu", "geglu"):
            gate, up = h.chunk(2, dim=-1)
            h = (F.silu(gate) if self.kind == "swiglu" else F.gelu(gate, approximate="tanh")) * up
        else:
            h = F.gelu(h, approximate="tanh" if self.kind == "gelu_tanh" else "none")
        return self.down(h)


class Block(nn.Module):
    """One Transformer layer.

    pre-norm  (GPT-2, Llama): x = x + Attn(Norm(x));  x = x + MLP(Norm(x))
    post-norm (BERT):         x = Norm(x + Attn(x));  x = Norm(x + MLP(x))
    pre-norm with post_block_norms (Gemma's "sandwich"): x = x + Norm(Attn(Norm(x)));  x = x + Norm(MLP(Norm(x)))
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.pre_norm = cfg.norm_position == "pre"
        self.attn_norm = make_norm(cfg)
        self.attn = MultiHeadAttention(cfg.d_model, cfg.n_head, cfg.n_kv_head, cfg.head_dim, bias=cfg.bias,
                                       qkv_bias=cfg.qkv_bias, qk_norm=cfg.qk_norm, norm_eps=cfg.norm_eps,
                                       scale=cfg.attn_scale, softcap=cfg.attn_softcap, dropout=cfg.dropout,
                                       fast=cfg.attn_impl == "sdpa")
        self.mlp_norm = make_norm(cfg)
        self.mlp = MLP(cfg)
        self.attn_out_norm = make_norm(cfg) if cfg.post_block_norms else nn.Identity()
        self.mlp_out_norm = make_norm(cfg) if cfg.post_block_norms else nn.Identity()
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, *, rope=None, mask: torch.Tensor | None = None, is_causal: bool = False,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        def attend(h):
            return self.dropout(self.attn(h, rope=rope, mask=mask, is_causal=is_causal, cache=cache, layer=layer))

        if self.pre_norm:
            x = x + self.attn_out_norm(attend(self.attn_norm(x)))
            return x + self.mlp_out_norm(self.dropout(self.mlp(self.mlp_norm(x))))
        x = self.attn_norm(x + attend(x))
        return self.mlp_norm(x + self.dropout(self.mlp(x)))
