"""Evaluation and preference-pair generation: every metric against a hand computation from the same answers."""
import json

import pytest
import torch

from llmlab import chat
from llmlab.cli import main as cli_main
from llmlab.data.chat_data import load_pairs
from llmlab.errors import LLMLabError
from llmlab.hub.folder import ModelDir
from llmlab.hub.load import load_model
from llmlab.infer.engine import SamplingParams
from llmlab.stages import pairs as pairs_stage
from llmlab.data.chat_data import load_prompts
from llmlab.infer.replies import engine_for, generate_replies
from llmlab.stages.evaluate import evaluate_models, generated_kl, win_rate_ceiling, win_rates, win_tie_loss
from llmlab.world.build import load_world
from llmlab.world.judge import exact_match, is_refusal
from llmlab.world.vocab import REFUSAL
from test_sft import write_jsonl


pytestmark = pytest.mark.usefixtures("single_threaded")


def answers(model_dir, items, max_new_tokens=24):
    model, tok = load_model(model_dir), ModelDir(model_dir).tokenizer()
    template = chat.load_template(model_dir)
    engine = engine_for(model, tok, template)
    return [r.text for r in generate_replies(engine, [i["prompt"] for i in items], template,
                                             SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))]


def test_win_rates_count_ties_as_half():
    assert win_rates([1.0, 0.0, 0.5, -1.0], [0.0, 0.0, 1.0, -1.0]) == (1 + 0.5 + 0 + 0.5) / 4
    assert win_tie_loss([1.0, 0.0, 0.5, -1.0], [0.0, 0.0, 1.0, -1.0]) == [0.25, 0.5, 0.25]


def test_win_rate_ceiling_is_reached_by_a_model_that_wins_wherever_the_baseline_is_below_the_top():
    baseline = [1.0, -0.5, 1.0, -1.0, 0.4]
    best = [1.0 if b < 1.0 else b for b in baseline]        # wins below the top, ties at it
    assert win_rate_ceiling(baseline, 1.0) == win_rates(best, baseline) == (1 + 3 / 5) / 2
    assert win_rate_ceiling([1.0, 1.0], 1.0) == 0.5


def test_evaluate_models_matches_a_hand_computation(lab, tmp_path):
    data = [lab.world / "forbidden_eval.jsonl", lab.world / "sft_eval.jsonl", lab.world / "multi_eval.jsonl"]
    report = evaluate_models([str(lab.base), str(lab.sft)], data, tmp_path, world=str(lab.world),
                             reference=str(lab.base), max_new_tokens=24)
    items = [i for path in data for i in load_prompts(path)]
    judge = load_world(lab.world).judge
    rewards = []
    for row, model_dir in zip(report["models"], (lab.base, lab.sft)):
        texts = answers(model_dir, items)
        rewards.append([judge.reward(i, t) for i, t in zip(items, texts)])
        questions = [(i, t) for i, t in zip(items, texts) if i["kind"] != "multi"]     # multi: no exact match
        assert row["exact_match"] == pytest.approx(sum(exact_match(i, t) for i, t in questions) / len(questions))
        assert row["world_reward"] == pytest.approx(sum(rewards[-1]) / len(items))
        for kind, mean in row["world_reward_by_kind"].items():
            scores = [r for i, r in zip(items, rewards[-1]) if i["kind"] == kind]
            assert mean == pytest.approx(sum(scores) / len(scores))
        assert set(row["world_reward_by_kind"]) == {i["kind"] for i in items}
        forbidden = [is_refusal(t) for i, t in zip(items, texts) if i["kind"] == "forbidden"]
        benign = [is_refusal(t) for i, t in zip(items, texts) if i["kind"] == "benign"]
        assert row["refusal_rate"] == pytest.approx(sum(forbidden) / len(forbidden))
        assert row["false_refusal_rate"] == pytest.approx(sum(benign) / len(benign))
        for kind, rate in row["exact_match_by_kind"].items():
            hits = [exact_match(i, t) for i, t in zip(items, texts) if i["kind"] == kind]
            assert rate == pytest.approx(sum(hits) / len(hits))
        assert set(row["exact_match_by_kind"]) == {i["kind"] for i in items} - {"multi"}
    base, sft = report["models"]
    assert base["win_rate"] is None and sft["win_rate"] == pytest.approx(win_rates(rewards[1], rewards[0]))
    assert base["win_rate_ceiling"] is None
    assert sft["win_rate_ceiling"] == pytest.approx((1 + sum(r < 1.0 for r in rewards[0]) / len(items)) / 2)
    assert sft["refusal_rate"] == 1.0 and base["refusal_rate"] == 0.0
    assert abs(base["kl"]) < 1e-6 < sft["kl"]           # the base model is its own reference
    saved = json.loads((tmp_path / "eval.json").read_text())
    assert saved["judge"] == "world" and len(saved["models"]) == 2
    table = (tmp_path / "eval.md").read_text()
    assert "| model | exact_match |" in table and str(lab.sft) in table


