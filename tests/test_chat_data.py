import gzip
import json
from pathlib import Path

import pytest

from llmlab.data.chat_data import load_conversations, load_heldout_conversations, load_pairs, load_prompts
from llmlab.errors import LLMLabError


def shared_data() -> Path | None:
    for root in (Path(__file__).parents[2] / "shared", Path("/work/shared")):
        if (root / "data").is_dir():
            return root / "data"
    return None


SHARED = shared_data()
needs_shared = pytest.mark.skipif(SHARED is None, reason="shared data folder (../shared) not present")


def write_jsonl(path: Path, rows: list) -> Path:
    lines = [row if isinstance(row, str) else json.dumps(row) for row in rows]
    if path.name.endswith(".gz"):
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write("\n".join(lines) + "\n")
    else:
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_openai_alpaca_and_sharegpt_in_one_file(tmp_path):
    path = write_jsonl(tmp_path / "mixed.jsonl.gz", [
        {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
                      {"role": "assistant", "content": "Hello!", "name": "bot"}]},
        {"instruction": "Translate to French.", "input": "cat", "output": "chat"},
        {"instruction": "Name a colour.", "input": "", "output": "Blue."},
        {"conversations": [{"from": "system", "value": "S"}, {"from": "human", "value": "Q1"},
                           {"from": "gpt", "value": "A1"}, {"from": "human", "value": "Q2"},
                           {"from": "gpt", "value": "A2"}]},
    ])
    assert load_conversations(path) == [
        [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi"},
         {"role": "assistant", "content": "Hello!"}],
        [{"role": "user", "content": "Translate to French.\n\ncat"}, {"role": "assistant", "content": "chat"}],
        [{"role": "user", "content": "Name a colour."}, {"role": "assistant", "content": "Blue."}],
        [{"role": "system", "content": "S"}, {"role": "user", "content": "Q1"},
         {"role": "assistant", "content": "A1"}, {"role": "user", "content": "Q2"},
         {"role": "assistant", "content": "A2"}],
    ]


