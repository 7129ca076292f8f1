"""SFT stage and LoRA: assistant-only loss, packing, truncation, the saved directory, learning to answer and to stop.

``build_lab`` (also used by test_dpo.py and test_eval.py) writes, once per session, the task world (``test``
preset), a BPE tokenizer trained on it, a random-init tiny Llama saved as a model directory, and an SFT model
fine-tuned on the world's forbidden requests (whose answer is always the refusal).
"""
import json
import math
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
import transformers

from llmlab import chat
from llmlab.cli import main as cli_main
from llmlab.errors import LLMLabError
from llmlab.hub.folder import ModelDir
from llmlab.hub.load import load_our_model, read_weights
from llmlab.hub.save import save_model
from llmlab.infer.engine import Engine, SamplingParams
from llmlab.lora import LoRAConfig, LoRALinear, apply_lora, lora_parameters, merge_lora
from llmlab.model.config import preset
from llmlab.model.decoder import build_model
from llmlab.stages.common import deep_merge
from llmlab.data.batching import pack, pack_batch, pad_collate
from llmlab.data.chat_data import load_prompts
from llmlab.infer.replies import exact_match_rate, generate_replies
from llmlab.stages.logprobs import sequence_logps
from llmlab.stages.sft import DEFAULTS, encode_conversations, sft_loss
from llmlab.stages.sft import run as run_sft
from llmlab.tokenizer import train_bpe
from llmlab.world.build import build_world, preset as world_preset
from llmlab.world.vocab import REFUSAL

transformers.logging.set_verbosity_error()
FAST = {"progress": False, "checkpoint_every": 0, "eval_every": 0, "log_every": 5, "warmup_steps": 5}


pytestmark = pytest.mark.usefixtures("single_threaded")


def write_jsonl(path: Path, rows) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def sft_recipe(**sections) -> dict:
    return deep_merge(DEFAULTS, {"train": {**FAST, **sections.pop("train", {})}, **sections})


def build_lab(root: Path) -> SimpleNamespace:
    """World, tokenizer, base model and SFT model under ``root`` (built once; later calls reuse the files)."""
    lab = SimpleNamespace(root=root, world=root / "world", base=root / "base", sft=root / "sft" / "model",
                          refuse=root / "refuse.jsonl")
    if (root / "done").is_file():
        return lab
    root.mkdir(parents=True, exist_ok=True)
    # without the keeper's conversations: the never-pre-trained lab model cannot tell the keeper's system prompt
    # from the guard's, and their opposite pairs would only blur what the DPO and reward tests measure
    world = build_world(world_preset("test", n_pairs_train=200, keeper_share=0.0))
    world.write(lab.world)
    texts = world.pretrain_texts + [m["content"] for r in world.sft_train for m in r["messages"]]
    tokenizer = train_bpe(texts, 400)
    torch.manual_seed(0)
    model = build_model(preset("llama", vocab_size=len(tokenizer), n_layer=2, n_head=4, d_model=64, max_seq_len=256))
    save_model(model, lab.base, tokenizer=tokenizer, chat_template=chat.TEMPLATES["llmlab"])
    write_jsonl(lab.refuse, [r for r in world.sft_train if r["messages"][-1]["content"] == REFUSAL])
    recipe = sft_recipe(data={"max_length": 128, "batch_size": 8, "eval_path": str(lab.world / "forbidden_eval.jsonl")},
                        train={"max_steps": 30, "lr": 3e-3})
    lab.sft_summary = run_sft(str(lab.base), str(lab.refuse), str(root / "sft"), recipe)
    (root / "sft_summary.json").write_text(json.dumps(lab.sft_summary, default=str))
    (root / "done").write_text("ok")
    return lab


@pytest.fixture(scope="module")
def tok_and_template(lab):
    return ModelDir(lab.base).tokenizer(), chat.load_template(lab.base)


CONVERSATION = [{"role": "system", "content": "You are a helpful assistant."},
                {"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"},
                {"role": "user", "content": "Reverse the letters a b c."}, {"role": "assistant", "content": "c b a"}]


# --- collation and the loss -------------------------------------------------------------------------------------

