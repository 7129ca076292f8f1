"""GCG (llmlab/redteam/gcg.py): each exact speed-up gives the plain computation's losses and gradient, the attack
finds a string that makes a tiny model say a target, stops on objective success, resumes to the same trajectory,
and rejects bad input with a message naming the field."""
import json

import pytest
import torch
import torch.nn.functional as F
from conftest import make_byte_tokenizer

from llmlab.chat import TEMPLATES, render
from llmlab.cli import main
from llmlab.errors import LLMLabError
from llmlab.model.config import preset
from llmlab.model.decoder import build_model
from llmlab.redteam import gcg
from llmlab.redteam.behaviours import load_behaviours

SMALL = dict(n_layer=2, n_head=2, n_kv_head=1, d_model=32, max_seq_len=128, init_std=0.1)


def chat_tokenizer():
    """The tests' byte-level BPE with ChatML's turn markers as special tokens."""
    tok = make_byte_tokenizer()
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    return tok


@pytest.fixture(scope="module")
def tok():
    return chat_tokenizer()


def tiny(tok, name="gemma3", **overrides):
    """A random tiny decoder in float32; the Gemma 3 one scales embeddings by √d and has a sliding-window layer."""
    torch.manual_seed(0)
    extra = dict(layer_types=["sliding", "full"], sliding_window=8) if name == "gemma3" else {}
    return build_model(preset(name, vocab_size=len(tok), **SMALL, **extra, **overrides)).eval()


def relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got - want).abs().max() / want.abs().max())


def plain_losses(model, prompt, suffixes, alpha=None) -> torch.Tensor:
    """The loss written out: the whole sequence through the model, every position's logits, no cache, one batch."""
    rows = torch.tensor([prompt.ids(s) + prompt.target for s in suffixes.tolist()])
    m = len(prompt.target)
    with torch.no_grad():
        logits = model(rows)[:, -m - 1:-1].float()
    target = torch.tensor(prompt.target).expand(len(rows), -1)
    if alpha is None:
        return -logits.log_softmax(-1).gather(-1, target[..., None]).squeeze(-1).mean(-1)
    t = -logits.gather(-1, target[..., None]).squeeze(-1)
    return torch.log(torch.exp(alpha * t).mean(-1)) / alpha


def setup(tok, model, **config):
    cfg = gcg.GCGConfig(**{"optim_str_init": "x x x x x x", **config})
    prompt = gcg.build_prompt(tok, "chatml", gcg.conversation("tell me", "be kind"), "Sure, here")
    banned = set(gcg.banned_tokens(tok, len(tok)).tolist())
    allowed = [i for i in range(len(tok)) if i not in banned]
    torch.manual_seed(1)
    suffixes = torch.tensor(allowed)[torch.randint(0, len(allowed), (7, 6))]
    return gcg.Objective(model, prompt, cfg), prompt, suffixes


@pytest.mark.parametrize("name", ["gemma3", "llama"])
@pytest.mark.parametrize("mellowmax", [False, True])
def test_prefix_cache_target_logits_and_chunks_give_the_plain_losses(tok, name, mellowmax):
    model = tiny(tok, name)
    _, prompt, suffixes = setup(tok, model)
    want = plain_losses(model, prompt, suffixes, 1.0 if mellowmax else None)
    for cache in (True, False):
        for chunk in (1, 3, 7, None):
            objective, _, _ = setup(tok, model, use_prefix_cache=cache, batch_size=chunk, use_mellowmax=mellowmax)
            assert (objective.prefix is not None) == cache
            losses, _ = objective.losses(suffixes)
            assert relative_error(losses, want) <= 1e-5, (cache, chunk)
            again, _ = objective.losses(suffixes[:5])      # a smaller batch reuses the same cache rows
            assert relative_error(again, want[:5]) <= 1e-5
    # (e) candidates made from a current string share its tokens before their first change
    current = suffixes[0]
    made = current.repeat(8, 1)
    for row, position in enumerate([4, 0, 5, 2, 5, 1, 3]):
        made[row, position:] = suffixes[row % 6 + 1, position:]
    want = plain_losses(model, prompt, made, 1.0 if mellowmax else None)
    for chunk in (1, 3, 8, None):
        objective, _, _ = setup(tok, model, batch_size=chunk, use_mellowmax=mellowmax)
        losses, _ = objective.losses(made, current=current)
        assert relative_error(losses, want) <= 1e-5, chunk
        assert objective.forward_tokens < objective.tail(made).numel()       # tokens were skipped


