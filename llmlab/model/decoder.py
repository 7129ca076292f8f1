"""The decoder-only language model: tokens → embedding → N × block → norm → lm_head → next-token logits.

With ``norm_position: post`` (the original Transformer's decoder) each block already ends in a norm, so there is
no final norm: tokens → embedding → N × post-norm block → lm_head.

One class covers GPT-2, Llama, Qwen2, Gemma 2 and Gemma 3 styles through ``ModelConfig`` switches (see
``model/config.py``). The model computes logits; losses live in ``llmlab/losses.py`` and generation in
``llmlab/infer/engine.py``.
"""
from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from .attention import KVCache, RotaryEmbedding, causal_mask
from .config import ModelConfig
from .encoder import Encoder
from .layers import Block, init_weights, make_norm


def attention_layout(attention_mask: torch.Tensor | None, t_q: int, t_k: int, device,
                     window: int | None = None) -> tuple[torch.Tensor | None, bool]:
    """The mask for a causal step of ``t_q`` new tokens over ``t_k`` keys, as (mask, is_causal).

    Without padding and without a window that cuts anything off (t_k ≤ W), no mask tensor is built: prefill is
    plain causal and a one-token decode step sees every key. Otherwise mask = causal (with the sliding window W:
    i − W < j ≤ i, see ``causal_mask``) ∧ key_is_real for a (B, t_k) padding mask (1 = real token); each position
    also sees itself so that a padding query never has an empty row (its output is ignored anyway).
    """
    padded = attention_mask is not None and not bool(attention_mask.all())
    if not padded and (window is None or t_k <= window):
        return None, t_q > 1
    causal = causal_mask(t_q, t_k, device, window)                       # (T_q, T_k)
    if not padded:
        return causal, False
    keys = attention_mask.bool()[:, None, None, :]                       # (B, 1, 1, T_k)
    self_pos = torch.arange(t_k - t_q, t_k, device=device)[:, None] == torch.arange(t_k, device=device)[None, :]
    return (causal & keys) | self_pos, False