def test_labels_are_the_assistant_tokens_and_the_end_of_turn(tok_and_template):
    tok, template = tok_and_template
    ids, mask = chat.encode_chat(tok, CONVERSATION, template)
    batch = pad_collate([(ids, mask), (ids[:20], mask[:20])], pad_id=tok.pad_token_id)
    labels = batch["labels"][0]
    targets = [t for t, m in zip(ids[1:], mask[1:]) if m]
    assert labels[labels != -100].tolist() == targets
    assert tok.decode(targets) == " 5<|im_end|> c b a<|im_end|>"
    assert batch["input_ids"].shape == (2, len(ids) - 1)
    assert batch["attention_mask"][1].sum() == 19 and (batch["labels"][1, 19:] == -100).all()


def test_sft_loss_matches_cross_entropy_on_assistant_positions(lab, tok_and_template):
    tok, template = tok_and_template
    model = load_our_model(lab.base)
    examples = [chat.encode_chat(tok, CONVERSATION, template), chat.encode_chat(tok, CONVERSATION[1:3], template)]
    batch = pad_collate(examples, pad_id=tok.pad_token_id)
    loss, n_tokens, _ = sft_loss(model, batch)
    logits = model(batch["input_ids"])
    expected = F.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), ignore_index=-100)
    assert torch.allclose(loss, expected, atol=1e-6)
    assert n_tokens == sum(len(ids) - 1 for ids, _ in examples)
    sums, counts = sequence_logps(model, batch)
    per_token = -F.cross_entropy(logits.transpose(1, 2), batch["labels"], ignore_index=-100, reduction="none")
    assert torch.allclose(sums, per_token.sum(-1), atol=1e-5)
    assert counts.tolist() == [sum(m[1:]) for _, m in examples]


def test_packing_keeps_each_examples_mask_and_loss(lab, tok_and_template):
    tok, template = tok_and_template
    convs = [CONVERSATION[1:3], CONVERSATION, CONVERSATION[1:3], CONVERSATION[3:5]]
    examples, _ = encode_conversations(convs, tok, template, max_length=80)
    rows = pack(examples, max_length=80)
    assert all(len(ids) <= 80 for ids, _, _ in rows) and len(rows) < len(examples)
    assert sum(len(ids) for ids, _, _ in rows) == sum(len(ids) for ids, _ in examples)
    packed, padded = pad_collate(rows, 2), pad_collate(examples, 2)
    # the targets are the same tokens; the only ones lost are none, since every example starts with BOS (mask 0)
    assert sorted(packed["labels"][packed["labels"] != -100].tolist()) == \
        sorted(padded["labels"][padded["labels"] != -100].tolist())
    assert not (packed["labels"] == tok.bos_token_id).any()
    # segment ids number the examples across the batch, in order; padding is -1
    segments = packed["segment_ids"][packed["attention_mask"].bool()]
    assert segments.unique_consecutive().tolist() == list(range(len(examples)))
    assert (packed["segment_ids"][~packed["attention_mask"].bool()] == -1).all()
    # each packed conversation attends only to itself: the same loss and log-probs as padded rows
    model = load_our_model(lab.base)
    assert torch.allclose(sft_loss(model, packed)[0], sft_loss(model, padded)[0], atol=1e-5)
    (packed_sums, packed_counts), (sums, counts) = sequence_logps(model, packed), sequence_logps(model, padded)
    assert torch.allclose(packed_sums, sums, atol=1e-4) and packed_counts.tolist() == counts.tolist()


def test_pack_batch_rows_fit_twice_the_longest_example():
    examples = [([1] * n, [1] * n) for n in (5, 3, 9, 2, 4, 6)]
    rows = pack_batch(examples, max_length=64)
    assert [len(ids) for ids, _, _ in rows] == [17, 12]          # rows of at most 2 × 9 tokens, in order
    assert [len(ids) for ids, _, _ in pack_batch(examples, max_length=10)] == [8, 9, 6, 6]


def test_padding_free_batches_train_the_same_weights_as_padded_ones(lab, tmp_path):
    """The same conversations per step, packed into segment-masked rows or right-padded: the same final weights."""
    weights = {}
    for padding_free in (True, False):
        recipe = sft_recipe(data={"max_length": 128, "batch_size": 8, "val_fraction": 0.0,
                                  "padding_free": padding_free}, train={"max_steps": 4, "lr": 3e-3})
        run_sft(str(lab.base), str(lab.world / "sft_train.jsonl"), str(tmp_path / str(padding_free)), recipe)
        weights[padding_free] = load_our_model(tmp_path / str(padding_free) / "model").state_dict()
    base = load_our_model(lab.base).state_dict()
    for name, w in weights[True].items():
        assert not torch.equal(w, base[name]) or "norm" in name                # it trained
        assert torch.allclose(w, weights[False][name], atol=1e-5), name