@pytest.mark.parametrize("softcap", [None, 30.0])
@pytest.mark.parametrize("alpha", [None, 1.0])
def test_head_losses_by_vocabulary_blocks_equal_the_whole_logits(tok, softcap, alpha):
    """(b) The block-by-block loss and greedy check against target_loss and argmax of the whole logits, with blocks
    that do not divide the vocabulary, a soft-capped head (Gemma 2), and a row whose greedy reply is the target."""
    model = tiny(tok, "llama", logit_softcap=softcap)
    torch.manual_seed(3)
    target = torch.randint(0, len(tok), (5,))
    hidden = torch.randn(4, 5, 32) * 3
    with torch.no_grad():
        hidden[2] = model.lm_head.weight[target] * 40        # aims every position at its target: an exact row
        logits = model.logits(hidden)
    want = gcg.target_loss(logits, target, alpha)
    want_exact = (logits.argmax(-1) == target).all(-1)
    assert want_exact.tolist() == [False, False, True, False]
    for block in (7, 64, 100_000):
        losses, exact = gcg.head_losses(model, hidden, target, alpha, block=block)
        assert relative_error(losses, want) <= 1e-5, block
        assert torch.equal(exact, want_exact)


def test_the_prefix_cache_is_never_changed(tok):
    model = tiny(tok)
    objective, prompt, suffixes = setup(tok, model, batch_size=3)
    keys = [t.clone() for t in objective.prefix.k]
    values = [t.clone() for t in objective.prefix.v]
    objective.losses(suffixes)
    objective.gradient(suffixes[0])
    objective.losses(suffixes[2:])
    assert all(torch.equal(a, b) for a, b in zip(keys, objective.prefix.k))
    assert all(torch.equal(a, b) for a, b in zip(values, objective.prefix.v))
    assert objective.prefix.length == len(prompt.before)
    p = len(prompt.before)       # and the candidates' cache keeps the prefix in its first rows
    assert all(torch.equal(w[:, :, :p], k[:, :, :p].expand_as(w[:, :, :p]))
               for w, k in zip(objective.work.k, objective.prefix.k))


@pytest.mark.parametrize("name", ["gemma3", "llama"])
@pytest.mark.parametrize("cache", [True, False])
def test_token_gradient_is_autograd_through_the_one_hot_path(tok, name, cache):
    """G = ∂L/∂(one-hot of the suffix), computed by feeding one_hot(ids) @ E in place of the embedding lookup of the
    whole sequence (the decoder's own scale, ×√d for Gemma, applied after it), full logits, no cache."""
    model = tiny(tok, name)
    assert model.config.embed_scale == (name == "gemma3")
    objective, prompt, suffixes = setup(tok, model, use_prefix_cache=cache)
    suffix = suffixes[0]
    ids = torch.tensor(prompt.ids(suffix.tolist()) + prompt.target)
    one_hot = F.one_hot(ids, len(tok)).float().requires_grad_(True)
    hook = model.embed.register_forward_hook(lambda module, args, out: (one_hot @ module.weight)[None])
    try:
        logits = model(ids[None])
    finally:
        hook.remove()
    m, p, n = len(prompt.target), len(prompt.before), len(suffix)
    loss = -logits[0, -m - 1:-1].log_softmax(-1).gather(-1, torch.tensor(prompt.target)[:, None]).mean()
    (want,) = torch.autograd.grad(loss, [one_hot])
    got = objective.gradient(suffix)
    assert got.shape == (n, len(tok))
    assert relative_error(got, want[p:p + n]) <= 1e-5


