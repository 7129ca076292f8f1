import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from llmlab.errors import LLMLabError
from llmlab.infer.engine import (Engine, GreedyHead, SamplingParams, TextStream, apply_repetition_penalty,
                                 filter_top_k_top_p)
from llmlab.model.config import preset
from llmlab.model.decoder import build_model


@pytest.fixture(scope="module")
def our_model(byte_tokenizer):
    torch.manual_seed(0)
    cfg = preset("llama", vocab_size=len(byte_tokenizer), n_layer=2, d_model=32, n_head=4, n_kv_head=2,
                 max_seq_len=64, eos_token_id=byte_tokenizer.eos_token_id)
    return build_model(cfg).eval()


def naive_greedy(model, ids, n):
    """Reference: recompute the whole sequence each step, no cache, no padding."""
    ids = list(ids)
    out = []
    for _ in range(n):
        nxt = int(model(torch.tensor([ids]))[0, -1].argmax())
        out.append(nxt)
        ids.append(nxt)
    return out


def test_batched_greedy_equals_naive_loop(our_model, byte_tokenizer):
    engine = Engine(our_model, byte_tokenizer, eos_token_ids=[])
    prompts = [[5, 6, 7], [8, 9, 10, 11, 12, 13, 14], [20]]
    outs = engine.generate(prompts, SamplingParams(max_new_tokens=12, temperature=0))
    for p, o in zip(prompts, outs):
        assert o.token_ids == naive_greedy(our_model, p, 12)
        assert o.finish_reason == "length" and o.prompt_tokens == len(p)


def test_batch_one_greedy_equals_naive_loop(our_model, byte_tokenizer):
    """Batch-1 greedy decoding takes the GreedyHead path; it must pick float32's argmax at every step."""
    engine = Engine(our_model, byte_tokenizer, eos_token_ids=[])
    for prompt in ([5, 6, 7], [20], list(range(30, 60))):
        out = engine.generate([prompt], SamplingParams(max_new_tokens=30, temperature=0))[0]
        assert out.token_ids == naive_greedy(our_model, prompt, 30)
    assert engine.lm.greedy_head is not None


def test_greedy_head_finds_float32s_argmax_among_its_candidates():
    torch.manual_seed(0)
    weight = torch.randn(5000, 64) * torch.rand(5000, 1) * 4
    weight[1] = weight[0] * (1 + 1e-6)          # near-ties that int8 alone cannot separate
    weight[7] = weight[3] + 1e-5
    head = GreedyHead(weight)
    for scale in (0.01, 1.0, 30.0):
        hiddens = []
        for _ in range(100):
            hidden = torch.randn(1, 64) * scale
            if torch.rand(()) < 0.3:            # aim at a near-tie pair
                hidden = (weight[0] if torch.rand(()) < 0.5 else weight[3])[None] * scale
            hiddens.append(hidden)
            logits = head(hidden)
            exact = hidden @ weight.T
            assert int(logits.argmax()) == int(exact.argmax())
            kept = torch.isfinite(logits)
            assert torch.allclose(logits[kept], exact[kept], rtol=1e-6, atol=1e-5)
            assert kept.sum() < 5000
        several = torch.cat(hiddens)            # several positions at once, as a speculative checking pass reads them
        assert head.argmax(several) == (several @ weight.T).argmax(-1).tolist()


def test_greedy_head_bound_holds_and_flat_logits_take_the_whole_head():
    """The float32 argmax is always among the candidates the int8 bound leaves; when nearly every row is one (rows
    that differ by less than the bound), the whole float32 product decides."""
    torch.manual_seed(1)
    weight = torch.randn(4096, 96) * 0.05
    head = GreedyHead(weight)
    hidden = torch.randn(8, 96) * 40
    exact = hidden @ weight.T
    for h, rows, e in zip(hidden, head.candidates(hidden), exact):
        assert int(e.argmax()) in rows.tolist()
    flat = torch.ones(4096, 96) + torch.randn(4096, 96) * 1e-4
    head = GreedyHead(flat)
    rows = head.candidates(hidden[:1])[0]
    assert len(rows) > 4096 // 64
    assert head.argmax(hidden[:1]) == [int((hidden[0] @ flat.T).argmax())]


