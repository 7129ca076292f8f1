import copy

import pytest
import torch
from torch import nn

from llmlab.errors import LLMLabError
from llmlab.infer import quant
from llmlab.infer.engine import Engine, SamplingParams, make_decode_model
from llmlab.infer.quant import (Int4Linear, Int8Linear, dequantize_int4, perplexity, quantization_error, quantize,
                                quantize_int4)
from llmlab.model.config import preset
from llmlab.model.decoder import build_model

BF16_HALF_ULP = 2 ** -8          # one rounding to bfloat16 moves a value by at most this fraction of it


@pytest.fixture(scope="module")
def tiny(byte_tokenizer):
    torch.manual_seed(0)
    cfg = preset("llama", vocab_size=len(byte_tokenizer), n_layer=2, d_model=32, n_head=4, n_kv_head=2,
                 max_seq_len=64, eos_token_id=byte_tokenizer.eos_token_id, tie_embeddings=True)
    return build_model(cfg).eval()


def linear(n_out, n_in, bias):
    torch.manual_seed(1)
    return nn.Linear(n_in, n_out, bias=bias)


def test_int4_linear_computes_exactly_the_dequantized_formula():
    layer = linear(50, 128, bias=True)                  # 50 rows: padded to 64 for the kernel, cut off after
    x = torch.randn(3, 5, 128)
    exact = Int4Linear(layer, act_dtype=torch.float32)
    q, scales_and_zeros = quantize_int4(layer.weight, dtype=torch.float32)
    w = dequantize_int4(q, scales_and_zeros)           # (Q − 8)·s + z
    torch.testing.assert_close(exact(x), x @ w.T + layer.bias, rtol=1e-6, atol=1e-6)
    # bfloat16 activations (the fast path): the kernel accumulates in float32 and rounds the output once
    layer.bias = None
    fast = Int4Linear(layer)
    q, scales_and_zeros = quantize_int4(layer.weight, dtype=torch.bfloat16)
    reference = x.bfloat16().float() @ dequantize_int4(q, scales_and_zeros).T
    y = fast(x)
    assert y.shape == (3, 5, 50) and y.dtype == torch.float32
    torch.testing.assert_close(y, reference, rtol=BF16_HALF_ULP, atol=1e-6)


def test_int4_linear_packs_a_matrix_chunk_by_chunk_as_a_whole(monkeypatch):
    layer = linear(200, 64, bias=False)                 # padded to 208 rows: chunks of 64, 64, 64 and 16
    whole = Int4Linear(layer)
    monkeypatch.setattr(quant, "CHUNK_ROWS", 64)
    chunked = Int4Linear(layer)
    assert torch.equal(chunked.qweight, whole.qweight)
    assert torch.equal(chunked.scales_and_zeros, whole.scales_and_zeros)


def test_int8_linear_computes_exactly_the_dequantized_formula():
    layer = linear(48, 64, bias=False)
    x = torch.randn(4, 64)
    q8 = Int8Linear(layer)
    reference = x.bfloat16().float() @ (q8.qweight.float() * q8.scale.float()[:, None]).T
    torch.testing.assert_close(q8(x), reference, rtol=BF16_HALF_ULP, atol=1e-6)


def test_int4_quantization_error_is_small_and_a_4_bit_grid_is_kept_exactly():
    torch.manual_seed(0)
    w = torch.randn(32, 256) * 0.05
    q, scales_and_zeros = quantize_int4(w)
    error = (dequantize_int4(q, scales_and_zeros) - w).norm() / w.norm()
    assert q.min() >= 0 and q.max() <= 15 and error < 0.1        # about 1/15 of each group's range
    # weights already on a 4-bit grid per group of 32 (as in a GGUF Q4_1 / Q4_K file) come back unchanged
    step = torch.randint(1, 5, (32, 8, 1)) * 2.0 ** -8
    low = -torch.randint(0, 64, (32, 8, 1)) * 2.0 ** -8
    levels = torch.randint(0, 16, (32, 8, 32))
    levels[..., 0], levels[..., 1] = 0, 15
    grid = (low + step * levels).reshape(32, 256)
    assert torch.equal(dequantize_int4(*quantize_int4(grid)), grid)


