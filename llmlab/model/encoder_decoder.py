"""An encoder-decoder Transformer (the original Transformer's and T5's layout) from the decoder's own blocks.

    source ──embed──► N_enc × Block (bidirectional: every source token sees every real source token) ──norm──► memory
    target ──embed──► N_dec × CrossBlock (causal self-attention, cross-attention to memory, MLP) ──norm──► lm_head

One token embedding serves the source, the target and the output layer (tied, as in T5). A ``CrossBlock`` is a
``layers.Block`` with one more sub-layer between attention and MLP (pre-norm):

    x = x + SelfAttn(Norm(x))              causal, over the target so far
    x = x + CrossAttn(Norm(x), memory)     queries from the target, keys and values from the encoder's output
    x = x + MLP(Norm(x))

Cross-attention is the same formula as self-attention, softmax(Q Kᵀ / √d_k + M) V, with Q = x W_q from the target
and K = m W_k, V = m W_v from the memory m; the mask M hides only the source's padding (no causal mask: the whole
source is known before the first target token). Positions: with ``pos: rope`` the encoder's and the decoder's
self-attention rotate queries and keys by their own positions and cross-attention has none (as T5's cross-attention
has no position bias); with ``pos: learned`` one table of position embeddings serves the source and the target (as
the original Transformer's one sinusoid table does), so the memory carries each source token's absolute position.

Generation caches two things. The decoder's self-attention keeps a ``KVCache`` of the target's keys and values, as
the decoder-only model does. Cross-attention's keys and values are computed once per source (``cross_kv``) and
reused at every step: they depend only on the memory, which the causal decoding of the target never changes, so
recomputing them would cost 2·N_dec·S·d² multiply-adds per generated token for nothing.
"""
from __future__ import annotations

import torch
from torch import nn

from .attention import KVCache, RotaryEmbedding, scaled_dot_product_attention
from .config import ModelConfig
from .layers import Block, init_weights, make_norm


