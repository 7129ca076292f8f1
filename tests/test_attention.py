import pytest
import torch
import torch.nn.functional as F

from llmlab.model.attention import KVCache, MultiHeadAttention, causal_mask, scaled_dot_product_attention
from llmlab.model.config import preset
from llmlab.model.decoder import build_model


def _qkv(b=2, h=4, h_kv=4, t_q=7, t_k=7, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(b, h, t_q, d, generator=g), torch.randn(b, h_kv, t_k, d, generator=g),
            torch.randn(b, h_kv, t_k, d, generator=g))


def _torch_ref(q, k, v, **kw):
    if k.shape[1] != q.shape[1]:
        kw["enable_gqa"] = True
    return F.scaled_dot_product_attention(q, k, v, **kw)


@pytest.mark.parametrize("fast", [False, True])
def test_plain_and_causal_match_torch(fast):
    q, k, v = _qkv()
    for causal in (False, True):
        ours = scaled_dot_product_attention(q, k, v, is_causal=causal, fast=fast)
        assert (ours - _torch_ref(q, k, v, is_causal=causal)).abs().max() <= 1e-5


@pytest.mark.parametrize("fast", [False, True])
def test_padding_masks_boolean_and_additive(fast):
    q, k, v = _qkv(t_q=6, t_k=6)
    keep = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1]]).bool()      # left padding in row 0
    mask = keep[:, None, None, :] & causal_mask(6, 6) | torch.eye(6, dtype=torch.bool)
    ref = _torch_ref(q, k, v, attn_mask=mask)
    assert (scaled_dot_product_attention(q, k, v, mask=mask, fast=fast) - ref).abs().max() <= 1e-5
    additive = torch.zeros(mask.shape).masked_fill(~mask, float("-inf"))
    assert (scaled_dot_product_attention(q, k, v, mask=additive, fast=fast) - ref).abs().max() <= 1e-5
    # a padding mask combined with is_causal equals the explicit intersection
    pad_only = keep[:, None, None, :] | torch.eye(6, dtype=torch.bool)
    ours = scaled_dot_product_attention(q, k, v, mask=pad_only, is_causal=True, fast=fast)
    assert (ours - _torch_ref(q, k, v, attn_mask=pad_only & causal_mask(6, 6))).abs().max() <= 1e-5


@pytest.mark.parametrize("h_kv", [1, 2])
def test_grouped_query_attention(h_kv):
    q, k, v = _qkv(h=4, h_kv=h_kv)
    ref = _torch_ref(q, k, v, is_causal=True)
    slow = scaled_dot_product_attention(q, k, v, is_causal=True)
    fast = scaled_dot_product_attention(q, k, v, is_causal=True, fast=True)
    assert (slow - ref).abs().max() <= 1e-5 and (fast - slow).abs().max() <= 1e-5


def test_causal_is_bottom_right_aligned_for_decoding():
    q, k, v = _qkv(t_q=2, t_k=5)
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]]).bool()
    ref = _torch_ref(q, k, v, attn_mask=mask)
    for fast in (False, True):
        assert (scaled_dot_product_attention(q, k, v, is_causal=True, fast=fast) - ref).abs().max() <= 1e-5


def test_sliding_window_mask():
    """Query i sees keys i − W < j ≤ i (transformers' sliding_window_overlay), bottom-right aligned like causal."""
    i, j = torch.arange(6)[:, None], torch.arange(6)[None, :]
    assert torch.equal(causal_mask(6, 6, window=3), (j <= i) & (j > i - 3))
    assert torch.equal(causal_mask(1, 6, window=3), torch.tensor([[False, False, False, True, True, True]]))
    assert torch.equal(causal_mask(6, 6, window=6), causal_mask(6, 6))


def test_formula_path_rejects_bad_head_counts():
    q, k, v = _qkv(h=4, h_kv=3)
    with pytest.raises(ValueError, match="multiple"):
        scaled_dot_product_attention(q, k, v)


