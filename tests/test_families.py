"""The course's model families in our Decoder, each against transformers on a tiny random configuration: Gemma 2
(soft-capped attention and logits, alternating sliding-window layers, sandwich norms), Llama 3.1 (llama3 RoPE
frequency scaling), Qwen2 (q/k/v biases; sliding-window layers) and SmolLM2 (Llama with tied embeddings).
Import (logits, greedy generation), export (our save_model → transformers), the config round trip, and one step
of SFT, LoRA and DPO on each trainable family."""
import dataclasses
import json
import math

import pytest
import torch
import transformers
from safetensors.torch import load_file

from llmlab import chat
from llmlab.errors import LLMLabError
from llmlab.hub.load import load_model, load_our_model, read_weights
from llmlab.hub.mapping import config_from_hf, config_to_hf
from llmlab.hub.save import save_model
from llmlab.infer.engine import Engine, SamplingParams
from llmlab.losses import lm_loss, token_logprobs
from llmlab.model.attention import llama3_frequencies
from llmlab.model.config import preset
from llmlab.model.decoder import Decoder, build_model
from llmlab.stages.common import deep_merge
from llmlab.stages.dpo import DEFAULTS as DPO_DEFAULTS
from llmlab.stages.dpo import run as run_dpo
from llmlab.stages.pretrain import CausalLM
from llmlab.stages.logprobs import token_logps
from llmlab.stages.sft import run as run_sft
from llmlab.tokenizer import train_bpe
from conftest import logit_error
from test_sft import sft_recipe, write_jsonl

transformers.logging.set_verbosity_error()
TOL = 1e-4
WINDOW = 8
VOCAB = 300
LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 64}


pytestmark = pytest.mark.usefixtures("single_threaded")


def hf_config(family: str, vocab_size: int = VOCAB, **ids):
    """A tiny transformers config of ``family``: GQA everywhere, layers that slide past WINDOW where the family
    has them, soft-caps small enough that tanh bends (Gemma 2), all three regimes of the llama3 frequencies."""
    common = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=96, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=64, **ids)
    if family == "gemma2":       # transformers' default layer_types: sliding, full, sliding, full
        return transformers.Gemma2Config(num_hidden_layers=4, head_dim=32, query_pre_attn_scalar=24,
                                         sliding_window=WINDOW, attn_logit_softcapping=3.0,
                                         final_logit_softcapping=2.0, **common)
    if family == "llama3.1":     # head_dim 16, θ = 10⁴: wavelengths 6.3 (kept), 20 and 63 (blended), ≥ 199 (÷ 8)
        return transformers.LlamaConfig(num_hidden_layers=2, tie_word_embeddings=False,
                                        rope_parameters={"rope_theta": 10000.0, **LLAMA3_ROPE}, **common)
    if family == "qwen2":        # Qwen2.5-7B style: untied
        return transformers.Qwen2Config(num_hidden_layers=2, tie_word_embeddings=False, **common)
    if family == "qwen2-sliding":    # layers ≥ max_window_layers slide; tied as Qwen2.5-0.5B
        return transformers.Qwen2Config(num_hidden_layers=3, use_sliding_window=True, sliding_window=WINDOW,
                                        max_window_layers=1, tie_word_embeddings=True, **common)
    assert family == "smollm2"   # Llama with tied embeddings, 3 query heads per K/V head
    return transformers.LlamaConfig(**{**common, "num_attention_heads": 3, "num_key_value_heads": 1,
                                       "hidden_size": 48, "intermediate_size": 128}, num_hidden_layers=2,
                                    head_dim=16, tie_word_embeddings=True, rms_norm_eps=1e-5,
                                    rope_parameters={"rope_type": "default", "rope_theta": 100000.0})


FAMILIES = ("gemma2", "llama3.1", "qwen2", "qwen2-sliding", "smollm2")
HF_CLASS = {"gemma2": "Gemma2ForCausalLM", "llama3.1": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
            "qwen2-sliding": "Qwen2ForCausalLM", "smollm2": "LlamaForCausalLM"}