GOOD = {"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}]}


@pytest.mark.parametrize("row, message", [
    ('{"messages": [', r"bad\.jsonl:2: bad JSON"),
    ([1, 2], r"bad\.jsonl:2: expected a JSON object"),
    ({"text": "hi"}, r"bad\.jsonl:2: unknown format.*'text'"),
    ({"messages": "hi"}, r"bad\.jsonl:2: field 'messages' must be a list"),
    ({"messages": [{"role": "user"}]}, r"bad\.jsonl:2: messages\[0\] is missing field 'content'"),
    ({"messages": [{"role": "bot", "content": "x"}]}, r"bad\.jsonl:2: messages\[0\]\.role: unknown role 'bot'"),
    ({"messages": [{"role": "user", "content": ["x"]}]}, r"bad\.jsonl:2: messages\[0\]\.content must be a string"),
    ({"messages": [{"role": "user", "content": "Hi"}]}, r"bad\.jsonl:2: field 'messages' has no assistant turn"),
    ({"instruction": "Do it"}, r"bad\.jsonl:2: missing field 'output'"),
    ({"instruction": "Do it", "input": 3, "output": "ok"}, r"bad\.jsonl:2: field 'input' must be a string"),
    ({"instruction": " ", "output": "ok"}, r"bad\.jsonl:2: field 'instruction' is empty"),
    ({"conversations": [{"from": "bard", "value": "x"}]}, r"bad\.jsonl:2: conversations\[0\]\.from: unknown role"),
    ({"conversations": [{"from": "human"}]}, r"bad\.jsonl:2: conversations\[0\] is missing field 'value'"),
    ({"conversations": [{"from": "human", "value": "x"}]}, r"bad\.jsonl:2: field 'conversations' has no assistant"),
])
def test_conversation_errors_name_file_line_and_field(tmp_path, row, message):
    path = write_jsonl(tmp_path / "bad.jsonl", [GOOD, row])
    with pytest.raises(LLMLabError, match=message):
        load_conversations(path)


def test_missing_and_empty_files(tmp_path):
    with pytest.raises(LLMLabError, match="no such file"):
        load_conversations(tmp_path / "none.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(LLMLabError, match="no conversations"):
        load_conversations(tmp_path / "empty.jsonl")
    (tmp_path / "data.csv").write_text("a,b\n")
    with pytest.raises(LLMLabError, match="expected a .jsonl"):
        load_pairs(tmp_path / "data.csv")


def test_pair_forms(tmp_path):
    prompt_messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"prompt": "Q", "chosen": "good", "rejected": "bad"},
        {"prompt": prompt_messages, "chosen": [{"role": "assistant", "content": "good"}],
         "rejected": [{"role": "assistant", "content": "bad"}]},
        {"chosen": prompt_messages + [{"role": "assistant", "content": "good"}],
         "rejected": prompt_messages + [{"role": "assistant", "content": "bad"}]},
        {"chosen": "\n\nHuman: Q1\n\nAssistant: A1\n\nHuman: Q2\n\nAssistant: good",
         "rejected": "\n\nHuman: Q1\n\nAssistant: A1\n\nHuman: Q2\n\nAssistant: bad"},
    ])
    pairs = load_pairs(path)
    assert pairs[0] == {"prompt": [{"role": "user", "content": "Q"}], "chosen": "good", "rejected": "bad"}
    assert pairs[1] == pairs[2] == {"prompt": prompt_messages, "chosen": "good", "rejected": "bad"}
    assert pairs[3] == {"prompt": [{"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                                   {"role": "user", "content": "Q2"}], "chosen": "good", "rejected": "bad"}


@pytest.mark.parametrize("row, message", [
    ({"prompt": "Q", "chosen": "same", "rejected": "same"}, r"pairs\.jsonl:1: 'chosen' and 'rejected' are the same"),
    ({"chosen": "\n\nHuman: Q\n\nAssistant: A", "rejected": "\n\nHuman: Q\n\nAssistant: A"},
     r"pairs\.jsonl:1: 'chosen' and 'rejected' are the same"),
    ({"prompt": "Q", "chosen": "a"}, r"pairs\.jsonl:1: missing field 'rejected'"),
    ({"prompt": 3, "chosen": "a", "rejected": "b"}, r"pairs\.jsonl:1: field 'prompt' must be a string or a list"),
    ({"prompt": "Q", "chosen": "a", "rejected": ""}, r"pairs\.jsonl:1: field 'rejected': the reply must be"),
    ({"prompt": "Q", "chosen": [{"role": "user", "content": "a"}], "rejected": "b"},
     r"pairs\.jsonl:1: field 'chosen' must end with an assistant message"),
    ({"prompt": [{"role": "user", "content": "Q"}],
      "chosen": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "a"}], "rejected": "b"},
     r"pairs\.jsonl:1: the messages of 'chosen' before its last one differ from the prompt"),
    ({"chosen": "Human: no leading blank line\n\nAssistant: a", "rejected": "x"},
     r"pairs\.jsonl:1: field 'chosen': an HH-RLHF transcript must start"),
    ({"chosen": [{"role": "assistant", "content": "a"}], "rejected": [{"role": "assistant", "content": "b"}]},
     r"pairs\.jsonl:1: no prompt"),
    ({"prompt": [{"role": "wizard", "content": "Q"}], "chosen": "a", "rejected": "b"},
     r"pairs\.jsonl:1: prompt\[0\]\.role: unknown role 'wizard'"),
])
def test_pair_errors_name_file_line_and_field(tmp_path, row, message):
    path = write_jsonl(tmp_path / "pairs.jsonl", [row])
    with pytest.raises(LLMLabError, match=message):
        load_pairs(path)


def test_hh_pairs_that_do_not_share_a_prompt_are_skipped_with_a_warning(tmp_path):
    path = write_jsonl(tmp_path / "hh.jsonl", [
        {"chosen": "\n\nHuman: Q\n\nAssistant: good", "rejected": "\n\nHuman: Q\n\nAssistant: bad"},
        {"chosen": "\n\nHuman: Q\n\nAssistant: good", "rejected": "\n\nHuman: other Q\n\nAssistant: bad"},
        {"chosen": "\n\nHuman: Q\n\nAssistant: ", "rejected": "\n\nHuman: Q\n\nAssistant: bad"},
    ])
    with pytest.warns(UserWarning, match=r"skipped 2 .*lines 2, 3"):
        pairs = load_pairs(path)
    assert pairs == [{"prompt": [{"role": "user", "content": "Q"}], "chosen": "good", "rejected": "bad"}]


def test_prompts_from_every_form(tmp_path):
    user = {"role": "user", "content": "Q"}
    answer = {"role": "assistant", "content": "A"}
    rows = [{"prompt": "Q", "kind": "fact", "reference": "A"},
            {"messages": [{"role": "system", "content": "S"}, user, answer]},
            {"instruction": "Do it.", "input": "X", "output": "done"},
            {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
            {"prompt": [user], "chosen": "A", "rejected": "B"},
            {"chosen": [user, answer], "rejected": [user, {"role": "assistant", "content": "B"}]},
            {"chosen": "\n\nHuman: Q\n\nAssistant: A\n\nHuman: And?\n\nAssistant: A", "rejected": "..."}]
    items = load_prompts(write_jsonl(tmp_path / "p.jsonl", rows))
    assert [i["prompt"] for i in items] == [
        [user], [{"role": "system", "content": "S"}, user], [{"role": "user", "content": "Do it.\n\nX"}], [user],
        [user], [user], [user, answer, {"role": "user", "content": "And?"}]]
    assert items[0]["kind"] == "fact" and items[0]["reference"] == "A" and items[0]["where"].endswith("p.jsonl:1")
    assert items[2]["reference"] == "done"            # an Alpaca output is the reference for exact match


def test_heldout_conversations_from_every_form(tmp_path):
    user = {"role": "user", "content": "Q"}
    answer = {"role": "assistant", "content": "A"}
    rows = [{"messages": [user, answer], "reference": "A", "kind": "fact"},
            {"conversations": [{"from": "human", "value": "Q"}, {"from": "gpt", "value": "A"}]},
            {"instruction": "Q", "output": "A"},
            {"prompt": "Q", "reference": "A"},
            {"prompt": "Q"}]                                   # nothing to score: skipped
    assert load_heldout_conversations(write_jsonl(tmp_path / "h.jsonl", rows)) == [[user, answer]] * 4
    with pytest.raises(LLMLabError, match="h.jsonl: no held-out conversation"):
        load_heldout_conversations(write_jsonl(tmp_path / "h.jsonl", [{"prompt": "Q"}]))
    with pytest.raises(LLMLabError, match="h.jsonl:2: .*content"):
        load_heldout_conversations(write_jsonl(tmp_path / "h.jsonl", [rows[0], {"prompt": "Q", "reference": ""}]))


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "assistant", "content": "A"}]}, "p.jsonl:1: .*messages"),
    ({"text": "no prompt"}, "p.jsonl:1: unknown format"),
    ({"chosen": "no transcript", "rejected": "x"}, "p.jsonl:1: field 'chosen'"),
])
def test_prompt_errors_name_file_line_and_field(tmp_path, row, message):
    with pytest.raises(LLMLabError, match=message):
        load_prompts(write_jsonl(tmp_path / "p.jsonl", [row]))