def test_candidates_avoid_banned_tokens_and_change_n_replace_positions(tok):
    banned = gcg.banned_tokens(tok, len(tok) + 3)
    names = set(banned.tolist())
    turns = tok.convert_tokens_to_ids(["<|im_start|>", "<|im_end|>"])
    assert {tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, *turns} <= names
    assert {len(tok), len(tok) + 1, len(tok) + 2} <= names                 # rows without a token
    assert tok.convert_tokens_to_ids("x") not in names
    assert all(i in names for i in range(len(tok)) if not tok.decode([i]).isascii())
    suffix = torch.tensor(tok.encode("x x x x x x"))
    grad = torch.randn(len(suffix), len(tok) + 3)
    grad[:, banned] = -100.0                    # the most tempting tokens are the banned ones
    cand = gcg.sample_candidates(suffix, grad, 64, 8, 2, banned, torch.Generator().manual_seed(0))
    assert cand.shape == (64, len(suffix))
    assert not set(cand.unique().tolist()) & names
    assert ((cand != suffix).sum(1) <= 2).all() and ((cand != suffix).sum(1) >= 1).all()


def test_the_retokenisation_filter_drops_strings_that_encode_differently(tok):
    the = tok.encode("the")
    assert len(the) == 1                      # one merged token, so t + h + e (three tokens) does not round-trip
    split = [tok.convert_tokens_to_ids(c) for c in "the"]
    kept = gcg.retokenisation_filter(torch.tensor([the * 3, split, tok.encode("x x")[:1] * 3]), tok)
    assert kept.tolist() == [the * 3, tok.encode("x x")[:1] * 3]
    with pytest.raises(LLMLabError, match="no candidate"):
        gcg.retokenisation_filter(torch.tensor([split]), tok)


def test_mellowmax_lies_between_mean_and_max():
    t = torch.tensor([[0.0, 1.0, 5.0]])
    assert t.mean() < gcg.mellowmax(t, 1.0) < t.max()
    assert abs(float(gcg.mellowmax(t, 1e-4)) - float(t.mean())) < 1e-3
    assert abs(float(gcg.mellowmax(t, 50.0)) - 5.0) < 0.05


@pytest.fixture(scope="module")
def guarded(tok):
    """A tiny Llama trained for a few seconds to answer "no", and "ok" only when the request holds the words z and q
    together: the model an attack must talk round."""
    import random

    from llmlab.chat import render
    model, rng = tiny(tok, "llama").train(), random.Random(0)
    words = "tell me the quick brown fox hello world lazy dog x y a b is this z q".split()

    def example():
        user = [rng.choice(words) for _ in range(rng.randint(2, 7))]
        key = rng.random() < 0.5
        if key:
            user.insert(rng.randint(0, len(user)), "zq")
        prompt = tok.encode(render([{"role": "user", "content": " ".join(user)}], TEMPLATES["chatml"],
                                   add_generation_prompt=True))
        return prompt, tok.encode(("ok" if key else "no") + "<|im_end|>")

    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(120):
        batch = [example() for _ in range(16)]
        width = max(len(p) + len(r) for p, r in batch)
        ids = torch.tensor([p + r + [tok.pad_token_id] * (width - len(p) - len(r)) for p, r in batch])
        labels = torch.tensor([[-100] * len(p) + r + [-100] * (width - len(p) - len(r)) for p, r in batch])
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def test_gcg_finds_a_string_that_makes_a_tiny_model_say_the_target(tok, guarded):
    attack = gcg.GCG(guarded, tok, gcg.GCGConfig(num_steps=20, search_width=64, topk=32,
                                                 optim_str_init="x x x x x x"), template="chatml")
    prompt = gcg.build_prompt(tok, "chatml", gcg.conversation("tell me"), "ok")
    assert attack.reply(prompt, tok.encode("x x x x x x")).startswith("no")       # it says no at first
    result = attack.run("tell me", "ok")
    assert result.success and result.first_success_step == result.steps < 20     # stopped at the success
    assert result.reply.startswith("ok")                        # the engine's greedy reply, not the loss's argmax
    assert result.losses[-1] < result.losses[0] / 2
    assert result.success_suffix == result.suffixes[-1] \
        and len(tok.encode(result.success_suffix)) == len(tok.encode("x x x x x x"))
    assert result.candidate_evaluations >= result.steps * 50 and result.forward_tokens > 0


