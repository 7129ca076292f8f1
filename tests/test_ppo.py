"""PPO: the stage's rewards, advantages and clipped objective against hand-computed values, the rollout layout
against the engine, a short run that raises an easy reward with a bounded KL, exact resume, the saved policy in
transformers and the engine, and the errors for a missing or wrong reward."""
import json
import math

import pytest
import torch
import transformers

from llmlab.chat import TEMPLATES
from llmlab.cli import main
from llmlab.config import from_dict
from llmlab.errors import LLMLabError
from llmlab.hub.load import load_our_model
from llmlab.hub.save import save_model
from llmlab.infer.engine import Engine, SamplingParams
from llmlab.model.config import preset
from llmlab.model.decoder import build_model
from llmlab.model.heads import PolicyWithValue
from llmlab.stages.ppo import (KLController, PPOConfig, advantages_and_returns, encode_prompts, make_scorer,
                               per_token_rewards, ppo_losses, rollout_batch)
from llmlab.stages.ppo import run as run_ppo
from llmlab.tokenizer import train_char
from llmlab.train.checkpoint import load_latest
from llmlab.world.build import build_world, preset as world_preset

transformers.logging.set_verbosity_error()
LETTERS = set("abcdefghijklmnopqrstuvwxyz ")


pytestmark = pytest.mark.usefixtures("single_threaded")


def save_decoder(folder, tokenizer, **overrides):
    torch.manual_seed(0)
    cfg = preset("llama", vocab_size=len(tokenizer), n_layer=2, d_model=32, n_head=4, max_seq_len=256, **overrides)
    return save_model(build_model(cfg), folder, tokenizer, chat_template=TEMPLATES["llmlab"])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """The world's ``test`` preset, a character tokenizer over it and a tiny (untrained) policy."""
    root = tmp_path_factory.mktemp("ppo")
    world_dir = build_world(world_preset("test")).write(root / "world")
    tokenizer = train_char([p.read_text() for p in world_dir.glob("*.jsonl")] + ["\n"])
    return {"root": root, "world": world_dir, "policy": save_decoder(root / "policy", tokenizer),
            "tokenizer": tokenizer}


def letter_share(item, text):
    """An easy programmatic reward: the share of the response's characters that are lowercase letters or spaces
    (about a third for a uniform policy over this vocabulary)."""
    return sum(c in LETTERS for c in text) / max(len(text), 1)


def recipe(steps, **ppo):
    return {"ppo": {"rollout_batch": 16, "minibatch": 4, "max_new_tokens": 8, **ppo},
            "train": {"max_steps": steps, "lr": 1e-2, "checkpoint_every": 2, "progress": False}}


def read_metrics(run):
    return [json.loads(line) for line in open(run / "metrics.jsonl")]


# ----------------------------------------------------------------------------------------- the math, by hand

