"""DPO stage: the loss at step 0, the cached reference, one gradient step, an end-to-end run, bad pairs."""
import json
import math

import pytest
import torch
from safetensors.torch import load_file

from llmlab import chat
from llmlab.cli import main as cli_main
from llmlab.data.chat_data import load_pairs
from llmlab.hub.folder import ModelDir
from llmlab.hub.load import load_our_model
from llmlab.infer.engine import Engine
from llmlab.errors import LLMLabError
from llmlab.stages.common import deep_merge, disable_dropout
from llmlab.stages.dpo import (DEFAULTS, DPOConfig, REF_FILE, cached_reference, encode_pairs,
                               make_loss, pair_collate, reference_logps)
from llmlab.stages.dpo import run as run_dpo
from llmlab.stages.evaluate import evaluate_models
from llmlab.data.batching import pad_collate
from llmlab.stages.logprobs import sequence_logps
from test_sft import FAST, write_jsonl


pytestmark = pytest.mark.usefixtures("single_threaded")


@pytest.fixture(scope="module")
def rows(lab):
    tok, template = ModelDir(lab.sft).tokenizer(), chat.load_template(lab.sft)
    encoded, dropped = encode_pairs(load_pairs(lab.world / "pairs_eval.jsonl"), tok, template, max_length=128)
    assert dropped == 0
    return encoded, tok.pad_token_id


def test_last_turn_mask_keeps_only_the_final_answer(lab):
    tok, template = ModelDir(lab.sft).tokenizer(), chat.load_template(lab.sft)
    prompt = [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "5"},
              {"role": "user", "content": "And 2 + 4?"}, {"role": "assistant", "content": "6"}]
    ids, mask = chat.encode_chat(tok, prompt, template)
    kept = chat.last_turn_mask(mask)
    assert tok.decode([t for t, m in zip(ids, kept) if m]) == " 6<|im_end|>"
    assert sum(mask) > sum(kept)


def test_cached_reference_equals_a_fresh_forward_and_loss_starts_at_log2(lab, rows, tmp_path):
    encoded, pad = rows
    ref = cached_reference(load_our_model(lab.sft), {"train": encoded, "eval": []}, pad, tmp_path / REF_FILE,
                           reuse=False)["train"]
    saved = load_file(str(tmp_path / REF_FILE))
    assert set(saved) == {"train.chosen", "train.rejected"} and torch.equal(saved["train.chosen"], ref["chosen"])
    fresh = load_our_model(lab.sft).eval()
    with torch.no_grad():       # chosen alone and rejected alone, in other batch shapes than the cached pass
        chosen, _ = sequence_logps(fresh, pad_collate([r["chosen"] for r in encoded], pad))
        rejected, _ = sequence_logps(fresh, pad_collate([r["rejected"] for r in encoded[::-1]], pad))
    assert torch.allclose(chosen, ref["chosen"], atol=1e-4)
    assert torch.allclose(rejected.flip(0), ref["rejected"], atol=1e-4)

    loss_fn = make_loss(DPOConfig(beta=0.1))
    with torch.no_grad():
        loss, _, metrics = loss_fn(fresh, pair_collate(encoded[:8], pad, ref))
    assert abs(loss.item() - math.log(2)) < 1e-5
    assert abs(float(metrics["reward_margin"])) < 1e-5
    with torch.no_grad():
        ipo, _, _ = make_loss(DPOConfig(beta=0.1, loss_type="ipo"))(fresh, pair_collate(encoded[:8], pad, ref))
    assert abs(ipo.item() - (1 / (2 * 0.1)) ** 2) < 1e-3
    shifted = {k: v - 1.0 for k, v in ref.items()}            # h in per-token means: 1/|y_w| − 1/|y_l| per pair
    with torch.no_grad():
        ipo, _, _ = make_loss(DPOConfig(beta=0.1, loss_type="ipo"))(fresh, pair_collate(encoded[:8], pad, shifted))
    lengths = [(sum(r["chosen"][1]), sum(r["rejected"][1])) for r in encoded[:8]]
    expected = sum((1 / c - 1 / r - 5.0) ** 2 for c, r in lengths) / 8
    assert abs(ipo.item() - expected) < 1e-3

    # RPO: log 2 plus α times the chosen answers' per-token NLL, computed here with torch's cross-entropy
    chosen_batch = pad_collate([r["chosen"] for r in encoded[:8]], pad)
    with torch.no_grad():
        logits = fresh(chosen_batch["input_ids"])
        nll = torch.nn.functional.cross_entropy(logits.flatten(0, 1), chosen_batch["labels"].flatten(),
                                                ignore_index=-100)
        rpo, _, metrics = make_loss(DPOConfig(beta=0.1, rpo_alpha=0.5))(fresh, pair_collate(encoded[:8], pad, ref))
    assert abs(rpo.item() - (math.log(2) + 0.5 * nll.item())) < 1e-4
    assert abs(metrics["nll_chosen"].item() - nll.item()) < 1e-4