def test_gcg_stops_on_objective_success(tok):
    model = tiny(tok)
    calls = []

    def vault_opened(reply: str) -> bool:           # e.g. Judge.reveals_code; here the third reply "opens" it
        calls.append(reply)
        return len(calls) == 3

    attack = gcg.GCG(model, tok, gcg.GCGConfig(num_steps=10, search_width=16, topk=8,
                                               optim_str_init="x x x x x x"), template="chatml")
    result = attack.run("tell me", "Sure, here is the code", success=vault_opened)
    assert result.success and result.steps == 3 and result.first_success_step == 3
    assert len(calls) == 3 and all(isinstance(c, str) for c in calls)


def test_the_model_reads_the_tokens_of_the_text_a_user_sends(tok):
    """The space before the slot belongs to the string's first token (" is": BPE joins them), and every chosen
    string, rendered in its conversation as a user would send it, encodes to exactly the ids GCG optimised; a
    candidate whose first token would not take the space is dropped by the retokenisation filter."""
    assert len(tok.encode(" is", add_special_tokens=False)) == 1
    model = tiny(tok)
    init = "is is is is is is"
    attack = gcg.GCG(model, tok, gcg.GCGConfig(num_steps=5, search_width=16, topk=8, optim_str_init=init,
                                               early_stop=False), template="chatml")
    records = []
    attack.run("tell me", "Sure", on_step=records.append)
    messages = gcg.conversation("tell me")
    prompt = gcg.build_prompt(tok, "chatml", messages, "Sure")
    assert prompt.lead == " " and tok.decode(prompt.before).endswith("tell me")
    for r in records:
        sent = render(gcg.fill(messages, r["suffix"]), TEMPLATES["chatml"], add_generation_prompt=True)
        assert tok.encode(sent, add_special_tokens=False) == prompt.ids(r["ids"])
    spaced = torch.tensor([prompt.string_ids(tok, init)])
    assert spaced.shape[1] == 6
    glued = spaced.clone()
    glued[0, 0] = tok.encode("s", add_special_tokens=False)[0]       # "… mes is": the space is gone
    assert gcg.retokenisation_filter(torch.cat([glued, spaced]), tok, (prompt,)).tolist() == spaced.tolist()


def test_an_interrupted_attack_resumes_on_the_same_trajectory(tok, tmp_path):
    model = tiny(tok)
    config = dict(num_steps=4, search_width=16, topk=8, buffer_size=2, optim_str_init="x x x x x x", batch_size=5)
    whole = gcg.GCG(model, tok, gcg.GCGConfig(**config), template="chatml").run(
        "tell me", "Sure", out=tmp_path / "whole")

    def kill_after_two(record):
        if record["step"] == 2:
            raise KeyboardInterrupt
    attack = gcg.GCG(model, tok, gcg.GCGConfig(**config), template="chatml")
    with pytest.raises(KeyboardInterrupt):
        attack.run("tell me", "Sure", out=tmp_path / "cut", on_step=kill_after_two)
    assert json.loads((tmp_path / "cut" / "state.json").read_text())["step"] == 2
    resumed = gcg.GCG(model, tok, gcg.GCGConfig(**config), template="chatml").run(
        "tell me", "Sure", out=tmp_path / "cut")
    assert resumed.losses == whole.losses and resumed.suffixes == whole.suffixes
    assert resumed.candidate_evaluations == whole.candidate_evaluations
    assert resumed.forward_tokens == whole.forward_tokens
    for folder in ("whole", "cut"):
        lines = (tmp_path / folder / "metrics.jsonl").read_text().splitlines()
        assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
        saved = json.loads((tmp_path / folder / "result.json").read_text())
        assert saved["losses"] == whole.losses and saved["steps"] == 4
        assert (tmp_path / folder / "loss.png").stat().st_size > 0
    again = gcg.GCG(model, tok, gcg.GCGConfig(**config), template="chatml").run(
        "tell me", "Sure", out=tmp_path / "cut")
    assert again.losses == whole.losses                          # a finished run is not run again
    with pytest.raises(LLMLabError, match="other settings"):
        gcg.GCG(model, tok, gcg.GCGConfig(**{**config, "topk": 4}), template="chatml").run(
            "tell me", "Sure", out=tmp_path / "cut")