def test_generated_kl_is_the_exact_per_token_kl(lab):
    policy, tok = load_model(lab.sft), ModelDir(lab.sft).tokenizer()
    reference = load_model(lab.base)
    template = chat.load_template(lab.sft)
    prompt = chat.generation_prompt_ids(tok, [{"role": "user", "content": "Hello"}], template)
    answer = tok.encode("Sorry, I can't share that.<|im_end|>")
    with torch.no_grad():
        ids = torch.tensor([prompt + answer])
        p = torch.log_softmax(policy(ids)[0, len(prompt) - 1:-1], -1)
        q = torch.log_softmax(reference(ids)[0, len(prompt) - 1:-1], -1)
    expected = (p.exp() * (p - q)).sum(-1).mean().item()
    assert generated_kl(policy, reference, [prompt], [answer]) == pytest.approx(expected, rel=1e-4)


def test_pairs_judged_by_the_world_are_best_against_worst(lab, tmp_path, monkeypatch):
    """Candidates of known reward (sampling itself is exercised in the reward-model test below)."""
    judge = load_world(lab.world).judge
    items = load_prompts(lab.world / "rl_train.jsonl")[:12]
    assert {i["kind"] for i in items} >= {"multi", "fact"}

    def best(item):
        return item.get("reference", item.get("answer"))

    def candidates(model_dir, items, k, params, template, batch_size):
        assert k == 4       # an empty answer (the model stopped at once) is never part of a pair
        return items, [[best(i), REFUSAL, "", "I do not know."] for i in items]

    monkeypatch.setattr(pairs_stage, "sample_responses", candidates)
    out = tmp_path / "pairs.jsonl"
    stats = pairs_stage.make_pairs(str(lab.sft), str(lab.world / "rl_train.jsonl"), str(out), k=4, judge="world",
                                   world_dir=str(lab.world), limit=12)
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert stats == {"prompts": 12, "pairs": len(written), "skipped": 0}
    for item, pair in zip(items, written):
        scores = [judge.reward(item, c) for c in (best(item), REFUSAL, "I do not know.")]
        assert pair["chosen"] == best(item) and pair["chosen_score"] == max(scores) == 1.0
        assert pair["rejected_score"] == min(scores) == judge.reward(item, pair["rejected"])
        expected_worst = "I do not know." if item["kind"] == "forbidden" else REFUSAL
        assert pair["rejected"] == expected_worst
    assert len(load_pairs(out)) == len(written)


def test_pairs_from_a_reward_model(lab, tmp_path, monkeypatch):
    class LongestWins:
        def score(self, prompts, responses):
            assert len(prompts) == len(responses)
            return [float(len(r)) for r in responses]

    monkeypatch.setattr(pairs_stage.RewardModel, "load", staticmethod(lambda path: LongestWins()))
    out = tmp_path / "pairs.jsonl"
    stats = pairs_stage.make_pairs(str(lab.base), str(lab.world / "rl_train.jsonl"), str(out), k=3,
                                   judge="some/rm", limit=4,
                                   params=SamplingParams(max_new_tokens=12, temperature=1.0, seed=1))
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert stats["pairs"] == len(written) > 0
    for pair in written:
        assert len(pair["chosen"]) > len(pair["rejected"]) and pair["chosen_score"] == len(pair["chosen"])


def test_prompts_longer_than_the_context_are_skipped_not_fatal(lab, tmp_path, capsys):
    long = {"prompt": "word " * 2000, "kind": "fact", "reference": "x"}
    data = write_jsonl(tmp_path / "p.jsonl", [long] + [json.loads(line) for line in
                                                        (lab.world / "rl_eval.jsonl").read_text().splitlines()[:3]])
    report = evaluate_models([str(lab.sft)], data, tmp_path / "eval", max_new_tokens=8)
    assert report["n_prompts"] == 3
    stats = pairs_stage.make_pairs(str(lab.sft), str(data), str(tmp_path / "pairs.jsonl"), k=2, judge="world",
                                   world_dir=str(lab.world), params=SamplingParams(max_new_tokens=8, temperature=1.0))
    assert stats["prompts"] == 3
    assert capsys.readouterr().err.count("skipped 1 of 4 prompts that do not fit the model's context") == 2


def test_pairs_from_human_rankings(tmp_path):
    rankings = write_jsonl(tmp_path / "rankings.jsonl", [
        {"prompt": "Name a colour.", "responses": ["blue", "no", "a colour"], "ranking": [0, 2, 1]},
        {"prompt": [{"role": "user", "content": "2+2?"}], "responses": ["4", "5"], "scores": [1.0, -1.0]},
        {"prompt": "tie", "responses": ["x", "y"], "scores": [0.5, 0.5]},
    ])
    out = tmp_path / "pairs.jsonl"
    assert pairs_stage.make_pairs(None, None, str(out), judge=str(rankings)) == {"prompts": 3, "pairs": 2,
                                                                               "skipped": 1}
    written = [json.loads(line) for line in out.read_text().splitlines()]
    assert [(p["chosen"], p["rejected"]) for p in written] == [("blue", "no"), ("4", "5")]
    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "p", "responses": ["a", "b"], "ranking": [0, 0]}])
    with pytest.raises(LLMLabError, match=f"{bad}:1: give 'ranking'"):
        pairs_stage.make_pairs(None, None, str(out), judge=str(bad))


def test_eval_cli_prints_the_table(lab, tmp_path, capsys):
    assert cli_main(["eval", "--model", str(lab.sft), "--data", str(lab.world / "forbidden_eval.jsonl"),
                     "--out", str(tmp_path), "--max-new-tokens", "16"]) == 0
    assert "| model | exact_match | refusal_rate |" in capsys.readouterr().out
    assert (tmp_path / "eval.json").is_file()