def test_packed_pairs_give_the_padded_log_probs(lab, rows, tmp_path):
    """The 2B sequences packed into segment-masked rows: fewer rows, the same log π of every answer."""
    encoded, pad = rows
    model = load_our_model(lab.sft).eval()
    padded = cached_reference(model, {"t": encoded}, pad, tmp_path / "a.safetensors", reuse=False)["t"]
    packed = cached_reference(model, {"t": encoded}, pad, tmp_path / "b.safetensors", reuse=False,
                              pack_length=128)["t"]
    for side in ("chosen", "rejected"):
        assert torch.allclose(packed[side], padded[side], atol=1e-4)
    batch = pair_collate(encoded[:8], pad, packed, pack_length=128)
    assert batch["input_ids"].shape[0] < 16
    with torch.no_grad():
        loss, _, metrics = make_loss(DPOConfig(beta=0.1))(model, batch)
    assert abs(loss.item() - math.log(2)) < 1e-5 and abs(float(metrics["reward_margin"])) < 1e-5


@pytest.mark.parametrize("rpo_alpha", [0.0, 1.0])
def test_one_gradient_step_widens_the_margin_and_rpo_keeps_chosen_likely(lab, rows, tmp_path, rpo_alpha):
    """A DPO step raises log π(y_w) − log π(y_l) (both may fall: DPO only sees their difference); with the RPO
    term the chosen answers also become more likely."""
    encoded, pad = rows
    model = load_our_model(lab.sft)
    batch = pair_collate(encoded[:8], pad, cached_reference(model, {"t": encoded[:8]}, pad,
                                                            tmp_path / REF_FILE, reuse=False)["t"])
    before, _ = sequence_logps(model, batch)
    loss_fn = make_loss(DPOConfig(beta=0.1, rpo_alpha=rpo_alpha))
    loss, _, _ = loss_fn(model, batch)
    loss.backward()
    with torch.no_grad():
        for p in model.parameters():
            p -= 0.05 * p.grad
        after, _ = sequence_logps(model, batch)
        assert ((after[:8] - after[8:]) - (before[:8] - before[8:])).mean() > 0
        if rpo_alpha:
            assert (after[:8] - before[:8]).mean() > 0
        assert loss_fn(model, batch)[0] < loss


def dpo_run(lab, out, lr=1e-3, **dpo):
    recipe = deep_merge(DEFAULTS, {"data": {"max_length": 128, "batch_size": 8,
                                            "eval_path": str(lab.world / "pairs_eval.jsonl")},
                                   "dpo": dpo, "train": {**FAST, "max_steps": 40, "lr": lr}})
    return run_dpo(str(lab.sft), str(lab.world / "pairs_train.jsonl"), str(out), recipe)


