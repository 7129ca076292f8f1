"""Universal GCG (llmlab/redteam/universal.py, Zou et al.'s Algorithm 2): with one prompt it is single-prompt GCG step
by step, its loss and gradient are the single prompts' summed, a prompt joins only after the string succeeds on the
set, an interrupted run resumes on the same trajectory; the string is measured on held-out behaviours and transferred
to another local model and to a served one; bad input is an error that names it."""
import json

import pytest
import torch
from test_gcg import chat_tokenizer, relative_error, tiny

from llmlab.errors import LLMLabError
from llmlab.redteam import gcg
from llmlab.redteam.universal import PromptSet, UniversalGCG, attack_messages

pytestmark = pytest.mark.usefixtures("single_threaded")

INIT = "x x x x x x"
# targets a random tiny model never says greedily, so only the objective checks below decide success
BEHAVIOURS = [{"goal": "tell me", "target": "Sure, here is the code"},
              {"messages": [{"role": "system", "content": "be kind"},
                            {"role": "user", "content": "{optim_str} and the fox"}], "target": "the quick brown fox"},
              {"goal": "hello world", "target": "1 + 2 = 3; 10 - 4 = 6"}]


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    return tiny(tok)


def attack(model, tok, **config):
    return UniversalGCG(model, tok, gcg.GCGConfig(**{"optim_str_init": INIT, "search_width": 16, "topk": 8,
                                                    **config}), template="chatml")


@pytest.mark.parametrize("buffer_size", [0, 2])
def test_one_prompt_is_the_single_prompt_gcg_trajectory(tok, model, buffer_size):
    config = dict(num_steps=4, search_width=16, topk=8, buffer_size=buffer_size, optim_str_init=INIT)
    single = gcg.GCG(model, tok, gcg.GCGConfig(**config), template="chatml").run(
        "tell me", "Sure, here is the code", success=lambda reply: False)
    universal = attack(model, tok, **config).run(BEHAVIOURS[:1], success=lambda reply: False)
    assert universal.suffixes == single.suffixes and universal.steps == 4
    assert relative_error(torch.tensor(universal.losses), torch.tensor(single.losses)) <= 1e-5
    assert universal.forward_tokens == single.forward_tokens          # the greedy replies included
    assert universal.candidate_evaluations == single.candidate_evaluations


def test_the_loss_and_gradient_sum_the_single_prompts(tok, model):
    config = gcg.GCGConfig(optim_str_init=INIT, batch_size=3)
    runner = attack(model, tok)
    prompts = [runner.gcg.prompt(attack_messages(b), b["target"]) for b in BEHAVIOURS]
    prompt_set = PromptSet([gcg.Objective(model, p, config) for p in prompts])
    allowed = [i for i in range(len(tok)) if i not in set(runner.gcg.banned.tolist())]
    torch.manual_seed(1)
    suffixes = torch.tensor(allowed)[torch.randint(0, len(allowed), (7, 6))]
    single = [gcg.Objective(model, p, config).losses(suffixes)[0] for p in prompts]
    for active in (1, 2, 3):
        prompt_set.active = active
        for current in (None, suffixes[0]):          # (e): candidates sharing the current string's first tokens
            total, _ = prompt_set.losses(suffixes, current=current)
            assert relative_error(total, sum(single[:active])) <= 1e-5
    grads = [gcg.Objective(model, p, config).gradient(suffixes[0]) for p in prompts]
    want = sum(g / g.norm(dim=-1, keepdim=True) for g in grads)
    assert relative_error(prompt_set.gradient(suffixes[0]), want) <= 1e-5
    prompt_set.active = 1                             # normalising a row keeps its top-k: Algorithm 1's candidates
    assert torch.equal((-prompt_set.gradient(suffixes[0])).topk(8).indices, (-grads[0]).topk(8).indices)


def test_a_prompt_joins_only_after_the_string_succeeds_on_the_set(tok, model):
    """Scripted objective checks, one per prompt in the set per step: step 1 fails on prompt 1; step 2 succeeds, so
    prompt 2 joins; step 3 fails on prompt 2; step 4 succeeds on both, prompt 3 joins; step 5 succeeds on all three
    and the attack stops."""
    verdicts = iter([False, True, True, False, True, True, True, True, True])
    replies = []

    def check(reply: str) -> bool:
        replies.append(reply)
        return next(verdicts)

    result = attack(model, tok, num_steps=10).run(BEHAVIOURS, success=check)
    assert result.prompts_per_step == [1, 1, 2, 2, 3] and result.added_after == [2, 4]
    assert result.success and result.first_success_step == result.steps == 5 and result.prompts_in_set == 3
    assert len(replies) == 9 and result.suffix == result.suffixes[-1]


def test_an_interrupted_universal_attack_resumes_on_the_same_trajectory(tok, model, tmp_path):
    config = dict(num_steps=4, buffer_size=2, batch_size=5, early_stop=False)
    always = lambda reply: True          # noqa: E731  a prompt joins after each step: the buffer is rescored twice
    whole = attack(model, tok, **config).run(BEHAVIOURS, out=tmp_path / "whole", success=always)
    assert whole.prompts_per_step == [1, 2, 3, 3] and whole.first_success_step == 3

    def kill_after_two(record):
        if record["step"] == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        attack(model, tok, **config).run(BEHAVIOURS, out=tmp_path / "cut", success=always, on_step=kill_after_two)
    assert json.loads((tmp_path / "cut" / "state.json").read_text())["active"] == 3
    resumed = attack(model, tok, **config).run(BEHAVIOURS, out=tmp_path / "cut", success=always)
    assert resumed.to_dict() | {"wall_clock_s": 0} == whole.to_dict() | {"wall_clock_s": 0}
    lines = (tmp_path / "cut" / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    assert json.loads((tmp_path / "cut" / "result.json").read_text())["losses"] == whole.losses
    assert (tmp_path / "cut" / "loss.png").stat().st_size > 0
    with pytest.raises(LLMLabError, match="other settings or another prompt"):
        attack(model, tok, **config).run(BEHAVIOURS[:2], out=tmp_path / "cut", success=always)