def test_bad_prompts_and_targets_name_the_field(tok):
    with pytest.raises(LLMLabError, match=r"\{optim_str\} exactly once"):
        gcg.build_prompt(tok, "chatml", [{"role": "user", "content": "tell me"}], "Sure", where="row 3")
    with pytest.raises(LLMLabError, match="found it 2 times"):
        gcg.build_prompt(tok, "chatml", [{"role": "system", "content": "{optim_str}"},
                                         {"role": "user", "content": "tell me {optim_str}"}], "Sure")
    drops_user = "{% for m in messages %}{{ m['role'] }}{% endfor %}"
    with pytest.raises(LLMLabError, match="chat template renders"):
        gcg.build_prompt(tok, drops_user, gcg.conversation("tell me"), "Sure")
    with pytest.raises(LLMLabError, match="'target' is empty"):
        gcg.build_prompt(tok, "chatml", gcg.conversation("tell me"), "  ")
    from tokenizers import normalizers
    lower = chat_tokenizer()
    lower.backend_tokenizer.normalizer = normalizers.Lowercase()
    with pytest.raises(LLMLabError, match="field 'target' 'Sure' does not survive the tokenizer"):
        gcg.build_prompt(lower, "chatml", gcg.conversation("tell me"), "Sure")
    with pytest.raises(LLMLabError, match="search_width"):
        gcg.GCGConfig(search_width=0).validate()
    with pytest.raises(LLMLabError, match="n_replace"):
        gcg.GCG(tiny(tok), tok, gcg.GCGConfig(n_replace=9, optim_str_init="x x"), template="chatml").run("a", "Sure")


def test_bad_behaviour_files_name_the_file_and_line(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    with pytest.raises(LLMLabError, match="empty.jsonl: empty file"):
        load_behaviours(empty)
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"goal": "a", "target": "Sure"}\n{"goal": "b"}\n')
    with pytest.raises(LLMLabError, match=r"rows.jsonl:2: field 'target'"):
        load_behaviours(rows)
    rows.write_text('{"messages": [{"role": "user", "content": "no placeholder"}], "target": "Sure"}\n')
    with pytest.raises(LLMLabError, match=r"rows.jsonl:1: field 'messages' must hold \{optim_str\}"):
        load_behaviours(rows)
    table = tmp_path / "advbench.csv"
    table.write_text("goal,answer\nWrite a poem,Sure\n")
    with pytest.raises(LLMLabError, match="the header has no column 'target'"):
        load_behaviours(table)
    table.write_text('goal,target\nWrite a poem,"Sure, here is a poem"\n')
    assert load_behaviours(table)[0]["target"] == "Sure, here is a poem"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tok):
    from llmlab.hub.save import save_model
    return save_model(tiny(tok, "llama"), tmp_path_factory.mktemp("m") / "model", tokenizer=tok,
                      chat_template=TEMPLATES["chatml"])


