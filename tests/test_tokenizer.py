import gzip
import json
import random

import huggingface_hub.constants
import pytest
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from llmlab.chat import TEMPLATES
from llmlab.cli import main
from llmlab.errors import LLMLabError
from llmlab.tokenizer import (SPECIAL_TOKENS, ensure_pad_token, load_tokenizer, save_tokenizer, special_ids,
                              train_bpe, train_char)

CORPUS = [
    "The quick brown fox jumps over the lazy dog. " * 3,
    "Byte-level BPE merges frequent pairs of bytes into tokens; the lazy dog sleeps.",
    "中文文本也要能编码。表情 🎉🎉 和 emoji 👍.",
    "def add(a, b):\n    return a + b\n",
] * 5

HANDMADE = [
    "", " ", "hello", "  leading and trailing spaces  ", "tabs\tand\nnewlines\r\n", "héllo wörld ñ",
    "中文测试，标点。", "🎉👍🏽 👨‍👩‍👧", "\x00\x01\x1f\x7f control", "a\u0301 combining", "\u200b zero width",
    "مرحبا بالعالم", "\U0010ffff last code point", "<|bos|> a special token written in text <|im_end|>",
    "never seen: ẞ ǅ ⅷ ∰ 𝔸",
]


def random_strings(n: int, seed: int = 0) -> list[str]:
    """Strings of random Unicode scalar values (surrogates excluded: they are not valid in UTF-8)."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        chars = []
        for _ in range(rng.randint(0, 24)):
            cp = rng.choice([rng.randint(0, 0x7F), rng.randint(0x80, 0xFFFF), rng.randint(0x10000, 0x10FFFF)])
            chars.append(chr(cp if not 0xD800 <= cp <= 0xDFFF else 0xFFFD))
        out.append("".join(chars))
    return out


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(CORPUS, vocab_size=400)


def test_special_tokens_have_fixed_ids_and_nothing_is_added(bpe):
    assert [bpe.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == [0, 1, 2, 3, 4, 5]
    assert special_ids(bpe) == {"bos": 0, "eos": 1, "pad": 2, "mask": 3}
    ids = bpe("hello")["input_ids"]
    assert not set(ids) & {0, 1, 2, 3, 4, 5}
    assert bpe.encode("<|im_start|>") == [4]


def test_bpe_has_every_byte_and_learned_merges(bpe):
    vocab = bpe.get_vocab()
    assert set(pre_tokenizers.ByteLevel.alphabet()) <= set(vocab)
    assert len(vocab) == 400
    assert len(bpe.encode("The quick brown fox")) < len("The quick brown fox".encode())


def test_bpe_splits_digits_unless_asked_not_to():
    numbers = ["I have 47 apples and 1234 pears, 47 + 12 = 59."] * 50
    split = train_bpe(numbers, vocab_size=300)
    assert [split.decode([i]) for i in split.encode("47 + 12")] == ["4", "7", " +", " ", "1", "2"]
    whole = train_bpe(numbers, vocab_size=300, split_digits=False)
    assert len(whole.encode("47 + 12")) < 6


@pytest.mark.parametrize("text", HANDMADE)
def test_bpe_round_trip_handmade(bpe, text):
    assert bpe.decode(bpe.encode(text)) == text


def test_bpe_round_trip_random_code_points(bpe):
    for text in random_strings(300):
        assert bpe.decode(bpe.encode(text)) == text


def test_saved_folder_loads_with_auto_tokenizer_and_gives_same_ids(bpe, tmp_path):
    save_tokenizer(bpe, tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert (config["bos_token"], config["eos_token"], config["pad_token"], config["mask_token"]) == SPECIAL_TOKENS[:4]
    assert (tmp_path / "chat_template.jinja").read_text() == TEMPLATES["llmlab"]
    auto = AutoTokenizer.from_pretrained(tmp_path)
    for text in HANDMADE + random_strings(50, seed=1):
        assert auto.encode(text) == bpe.encode(text)
        assert auto.decode(auto.encode(text)) == text
    assert auto.chat_template == TEMPLATES["llmlab"]
    assert (auto.bos_token_id, auto.eos_token_id, auto.pad_token_id, auto.mask_token_id) == (0, 1, 2, 3)
    assert load_tokenizer(tmp_path).encode("héllo 中文") == bpe.encode("héllo 中文")


def test_save_writes_the_given_template(bpe, tmp_path):
    save_tokenizer(bpe, tmp_path, chat_template=TEMPLATES["llama-3"])
    assert (tmp_path / "chat_template.jinja").read_text() == TEMPLATES["llama-3"]
    assert AutoTokenizer.from_pretrained(tmp_path).chat_template == TEMPLATES["llama-3"]


def test_vocab_too_small():
    with pytest.raises(LLMLabError, match="at least 262"):
        train_bpe(CORPUS, vocab_size=261)


def test_char_tokenizer(tmp_path):
    tok = train_char(["hello world\n", "low"])
    # specials 0..5, then the sorted distinct characters: "\n", " ", d, e, h, l, o, r, w
    assert tok.encode("hello") == [10, 9, 11, 11, 12]
    assert tok.encode("\n ") == [6, 7]
    assert len(tok) == 6 + 9
    assert tok.decode(tok.encode("world hello\n")) == "world hello\n"
    assert tok.encode("<|eos|>wow") == [1, 14, 12, 14]
    with pytest.raises(Exception, match="UNK"):
        tok.encode("hellz")
    save_tokenizer(tok, tmp_path)
    auto = AutoTokenizer.from_pretrained(tmp_path)
    assert auto.encode("hello world") == tok.encode("hello world")
    assert auto.decode(auto.encode("hello\nworld")) == "hello\nworld"


def test_char_tokenizer_empty_corpus():
    with pytest.raises(LLMLabError, match="empty"):
        train_char([])


def test_load_missing_folder(tmp_path):
    with pytest.raises(LLMLabError, match="not found"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(LLMLabError, match="no tokenizer files"):
        load_tokenizer(tmp_path)


def test_unreachable_hub_name_says_so(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(LLMLabError, match="Hugging Face Hub could not provide it"):
        load_tokenizer("llmlab-test/no-such-tokenizer")


def test_ensure_pad_token():
    backend = Tokenizer(models.WordLevel({"a": 0, "</s>": 1, "<unk>": 2}, unk_token="<unk>"))
    gpt2_like = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", unk_token="<unk>")
    assert special_ids(gpt2_like) == {"bos": None, "eos": 1, "pad": None, "mask": None}
    assert ensure_pad_token(gpt2_like).pad_token_id == 1

    no_eos = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({"a": 0, "<unk>": 1},
                                                                                 unk_token="<unk>")))
    ensure_pad_token(no_eos)
    assert no_eos.pad_token == "<|pad|>" and no_eos.pad_token_id == 2 and len(no_eos) == 3


def test_cli_trains_bpe_end_to_end(tmp_path):
    (tmp_path / "a.txt").write_text(CORPUS[0] + CORPUS[2], encoding="utf-8")
    with gzip.open(tmp_path / "b.jsonl.gz", "wt", encoding="utf-8") as f:
        for text in CORPUS:
            f.write(json.dumps({"body": text}) + "\n")
    out = tmp_path / "tok"
    code = main(["tokenizer", "train", "--data", str(tmp_path / "a.txt"), str(tmp_path / "b.jsonl.gz"),
                 "--vocab-size", "300", "--out", str(out), "--text-field", "body"])
    assert code == 0
    tok = load_tokenizer(out)
    assert len(tok) == 300
    assert tok.decode(tok.encode("def add 中文 🎉")) == "def add 中文 🎉"
    assert (out / "chat_template.jinja").read_text() == TEMPLATES["llmlab"]


def test_cli_trains_char_end_to_end(tmp_path):
    (tmp_path / "a.txt").write_text("to be or not to be\n", encoding="utf-8")
    out = tmp_path / "tok"
    assert main(["tokenizer", "train", "--data", str(tmp_path / "a.txt"), "--char", "--out", str(out)]) == 0
    tok = load_tokenizer(out)
    assert len(tok) == 6 + len(set("to be or not to be\n"))
    assert tok.decode(tok.encode("not to be")) == "not to be"


def test_cli_errors_name_the_problem(tmp_path, capsys):
    (tmp_path / "a.txt").write_text("text", encoding="utf-8")
    assert main(["tokenizer", "train", "--data", str(tmp_path / "a.txt"), "--out", str(tmp_path / "o")]) == 2
    assert "--vocab-size" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n', encoding="utf-8")
    assert main(["tokenizer", "train", "--data", str(tmp_path / "bad.jsonl"), "--vocab-size", "300",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "line 2" in err
