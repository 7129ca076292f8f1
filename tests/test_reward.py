"""Reward model: the zero-initialised head gives a loss of exactly log 2, a short run learns an easy preference,
the saved folder scores the same in transformers, and directories without a reward head are refused."""
import json
import math

import pytest
import torch
import transformers

from llmlab.chat import TEMPLATES, assistant_spans, reply_closing
from llmlab.errors import LLMLabError
from llmlab.hub.load import load_our_model
from llmlab.hub.save import save_model
from llmlab.model.config import preset
from llmlab.model.decoder import build_model
from llmlab.chat import encode_reply
from llmlab.data.batching import pad
from llmlab.model.heads import RewardModel
from llmlab.stages.reward import run as run_rm
from llmlab.stages.reward import (encode_reward_pairs, load_pair_records, pair_loss, reward_pair_collate,
                                  split_pairs, PairData)
from llmlab.tokenizer import train_char
from llmlab.world.build import build_world, preset as world_preset

transformers.logging.set_verbosity_error()


pytestmark = pytest.mark.usefixtures("single_threaded")


def save_lm(folder, tokenizer, seed=0, **overrides):
    torch.manual_seed(seed)
    cfg = preset("llama", vocab_size=len(tokenizer), n_layer=2, d_model=32, n_head=4, max_seq_len=256, **overrides)
    return save_model(build_model(cfg), folder, tokenizer, chat_template=TEMPLATES["llmlab"])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The world's ``test`` preset, a character tokenizer over it, a tiny language model and easy pairs: the
    chosen reply is the rejected one with a marker ``" !"`` at its end."""
    root = tmp_path_factory.mktemp("rm")
    world_dir = build_world(world_preset("test")).write(root / "world")
    tokenizer = train_char([p.read_text() for p in world_dir.glob("*.jsonl")] + ["\n!"])
    lm = save_lm(root / "lm", tokenizer)
    for split in ("train", "eval"):
        with open(root / f"easy_{split}.jsonl", "w") as f:
            for line in open(world_dir / f"pairs_{split}.jsonl"):
                pair = json.loads(line)
                f.write(json.dumps({"prompt": pair["prompt"], "chosen": pair["chosen"] + " !",
                                    "rejected": pair["chosen"]}) + "\n")
    return {"root": root, "lm": lm, "tokenizer": tokenizer}


@pytest.fixture(scope="module")
def trained(setup):
    root = setup["root"]
    recipe = {"data": {"eval_path": str(root / "easy_eval.jsonl")},
              "train": {"max_steps": 15, "lr": 3e-3, "warmup_steps": 0, "log_every": 1, "eval_every": 0,
                        "checkpoint_every": 15, "progress": False}}
    summary = run_rm(setup["lm"], root / "easy_train.jsonl", root / "run", recipe)
    return summary, root / "run"


def test_zero_head_gives_log2_and_a_short_run_learns_the_preference(setup, trained):
    rm = RewardModel.from_language_model(setup["lm"])
    assert torch.count_nonzero(rm.value_head.weight) == 0
    rows = encode_reward_pairs(load_pair_records(setup["root"] / "easy_train.jsonl")[:4], rm.tokenizer, rm.chat_template,
                        256, 0.0, "easy")
    loss, _, metrics = pair_loss(rm, reward_pair_collate(rm.tokenizer.pad_token_id)(rows))
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)

    summary, run = trained
    records = [json.loads(line) for line in open(run / "metrics.jsonl")]
    assert records[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)      # logged before the first update
    assert summary["eval"]["val_accuracy"] >= 0.9                          # chance is 0.5
    assert summary["eval"]["val_loss"] < 0.6 < math.log(2)
    assert (run / "run.yaml").is_file() and (run / "loss.png").is_file() and (run / "checkpoints").is_dir()


def test_saved_reward_model_scores_the_same_in_transformers(setup, trained):
    _, run = trained
    rm = RewardModel.load(run)                       # the run directory: its model/ folder
    pairs = load_pair_records(setup["root"] / "easy_eval.jsonl")[:6]
    prompts = [p["prompt"] for p in pairs]
    ours = rm.score(prompts, [p["chosen"] for p in pairs], batch_size=4)
    theirs_model = transformers.AutoModelForSequenceClassification.from_pretrained(run / "model").eval()
    assert type(theirs_model).__name__ == "LlamaForSequenceClassification"
    ids, mask = pad([encode_reply(rm.tokenizer, rm.chat_template, p["prompt"], p["chosen"])[0] for p in pairs],
                          rm.tokenizer.pad_token_id)
    with torch.no_grad():
        theirs = theirs_model(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
    assert torch.allclose(torch.tensor(ours), theirs, atol=1e-4)
    rejected = rm.score(prompts, [p["rejected"] for p in pairs])
    assert sum(c > r for c, r in zip(ours, rejected)) >= 5
    assert isinstance(rm.score(prompts[:1], [""])[0], float)        # an empty reply (a policy may stop at once)
    context = rm.backbone.config.max_seq_len                        # a reply longer than the context is cut
    assert math.isfinite(rm.score(prompts[:1], ["a" * (2 * context)])[0])


def test_reply_encoding_ends_at_the_end_of_turn_token(setup):
    tok = setup["tokenizer"]
    ids, reply = encode_reply(tok, TEMPLATES["llmlab"], [{"role": "user", "content": "hi"}], "yes")
    assert tok.decode(ids) == "<|bos|><|im_start|>user\n hi<|im_end|>\n<|im_start|>assistant\n yes<|im_end|>"
    assert len(reply) == len(ids) and tok.decode([i for i, m in zip(ids, reply) if m]) == " yes<|im_end|>"
    empty, reply = encode_reply(tok, TEMPLATES["llmlab"], [{"role": "user", "content": "hi"}], "")
    assert tok.decode(empty) == "<|bos|><|im_start|>user\n hi<|im_end|>\n<|im_start|>assistant\n<|im_end|>"
    assert tok.decode([i for i, m in zip(empty, reply) if m]) == "<|im_end|>"
    # what closes an empty reply is what closes a non-empty final one (GLM-4 leaves the last answer open: its EOS)
    closings = {name: reply_closing(TEMPLATES[name], "<|eos|>") for name in ("glm-4", "chatml", "llama-3", "gemma")}
    assert closings == {"glm-4": "<|eos|>", "chatml": "<|im_end|>", "llama-3": "<|eot_id|>", "gemma": "<end_of_turn>"}
    for name, closing in closings.items():
        text, spans = assistant_spans([{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yes"}],
                                      TEMPLATES[name], eos_token="<|eos|>")
        assert text[:spans[-1][1]].endswith("yes" + closing), name


def test_per_pair_margin_and_eval_split(setup, tmp_path):
    rm = RewardModel.from_language_model(setup["lm"])
    path = tmp_path / "margin.jsonl"
    path.write_text("".join(json.dumps({"prompt": "q", "chosen": "a", "rejected": "b", "margin": m}) + "\n"
                            for m in (1.0, 3.0)))
    rows = encode_reward_pairs(load_pair_records(path), rm.tokenizer, rm.chat_template, 256, 0.0, "margins")
    loss, _, _ = pair_loss(rm, reward_pair_collate(rm.tokenizer.pad_token_id)(rows))
    expected = (math.log1p(math.exp(1.0)) + math.log1p(math.exp(3.0))) / 2    # −log σ(0 − m), rewards all 0
    assert loss.item() == pytest.approx(expected, rel=1e-6)

    pairs = load_pair_records(setup["root"] / "easy_train.jsonl")
    data = PairData(val_fraction=0.25)
    train, held = split_pairs(pairs, data, seed=3)
    again = split_pairs(pairs, data, seed=3)
    assert (train, held) == again and len(held) == round(0.25 * len(pairs)) and len(train) + len(held) == len(pairs)
    assert not {json.dumps(p) for p in held} & {json.dumps(p) for p in train}
    with pytest.raises(LLMLabError, match="val_fraction=0.25 leaves no training pairs"):
        split_pairs(pairs[:1], data, seed=3)


def test_directories_without_a_reward_head_are_refused(setup, tmp_path):
    with pytest.raises(LLMLabError, match="no reward head"):
        RewardModel.load(setup["lm"])                 # a plain language model
    save_lm(tmp_path / "two", setup["tokenizer"], num_labels=2)
    with pytest.raises(LLMLabError, match="num_labels=2"):
        RewardModel.load(tmp_path / "two")
    with pytest.raises(LLMLabError, match="not found"):
        RewardModel.load(tmp_path / "missing")


def mean_reply_logprob_of(lm, ids, reply):
    """The reference: the plain language model's log-softmax over its full logits, averaged over the reply."""
    with torch.no_grad():
        out = lm(torch.tensor([ids]))
    logits = (out.logits if isinstance(lm, transformers.PreTrainedModel) else out)[0]
    logp = torch.log_softmax(logits.float(), -1)
    picked = [logp[t - 1, ids[t]] for t in range(1, len(ids)) if reply[t]]
    return float(sum(picked) / len(picked))