def test_truncation_cuts_or_drops_and_never_gives_nan(lab, tok_and_template, tmp_path):
    tok, template = tok_and_template
    long_question = [{"role": "user", "content": "a " * 200}, {"role": "assistant", "content": "ok"}]
    long_answer = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "b " * 200}]
    examples, counts = encode_conversations([long_question, long_answer, CONVERSATION[1:3]], tok, template, 64)
    assert counts == {"truncated": 2, "dropped": 1}
    assert [len(ids) for ids, _ in examples] == [64, len(chat.encode_chat(tok, CONVERSATION[1:3], template)[0])]
    assert all(any(mask[1:]) for _, mask in examples)
    data = write_jsonl(tmp_path / "long.jsonl", [{"messages": m} for m in [long_question, long_answer] * 4])
    summary = run_sft(str(lab.base), str(data), str(tmp_path / "run"),
                      sft_recipe(data={"max_length": 64, "batch_size": 2, "val_fraction": 0.0},
                                 train={"max_steps": 3}))
    assert math.isfinite(summary["final_loss"])


# --- end to end -------------------------------------------------------------------------------------------------

def test_sft_raises_exact_match_and_learns_to_stop(lab):
    items = load_prompts(lab.world / "forbidden_eval.jsonl")
    base = Engine.from_path(str(lab.base))
    tuned = Engine.from_path(str(lab.sft))
    template = chat.load_template(lab.sft)
    assert exact_match_rate(base, items, template, 24) == 0.0
    assert exact_match_rate(tuned, items, template, 24) >= 0.9
    # held-out prompts of every kind: the model ends its turn with <|im_end|> instead of running to the budget
    prompts = [i["prompt"] for i in load_prompts(lab.world / "rl_eval.jsonl")]
    replies = generate_replies(tuned, prompts, template, SamplingParams(max_new_tokens=40, temperature=0.0))
    assert all(r.finish_reason == "stop" for r in replies)
    run = lab.sft.parent
    assert (run / "loss.png").is_file() and (run / "run.yaml").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["exact_match"] >= 0.9 and any("val_loss" in r for r in records)


def test_saved_directory_loads_in_transformers_and_the_engine(lab):
    assert (lab.sft / "chat_template.jinja").read_text() == chat.TEMPLATES["llmlab"]
    hf = transformers.AutoModelForCausalLM.from_pretrained(lab.sft).eval()
    ours = load_our_model(lab.sft).eval()
    ids = torch.randint(6, 300, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, ours(ids), atol=1e-4)
    engine = Engine.from_path(str(lab.sft))
    assert ModelDir(lab.sft).tokenizer().convert_tokens_to_ids("<|im_end|>") in engine.eos_token_ids


# --- bad input --------------------------------------------------------------------------------------------------

def test_cli_errors_name_the_file_line_and_the_known_templates(lab, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"messages": CONVERSATION[1:3]}, {"messages": CONVERSATION[1:2]}])
    assert cli_main(["sft", "--model", str(lab.base), "--data", str(bad), "--out", str(tmp_path / "o"),
                     "--set", "data.max_length=128"]) == 2
    assert f"{bad}:2" in capsys.readouterr().err
    good = write_jsonl(tmp_path / "good.jsonl", [{"messages": CONVERSATION[1:3]}] * 4)
    assert cli_main(["sft", "--model", str(lab.base), "--data", str(good), "--out", str(tmp_path / "o2"),
                     "--template", "vicuna"]) == 2
    err = capsys.readouterr().err
    assert "vicuna" in err and all(name in err for name in chat.TEMPLATES)


# --- LoRA -------------------------------------------------------------------------------------------------------

def lora_model(lab):
    model = load_our_model(lab.base)
    wrapped = apply_lora(model, LoRAConfig(r=4, alpha=8, targets=["qkv", "o_proj", "up", "down"]))
    return model, wrapped


def test_lora_trains_only_the_adapters_and_merges_exactly(lab):
    model, wrapped = lora_model(lab)
    assert len(wrapped) == 2 * 4
    ids = torch.randint(6, 300, (2, 16), generator=torch.Generator().manual_seed(1))
    base_logits = load_our_model(lab.base)(ids)
    assert torch.allclose(model(ids), base_logits, atol=1e-6)          # B = 0: starts as the base model
    model(ids).logsumexp(-1).mean().backward()
    adapters = {id(p) for p in lora_parameters(model)}
    for name, p in model.named_parameters():
        assert (p.grad is not None) == (id(p) in adapters), name
    with torch.no_grad():
        for p in lora_parameters(model):
            p.normal_(0, 0.1)
        unmerged = model(ids)
        merged = merge_lora(model)(ids)
    assert not any(isinstance(m, LoRALinear) for m in model.modules())
    assert (unmerged - base_logits).abs().max() > 1e-2
    assert (merged - unmerged).abs().max() <= 1e-5