def test_multihead_attention_equals_manual_heads():
    torch.manual_seed(0)
    mha = MultiHeadAttention(32, n_head=4, n_kv_head=2, head_dim=8, fast=False)
    x = torch.randn(2, 5, 32)
    out = mha(x, is_causal=True)
    wq, wk, wv = mha.qkv.weight.split([32, 16, 16])
    heads = []
    for h in range(4):
        g = h // 2                                           # the K/V head serving query head h
        qh, kh, vh = x @ wq[h * 8:(h + 1) * 8].T, x @ wk[g * 8:(g + 1) * 8].T, x @ wv[g * 8:(g + 1) * 8].T
        s = (qh @ kh.transpose(-1, -2)) / 8 ** 0.5
        s = s.masked_fill(~torch.ones(5, 5).tril().bool(), float("-inf"))
        heads.append(torch.softmax(s, -1) @ vh)
    expected = torch.cat(heads, -1) @ mha.o_proj.weight.T     # Concat(head_1..head_h) Wᴼ
    assert (out - expected).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("attn_impl", ["math", "sdpa"])
def test_kv_cache_decoding_equals_full_forward(name, attn_impl):
    torch.manual_seed(0)
    cfg = preset(name, vocab_size=50, n_layer=2, d_model=32, n_head=4, n_kv_head=2, max_seq_len=32,
                 attn_impl=attn_impl, qk_norm=name == "llama")
    model = build_model(cfg).eval()
    ids = torch.randint(0, 50, (2, 12))
    full = model(ids)
    cache = model.new_cache(2)
    steps = [model(ids[:, :5], cache=cache)] + [model(ids[:, i:i + 1], cache=cache) for i in range(5, 12)]
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-5


def test_kv_cache_with_left_padding_equals_unpadded():
    torch.manual_seed(0)
    model = build_model(preset("llama", vocab_size=50, n_layer=2, d_model=32, n_head=4, max_seq_len=32)).eval()
    short, long = torch.randint(0, 50, (1, 4)), torch.randint(0, 50, (1, 7))
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], 1), long])
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :3] = 0
    cache = model.new_cache(2)
    out = model(batch, attention_mask=mask, cache=cache)
    assert (out[0, 3:] - model(short)[0]).abs().max() <= 1e-5
    assert (out[1] - model(long)[0]).abs().max() <= 1e-5
    nxt = torch.randint(0, 50, (2, 1))
    mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
    step = model(nxt, attention_mask=mask, cache=cache)
    assert (step[0, -1] - model(torch.cat([short, nxt[:1]], 1))[0, -1]).abs().max() <= 1e-5


@pytest.mark.parametrize("name", ["llama", "gpt2", "sliding"])
def test_packed_segments_equal_each_sequence_alone(name):
    """Rows packing several sequences (segment_ids) give each sequence the hidden states it has alone in a row."""
    torch.manual_seed(0)
    extra = dict(layer_types=["sliding", "full"], sliding_window=3) if name == "sliding" else {}
    cfg = preset("gpt2" if name == "gpt2" else "llama", vocab_size=50, n_layer=2, d_model=32, n_head=4,
                 max_seq_len=32, **extra)
    model = build_model(cfg).eval()
    seqs = [torch.randint(0, 50, (n,)) for n in (6, 1, 4, 5)]
    rows = torch.zeros(2, 12, dtype=torch.long)
    segments = torch.full((2, 12), -1)
    rows[0, :11], segments[0, :11] = torch.cat(seqs[:3]), torch.tensor([0] * 6 + [1] + [2] * 4)
    rows[1, :5], segments[1, :5] = seqs[3], 3
    hidden = model.hidden_states(rows, segment_ids=segments)
    packed = [hidden[0, :6], hidden[0, 6:7], hidden[0, 7:11], hidden[1, :5]]
    for seq, h in zip(seqs, packed):
        assert (h - model.hidden_states(seq[None])[0]).abs().max() <= 1e-5
    with pytest.raises(ValueError, match="segment_ids"):
        model.hidden_states(rows, segment_ids=segments, cache=model.new_cache(2))


def test_cache_overflow_is_reported():
    cache = KVCache(1, 1, 1, 4, 8)
    with pytest.raises(ValueError, match="KV cache full"):
        cache.update(0, torch.zeros(1, 1, 5, 8), torch.zeros(1, 1, 5, 8))