def test_likelihood_weighted_reward_reads_the_language_models_own_likelihood(setup, tmp_path):
    """With rm.likelihood_weight = λ the reward is w · h_last + λ · mean log π(reply): with the zero head it is
    exactly λ times the language model's mean log-likelihood; the trained folder keeps λ and its language-model
    head, and transformers (sequence-classification score + λ × causal-LM likelihood) scores it the same."""
    lm = load_our_model(setup["lm"]).eval()
    rm = RewardModel.from_language_model(setup["lm"], likelihood_weight=0.5).eval()
    pairs = load_pair_records(setup["root"] / "easy_eval.jsonl")[:4]
    prompts, replies = [p["prompt"] for p in pairs], [p["chosen"] for p in pairs]
    encoded = [encode_reply(rm.tokenizer, rm.chat_template, p, r) for p, r in zip(prompts, replies)]
    expected = [0.5 * mean_reply_logprob_of(lm, ids, reply) for ids, reply in encoded]
    assert rm.score(prompts, replies, batch_size=3) == pytest.approx(expected, abs=1e-5)   # padded batches too

    recipe = {"data": {"eval_path": str(setup["root"] / "easy_eval.jsonl")}, "rm": {"likelihood_weight": 0.5},
              "train": {"max_steps": 3, "lr": 3e-3, "warmup_steps": 0, "eval_every": 0, "checkpoint_every": 0,
                        "progress": False}}
    run_rm(setup["lm"], setup["root"] / "easy_train.jsonl", tmp_path / "run", recipe)
    trained = RewardModel.load(tmp_path / "run")
    assert trained.likelihood_weight == 0.5
    ours = trained.score(prompts, replies)
    folder = tmp_path / "run" / "model"
    head = transformers.AutoModelForSequenceClassification.from_pretrained(folder).eval()
    causal = transformers.LlamaForCausalLM.from_pretrained(folder).eval()
    assert not torch.equal(causal.lm_head.weight, lm.lm_head.weight)              # trained, and saved
    for score, (ids, reply) in zip(ours, encoded):
        with torch.no_grad():
            value = head(input_ids=torch.tensor([ids])).logits.item()
        assert score == pytest.approx(value + 0.5 * mean_reply_logprob_of(causal, ids, reply), abs=1e-4)

    headless = tmp_path / "headless"          # λ > 0 but saved without the language-model head
    save_model(trained.backbone, headless, trained.tokenizer, chat_template=trained.chat_template,
               extra_files={"reward_config.json": '{"likelihood_weight": 0.5}'})
    with pytest.raises(LLMLabError, match="no language-model head"):
        RewardModel.load(headless)
    (folder / "reward_config.json").write_text('{"likelihood_weight": "high"}')
    with pytest.raises(LLMLabError, match="reward_config.json: likelihood_weight must be a number"):
        RewardModel.load(folder)
    with pytest.raises(LLMLabError, match="rm.likelihood_weight must be a number"):
        run_rm(setup["lm"], setup["root"] / "easy_train.jsonl", tmp_path / "bad", {"rm": {"likelihood_weight": -1}})
    with pytest.raises(LLMLabError, match=r"unknown config key\(s\) rm.batch_size"):     # it is data.batch_size
        run_rm(setup["lm"], setup["root"] / "easy_train.jsonl", tmp_path / "typo", {"rm": {"batch_size": 2}})