def test_greedy_equals_transformers_generate_for_hf_models(byte_tokenizer):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=len(byte_tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64)).eval()
    engine = Engine(hf, byte_tokenizer, eos_token_ids=[])
    prompt = byte_tokenizer.encode("hello world", add_special_tokens=False)
    ours = engine.generate([prompt, [3, 4]], SamplingParams(max_new_tokens=10, temperature=0))[0].token_ids
    ref = hf.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False, eos_token_id=None,
                      pad_token_id=byte_tokenizer.pad_token_id)[0, len(prompt):].tolist()
    assert ours == ref


def test_each_row_stops_at_its_own_eos(our_model, byte_tokenizer):
    free = Engine(our_model, byte_tokenizer, eos_token_ids=[]).generate(
        [[5, 6], [30, 31]], SamplingParams(max_new_tokens=10, temperature=0))
    eos = free[0].token_ids[3]                       # make row 0's 4th token the end-of-sequence token
    engine = Engine(our_model, byte_tokenizer, eos_token_ids=[eos])
    outs = engine.generate([[5, 6], [30, 31]], SamplingParams(max_new_tokens=10, temperature=0))
    assert outs[0].token_ids == free[0].token_ids[:3] and outs[0].finish_reason == "stop"
    cut = free[1].token_ids.index(eos) if eos in free[1].token_ids else 10
    assert outs[1].token_ids == free[1].token_ids[:cut]


def test_stop_string_truncates_text(our_model, byte_tokenizer):
    engine = Engine(our_model, byte_tokenizer, eos_token_ids=[])
    free = engine.generate(["hello"], SamplingParams(max_new_tokens=16, temperature=0))[0].text
    stop = free[3:5]
    out = engine.generate(["hello"], SamplingParams(max_new_tokens=16, temperature=0, stop=[stop]))[0]
    assert out.text == free[:free.index(stop)] and out.finish_reason == "stop"
    assert "".join(engine.stream("hello", SamplingParams(max_new_tokens=16, temperature=0, stop=[stop]))) == out.text


def test_stream_never_splits_multibyte_characters(byte_tokenizer):
    text = "a你好🙂b ünï"
    ids = [byte_tokenizer.convert_tokens_to_ids(t) for t in
           byte_tokenizer.convert_ids_to_tokens(byte_tokenizer.encode(text, add_special_tokens=False))]
    # feed byte by byte: encode each byte's token separately
    byte_ids = []
    for ch in text:
        byte_ids += byte_tokenizer.encode(ch, add_special_tokens=False)
    stream = TextStream(byte_tokenizer, stop=[])
    pieces = [stream.add(i) for i in byte_ids] + [stream.flush()]
    assert "".join(pieces) == text and all("\ufffd" not in p for p in pieces)
    assert ids  # the tokenizer really encodes the text


def test_stream_holds_back_possible_stop_prefix(byte_tokenizer):
    stream = TextStream(byte_tokenizer, stop=["END"])
    pieces = [stream.add(i) for i in byte_tokenizer.encode("abcEN", add_special_tokens=False)]
    assert "".join(pieces) == "abc"
    pieces += [stream.add(i) for i in byte_tokenizer.encode("D tail", add_special_tokens=False)]
    assert "".join(pieces) == "abc" and stream.stopped


def test_stream_cuts_at_the_earliest_stop_string_when_one_token_holds_two():
    class Pieces:                       # a tokenizer whose token 1 decodes to ".\n"
        words = ["Hello", ".\n", " more"]

        def decode(self, ids, skip_special_tokens=True):
            return "".join(self.words[i] for i in ids)

    for stop in (["\n", "."], [".", "\n"]):
        stream = TextStream(Pieces(), stop=stop)
        assert stream.add(0) + stream.add(1) == "Hello" and stream.stopped, stop