def test_rewards_kl_and_gae_as_computed_by_hand():
    beta, lam = 0.1, 0.95
    logprobs = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -9.0, -9.0]])
    ref = torch.tensor([[-1.5, -1.0, -0.5], [-0.1, -9.0, -9.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    scores = torch.tensor([2.0, -1.0])
    rewards, kl = per_token_rewards(scores, logprobs, ref, mask, beta)
    # kl_t = log π − log π_ref; r_t = −β kl_t, the score added on each row's last response token, 0 past it
    assert torch.allclose(kl, torch.tensor([[0.5, -1.0, 0.0], [-0.2, 0.0, 0.0]]))
    assert torch.allclose(rewards, torch.tensor([[-0.05, 0.1, 2.0], [0.02 - 1.0, 0.0, 0.0]]))

    values = torch.tensor([[0.5, 0.2, 1.0], [0.3, 7.0, 7.0]])        # values past the response are ignored
    adv, ret = advantages_and_returns(rewards, values, mask, PPOConfig(lam=lam, whiten_advantages=False))
    a2 = 2.0 - 1.0                                                    # δ_2 = r_2 + 0 − V_2
    a1 = 0.1 + 1.0 - 0.2 + lam * a2                                   # δ_1 + γλ A_2
    a0 = -0.05 + 0.2 - 0.5 + lam * a1
    assert torch.allclose(adv, torch.tensor([[a0, a1, a2], [-0.98 - 0.3, 0.0, 0.0]]))
    assert torch.allclose(ret, torch.tensor([[a0 + 0.5, a1 + 0.2, a2 + 1.0], [-0.98, 0.0, 0.0]]))

    whitened, ret_w = advantages_and_returns(rewards, values, mask, PPOConfig(lam=lam))
    valid = mask.bool()
    assert whitened[valid].mean().abs() < 1e-6 and whitened[valid].std() == pytest.approx(1.0, abs=1e-4)
    assert torch.equal(whitened[~valid], torch.zeros(2)) and torch.allclose(ret_w, ret)


def test_clipped_objective_as_computed_by_hand():
    ratios = torch.tensor([[1.5, 0.5, 1.1]])
    batch = {"response_mask": torch.ones(1, 3), "logprobs": torch.zeros(1, 3),
             "advantages": torch.tensor([[1.0, 1.0, -2.0]]),
             "values": torch.tensor([[0.0, 0.0, 0.9]]), "returns": torch.tensor([[1.0, 1.0, 0.0]])}
    values = torch.tensor([[0.5, 0.0, 1.0]])
    loss, stats = ppo_losses(ratios.log(), values, batch, PPOConfig(clip_range=0.2, value_clip=0.2, vf_coef=0.1))
    # policy: max(−Aρ, −A clip(ρ, 0.8, 1.2)) = max(−1.5, −1.2), max(−0.5, −0.8), max(2.2, 2.2)
    policy = (-1.2 - 0.5 + 2.2) / 3
    # value: V_old + clip(V − V_old, ±0.2) = 0.2, 0.0, 1.0; ½ mean of max squared errors (0.64, 1, 1)
    value = 0.5 * (0.64 + 1.0 + 1.0) / 3
    assert stats["policy_loss"] == pytest.approx(policy, abs=1e-6)
    assert stats["value_loss"] == pytest.approx(value, abs=1e-6)
    assert stats["clip_fraction"] == pytest.approx(1 / 3)
    assert loss.item() == pytest.approx(policy + 0.1 * value, abs=1e-6)


def test_adaptive_kl_controller():
    fixed = KLController(0.05)
    fixed.update(100.0, 16)
    assert fixed.coef == 0.05
    for kl, error in ((12.0, 0.2), (3.0, -0.2), (6.6, 0.1)):        # target 6: e = clip(KL/6 − 1, ±0.2)
        ctl = KLController(0.05, target=6.0, horizon=10000)
        ctl.update(kl, 16)
        assert ctl.coef == pytest.approx(0.05 * (1 + error * 16 / 10000))


# ----------------------------------------------------------------------------------------- rollouts

def test_rollout_layout_gives_the_engines_distribution(setup):
    """The packed (left-padded prompt, right-padded response) batch reproduces the logits the engine sampled
    from: greedy responses are the argmax of the training forward at every response position."""
    policy = load_our_model(setup["policy"])
    tokenizer = setup["tokenizer"]
    items = encode_prompts(setup["world"] / "rl_train.jsonl", tokenizer, TEMPLATES["llmlab"], 200)[:3]
    engine = Engine(policy, tokenizer, eos_token_ids=[])
    prompts = [item["ids"] for item in items]
    responses = [c.token_ids for c in engine.generate(prompts, SamplingParams(max_new_tokens=6, temperature=0))]
    responses[1] = responses[1][:2]                                   # rows of different lengths
    batch = rollout_batch(prompts, responses, tokenizer.pad_token_id)
    assert batch["response_start"] == max(len(p) for p in prompts)
    with torch.no_grad():
        logits, values = PolicyWithValue(policy)(batch["input_ids"], batch["attention_mask"],
                                                 batch["response_start"])
    mask = batch["response_mask"].bool()
    targets = batch["input_ids"][:, batch["response_start"]:]
    assert torch.equal(logits.argmax(-1)[mask], targets[mask]) and mask.sum() == 6 + 2 + 6
    assert torch.equal(values, torch.zeros_like(values))             # the value head starts at zero


# ----------------------------------------------------------------------------------------- a run

@pytest.fixture(scope="module")
def trained(setup):
    run = setup["root"] / "run"
    run_ppo(setup["policy"], setup["world"] / "rl_train.jsonl", run, recipe(10), reward=letter_share)
    return run


def test_short_run_raises_the_reward_and_keeps_kl_bounded(trained):
    records = read_metrics(trained)
    assert [r["step"] for r in records] == list(range(1, 11))
    scores = [r["score"] for r in records]
    first, last = sum(scores[:3]) / 3, sum(scores[-3:]) / 3            # about 0.42 → 0.57 on this seed
    assert last > first + 0.1 and last > 0.5
    assert records[0]["kl"] == pytest.approx(0.0, abs=1e-5)          # the policy starts as the reference
    assert max(r["kl"] for r in records) < 8.0        # nats per 8-token response (about 4–6 at lr 1e-2 here)
    for key in ("reward", "entropy", "clip_fraction", "value_loss", "policy_loss", "response_length", "kl_coef"):
        assert all(math.isfinite(r[key]) for r in records), key
    assert (trained / "reward.png").is_file() and (trained / "run.yaml").is_file()


def test_saved_policy_loads_in_transformers_and_the_engine(setup, trained):
    model_dir = trained / "model"
    theirs = transformers.AutoModelForCausalLM.from_pretrained(model_dir).eval()
    assert type(theirs).__name__ == "LlamaForCausalLM"               # the value head is not saved
    ours = load_our_model(model_dir)
    ids = torch.tensor([encode_prompts(setup["world"] / "rl_train.jsonl", setup["tokenizer"], TEMPLATES["llmlab"],
                                     200)[0]["ids"]])
    with torch.no_grad():
        assert torch.allclose(ours(ids), theirs(ids).logits, atol=1e-4)
    assert not torch.allclose(ours(ids), load_our_model(setup["policy"])(ids))   # it did change
    completion = Engine.from_path(str(model_dir)).generate([ids[0].tolist()], SamplingParams(max_new_tokens=4))[0]
    assert 1 <= len(completion.token_ids) <= 4


def test_resume_continues_exactly(setup, trained, tmp_path):
    data = setup["world"] / "rl_train.jsonl"
    run_ppo(setup["policy"], data, tmp_path, recipe(1), reward=letter_share)        # checkpoints its last step
    with pytest.raises(LLMLabError, match="--resume"):
        run_ppo(setup["policy"], data, tmp_path, recipe(3), reward=letter_share)
    run_ppo(setup["policy"], data, tmp_path, recipe(3), reward=letter_share, resume=True)
    resumed, straight = read_metrics(tmp_path), read_metrics(trained)[:3]
    assert [r["step"] for r in resumed] == [1, 2, 3]
    for a, b in zip(resumed, straight):
        assert a["score"] == pytest.approx(b["score"], abs=1e-6) and a["kl"] == pytest.approx(b["kl"], abs=1e-4)


def test_value_head_learns_at_its_own_rate(setup, tmp_path):
    """ppo.value_lr_scale: the value head is its own AdamW group at that multiple of the policy's learning rate."""
    run_ppo(setup["policy"], setup["world"] / "rl_train.jsonl", tmp_path, recipe(2, value_lr_scale=30),
            reward=letter_share)
    groups = load_latest(tmp_path).optimizer["param_groups"]
    assert [g["lr"] for g in groups] == pytest.approx([1e-2] * (len(groups) - 1) + [0.3])
    assert sorted(groups[-1]["params"]) == ["value_head.bias", "value_head.weight"]
    assert not any(name.startswith("value_head") for g in groups[:-1] for name in g["params"])
    with pytest.raises(LLMLabError, match="ppo.value_lr_scale must be > 0"):
        run_ppo(setup["policy"], setup["world"] / "rl_train.jsonl", tmp_path / "bad", recipe(1, value_lr_scale=0),
                reward=letter_share)


def test_ppo_whole_number_fields_refuse_fractions():
    with pytest.raises(LLMLabError, match=r"ppo.rollout_batch: expected a whole number, got 2.5"):
        from_dict(PPOConfig, {"rollout_batch": 2.5}, "ppo")
    assert from_dict(PPOConfig, {"rollout_batch": "1e1", "minibatch": 5.0}, "ppo").rollout_batch == 10
    with pytest.raises(LLMLabError, match="ppo.epochs: expected a number"):
        from_dict(PPOConfig, {"epochs": "many"}, "ppo")


# ----------------------------------------------------------------------------------------- rewards and errors

def test_world_and_reward_model_scorers(setup, tmp_path):
    data = setup["world"] / "rl_train.jsonl"
    items = encode_prompts(data, setup["tokenizer"], TEMPLATES["llmlab"], 200)[:4]
    world = make_scorer("world", {"reward": {}}, data, items, "cpu")          # the world folder is data's
    assert world(items, [item["reference"] for item in items]) == [1.0] * 4
    save_decoder(tmp_path / "rm", setup["tokenizer"], num_labels=1)
    rm = make_scorer(str(tmp_path / "rm"), {"reward": {"batch_size": 3}}, data, items, "cpu")
    assert len(rm(items, ["a b", "c", "d e f", "g"])) == 4


def test_missing_or_wrong_reward_is_a_clear_error(setup, tmp_path, capsys):
    data = setup["world"] / "rl_train.jsonl"
    with pytest.raises(LLMLabError, match="ppo needs a reward"):
        run_ppo(setup["policy"], data, tmp_path / "a", recipe(1), reward=None)
    code = main(["ppo", "--model", str(setup["policy"]), "--data", str(data), "--out", str(tmp_path / "b")])
    assert code == 2 and "ppo needs a reward: --reward RM_DIR" in capsys.readouterr().err
    with pytest.raises(LLMLabError, match="no reward head"):
        run_ppo(setup["policy"], data, tmp_path / "c", recipe(1), reward=str(setup["policy"]))
    other = tmp_path / "prompts.jsonl"
    other.write_text(json.dumps({"prompt": "hi"}) + "\n")
    with pytest.raises(LLMLabError, match="reward.world"):
        run_ppo(setup["policy"], other, tmp_path / "d", recipe(1), reward="world")
    with pytest.raises(LLMLabError, match=r"needs the field\(s\) kind, reference"):
        run_ppo(setup["policy"], other, tmp_path / "e", {**recipe(1), "reward": {"world": str(setup["world"])}},
                reward="world")