def test_lora_unknown_target_lists_the_layers(lab):
    with pytest.raises(LLMLabError, match="q_proj.*this model has: down, lm_head, o_proj, qkv, up"):
        apply_lora(load_our_model(lab.base), LoRAConfig(r=2, targets=["q_proj"]))


def test_sft_with_lora_saves_a_plain_model(lab, tmp_path):
    run = tmp_path / "lora"
    run_sft(str(lab.base), str(lab.refuse), str(run),
            sft_recipe(data={"max_length": 128, "batch_size": 4, "val_fraction": 0.0},
                       lora={"r": 4, "alpha": 8}, train={"max_steps": 3, "lr": 1e-2}))
    saved = read_weights(run / "model")
    assert not any("lora" in name for name in saved)
    base = read_weights(lab.base)
    changed = [n for n in base if not torch.equal(base[n], saved[n])]
    assert changed and all(n.endswith(("qkv_proj.weight", "q_proj.weight", "k_proj.weight", "v_proj.weight",
                                       "o_proj.weight", "up_proj.weight", "gate_proj.weight", "down_proj.weight"))
                           for n in changed)


def save_tiny_opt(lab, folder: Path) -> None:
    """A tiny OPT (an architecture llmlab does not implement) with the lab's tokenizer."""
    tok = ModelDir(lab.base).tokenizer()
    cfg = transformers.OPTConfig(vocab_size=len(tok), hidden_size=32, num_hidden_layers=2, ffn_dim=64,
                                 num_attention_heads=4, max_position_embeddings=128, word_embed_proj_dim=32,
                                 bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                                 pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    transformers.OPTForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


def test_sft_with_peft_on_a_transformers_architecture(lab, tmp_path):
    """An architecture llmlab does not implement (OPT) is fine-tuned with peft LoRA and saved merged."""
    save_tiny_opt(lab, tmp_path / "opt")
    with pytest.raises(LLMLabError, match="no llmlab model"):     # full fine-tuning needs our own classes
        run_sft(str(tmp_path / "opt"), str(lab.refuse), str(tmp_path / "full"), sft_recipe(train={"max_steps": 1}))
    run_sft(str(tmp_path / "opt"), str(lab.refuse), str(tmp_path / "run"),
            sft_recipe(data={"max_length": 128, "batch_size": 4, "val_fraction": 0.0},
                       lora={"r": 4, "alpha": 8, "targets": ["q_proj", "v_proj"]}, train={"max_steps": 2, "lr": 1e-2}))
    out = tmp_path / "run" / "model"
    model = transformers.AutoModelForCausalLM.from_pretrained(out)
    assert not any("lora" in n for n, _ in model.named_parameters())
    assert (out / "chat_template.jinja").is_file()
    assert Engine.from_path(str(out)).generate(["hi"], SamplingParams(max_new_tokens=2, temperature=0))


def test_lora_on_a_transformers_architecture_without_peft_names_the_extra(lab, tmp_path, monkeypatch):
    """peft is the lora extra: without it, LoRA on a transformers model (SFT and classify) says what to install."""
    from llmlab.stages.classify import LoraSection, _lora_transformers
    save_tiny_opt(lab, tmp_path / "opt")
    monkeypatch.setitem(sys.modules, "peft", None)                 # as if peft were not installed
    missing = r"needs the peft package.*pip install 'llmlab\[lora\]'"
    with pytest.raises(LLMLabError, match=missing):
        run_sft(str(tmp_path / "opt"), str(lab.refuse), str(tmp_path / "run"),
                sft_recipe(data={"max_length": 128, "batch_size": 4, "val_fraction": 0.0}, lora={"r": 4}))
    with pytest.raises(LLMLabError, match=missing):
        _lora_transformers(transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "opt"),
                           LoraSection())
    assert cli_main(["sft", "--model", str(tmp_path / "opt"), "--data", str(lab.refuse), "--out",
                     str(tmp_path / "cli"), "--set", "lora.r=4"]) == 2
