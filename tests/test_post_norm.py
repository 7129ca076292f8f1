"""A post-norm decoder (``norm_position: post``, the original Transformer's layout) against its formula:

    h_0 = E[x] + P            h' = LN(h + Attn(h))            h_next = LN(h' + MLP(h'))            z = h_N Wᵀ

with causal multi-head attention and no final norm (each block already ends in one)."""
import math

import torch
import torch.nn.functional as F
from torch import nn

from llmlab.model.config import preset
from llmlab.model.decoder import build_model


def layer_norm(x, norm):
    return (x - x.mean(-1, keepdim=True)) / torch.sqrt(x.var(-1, unbiased=False, keepdim=True) + norm.eps) \
        * norm.weight + norm.bias


def attention(x, attn, n_head):
    b, t, d = x.shape
    q, k, v = (x @ attn.qkv.weight.T + attn.qkv.bias).split(d, dim=-1)
    q, k, v = (m.view(b, t, n_head, d // n_head).transpose(1, 2) for m in (q, k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(d // n_head)
    scores = scores.masked_fill(torch.ones(t, t, dtype=torch.bool).triu(1), float("-inf"))
    out = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, d)
    return out @ attn.o_proj.weight.T + attn.o_proj.bias


def mlp(x, m):
    return F.gelu(x @ m.up.weight.T + m.up.bias, approximate="tanh") @ m.down.weight.T + m.down.bias


def test_post_norm_decoder_matches_the_formula():
    torch.manual_seed(0)
    cfg = preset("gpt2", norm_position="post", n_layer=2, n_head=2, d_model=16, vocab_size=11, max_seq_len=8)
    model = build_model(cfg).eval()
    assert isinstance(model.final_norm, nn.Identity)
    with torch.no_grad():              # non-trivial gains and biases, so a missing or extra norm shows
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randint(0, 11, (2, 6))
    with torch.no_grad():
        h = model.embed.weight[x] + model.pos_embed.weight[:6]
        for block in model.blocks:
            h = layer_norm(h + attention(h, block.attn, cfg.n_head), block.attn_norm)
            h = layer_norm(h + mlp(h, block.mlp), block.mlp_norm)
        expected = h @ model.lm_head.weight.T
        assert torch.allclose(model(x), expected, atol=1e-5)


def test_pre_norm_decoder_keeps_its_final_norm():
    cfg = preset("gpt2", n_layer=1, n_head=2, d_model=16, vocab_size=11, max_seq_len=8)
    assert isinstance(build_model(cfg).final_norm, nn.LayerNorm)


def test_post_norm_decoder_generates_with_a_kv_cache():
    """The cached decode of a post-norm decoder gives the same logits as a full pass."""
    torch.manual_seed(0)
    cfg = preset("gpt2", norm_position="post", n_layer=2, n_head=2, d_model=16, vocab_size=11, max_seq_len=8)
    model = build_model(cfg).eval()
    x = torch.randint(0, 11, (1, 6))
    with torch.no_grad():
        cache = model.new_cache(1)
        first = model(x[:, :4], cache=cache)
        rest = [model(x[:, t:t + 1], cache=cache) for t in (4, 5)]
        full = model(x)
    assert torch.allclose(torch.cat([first, *rest], 1), full, atol=1e-5)
