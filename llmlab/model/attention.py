"""Attention, written from the formula.

    Attention(Q, K, V) = softmax(Q Kᵀ / √d_k + M) V

Q has shape (batch, n_head, T_q, d_k); K and V have (batch, n_kv_head, T_k, d_k). When n_kv_head < n_head
(grouped-query attention; n_kv_head = 1 is multi-query attention) each K/V head serves n_head / n_kv_head query
heads. M is the mask: boolean (True = may attend) or additive (0 or -inf, added to the scores). A causal mask lets
the query at position i see keys j ≤ i; a sliding window of W positions (Gemma's local layers) only i − W < j ≤ i.

Multi-head attention projects the input into h heads, attends in each, concatenates and projects back:

    MultiHead(X) = Concat(head_1, ..., head_h) Wᴼ,   head_i = Attention(X W_iᵠ, X W_iᴷ, X W_iⱽ)

Positions enter through rotary embeddings (RoPE): each pair of channels (x_i, x_{i+d/2}) of a query or key at
position p is rotated by the angle p·θ^(-2i/d), so that q·k depends only on the relative position.
Llama 3.1 stretches the slow rotations of RoPE for a longer context (``llama3_frequencies``).

Gemma 2 soft-caps the scores before the mask, a = c·tanh(a/c) with a = QKᵀ/√d_k, so that no score exceeds c;
torch's fused kernel has no such step, so soft-capped attention runs the formula.

During generation a KV cache keeps the keys and values of earlier tokens, so each new token costs one row of
attention instead of a full pass.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def causal_mask(t_q: int, t_k: int, device=None, window: int | None = None) -> torch.Tensor:
    """Boolean (t_q, t_k) mask, True where query i may see key j: j ≤ i, and i − W < j with a sliding ``window`` W
    (the query and its W − 1 predecessors, as transformers' ``sliding_window_overlay``: kv_idx > q_idx − W).

    Aligned to the bottom right: query i sits at absolute position t_k - t_q + i, so a decode step with a cache
    (t_q = 1) sees every cached key (the last W with a window), and t_q = t_k gives the usual lower triangle.
    """
    q_pos = torch.arange(t_k - t_q, t_k, device=device)[:, None]
    k_pos = torch.arange(t_k, device=device)[None, :]
    if window is None:
        return k_pos <= q_pos
    return (k_pos <= q_pos) & (k_pos > q_pos - window)


def scaled_dot_product_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                                 mask: torch.Tensor | None = None, is_causal: bool = False,
                                 scale: float | None = None, dropout_p: float = 0.0, fast: bool = False,
                                 softcap: float | None = None) -> torch.Tensor:
    """softmax(Q Kᵀ / √d_k + M) V for (B, H, T_q, D) queries and (B, H_kv, T_k, D) keys/values.

    ``mask`` is boolean (True = attend) or additive, broadcastable to (B, H, T_q, T_k). ``is_causal`` adds the
    bottom-right-aligned causal mask. ``dropout_p`` drops attention weights (training only). ``softcap`` c
    replaces each score a = Q Kᵀ / √d_k by c·tanh(a/c) before the mask is applied (Gemma 2). ``fast=True`` hands
    the same computation to ``torch.nn.functional.scaled_dot_product_attention`` (fused kernels) when there is no
    ``softcap``; otherwise the formula runs step by step.
    """
    fast = fast and softcap is None           # torch's kernel cannot soft-cap the scores
    n_head, n_kv_head = q.shape[1], k.shape[1]
    if n_head % n_kv_head:
        raise ValueError(f"n_head ({n_head}) must be a multiple of n_kv_head ({n_kv_head})")
    t_q, t_k = q.shape[-2], k.shape[-2]
    if is_causal and (mask is not None or t_q != t_k or not fast):
        mask, is_causal = _combine(mask, causal_mask(t_q, t_k, q.device)), False
    if fast:   # torch's is_causal is top-left aligned, which equals ours only when t_q == t_k (handled above)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, scale=scale,
                                              dropout_p=dropout_p, enable_gqa=n_kv_head != n_head)
    if n_kv_head != n_head:                       # GQA: each K/V head serves a group of query heads
        k = k.repeat_interleave(n_head // n_kv_head, dim=1)
        v = v.repeat_interleave(n_head // n_kv_head, dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale    # (B, H, T_q, T_k)
    if softcap is not None:
        scores = softcap * torch.tanh(scores / softcap)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    weights = torch.softmax(scores, dim=-1)
    if dropout_p > 0:
        weights = F.dropout(weights, p=dropout_p)
    return weights @ v


def _combine(mask: torch.Tensor | None, causal: torch.Tensor) -> torch.Tensor:
    """Intersect a user mask (boolean or additive) with a boolean causal mask."""
    if mask is None:
        return causal
    if mask.dtype == torch.bool:
        return mask & causal
    return mask.masked_fill(~causal, float("-inf"))


def llama3_frequencies(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                       original_max_position_embeddings: int) -> torch.Tensor:
    """Llama 3.1's RoPE frequencies for a context ``factor`` times longer than pre-training's L
    (``original_max_position_embeddings``). A frequency f has the wavelength λ = 2π/f; then

        f' = f                        if λ < L / high_freq_factor  (fast rotations: local order, kept)
        f' = f / factor               if λ > L / low_freq_factor   (slow rotations: stretched over the context)
        f' = (1 − s)·f/factor + s·f   otherwise (a smooth blend), where
        s  = (L/λ − low_freq_factor) / (high_freq_factor − low_freq_factor)

    Computed in float32, in transformers' order of operations, so that the tables match its own bit for bit."""
    wavelen = 2 * math.pi / inv_freq
    old = original_max_position_embeddings
    smooth = (old / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    between = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    scaled = torch.where(wavelen > old / low_freq_factor, inv_freq / factor, between)
    return torch.where(wavelen < old / high_freq_factor, inv_freq, scaled)


class RotaryEmbedding(nn.Module):
    """cos/sin tables for RoPE: angle(p, i) = p · θ^(-2i/d) for i < d/2, laid out as [angles, angles] (the
    "rotate half" convention of Llama in Hugging Face, so weights map without permutation). ``scaling`` (a
    ``ModelConfig.rope_scaling``, rope_type "llama3") rescales the frequencies θ^(-2i/d) (``llama3_frequencies``)."""

    def __init__(self, head_dim: int, max_seq_len: int, theta: float = 10000.0, scaling: dict | None = None):
        super().__init__()
        self.head_dim, self.max_seq_len, self.theta, self.scaling = head_dim, max_seq_len, theta, scaling
        self.register_buffer("cos", torch.empty(max_seq_len, head_dim), persistent=False)
        self.register_buffer("sin", torch.empty(max_seq_len, head_dim), persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """(Re)compute the tables on the buffers' device: at construction, and after ``to_empty`` (a model built
        on the meta device, see ``decoder.build_empty``)."""
        device = self.cos.device
        if device.type == "meta":       # shapes only (and meta kernels would import torch._dynamo)
            return
        # 1 / θ^(2i/d), computed as transformers does, so that the tables match its own bit for bit
        inv_freq = 1.0 / self.theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device)
                                        / self.head_dim)
        if self.scaling is not None:
            inv_freq = llama3_frequencies(inv_freq, **{k: v for k, v in self.scaling.items() if k != "rope_type"})
        angles = torch.outer(torch.arange(self.max_seq_len, dtype=torch.float32, device=device), inv_freq)
        angles = torch.cat([angles, angles], dim=-1)
        self.cos, self.sin = angles.cos(), angles.sin()

    def forward(self, position_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for positions of shape (B, T), each (B, 1, T, head_dim) to broadcast over heads."""
        return self.cos[position_ids].unsqueeze(1), self.sin[position_ids].unsqueeze(1)

    def span(self, start: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) for the positions start … start+length−1 of every row: slices, no gather."""
        return self.cos[start:start + length][None, None], self.sin[start:start + length][None, None]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (x_i, x_{i+d/2}): x·cos + rotate_half(x)·sin, rotate_half(x) = [-x₂, x₁]."""
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class KVCache:
    """Keys and values of every layer for up to ``max_len`` positions, preallocated.

    All sequences of a batch share one write position (prompts are left-padded to a common length), so
    ``length`` is a single integer; padding is excluded through the attention mask.
    """

    def __init__(self, n_layer: int, batch: int, n_kv_head: int, max_len: int, head_dim: int,
                 device=None, dtype=torch.float32):
        shape = (batch, n_kv_head, max_len, head_dim)
        self.k = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.v = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(n_layer)]
        self.max_len = max_len
        self.length = 0          # positions filled, advanced by ``advance`` after all layers wrote

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this step's (B, H_kv, T, D) keys/values for ``layer``; return all keys/values so far."""
        start, end = self.length, self.length + k.shape[2]
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} positions needed, {self.max_len} allocated")
        self.k[layer][:, :, start:end] = k
        self.v[layer][:, :, start:end] = v
        return self.k[layer][:, :, :end], self.v[layer][:, :, :end]

    def advance(self, n: int) -> None:
        self.length += n

    def truncate(self, length: int) -> None:
        """Forget the positions from ``length`` on (a rejected speculative draft's); later writes overwrite them."""
        if not 0 <= length <= self.length:
            raise ValueError(f"cannot truncate a cache of {self.length} positions to {length}")
        self.length = length

    def to(self, dtype: torch.dtype) -> None:
        """Cast the stored keys/values, e.g. to bfloat16 after a float32 prefill."""
        self.k = [t.to(dtype) for t in self.k]
        self.v = [t.to(dtype) for t in self.v]

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the batch rows in ``keep`` (indices), e.g. after some sequences finished."""
        self.k = [t[keep] for t in self.k]
        self.v = [t[keep] for t in self.v]


class MultiHeadAttention(nn.Module):
    """Multi-head attention with n_kv_head ≤ n_head key/value heads (MHA, GQA, MQA), optional RoPE and QK-norm;
    ``scale`` replaces the softmax's 1/√head_dim (Gemma: query_pre_attn_scalar^-½), ``softcap`` soft-caps the
    scores (Gemma 2). ``bias`` puts biases on every projection, ``qkv_bias`` on the input ones only (Qwen2).

    The three input projections are one matrix ``qkv`` (one matmul instead of three); its rows are
    [W_q (n_head·d), W_k (n_kv_head·d), W_v (n_kv_head·d)].
    """

    def __init__(self, d_model: int, n_head: int, n_kv_head: int, head_dim: int, *, bias: bool = False,
                 qkv_bias: bool = False, qk_norm: bool = False, norm_eps: float = 1e-6, scale: float | None = None,
                 softcap: float | None = None, dropout: float = 0.0, fast: bool = True):
        super().__init__()
        if n_head % n_kv_head:
            raise ValueError(f"n_head ({n_head}) must be a multiple of n_kv_head ({n_kv_head})")
        self.n_head, self.n_kv_head, self.head_dim = n_head, n_kv_head, head_dim
        self.qkv = nn.Linear(d_model, (n_head + 2 * n_kv_head) * head_dim, bias=bias or qkv_bias)
        self.o_proj = nn.Linear(n_head * head_dim, d_model, bias=bias)
        self.q_norm = nn.RMSNorm(head_dim, eps=norm_eps) if qk_norm else None
        self.k_norm = nn.RMSNorm(head_dim, eps=norm_eps) if qk_norm else None
        self.scale, self.softcap = scale, softcap
        self.dropout = dropout
        self.fast = fast

    def forward(self, x: torch.Tensor, *, rope: tuple[torch.Tensor, torch.Tensor] | None = None,
                mask: torch.Tensor | None = None, is_causal: bool = False,
                cache: KVCache | None = None, layer: int = 0) -> torch.Tensor:
        b, t, _ = x.shape
        q, k, v = self.qkv(x).split([self.n_head * self.head_dim, self.n_kv_head * self.head_dim,
                                     self.n_kv_head * self.head_dim], dim=-1)
        q = q.view(b, t, self.n_head, self.head_dim).transpose(1, 2)        # (B, H, T, D)
        k = k.view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)     # (B, H_kv, T, D)
        v = v.view(b, t, self.n_kv_head, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        y = scaled_dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, scale=self.scale,
                                         dropout_p=self.dropout if self.training else 0.0, fast=self.fast,
                                         softcap=self.softcap)
        return self.o_proj(y.transpose(1, 2).reshape(b, t, self.n_head * self.head_dim))