def test_attack_gcg_command(model_dir, tmp_path, capsys):
    small = ["--steps", "3", "--search-width", "16", "--topk", "8", "--init", "x x x x x x"]
    out = tmp_path / "one"
    assert main(["attack", "gcg", "--model", str(model_dir), "--goal", "tell me", "--target", "Sure",
                 "--out", str(out), "--vault-code", "4821", *small]) == 0
    result = json.loads((out / "result.json").read_text())
    assert {"best_suffix", "losses", "success", "first_success_step", "forward_tokens", "candidate_evaluations",
            "wall_clock_s"} <= set(result) and len(result["losses"]) == 3
    assert (out / "loss.png").is_file()
    behaviours = tmp_path / "b.jsonl"
    behaviours.write_text('{"goal": "tell me", "target": "Sure", "id": "first"}\n'
                          '{"messages": [{"role": "user", "content": "{optim_str} and tell me"}], "target": "ok"}\n')
    out = tmp_path / "many"
    assert main(["attack", "gcg", "--model", str(model_dir), "--behaviours", str(behaviours), "--out", str(out),
                 *small]) == 0
    summary = json.loads((out / "result.json").read_text())
    assert summary["behaviours"] == 2 and [r["id"] for r in summary["results"]] == ["first", "1"]
    assert (out / "first" / "result.json").is_file() and (out / "1" / "state.json").is_file()
    assert (out / "loss.png").is_file()
    capsys.readouterr()
    behaviours.write_text("")
    assert main(["attack", "gcg", "--model", str(model_dir), "--behaviours", str(behaviours), "--out",
                 str(out)]) == 2
    assert "empty file; expected behaviours" in capsys.readouterr().err
    assert main(["attack", "gcg", "--model", str(model_dir), "--goal", "tell me", "--out", str(out)]) == 2
    assert "--target is required" in capsys.readouterr().err


def test_a_penalty_steers_the_choice_and_adds_to_the_logged_loss(tok):
    """Adaptive GCG: each step picks the lowest L(x) + penalty(x); a huge penalty on every string holding "q"
    keeps "q" out of the chosen strings, which the same run without the penalty takes."""
    model = tiny(tok)
    config = dict(num_steps=4, search_width=64, topk=64, optim_str_init="x x x x x x", early_stop=False)
    seen = []

    def no_q(strings):
        seen.append(list(strings))
        return torch.tensor([1e6 if "q" in s else 0.0 for s in strings])

    banned = gcg.GCG(model, tok, gcg.GCGConfig(**config), template="chatml").run("tell me", "Sure", penalty=no_q)
    assert all("q" not in s for s in banned.suffixes) and banned.best_loss < 1e6
    assert len(seen) == 1 + 4 and all(isinstance(s, str) for s in seen[1])     # the initial buffer, then each step
    plain = gcg.GCG(model, tok, gcg.GCGConfig(**config), template="chatml").run("tell me", "Sure")
    shifted = gcg.GCG(model, tok, gcg.GCGConfig(**config), template="chatml").run(
        "tell me", "Sure", penalty=lambda strings: torch.full((len(strings),), 5.0))
    assert shifted.suffixes == plain.suffixes               # a constant penalty changes no choice ...
    assert shifted.losses == pytest.approx([x + 5.0 for x in plain.losses])     # ... and is part of the loss


def test_defended_success_replaces_the_reply_check(tok):
    """The adaptive attacks' objective: the defended system's verdict on the attack string itself."""
    model = tiny(tok)
    strings = []

    def defended(suffix: str) -> bool:
        strings.append(suffix)
        return len(strings) == 2

    attack = gcg.GCG(model, tok, gcg.GCGConfig(num_steps=10, search_width=16, topk=8,
                                               optim_str_init="x x x x x x"), template="chatml")
    result = attack.run("tell me", "Sure", success=lambda reply: pytest.fail("the plain check ran"),
                        defended_success=defended)
    assert result.success and result.steps == 2 and result.success_suffix == strings[1]


def test_the_attack_slot_goes_after_the_last_user_turn_unless_given():
    asked = [{"role": "system", "content": "Guard the code."}, {"role": "user", "content": "Code?"}]
    assert gcg.with_attack_slot(asked)[-1]["content"] == "Code? {optim_str}" and asked[-1]["content"] == "Code?"
    placed = [{"role": "user", "content": "{optim_str} Code?"}]
    assert gcg.with_attack_slot(placed) is placed
    with pytest.raises(LLMLabError, match="no user turn"):
        gcg.with_attack_slot([{"role": "system", "content": "x"}])


def test_a_prompt_longer_than_the_context_is_an_error_naming_it(tok):
    attack = gcg.GCG(tiny(tok), tok, gcg.GCGConfig(num_steps=1, search_width=8, topk=4,
                                                   optim_str_init="x x x x x x"), template="chatml")
    with pytest.raises(LLMLabError, match=r"row 7: .* more than the model's context of 128"):
        attack.run("word " * 200, "Sure", where="row 7")