def test_stream_can_drop_the_leading_space_of_a_chat_reply(byte_tokenizer):
    ids = byte_tokenizer.encode("  It is 4. ", add_special_tokens=False)
    stripped = TextStream(byte_tokenizer, stop=[], lstrip=True)
    assert "".join([stripped.add(i) for i in ids] + [stripped.flush()]) == "It is 4. "
    kept = TextStream(byte_tokenizer, stop=[])
    assert "".join([kept.add(i) for i in ids] + [kept.flush()]) == "  It is 4. "


def test_sampling_is_reproducible_with_a_seed(our_model, byte_tokenizer):
    engine = Engine(our_model, byte_tokenizer, eos_token_ids=[])
    params = SamplingParams(max_new_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=123)
    a = engine.generate(["hello", "fox"], params)
    b = engine.generate(["hello", "fox"], params)
    assert [o.token_ids for o in a] == [o.token_ids for o in b]


def test_top_k_and_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.25, 0.15, 0.1]]))
    assert torch.isinf(filter_top_k_top_p(logits, 2, 1.0)).tolist() == [[False, False, True, True]]
    # mass before token: 0, .5, .75, .9 → with top_p = 0.7 keep the first two
    assert torch.isinf(filter_top_k_top_p(logits, 0, 0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_top_k_top_p(logits, 0, 0.3)).tolist() == [[False, True, True, True]]


def test_repetition_penalty():
    logits = torch.tensor([[2.0, -2.0, 1.0]])
    seen = torch.tensor([[True, True, False]])
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 1.0]]


def test_bad_requests_are_rejected(our_model, byte_tokenizer):
    engine = Engine(our_model, byte_tokenizer)
    with pytest.raises(LLMLabError, match="context of 64"):
        engine.generate([[5] * 64])
    with pytest.raises(LLMLabError, match="empty prompt"):
        engine.generate([[]])
    with pytest.raises(LLMLabError, match="top_p"):
        engine.generate(["hi"], SamplingParams(top_p=0))


def test_int8_weights_stay_close_to_float32(our_model):
    import copy

    from llmlab.infer.quant import Int8Linear, quantization_error, quantize_int8
    quantized = quantize_int8(copy.deepcopy(our_model))
    assert not any(isinstance(m, torch.nn.Linear) for m in quantized.modules())
    assert any(isinstance(m, Int8Linear) for m in quantized.modules())
    err = quantization_error(our_model, quantized, torch.randint(0, 300, (2, 24)))
    assert err["mean_kl"] < 1e-3 and err["top1_agreement"] >= 0.9


@pytest.mark.parametrize("options", [dict(decode_dtype=torch.bfloat16), dict(quantize="int8"),
                                     dict(decode_dtype=torch.bfloat16, quantize="int8"), dict(quantize="int4")])
def test_per_phase_precision_decodes_close_to_float32(our_model, byte_tokenizer, options):
    params = SamplingParams(max_new_tokens=8, temperature=0)
    exact = Engine(our_model, byte_tokenizer, eos_token_ids=[]).generate([[5, 6, 7]], params)[0].token_ids
    engine = Engine(our_model, byte_tokenizer, eos_token_ids=[], **options)
    assert engine.model is our_model and next(our_model.parameters()).dtype == torch.float32
    out = engine.generate([[5, 6, 7]], params)[0].token_ids
    assert len(out) == 8 and out[0] == exact[0]     # prefill is float32: its token is exact


def test_hf_model_decodes_in_bfloat16_after_float32_prefill(byte_tokenizer):
    torch.manual_seed(0)
    hf = LlamaForCausalLM(LlamaConfig(vocab_size=len(byte_tokenizer), hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                      max_position_embeddings=64)).eval()
    exact = Engine(hf, byte_tokenizer, eos_token_ids=[]).generate([[5, 6, 7]], SamplingParams(8, temperature=0))
    out = Engine(hf, byte_tokenizer, eos_token_ids=[], decode_dtype=torch.bfloat16).generate(
        [[5, 6, 7]], SamplingParams(8, temperature=0))
    assert out[0].token_ids[0] == exact[0].token_ids[0] and len(out[0].token_ids) == 8