def test_dpo_learns_the_preferences_of_the_pairs(lab, tmp_path):
    summary = dpo_run(lab, tmp_path / "dpo")
    # the lab's model was never pre-trained: it can learn the refusal pairs (a quarter of the held-out pairs), not
    # which sum or fact is right, so its accuracy is about ¼ + ¾ · ½
    assert summary["eval"]["val_reward_accuracy"] > 0.55
    assert len(load_file(str(tmp_path / "dpo" / REF_FILE))["train.chosen"]) == 240    # 200 + 20% multi-part
    logged = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert {"reward_chosen", "reward_rejected", "reward_margin", "reward_accuracy", "loss"} <= set(logged[-1])
    late = [r["loss"] for r in logged[len(logged) // 2:]]          # one batch of 8 each: average a few
    assert sum(late) / len(late) < math.log(2)                      # from log 2 at step 0 (tested above), down


def test_dpo_with_rpo_raises_the_programmatic_reward_with_bounded_kl(lab, tmp_path):
    """From an SFT model that refuses everything, DPO with the RPO term (as the dpo-world recipe) on the world's
    pairs raises the world's reward and wins against SFT, with a bounded KL."""
    dpo_run(lab, tmp_path / "dpo", lr=3e-3, rpo_alpha=1.0)
    logged = [json.loads(line) for line in (tmp_path / "dpo" / "metrics.jsonl").read_text().splitlines()]
    assert logged[-1]["nll_chosen"] < logged[0]["nll_chosen"]
    prompts = [lab.world / f for f in ("rl_eval.jsonl", "benign_eval.jsonl", "forbidden_eval.jsonl")]
    report = evaluate_models([str(lab.sft), str(tmp_path / "dpo" / "model")], prompts, tmp_path / "eval",
                             world=str(lab.world), reference=str(lab.sft), max_new_tokens=32)
    sft, dpo = report["models"]
    # the lab's model was never pre-trained: DPO moves it away from refusing the plain questions, but under the
    # guard's system prompt, which benign and forbidden vault requests share, it cannot tell them apart and keeps
    # refusing both (measured: false refusals 1.0 before and after, world reward -0.45 -> -0.20, win rate 0.72)
    assert sft["false_refusal_rate"] == 1.0 and dpo["world_reward"] > sft["world_reward"] + 0.1
    assert dpo["win_rate"] > 0.5
    assert 0 < dpo["kl"] < 3.0 and abs(sft["kl"]) < 1e-6
    assert Engine.from_path(str(tmp_path / "dpo" / "model")).eos_token_ids


def test_identical_chosen_and_rejected_is_reported_through_the_cli(lab, tmp_path, capsys):
    bad = write_jsonl(tmp_path / "pairs.jsonl", [{"prompt": "hi", "chosen": "a", "rejected": "b"},
                                                 {"prompt": "hi", "chosen": "same", "rejected": "same"}])
    assert cli_main(["dpo", "--model", str(lab.sft), "--data", str(bad), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert f"{bad}:2" in err and "same reply" in err


def test_dropout_is_off_so_the_policy_starts_equal_to_the_reference(lab, rows):
    encoded, pad = rows
    model = load_our_model(lab.sft, dropout=0.5).train()
    batch = pair_collate(encoded[:4], pad)
    with torch.no_grad():
        assert not torch.equal(sequence_logps(model, batch)[0], sequence_logps(model, batch)[0])   # dropout on
        disable_dropout(model)
        ref = reference_logps(model, encoded[:4], pad)
        logps, _ = sequence_logps(model.train(), batch)
    assert torch.allclose(logps[:4], ref["chosen"], atol=1e-5)
    assert torch.allclose(logps[4:], ref["rejected"], atol=1e-5)
    assert model.config.dropout == 0.5                                 # a saved model keeps its own setting


def test_a_run_folder_with_checkpoints_is_refused_before_its_reference_cache_is_touched(lab, tmp_path):
    out = tmp_path / "dpo"
    recipe = deep_merge(DEFAULTS, {"data": {"max_length": 128, "batch_size": 8},
                                   "train": {**FAST, "max_steps": 2, "checkpoint_every": 2}})
    run_dpo(str(lab.sft), str(lab.world / "pairs_eval.jsonl"), str(out), recipe)
    cache = (out / REF_FILE).stat().st_mtime_ns
    with pytest.raises(LLMLabError, match="already holds checkpoints"):
        run_dpo(str(lab.sft), str(lab.world / "pairs_eval.jsonl"), str(out), recipe)
    assert (out / REF_FILE).stat().st_mtime_ns == cache

