"""Speculative greedy decoding with prompt lookup (``llmlab/infer/speculative.py``): the tokens of plain greedy
decoding, in fewer forward passes, on llmlab's Llama and Gemma 3 (sliding-window) decoders."""
import pytest
import torch

from llmlab.infer.engine import Engine, OurLM, SamplingParams
from llmlab.infer.speculative import PromptLookup, accepted_length
from llmlab.model.attention import KVCache
from llmlab.model.config import preset
from llmlab.model.decoder import build_model
from conftest import count_passes
from test_gemma import tiny_gemma3


def test_prompt_lookup_drafts_what_followed_the_latest_earlier_occurrence():
    assert PromptLookup([1, 2, 3, 9, 5, 2, 3]).draft(2) == []              # by default trigrams only
    assert PromptLookup([1, 2, 3, 9, 5, 1, 2, 3]).draft(2) == [9, 5]
    lookup = PromptLookup([1, 2, 3, 9, 1, 2, 3, 7, 8, 5, 2, 3], sizes=(3, 2))
    assert lookup.draft(3) == [7, 8, 5]          # "2 3" last came before 7 8 5 (the trigram 5 2 3 is new)
    assert lookup.draft(7) == [7, 8, 5, 2, 3, 7, 8]   # past the sequence's end: its period repeats
    assert PromptLookup([4, 4, 4, 4]).draft(3) == [4, 4, 4]
    assert lookup.draft(0) == []
    lookup.append(4)                             # "3 4" never occurred: no draft
    assert lookup.draft(3) == []
    assert PromptLookup([1, 2, 3]).draft(4) == []   # the final n-gram never matches itself
    trigram = PromptLookup([6, 2, 3, 1, 9, 2, 3, 4, 6, 2, 3], sizes=(3, 2))
    assert trigram.draft(2) == [1, 9]            # "6 2 3" (n = 3) wins over the later "2 3" → 4


def test_accepted_length_counts_the_draft_tokens_the_model_would_have_chosen():
    assert accepted_length([4, 5, 6], [4, 5, 7, 1]) == 2
    assert accepted_length([4, 5, 6], [1, 5, 6, 1]) == 0
    assert accepted_length([4, 5, 6], [4, 5, 6, 1]) == 3


def test_cache_truncate_keeps_a_prefix_only():
    cache = KVCache(1, 1, 1, 8, 2)
    cache.advance(5)
    cache.truncate(3)
    assert cache.length == 3
    with pytest.raises(ValueError, match="truncate"):
        cache.truncate(4)


def llama(vocab: int):
    torch.manual_seed(0)
    return build_model(preset("llama", vocab_size=vocab, n_layer=2, d_model=32, n_head=4, n_kv_head=2,
                              max_seq_len=128)).eval()


def gemma():
    from llmlab.hub.mapping import config_from_hf, load_hf_state_dict
    from llmlab.model.decoder import Decoder
    theirs = tiny_gemma3()
    ours = Decoder(config_from_hf(theirs.config))
    load_hf_state_dict(ours, theirs.state_dict())
    return ours.eval()


@pytest.mark.parametrize("make", [llama, gemma], ids=["llama", "gemma3-sliding-window"])
@pytest.mark.parametrize("budget", [1, 2, 7, 60])
def test_speculative_greedy_gives_plain_greedys_tokens_in_fewer_passes(byte_tokenizer, make, budget):
    model = make(len(byte_tokenizer)) if make is llama else make()
    vocab = model.config.vocab_size
    plain = Engine(model, byte_tokenizer, eos_token_ids=[], speculative_tokens=0)
    fast = Engine(model, byte_tokenizer, eos_token_ids=[], speculative_tokens=4)
    passes = count_passes(fast)
    prompt = [t % vocab for t in [5, 17, 42, 9, 33, 5, 17, 42, 9, 71]]
    seed = plain.generate([prompt], SamplingParams(max_new_tokens=20, temperature=0))[0].token_ids
    prompt = prompt + seed + prompt     # the continuation after the repeat is likely to repeat too: drafts
    params = SamplingParams(max_new_tokens=budget, temperature=0)
    want = plain.generate([prompt], params)[0]
    got = fast.generate([prompt], params)[0]
    n = min(budget, model.config.max_seq_len - len(prompt))
    assert got.token_ids == want.token_ids and len(got.token_ids) == n
    assert got.finish_reason == want.finish_reason == "length"
    if budget == 60:
        assert passes["passes"] <= n - 1 - 8            # at least 8 tokens came from accepted drafts


