"""Gemma 3 in our Decoder: (1 + w) norms folded on import, sandwich norms, GeGLU, √d_model embeddings, the
query_pre_attn_scalar, and sliding-window layers with their own RoPE θ, against transformers' Gemma3ForCausalLM."""
import dataclasses

import pytest
import torch
import transformers

from llmlab.errors import LLMLabError
from llmlab.hub.load import load_model
from llmlab.hub.mapping import load_hf_state_dict
from llmlab.hub.save import save_model
from llmlab.infer.engine import Engine, SamplingParams
from llmlab.model.config import preset
from llmlab.model.decoder import Decoder, build_model
from conftest import logit_error

transformers.logging.set_verbosity_error()
TOL = 1e-4
WINDOW = 8


def tiny_gemma3(vocab_size: int = 300, seed: int = 0) -> transformers.Gemma3ForCausalLM:
    """Two sliding and two full layers, GQA with one K/V head, head_dim ≠ d_model / n_head, and every weight
    random (norm weights w ≠ 0, so that folding 1 + w is really exercised)."""
    config = transformers.Gemma3TextConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=1, head_dim=32, query_pre_attn_scalar=24, max_position_embeddings=64,
        sliding_window=WINDOW, layer_types=["sliding_attention", "full_attention"] * 2,
        rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                         "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}})
    torch.manual_seed(seed)
    model = transformers.Gemma3ForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.3 if p.dim() == 1 else 0.2)
    return model.eval()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(transformers' model, ours loaded by load_model from its saved folder)."""
    theirs = tiny_gemma3()
    folder = tmp_path_factory.mktemp("gemma3")
    theirs.save_pretrained(folder)
    ours = load_model(folder)
    return theirs, ours


def test_load_model_returns_our_decoder(pair):
    _, ours = pair
    cfg = ours.config
    assert isinstance(ours, Decoder) and not ours.training
    assert cfg.layer_types == ["sliding", "full"] * 2 and cfg.sliding_window == WINDOW
    assert cfg.rope_theta == 1e6 and cfg.rope_local_theta == 1e4 and cfg.attn_scale == 24 ** -0.5
    assert cfg.mlp == "geglu" and cfg.post_block_norms and cfg.embed_scale and cfg.qk_norm and cfg.head_dim == 32


@pytest.mark.parametrize("attn_impl", ["sdpa", "math"])
@pytest.mark.parametrize("padded", [False, True])
def test_logits_equal_transformers_past_the_window(pair, padded, attn_impl):
    theirs, ours = pair
    ours = build_model(dataclasses.replace(ours.config, attn_impl=attn_impl)).eval()
    load_hf_state_dict(ours, theirs.state_dict())
    x = torch.randint(0, 300, (2, 3 * WINDOW), generator=torch.Generator().manual_seed(1))
    assert logit_error(ours, theirs, x, padded) <= TOL


@pytest.mark.parametrize("attn_impl", ["sdpa", "math"])
def test_kv_cache_decoding_past_the_window_equals_full_forward(pair, attn_impl):
    _, ours = pair
    model = build_model(dataclasses.replace(ours.config, attn_impl=attn_impl)).eval()
    model.load_state_dict(ours.state_dict())
    x = torch.randint(0, 300, (2, 3 * WINDOW), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2)
        steps = [model(x[:, :5], cache=cache)] + [model(x[:, i:i + 1], cache=cache) for i in range(5, x.shape[1])]
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-5


def test_engine_greedy_equals_transformers_generate(pair, byte_tokenizer):
    theirs, ours = pair
    prompts = [list(range(10, 10 + 2 * WINDOW - 3)), [7, 8, 9]]      # one longer than the window, one padded
    outs = Engine(ours, byte_tokenizer, eos_token_ids=[]).generate(prompts, SamplingParams(12, temperature=0))
    for prompt, out in zip(prompts, outs):
        ref = theirs.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(prompt):].tolist()
        assert out.token_ids == ref
    fast = Engine(ours, byte_tokenizer, eos_token_ids=[], decode_dtype=torch.bfloat16)
    out = fast.generate(prompts[:1], SamplingParams(12, temperature=0))[0].token_ids
    assert len(out) == 12 and out[0] == outs[0].token_ids[0]          # prefill is float32: its token is exact


def test_export_round_trips_through_transformers(pair, tmp_path):
    _, ours = pair
    model = build_model(ours.config).eval()
    torch.manual_seed(3)
    with torch.no_grad():       # gains g in [0.5, 2]: there g − 1 and (g − 1) + 1 are exact in float32
        for p in model.parameters():
            p.uniform_(0.6, 1.4) if p.dim() == 1 else p.normal_(0.0, 0.2)
    save_model(model, tmp_path / "m")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(theirs).__name__ == "Gemma3ForCausalLM"
    x = torch.randint(0, 300, (2, 3 * WINDOW), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        assert (model(x) - theirs(x).logits).abs().max() <= TOL
    back = load_model(tmp_path / "m")
    assert back.config == model.config
    assert all(torch.equal(p, back.get_parameter(name)) for name, p in model.named_parameters())


def test_unsupported_gemma3_variants_run_in_transformers(tmp_path):
    theirs = tiny_gemma3()
    theirs.config.final_logit_softcapping = 30.0
    theirs.save_pretrained(tmp_path / "capped")
    model = load_model(tmp_path / "capped")
    assert isinstance(model, transformers.Gemma3ForCausalLM)


@pytest.mark.parametrize("overrides, message", [
    (dict(layer_types=["sliding", "full"]), "sliding_window"),
    (dict(layer_types=["full"]), "layer_types"),
    (dict(layer_types=["sliding", "local"], sliding_window=4), "layer_types"),
    (dict(norm_position="post"), "post_block_norms"),
])
def test_config_errors(overrides, message):
    with pytest.raises(LLMLabError, match=message):
        preset("gemma3", n_layer=2, **overrides)