def test_quantize_modes_put_the_head_where_asked(tiny):
    for mode, head_type in [("int4", Int4Linear), ("int8", Int8Linear), ("int4-head-int8", Int8Linear),
                            ("int4-head-float", nn.Linear)]:
        model = quantize(copy.deepcopy(tiny), mode)
        body = Int8Linear if mode.startswith("int8") else Int4Linear
        assert all(type(block.attn.qkv) is body and type(block.mlp.down) is body for block in model.blocks)
        assert type(model.lm_head) is head_type, mode
        # the embedding lookup keeps its float table; only the head is quantised (tied: a separate copy)
        assert isinstance(model.embed, nn.Embedding) and torch.equal(model.embed.weight, tiny.embed.weight)
        if head_type is nn.Linear:
            assert model.lm_head.weight is model.embed.weight
    assert tiny.lm_head.weight is tiny.embed.weight and type(tiny.lm_head) is nn.Linear


def test_layers_the_int4_kernel_cannot_take_fall_back_to_int8_with_a_warning():
    model = build_model(preset("llama", vocab_size=320, n_layer=1, d_model=128, n_head=4, max_seq_len=64))
    with pytest.warns(UserWarning, match=r"int8 for: blocks\.0\.mlp\.down \(in_features 352\)$"):
        quantize(model, "int4", group_size=64)                  # 352 inputs are no whole number of groups of 64
    assert type(model.blocks[0].mlp.down) is Int8Linear and type(model.blocks[0].mlp.up) is Int4Linear


def test_unknown_mode_or_group_is_a_clear_error(tiny, byte_tokenizer):
    with pytest.raises(LLMLabError, match="quantize='int3': choose one of int8, int4"):
        Engine(tiny, byte_tokenizer, quantize="int3")
    with pytest.raises(LLMLabError, match="group size 16"):
        quantize(copy.deepcopy(tiny), "int4", group_size=16)


def test_int4_decode_runs_through_the_engine_with_close_logits(tiny, byte_tokenizer):
    params = SamplingParams(max_new_tokens=12, temperature=0)
    exact = Engine(tiny, byte_tokenizer, eos_token_ids=[]).generate([[5, 6, 7], [40, 41]], params)
    outs = Engine(tiny, byte_tokenizer, eos_token_ids=[], quantize="int4").generate([[5, 6, 7], [40, 41]], params)
    for o, e in zip(outs, exact):
        assert len(o.token_ids) == 12 and o.token_ids[0] == e.token_ids[0]    # prefill stays float32
    decode_model = make_decode_model(tiny, None, "int4")
    err = quantization_error(tiny, decode_model, torch.randint(0, 300, (2, 24)))
    assert err["mean_kl"] < 1e-3 and err["top1_agreement"] >= 0.9


@torch.no_grad()
def test_perplexity_is_the_exponentiated_mean_cross_entropy(tiny):
    ids = torch.randint(3, 300, (40,))
    logits = tiny(ids[None])[0, :-1]
    nll = torch.nn.functional.cross_entropy(logits, ids[1:])
    assert perplexity(tiny, ids, window=64) == pytest.approx(float(nll.exp()), rel=1e-5)
    # two windows of 20, each scored from its own start; after a BOS the window's first token is still context
    halves = [torch.nn.functional.cross_entropy(tiny(torch.cat([torch.tensor([1]), h])[None])[0, 1:-1], h[1:],
                                                reduction="sum") for h in ids.split(20)]
    assert perplexity(tiny, ids, window=20, bos_id=1) == pytest.approx(float((sum(halves) / 38).exp()), rel=1e-5)


def test_transformers_models_decode_in_int4_with_their_head_quantized(byte_tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=len(byte_tokenizer), hidden_size=64, intermediate_size=128,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64, tie_word_embeddings=True)).eval()
    decode_model = make_decode_model(hf, None, "int4")
    assert type(decode_model.lm_head) is Int4Linear and isinstance(decode_model.model.embed_tokens, nn.Embedding)
    params = SamplingParams(max_new_tokens=6, temperature=0)
    out = Engine(hf, byte_tokenizer, eos_token_ids=[], quantize="int4").generate([[5, 6, 7]], params)[0].token_ids
    exact = Engine(hf, byte_tokenizer, eos_token_ids=[]).generate([[5, 6, 7]], params)[0].token_ids
    assert len(out) == 6 and out[0] == exact[0]