@needs_shared
def test_real_hh_rlhf_loads():
    path = SHARED / "hh-rlhf" / "harmless-base" / "test.jsonl.gz"
    with pytest.warns(UserWarning, match="skipped 9 "):  # 5 differ before the last turn, 4 have an empty reply
        pairs = load_pairs(path)
    assert len(pairs) == 2312 - 9
    first = json.loads(gzip.open(path, "rt", encoding="utf-8").readline())
    assert pairs[0]["prompt"][0] == {"role": "user", "content": "what are some pranks with a pen i can do?"}
    assert pairs[0]["prompt"][-1]["role"] == "user"
    assert first["chosen"].endswith("\n\nAssistant: " + pairs[0]["chosen"])
    assert first["rejected"].endswith("\n\nAssistant: " + pairs[0]["rejected"])
    assert all(p["prompt"][-1]["role"] == "user" and p["chosen"] != p["rejected"] for p in pairs)
    prompts = load_prompts(path)          # PPO and `llmlab pairs` take the dialogues up to the last answer
    assert len(prompts) == 2312 and prompts[0]["prompt"] == pairs[0]["prompt"]
    assert all(p["prompt"][-1]["role"] == "user" for p in prompts)


@needs_shared
def test_real_self_instruct_loads():
    seed = load_conversations(SHARED / "self-instruct" / "seed_tasks.jsonl")
    assert len(seed) == 175
    rows = [json.loads(line) for line in (SHARED / "self-instruct" / "seed_tasks.jsonl").open(encoding="utf-8")]
    with_input = next(i for i, r in enumerate(rows) if r["input"])
    assert seed[with_input][0]["content"] == rows[with_input]["instruction"] + "\n\n" + rows[with_input]["input"]
    assert seed[0] == [{"role": "user", "content": rows[0]["instruction"]},
                       {"role": "assistant", "content": rows[0]["output"]}]
    assert sum(1 for r in rows if not r["input"]) == 50
    assert len(load_conversations(SHARED / "self-instruct" / "user_oriented_eval.jsonl")) == 252
    prompts = load_prompts(SHARED / "self-instruct" / "user_oriented_eval.jsonl")
    assert len(prompts) == 252 and all(p["prompt"][-1]["role"] == "user" and p["reference"] for p in prompts)