def test_speculative_decoding_stops_at_an_eos_inside_an_accepted_draft(byte_tokenizer):
    model = llama(len(byte_tokenizer))
    prompt = [5, 17, 42, 9, 33] * 4
    free = Engine(model, byte_tokenizer, eos_token_ids=[], speculative_tokens=0).generate(
        [prompt], SamplingParams(max_new_tokens=30, temperature=0))[0].token_ids
    eos = free[12]
    want = Engine(model, byte_tokenizer, eos_token_ids=[eos], speculative_tokens=0).generate(
        [prompt], SamplingParams(max_new_tokens=30, temperature=0))[0]
    got = Engine(model, byte_tokenizer, eos_token_ids=[eos], speculative_tokens=8).generate(
        [prompt], SamplingParams(max_new_tokens=30, temperature=0))[0]
    assert got.token_ids == want.token_ids == free[:free.index(eos)] and got.finish_reason == "stop"


def test_sampling_and_batches_do_not_speculate(byte_tokenizer):
    model = llama(len(byte_tokenizer))
    engine = Engine(model, byte_tokenizer, eos_token_ids=[], speculative_tokens=4)
    passes = count_passes(engine)
    engine.generate([[5, 6, 7, 5, 6, 7]], SamplingParams(max_new_tokens=5, temperature=0.8, seed=0))
    engine.generate([[5, 6, 7, 5, 6], [8, 9]], SamplingParams(max_new_tokens=5, temperature=0))
    assert passes["passes"] == 0


@pytest.mark.parametrize("make", [llama, gemma], ids=["llama", "gemma3-sliding-window"])
def test_a_pass_over_several_tokens_after_a_truncated_cache_equals_one_token_at_a_time(make):
    """What a verification pass relies on: the causal (and 8-token sliding-window) masks of a multi-token step after
    a cache, and a truncated cache whose stale positions are overwritten."""
    model = make(300) if make is llama else make()
    torch.manual_seed(1)
    prompt, draft, other = (torch.randint(0, 300, (1, n)) for n in (40, 6, 6))

    def stepwise(tokens):
        cache = model.new_cache(1, 64)
        model.hidden_states(prompt, cache=cache)
        return torch.cat([model.logits(model.hidden_states(tokens[:, i:i + 1], cache=cache)[0])
                          for i in range(tokens.shape[1])])

    with torch.no_grad():
        cache = model.new_cache(1, 64)
        model.hidden_states(prompt, cache=cache)
        at_once = model.logits(model.hidden_states(draft, cache=cache)[0])
        assert torch.allclose(at_once, stepwise(draft), atol=1e-5)
        cache.truncate(40 + 2)                   # keep two draft tokens, feed four others over the stale ones
        rest = model.logits(model.hidden_states(other[:, 2:], cache=cache)[0])
        assert torch.allclose(rest, stepwise(torch.cat([draft[:, :2], other[:, 2:]], 1))[2:], atol=1e-5)


def test_greedy_after_reads_choices_up_to_the_first_rejected_draft_token():
    """The checking pass reads greedy choices chunk by chunk (2, 4, 8 positions) and stops at the first that
    rejects the draft; what it returns must be float32's argmax at each of those positions."""
    model = llama(300)
    torch.manual_seed(2)
    prompt = torch.randint(0, 300, (1, 20))

    def after_prompt():
        cache = model.new_cache(1, 64)
        model.hidden_states(prompt, cache=cache)
        return cache

    with torch.no_grad():
        cache, tokens = after_prompt(), [7]
        for _ in range(9):                       # the model's own greedy continuation: a draft accepted whole
            logits = model.logits(model.hidden_states(torch.tensor([tokens[-1:]]), cache=cache)[0, -1])
            tokens.append(int(logits.argmax()))
        lm = OurLM(model)
        for wrong_at in (1, 2, 3, 6, None):      # rejections in the first, second and third chunk
            fed = list(tokens)
            if wrong_at is not None:
                fed[wrong_at] = (fed[wrong_at] + 1) % 300
            full = model.logits(model.hidden_states(torch.tensor([fed]), cache=after_prompt())[0]).argmax(-1)
            lm.prefill(prompt, torch.ones_like(prompt), 64)
            greedy = lm.greedy_after(fed)
            assert len(greedy) == (len(fed) if wrong_at is None else wrong_at)
            assert greedy == full[:len(greedy)].tolist()
        assert lm.greedy_head is not None