def positions_from_mask(attention_mask: torch.Tensor, past: int, t: int) -> torch.Tensor:
    """Position ids of the t new tokens: counting only real tokens, so a left-padded prompt starts at 0."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)[:, past:past + t]


def segment_positions(segment_ids: torch.Tensor) -> torch.Tensor:
    """Position ids (B, T) for rows that pack several sequences, ``segment_ids`` (B, T) giving each token's sequence
    (contiguous runs; any value, e.g. −1, for padding): positions restart at 0 where a segment starts."""
    b, t = segment_ids.shape
    index = torch.arange(t, device=segment_ids.device).expand(b, t)
    starts = torch.ones_like(segment_ids, dtype=torch.bool)
    starts[:, 1:] = segment_ids[:, 1:] != segment_ids[:, :-1]
    return index - torch.where(starts, index, torch.zeros_like(index)).cummax(-1).values


def segment_mask(segment_ids: torch.Tensor, window: int | None = None) -> torch.Tensor:
    """Boolean mask (B, 1, T, T) for packed rows: query i sees key j when j ≤ i (within the window W) and both
    belong to the same segment. With ``segment_positions`` each packed sequence is computed exactly as if it were
    alone in its row (document masking, what TRL calls padding-free batches)."""
    t = segment_ids.shape[1]
    same = segment_ids[:, :, None] == segment_ids[:, None, :]
    return (causal_mask(t, t, segment_ids.device, window) & same)[:, None]


class Decoder(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model) if cfg.pos == "learned" else None
        self.rope = (RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
                     if cfg.pos == "rope" else None)
        self.windows = [cfg.window(i) for i in range(cfg.n_layer)]      # sliding window W per layer, or None
        local_theta = cfg.rope_local_theta or cfg.rope_theta               # the sliding layers' own RoPE θ
        self.rope_local = (RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, local_theta, cfg.rope_scaling)
                           if self.rope is not None and local_theta != cfg.rope_theta and any(self.windows) else None)
        self.drop = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        # post-norm: the last block's output is already normalised (Vaswani et al. 2017 has no final norm)
        self.final_norm = make_norm(cfg) if cfg.norm_position == "pre" else nn.Identity()
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.score = nn.Linear(cfg.d_model, cfg.num_labels, bias=False) if cfg.num_labels else None
        init_weights(self, cfg)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight

    def hidden_states(self, input_ids: torch.Tensor | None, *, attention_mask: torch.Tensor | None = None,
                      position_ids: torch.Tensor | None = None, cache: KVCache | None = None,
                      segment_ids: torch.Tensor | None = None, embeds: torch.Tensor | None = None) -> torch.Tensor:
        """Final-norm hidden states (B, T, d_model) for ``input_ids`` (B, T).

        ``attention_mask`` (B, past + T) marks real tokens with 1 (left padding for batched prompts);
        ``cache`` holds earlier positions and is advanced by T. ``segment_ids`` (B, T) packs several sequences
        per row, each attending only to itself (``segment_mask``; training and scoring, not with a cache).
        ``embeds`` (B, T, d_model) replaces ``embed(input_ids)`` (pass ``input_ids=None``): token embeddings
        *before* the embedding scale, which is applied here as to looked-up ones, so a gradient with respect to
        ``embeds`` is one with respect to the embedding rows (GCG's token gradient, ``redteam/gcg.py``).
        """
        if (input_ids is None) == (embeds is None):
            raise ValueError("give exactly one of input_ids and embeds")
        b, t = input_ids.shape if embeds is None else embeds.shape[:2]
        device = (input_ids if embeds is None else embeds).device
        past = cache.length if cache is not None else 0
        if past + t > self.config.max_seq_len:
            raise ValueError(f"sequence of {past + t} tokens exceeds the model's context of "
                             f"{self.config.max_seq_len} (max_seq_len)")
        if segment_ids is not None and (cache is not None or attention_mask is not None or position_ids is not None):
            raise ValueError("segment_ids replaces attention_mask and position_ids, and takes no cache")
        if segment_ids is not None:
            position_ids = segment_positions(segment_ids)
        contiguous = position_ids is None and attention_mask is None     # positions past … past+t−1 in every row
        if position_ids is None and not contiguous:
            position_ids = positions_from_mask(attention_mask, past, t)
        x = self.embed(input_ids) if embeds is None else embeds
        if self.config.embed_scale:     # × √d_model, rounded to the embedding's dtype as Gemma does
            x = x * torch.tensor(self.config.d_model ** 0.5, dtype=x.dtype)
        if self.pos_embed is not None:
            x = x + (self.pos_embed.weight[past:past + t] if contiguous else self.pos_embed(position_ids))
        x = self.drop(x)

        def angles(table):
            return table.span(past, t) if contiguous else table(position_ids)

        rope = angles(self.rope) if self.rope is not None else None
        rope_local = angles(self.rope_local) if self.rope_local is not None else rope
        layouts = {w: (segment_mask(segment_ids, w), False) if segment_ids is not None else
                   attention_layout(attention_mask, t, past + t, device, w) for w in set(self.windows)}
        for i, block in enumerate(self.blocks):
            window = self.windows[i]
            mask, is_causal = layouts[window]
            x = block(x, rope=rope_local if window else rope, mask=mask, is_causal=is_causal, cache=cache, layer=i)
        if cache is not None:
            cache.advance(t)
        return self.final_norm(x)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Next-token logits of final hidden states (…, d_model): z = lm_head(h), soft-capped to c·tanh(z/c) when
        the config has a ``logit_softcap`` c (Gemma 2). Every user of the language-model head goes through here but
        the chunked pretraining loss, which reads ``lm_head.weight`` and caps with the same c."""
        z = self.lm_head(hidden)
        c = self.config.logit_softcap
        return z if c is None else c * torch.tanh(z / c)

    def forward(self, input_ids: torch.Tensor, **kwargs) -> torch.Tensor:
        """Next-token logits (B, T, vocab_size)."""
        return self.logits(self.hidden_states(input_ids, **kwargs))

    def new_cache(self, batch: int, max_len: int | None = None, dtype: torch.dtype | None = None) -> KVCache:
        cfg = self.config
        return KVCache(cfg.n_layer, batch, cfg.n_kv_head, max_len or cfg.max_seq_len, cfg.head_dim,
                       device=self.embed.weight.device, dtype=dtype or self.embed.weight.dtype)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token ≈ 6·N (forward + backward through N matmul weights)
        + 12·n_layer·n_head·head_dim·T (attention scores and weighted sums)."""
        cfg = self.config
        n_matmul = sum(p.numel() for n, p in self.named_parameters() if p.dim() == 2 and "embed" not in n)
        if cfg.tie_embeddings:
            n_matmul += self.lm_head.weight.numel()
        return 6 * n_matmul + 12 * cfg.n_layer * cfg.n_head * cfg.head_dim * seq_len


def build_empty(cfg: ModelConfig, device=None) -> nn.Module:
    """The model for ``cfg`` with *uninitialised* parameters, for weights about to be loaded: built on the meta
    device (no memory, no random numbers: initialising weights only to overwrite them is most of a large model's
    load time), then allocated on ``device``. RoPE tables are recomputed and tied weights tied again (``to_empty`` gives
    each module its own copy)."""
    with _no_init():
        model = build_model(cfg, device="meta")
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    model.to_empty(device=device or "cpu")
    for first, *others in (names for names in aliases.values() if len(names) > 1):
        for name in others:
            owner, _, attr = name.rpartition(".")
            setattr(model.get_submodule(owner), attr, model.get_parameter(first))
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.reset_parameters()
    return model


@contextmanager
def _no_init():
    """torch.nn.init's functions as no-ops (as transformers' ``no_init_weights``): on the meta device there is
    nothing to fill, but their meta kernels import torch._dynamo on first use, a second of start-up."""
    names = ("normal_", "uniform_", "kaiming_uniform_", "zeros_", "ones_")
    saved = {name: getattr(nn.init, name) for name in names}
    for name in names:
        setattr(nn.init, name, lambda tensor, *args, **kwargs: tensor)
    try:
        yield
    finally:
        for name, fn in saved.items():
            setattr(nn.init, name, fn)


def build_model(cfg: ModelConfig, device=None) -> nn.Module:
    """A fresh, initialised model for ``cfg`` (decoder or encoder)."""
    cls = Encoder if cfg.arch == "encoder" else Decoder
    with torch.device(device or "cpu"):
        return cls(cfg)


def num_params(cfg: ModelConfig) -> int:
    """Parameter count of ``cfg``'s model without allocating it (embeddings counted once when tied)."""
    with _no_init():
        return sum(p.numel() for p in build_model(cfg, device="meta").parameters())
