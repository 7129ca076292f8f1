"""A BERT-style encoder built from the same blocks as the decoder, but bidirectional.

tokens + positions + token types → LayerNorm → N × post-norm block (no causal mask: every token sees every
other non-pad token) → hidden states, used by
- the masked-LM head:  logits = LayerNorm(GELU(W h)) Eᵀ + b   (E the tied token embeddings), and
- the pooled classification head:  pooled = tanh(W_p h_[CLS]);  logits = W_c pooled + b_c.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .layers import Block, init_weights, make_norm


class Encoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.type_embed = nn.Embedding(cfg.type_vocab_size, cfg.d_model) if cfg.type_vocab_size else None
        self.embed_norm = make_norm(cfg)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.mlm_dense = nn.Linear(cfg.d_model, cfg.d_model)
        self.mlm_norm = make_norm(cfg)
        self.mlm_decoder = nn.Linear(cfg.d_model, cfg.vocab_size, bias=True)
        self.pooler = nn.Linear(cfg.d_model, cfg.d_model)
        self.classifier = nn.Linear(cfg.d_model, cfg.num_labels) if cfg.num_labels else None
        init_weights(self, cfg)
        if cfg.tie_embeddings:
            self.mlm_decoder.weight = self.embed.weight

    def hidden_states(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
                      token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """Contextual hidden states (B, T, d_model); ``attention_mask`` (B, T) marks real tokens with 1."""
        b, t = input_ids.shape
        if t > self.config.max_seq_len:
            raise ValueError(f"sequence of {t} tokens exceeds the model's context of {self.config.max_seq_len}")
        positions = torch.arange(t, device=input_ids.device)
        x = self.embed(input_ids) + self.pos_embed(positions)
        if self.type_embed is not None:
            types = token_type_ids if token_type_ids is not None else torch.zeros_like(input_ids)
            x = x + self.type_embed(types)
        x = self.drop(self.embed_norm(x))
        mask = None
        if attention_mask is not None and not bool(attention_mask.all()):
            mask = attention_mask.bool()[:, None, None, :]          # keys only: bidirectional
        for block in self.blocks:
            x = block(x, mask=mask)
        return x

    def forward(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Masked-LM logits (B, T, vocab_size)."""
        h = self.hidden_states(input_ids, **kwargs)
        h = self.mlm_norm(F.gelu(self.mlm_dense(h)))
        return self.mlm_decoder(h)

    def pooled(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """tanh(W_p h_0 + b_p): the first ([CLS]) position's state through the pooler, (B, d_model)."""
        return torch.tanh(self.pooler(self.hidden_states(input_ids, **kwargs)[:, 0]))

    def classify(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Class logits (B, num_labels) from the pooled output."""
        if self.classifier is None:
            raise ValueError("this encoder has no classification head (model.num_labels = 0)")
        return self.classifier(self.drop(self.pooled(input_ids, **kwargs)))