class CrossAttention(nn.Module):
    """Multi-head attention of target queries over memory keys/values:

        CrossAttn(x, m) = Concat_h softmax((x W_q^h)(m W_k^h)ᵀ / √d_k + M) (m W_v^h) · W_o

    ``kv`` is one matrix [W_k; W_v] (one matmul over the memory); n_kv_head < n_head gives grouped queries."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.q = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=cfg.bias)
        self.kv = nn.Linear(cfg.d_model, 2 * cfg.n_kv_head * cfg.head_dim, bias=cfg.bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=cfg.bias)
        self.dropout = cfg.dropout
        self.fast = cfg.attn_impl == "sdpa"

    def memory_kv(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """K = m W_k and V = m W_v of the memory (B, S, d_model), each (B, H_kv, S, d_k)."""
        b, s, _ = memory.shape
        k, v = self.kv(memory).view(b, s, 2, self.n_kv_head, self.head_dim).permute(2, 0, 3, 1, 4)
        return k, v

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor, torch.Tensor],
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """Attend from ``x`` (B, T, d_model) over ``kv`` (``memory_kv``'s pair); ``mask`` (B, 1, 1, S) True = a real
        source token."""
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.n_head, self.head_dim).transpose(1, 2)
        y = scaled_dot_product_attention(q, *kv, mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                         fast=self.fast)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim))


class CrossBlock(Block):
    """A decoder layer: ``Block``'s causal self-attention and MLP with cross-attention between them.

    pre-norm:  x = x + SelfAttn(Norm(x));  x = x + CrossAttn(Norm(x), m);  x = x + MLP(Norm(x))
    post-norm: x = Norm(x + SelfAttn(x));  x = Norm(x + CrossAttn(x, m));  x = Norm(x + MLP(x))
    """

    def __init__(self, cfg: ModelConfig):
        super().__init__(cfg)
        self.cross_norm = make_norm(cfg)
        self.cross = CrossAttention(cfg)

    def forward(self, x: torch.Tensor, *, kv: tuple[torch.Tensor, torch.Tensor], memory_mask=None, rope=None,
                is_causal: bool = True, cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        def attend(h):
            return self.dropout(self.attn(h, rope=rope, is_causal=is_causal, cache=cache, layer=layer))

        def cross(h):
            return self.dropout(self.cross(h, kv, memory_mask))

        if self.pre_norm:
            x = x + self.attn_out_norm(attend(self.attn_norm(x)))
            x = x + cross(self.cross_norm(x))
            return x + self.mlp_out_norm(self.dropout(self.mlp(self.mlp_norm(x))))
        x = self.attn_norm(x + attend(x))
        x = self.cross_norm(x + cross(x))
        return self.mlp_norm(x + self.dropout(self.mlp(x)))


class EncoderDecoder(nn.Module):
    """``cfg.n_layer`` decoder layers over ``n_encoder_layer`` encoder layers (default: as many), every other
    setting (width, heads, norm, MLP, positions) from ``cfg``. ``forward(src, tgt)`` gives next-token logits of the
    target (teacher forcing); ``generate`` decodes greedily with both caches."""

    def __init__(self, cfg: ModelConfig, n_encoder_layer: int | None = None):
        super().__init__()
        self.config = cfg
        self.n_encoder_layer = n_encoder_layer or cfg.n_layer
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        learned = cfg.pos == "learned"
        self.pos_embed = nn.Embedding(cfg.max_seq_len, cfg.d_model) if learned else None   # source and target
        self.rope = None if learned else RotaryEmbedding(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.drop = nn.Dropout(cfg.dropout)
        self.encoder = nn.ModuleList(Block(cfg) for _ in range(self.n_encoder_layer))
        self.encoder_norm = make_norm(cfg) if cfg.norm_position == "pre" else nn.Identity()
        self.decoder = nn.ModuleList(CrossBlock(cfg) for _ in range(cfg.n_layer))
        self.final_norm = make_norm(cfg) if cfg.norm_position == "pre" else nn.Identity()
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        init_weights(self, cfg)
        self.lm_head.weight = self.embed.weight          # one embedding for source, target and output

    def _embed(self, ids: torch.Tensor, table: nn.Embedding | None, start: int) -> torch.Tensor:
        x = self.embed(ids)
        if table is not None:
            x = x + table.weight[start:start + ids.shape[1]]
        return self.drop(x)

    def _check_length(self, n: int, what: str) -> None:
        if n > self.config.max_seq_len:
            raise ValueError(f"{what} of {n} tokens exceeds the model's context of {self.config.max_seq_len} "
                             "(max_seq_len)")

    def encode(self, src: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """The memory (B, S, d_model) of source ids (B, S); ``src_mask`` (B, S) marks real tokens with 1 (the
        source is right-padded). Bidirectional: no causal mask, padding hidden from every query."""
        self._check_length(src.shape[1], "a source")
        x = self._embed(src, self.pos_embed, 0)
        mask = key_mask(src_mask)
        rope = self.rope.span(0, src.shape[1]) if self.rope is not None else None
        for block in self.encoder:
            x = block(x, rope=rope, mask=mask)
        return self.encoder_norm(x)

    def cross_kv(self, memory: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Every decoder layer's cross-attention keys and values of ``memory``: computed once per source."""
        return [block.cross.memory_kv(memory) for block in self.decoder]

    def decode(self, tgt: torch.Tensor, kv: list[tuple[torch.Tensor, torch.Tensor]],
               src_mask: torch.Tensor | None = None, cache: KVCache | None = None) -> torch.Tensor:
        """Next-token logits (B, T, V) of target ids (B, T) against the memory's ``kv`` (``cross_kv``); with a
        ``cache`` the ids continue the cached target (positions ``cache.length`` …) and the cache advances by T."""
        past = cache.length if cache is not None else 0
        t = tgt.shape[1]
        self._check_length(past + t, "a target")
        x = self._embed(tgt, self.pos_embed, past)
        mask = key_mask(src_mask)
        rope = self.rope.span(past, t) if self.rope is not None else None
        for i, block in enumerate(self.decoder):
            x = block(x, kv=kv[i], memory_mask=mask, rope=rope, is_causal=t > 1, cache=cache, layer=i)
        if cache is not None:
            cache.advance(t)
        return self.lm_head(self.final_norm(x))

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, src_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Teacher forcing: logits (B, T, V) where row t predicts the target token after ``tgt[:, :t+1]``."""
        return self.decode(tgt, self.cross_kv(self.encode(src, src_mask)), src_mask)

    def new_cache(self, batch: int, max_len: int | None = None) -> KVCache:
        """The decoder self-attention's cache (the cross-attention's keys/values live in ``cross_kv``'s list)."""
        cfg = self.config
        return KVCache(cfg.n_layer, batch, cfg.n_kv_head, max_len or cfg.max_seq_len, cfg.head_dim,
                       device=self.embed.weight.device, dtype=self.embed.weight.dtype)

    @torch.no_grad()
    def generate(self, src: torch.Tensor, src_mask: torch.Tensor | None, *, start_id: int, eos_id: int,
                 max_new_tokens: int, use_cache: bool = True) -> list[list[int]]:
        """Greedy decoding of each source's target, from ``start_id`` until ``eos_id`` (left out of the result) or
        ``max_new_tokens``. With ``use_cache`` one token per step runs through the decoder against the two caches;
        without, every step recomputes the whole target so far (same tokens, more work: the tests compare them)."""
        b = src.shape[0]
        kv = self.cross_kv(self.encode(src, src_mask))
        tgt = torch.full((b, 1), start_id, dtype=torch.long, device=src.device)
        cache = self.new_cache(b, max_new_tokens + 1) if use_cache else None
        step_input = tgt
        done = torch.zeros(b, dtype=torch.bool, device=src.device)
        for _ in range(max_new_tokens):
            logits = self.decode(step_input if use_cache else tgt, kv, src_mask, cache)[:, -1]
            token = logits.argmax(-1).masked_fill(done, eos_id)
            tgt = torch.cat([tgt, token[:, None]], dim=1)
            step_input = token[:, None]
            done |= token == eos_id
            if bool(done.all()):
                break
        out = []
        for row in tgt[:, 1:].tolist():
            out.append(row[:row.index(eos_id)] if eos_id in row else row)
        return out


def key_mask(src_mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, 1, 1, S) boolean mask, True = a real source token (every query may see it), or None without padding."""
    if src_mask is None or bool(src_mask.all()):
        return None
    return src_mask.bool()[:, None, None, :]


def count_params(model: nn.Module) -> int:
    """Parameters of ``model``, a tied matrix counted once."""
    return sum(p.numel() for p in model.parameters())
