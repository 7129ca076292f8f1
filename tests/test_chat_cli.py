"""llmlab chat: answers equal the engine's greedy output on the rendered conversation; multi-turn history, commands,
context fitting, Ctrl-C handling, and the command driven through stdin."""
import argparse
import io
import json

import pytest
import torch

from llmlab import chat
from llmlab.errors import LLMLabError
from llmlab.hub.save import save_model
from llmlab.infer import chat_cli
from llmlab.infer.chat_cli import ChatSession, repl
from llmlab.infer.engine import Engine, SamplingParams
from llmlab.model.config import preset
from llmlab.model.decoder import build_model
from llmlab.tokenizer import train_bpe

CORPUS = ["the quick brown fox jumps over the lazy dog", "hello world, how are you today?"] * 20
GREEDY = SamplingParams(max_new_tokens=12, temperature=0)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tokenizer = train_bpe(CORPUS, vocab_size=290)
    torch.manual_seed(0)
    cfg = preset("llama", vocab_size=len(tokenizer), n_layer=2, d_model=32, n_head=4, n_kv_head=2, max_seq_len=128)
    out = tmp_path_factory.mktemp("chatmodel") / "m"
    save_model(build_model(cfg).eval(), out, tokenizer=tokenizer, chat_template=chat.TEMPLATES["chatml"])
    return out


@pytest.fixture(scope="module")
def engine(model_dir):
    return Engine.from_path(str(model_dir))


def expected_answer(engine, model_dir, messages, max_new_tokens=12):
    """Reference: render with the folder's template, generate greedily with the template's stop strings."""
    template = chat.load_template(model_dir)
    text = chat.render(messages, template, add_generation_prompt=True, bos_token=engine.tokenizer.bos_token,
                       eos_token=engine.tokenizer.eos_token)
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    stops = chat.stop_strings(template, engine.tokenizer.eos_token)
    return engine.generate([ids], SamplingParams(max_new_tokens=max_new_tokens, temperature=0, stop=stops))[0].text


class WrappedEngine:
    """The engine with ``stream`` replaced (to record prompts or to simulate Ctrl-C)."""

    def __init__(self, engine, stream):
        self.context, self.tokenizer, self.stream = engine.context, engine.tokenizer, stream


def session(engine, model_dir, params=GREEDY, **kw):
    out = io.StringIO()
    return ChatSession(engine, chat.load_template(model_dir), params, out=out, **kw), out


def feed(lines):
    """An input() replacement returning ``lines`` one by one (an exception instance is raised instead)."""
    items = iter(lines)

    def read(prompt):
        item = next(items)
        if isinstance(item, BaseException):
            raise item
        return item
    return read


def run_command(argv):
    parser = argparse.ArgumentParser()
    chat_cli.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    args.func(args)


def test_replies_are_left_stripped_and_stop_at_the_end_of_turn(engine, model_dir):
    s, _ = session(engine, model_dir)
    assert s.params.lstrip and "<|im_end|>" in s.params.stop


def test_prompt_answers_once_and_exits(engine, model_dir, capsys):
    run_command(["chat", "--model", str(model_dir), "--prompt", "hello world", "--system", "be brief",
                 "--temperature", "0", "--max-new-tokens", "12"])
    ref = expected_answer(engine, model_dir, [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hello world"}])
    assert capsys.readouterr().out == ref + "\n"


def test_stdin_drives_a_multi_turn_chat(engine, model_dir, tmp_path, monkeypatch, capsys):
    saved = tmp_path / "chat.json"
    monkeypatch.setattr("sys.stdin", io.StringIO(f"hello\nhow are you\n/save {saved}\n/quit\n"))
    run_command(["chat", "--model", str(model_dir), "--temperature", "0", "--max-new-tokens", "12"])
    messages = json.loads(saved.read_text())
    first = expected_answer(engine, model_dir, [{"role": "user", "content": "hello"}])
    history = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": first},
               {"role": "user", "content": "how are you"}]
    assert messages == history + [{"role": "assistant", "content": expected_answer(engine, model_dir, history)}]
    assert f"saved 4 messages to {saved}" in capsys.readouterr().out


def test_reset_system_and_save_commands(engine, model_dir, tmp_path):
    s, out = session(engine, model_dir)
    repl(s, feed(["hello", "/system be brief", "again", f"/save {tmp_path / 'a.json'}", "/reset",
                  f"/save {tmp_path / 'b.json'}", "/system", f"/save {tmp_path / 'c.json'}", "/nonsense", "/quit"]))
    a = json.loads((tmp_path / "a.json").read_text())
    assert [m["role"] for m in a] == ["system", "user", "assistant", "user", "assistant"]
    assert a[0]["content"] == "be brief" and a[-1]["content"] == expected_answer(engine, model_dir, a[:-1])
    assert json.loads((tmp_path / "b.json").read_text()) == [{"role": "system", "content": "be brief"}]
    assert json.loads((tmp_path / "c.json").read_text()) == []
    assert "commands:" in out.getvalue()              # unknown command → help


def test_oldest_turns_are_dropped_when_the_context_is_full(engine, model_dir):
    params = SamplingParams(max_new_tokens=40, temperature=0)
    s, out = session(engine, model_dir, params)
    prompts = []

    def recording_stream(ids, p):          # a fixed answer: only the prompts' lengths matter here
        prompts.append(len(ids))
        return iter(["a fixed answer of a few tokens"])

    s.engine = WrappedEngine(engine, recording_stream)
    for i in range(4):
        s.handle(f"message number {i}: the quick brown fox jumps over the lazy dog")
    assert all(n + 40 <= engine.context for n in prompts)
    assert "dropped the oldest" in out.getvalue()
    assert s.history[0]["content"].startswith("message number") and len(s.history) < 8
    assert s.history[-2]["content"].startswith("message number 3")


def test_a_message_that_cannot_fit_is_an_error_not_an_exit(engine, model_dir):
    s, out = session(engine, model_dir)
    repl(s, feed(["fox " * 200, "hello", "/quit"]))
    assert "error: this message makes a prompt of" in out.getvalue()
    assert [m["content"] for m in s.history if m["role"] == "user"] == ["hello"]
    with pytest.raises(LLMLabError, match="leaves no room"):
        session(engine, model_dir, SamplingParams(max_new_tokens=128))


def test_ctrl_c_stops_the_answer_and_keeps_the_session(engine, model_dir):
    s, out = session(engine, model_dir, SamplingParams(max_new_tokens=40, temperature=0))

    def interrupted_stream(ids, params):
        for i, piece in enumerate(engine.stream(ids, params)):
            if i == 2:
                raise KeyboardInterrupt
            yield piece

    s.engine = WrappedEngine(engine, interrupted_stream)
    repl(s, feed(["hello", KeyboardInterrupt(), "again", KeyboardInterrupt(), KeyboardInterrupt(), "never read"]))
    text = out.getvalue()
    assert text.count("[stopped]") == 2 and "press Ctrl-C again" in text
    full = expected_answer(engine, model_dir, [{"role": "user", "content": "hello"}], 40)
    assert full.startswith(s.history[1]["content"]) and len(s.history) == 4   # partial answers kept, session went on