def randomize(model, gemma: bool, seed: int = 0):
    """Every weight random: matrices N(0, 0.2); Gemma's (1 + w) norm weights w ~ N(0, 0.3) (so folding is
    exercised); other norm gains and the biases 1 + N(0, 0.2)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.2)
            else:
                p.normal_(0.0, 0.3) if gemma else p.normal_(1.0, 0.2)
    return model.eval()


def tiny_hf(family: str, **kw):
    cfg = hf_config(family, **kw)
    return randomize(getattr(transformers, HF_CLASS[family])(cfg), gemma=family == "gemma2")


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """family → (family, transformers' model, ours loaded by load_model from its saved folder, that folder),
    each built on first use."""
    built = {}

    def get(family):
        if family not in built:
            theirs = tiny_hf(family)
            folder = tmp_path_factory.mktemp(family)
            theirs.save_pretrained(folder)
            built[family] = family, theirs, load_model(folder), folder
        return built[family]
    return get


@pytest.fixture(params=FAMILIES)
def pair(request, pairs):
    return pairs(request.param)


@pytest.fixture
def gemma2(pairs):
    return pairs("gemma2")[2]


def tokens(seed: int, t: int = 3 * WINDOW, batch: int = 2):
    return torch.randint(0, VOCAB, (batch, t), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------------- import: transformers → ours

def test_load_model_maps_each_family_onto_our_decoder(pair):
    family, theirs, ours, folder = pair
    cfg = ours.config
    assert isinstance(ours, Decoder) and not ours.training
    assert cfg.tie_embeddings == theirs.config.tie_word_embeddings
    stored = load_file(folder / "model.safetensors")
    assert ("lm_head.weight" in stored) == (not cfg.tie_embeddings)     # tied: the head is not stored
    if family == "gemma2":
        assert cfg.layer_types == ["sliding", "full"] * 2 and cfg.sliding_window == WINDOW
        assert (cfg.attn_softcap, cfg.logit_softcap, cfg.attn_scale) == (3.0, 2.0, 24 ** -0.5)
        assert cfg.post_block_norms and cfg.embed_scale and not cfg.qk_norm and cfg.mlp == "geglu"
    elif family.startswith("qwen2"):
        assert cfg.qkv_bias and not cfg.bias and cfg.mlp == "swiglu"
        if family == "qwen2-sliding":
            assert cfg.layer_types == ["full", "sliding", "sliding"] and cfg.sliding_window == WINDOW
    elif family == "llama3.1":
        assert cfg.rope_scaling == LLAMA3_ROPE
    else:
        assert cfg.n_kv_head == 1 and cfg.head_dim == 16 and cfg.rope_theta == 1e5


@pytest.mark.parametrize("padded", [False, True])
def test_logits_equal_transformers_past_the_window(pair, padded):
    _, theirs, ours, _ = pair
    x = tokens(1)
    assert logit_error(ours, theirs, x, padded) <= TOL


def test_engine_greedy_equals_transformers_generate(pair, byte_tokenizer):
    _, theirs, ours, _ = pair
    prompts = [list(range(10, 10 + 2 * WINDOW - 3)), [7, 8, 9]]      # one longer than the window, one padded
    outs = Engine(ours, byte_tokenizer, eos_token_ids=[]).generate(prompts, SamplingParams(12, temperature=0))
    for prompt, out in zip(prompts, outs):
        ref = theirs.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False, eos_token_id=None,
                              pad_token_id=0)[0, len(prompt):].tolist()
        assert out.token_ids == ref


def test_training_log_probs_equal_transformers(pair):
    """SFT, DPO and PPO score tokens through the LM head on the kept positions only (soft-capped for Gemma 2)."""
    _, theirs, ours, _ = pair
    x = tokens(8)
    labels = torch.cat([x[:, 1:], torch.full((2, 1), -100)], 1)
    labels[0, :6] = -100
    keep = labels != -100
    with torch.no_grad():
        got, kept = token_logps(ours, {"input_ids": x, "labels": labels})
        ref = token_logprobs(theirs(x).logits[keep], labels[keep])
    assert torch.equal(kept, keep) and (got - ref).abs().max() <= TOL


# ------------------------------------------------------------------------------- export: ours → transformers

def test_export_round_trips_through_transformers(pair, tmp_path):
    family, _, ours, _ = pair
    cfg = ours.config
    hf = config_to_hf(cfg)
    assert hf.architectures == [HF_CLASS[family]] and config_from_hf(hf) == cfg
    model = build_model(cfg).eval()
    torch.manual_seed(3)
    with torch.no_grad():       # gains g in [0.6, 1.4]: there Gemma's g − 1 and (g − 1) + 1 are exact in float32
        for p in model.parameters():
            p.uniform_(0.6, 1.4) if p.dim() == 1 else p.normal_(0.0, 0.2)
    save_model(model, tmp_path / "m")
    assert ("lm_head.weight" in load_file(tmp_path / "m" / "model.safetensors")) == (not cfg.tie_embeddings)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "m").eval()
    assert type(theirs).__name__ == HF_CLASS[family]
    x = tokens(4)
    with torch.no_grad():
        assert (model(x) - theirs(x).logits).abs().max() <= TOL
    back = load_model(tmp_path / "m")
    assert back.config == model.config
    assert all(torch.equal(p, back.get_parameter(name)) for name, p in model.named_parameters())


# ------------------------------------------------------------------------------------ the pieces, one by one

def test_llama3_frequencies_equal_transformers_in_all_three_regimes():
    config = hf_config("llama3.1")
    theirs, _ = transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS["llama3"](config)
    head_dim = config.hidden_size // config.num_attention_heads
    plain = 1.0 / 10000.0 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    scaling = {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_type"}
    ours = llama3_frequencies(plain, **scaling)
    assert torch.equal(ours, theirs)
    factor = LLAMA3_ROPE["factor"]
    kept, divided = ours == plain, torch.isclose(ours, plain / factor)
    assert kept.any() and divided.any() and (~kept & ~divided).any()      # every branch of the formula is used


def test_each_gemma2_soft_cap_changes_the_logits(gemma2):
    """Dropping either cap moves the logits: the parity above really exercises both."""
    ours = gemma2
    x = tokens(5)
    with torch.no_grad():
        capped = ours(x)
        assert capped.abs().max() < ours.config.logit_softcap
        for field in ("attn_softcap", "logit_softcap"):
            uncapped = build_model(dataclasses.replace(ours.config, **{field: None})).eval()
            uncapped.load_state_dict(ours.state_dict())
            assert (uncapped(x) - capped).abs().max() > 1e-2, field


def test_gemma2_kv_cache_decoding_past_the_window_equals_full_forward(gemma2):
    model = gemma2
    x = tokens(2)
    with torch.no_grad():
        full = model(x)
        cache = model.new_cache(2)
        steps = [model(x[:, :5], cache=cache)] + [model(x[:, i:i + 1], cache=cache) for i in range(5, x.shape[1])]
    assert (torch.cat(steps, 1) - full).abs().max() <= 1e-5


def test_gemma2_chunked_pretraining_loss_applies_the_logit_soft_cap(gemma2):
    """The pretraining loss never builds the logits through forward(): its chunked loss must cap them too, and give
    the gradients of the plain loss on the capped logits."""
    ours = gemma2
    x, y = tokens(6)[:, :-1], tokens(6)[:, 1:].clone()
    y[0, :3] = -100
    grads = []
    for loss_fn in (lambda m: CausalLM(m, chunk_size=7)(x, y), lambda m: lm_loss(m(x), y)):
        model = build_model(ours.config)
        model.load_state_dict(ours.state_dict())
        loss = loss_fn(model)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad for n, p in model.named_parameters()}))
    (chunked, g1), (full, g2) = grads
    assert torch.allclose(chunked, full, atol=1e-5)
    assert all(torch.allclose(g1[n], g2[n], atol=1e-5) for n in g1)


# ---------------------------------------------------------------------------------------------- configurations

@pytest.mark.parametrize("overrides, message", [
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "model.rope_scaling.rope_type = 'yarn'"),
    (dict(rope_scaling={**LLAMA3_ROPE, "factor": None}), "model.rope_scaling needs.*wrong or missing: factor"),
    (dict(rope_scaling={**LLAMA3_ROPE, "high_freq_factor": 1.0}), "high_freq_factor"),
    (dict(logit_softcap=0.0), "model.logit_softcap must be a positive number"),
    (dict(attn_softcap=-1.0), "model.attn_softcap must be a positive number"),
])
def test_config_errors(overrides, message):
    with pytest.raises(LLMLabError, match=message):
        preset("llama", n_layer=2, **overrides)


def test_presets_are_the_families(tmp_path):
    """The gemma2 and qwen2 presets export to their family (and the qwen2 preset's biases to q, k, v only)."""
    for name, family in (("gemma2", "Gemma2ForCausalLM"), ("qwen2", "Qwen2ForCausalLM")):
        cfg = preset(name, vocab_size=64, n_layer=2, n_head=4, n_kv_head=2, d_model=32, max_seq_len=32)
        assert config_to_hf(cfg).architectures == [family]
    qwen = build_model(preset("qwen2", vocab_size=64, n_layer=1, n_head=4, d_model=32))
    assert [n for n, _ in qwen.named_parameters() if n.endswith("bias")] == ["blocks.0.attn.qkv.bias"]


# ------------------------------------------------------------------------------------------------------- training

@pytest.fixture(scope="module")
def chat_folders(tmp_path_factory):
    """Gemma 2 and Qwen2 folders as transformers writes them, with a BPE tokenizer and the llmlab chat template,
    and a few conversations and preference pairs."""
    root = tmp_path_factory.mktemp("families_training")
    questions = [(f"What is {a} + {b}?", str(a + b), str(a + b + 1)) for a in range(4) for b in range(3)]
    write_jsonl(root / "sft.jsonl", [{"messages": [{"role": "user", "content": q},
                                                   {"role": "assistant", "content": good}]}
                                     for q, good, _ in questions])
    write_jsonl(root / "pairs.jsonl", [{"prompt": q, "chosen": good, "rejected": bad} for q, good, bad in questions])
    tokenizer = train_bpe([q + " " + good for q, good, _ in questions] * 4, 300)
    folders = {}
    for family in ("gemma2", "qwen2"):
        ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                   pad_token_id=tokenizer.pad_token_id)
        theirs = getattr(transformers, HF_CLASS[family])(hf_config(family, vocab_size=len(tokenizer), **ids))
        folders[family] = root / family
        theirs.save_pretrained(folders[family])
        tokenizer.save_pretrained(folders[family])
        (folders[family] / "chat_template.jinja").write_text(chat.TEMPLATES["llmlab"])
    return root, folders


@pytest.mark.parametrize("family", ["gemma2", "qwen2"])
@pytest.mark.parametrize("lora", [False, True])
def test_sft_takes_a_step_and_saves_a_folder_transformers_loads(chat_folders, family, lora, tmp_path):
    root, folders = chat_folders
    assert isinstance(load_our_model(folders[family]), Decoder)
    recipe = sft_recipe(data={"max_length": 64, "batch_size": 4, "val_fraction": 0.0},
                        lora={"r": 4, "alpha": 8} if lora else {"r": 0}, train={"max_steps": 1, "lr": 1e-2})
    summary = run_sft(str(folders[family]), str(root / "sft.jsonl"), str(tmp_path), recipe)
    assert summary["steps"] == 1 and math.isfinite(summary["final_loss"])
    before, after = read_weights(folders[family]), read_weights(tmp_path / "model")
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed and not any("lora" in n for n in after)
    if lora:      # the default targets: every projection, not the norms or embeddings
        assert all(n.endswith("proj.weight") for n in changed)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval()
    assert type(theirs).__name__ == HF_CLASS[family]
    x = tokens(7, t=12, batch=1).clamp_max(theirs.config.vocab_size - 1)
    with torch.no_grad():
        assert (load_our_model(tmp_path / "model")(x) - theirs(x).logits).abs().max() <= TOL


@pytest.mark.parametrize("family", ["gemma2", "qwen2"])
def test_dpo_takes_a_step(chat_folders, family, tmp_path):
    root, folders = chat_folders
    recipe = deep_merge(DPO_DEFAULTS, {"data": {"max_length": 64, "batch_size": 4, "val_fraction": 0.0},
                                       "train": {"max_steps": 1, "lr": 1e-3, "progress": False, "checkpoint_every": 0,
                                                 "eval_every": 0, "warmup_steps": 0}})
    summary = run_dpo(str(folders[family]), str(root / "pairs.jsonl"), str(tmp_path), recipe)
    assert summary["steps"] == 1 and abs(summary["final_loss"] - math.log(2)) < 1e-4     # policy = reference
    assert json.loads((tmp_path / "model" / "config.json").read_text())["model_type"] == family
