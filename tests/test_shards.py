"""Text sources, token shards, packing and the resumable sampler (llmlab.data.sources / llmlab.data.shards)."""
from __future__ import annotations

import gzip
import hashlib
import json
import urllib.error

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from llmlab import cli
from llmlab.data import shards as shards_module
from llmlab.data.shards import (
    BatchSampler, PackedSequences, TokenShards, build_shards, tokenizer_fingerprint)
from llmlab.data import sources
from llmlab.data.sources import iter_documents, iter_documents_many
from llmlab.stages.common import resolve_max_length
from llmlab.errors import LLMLabError

SENTENCES = [
    "The quick brown fox jumps over the lazy dog.",
    "A journey of a thousand miles begins with a single step.",
    "To be, or not to be: that is the question.",
    "Ünïcödé text, emoji 🙂 and numbers 1234 survive the round trip.",
    "Short.",
    "Line one\nline two\n\nline four after a blank line.",
]


def make_tokenizer(bos: bool = True, eos: bool = True) -> PreTrainedTokenizerFast:
    """A tiny byte-level BPE trained on SENTENCES, with <|bos|>, <|eos|> and <|pad|>."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(SENTENCES * 3, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>" if bos else None,
                                   eos_token="<|eos|>" if eos else None, pad_token="<|pad|>")


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


def reference_stream(tokenizer, docs) -> np.ndarray:
    """The expected stream, tokenizing each document directly through the tokenizer's own __call__."""
    ids = []
    for doc in docs:
        ids += [tokenizer.bos_token_id] + tokenizer(doc, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return np.asarray(ids, dtype=np.int64)


def read_split(out, split) -> np.ndarray:
    shards = TokenShards(out, split)
    return shards.tokens(0, len(shards)).astype(np.int64)


def corpus(n: int = 40) -> list[str]:
    return [f"{SENTENCES[i % len(SENTENCES)]} Document number {i}." * (1 + i % 4) for i in range(n)]


# --- shards -------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("num_workers", [1, 2])
def test_shards_round_trip_to_the_token_stream(tmp_path, tokenizer, num_workers, monkeypatch):
    monkeypatch.setattr(shards_module, "DOCS_PER_BATCH", 3)  # 14 batches: more than the 2 x workers in flight
    docs = corpus()
    reference_stream(tokenizer, docs[:2])  # the Rust thread pool is in use before the pool forks
    index = build_shards(docs, tokenizer, tmp_path / "out", val_fraction=0.1, shard_size=97,
                         num_workers=num_workers)
    stream = reference_stream(tokenizer, docs)
    n_val = round(len(stream) * 0.1)
    train, val = read_split(tmp_path / "out", "train"), read_split(tmp_path / "out", "val")
    np.testing.assert_array_equal(np.concatenate([train, val]), stream)
    assert len(val) == n_val  # the last 10% of the stream, by position
    assert index["splits"]["train"]["num_tokens"] == len(stream) - n_val
    assert len(index["splits"]["train"]["files"]) == -(-(len(stream) - n_val) // 97)  # shards of 97 tokens
    assert all(c == 97 for c in index["splits"]["train"]["tokens"][:-1])
    assert index["splits"]["train"]["files"][0] == "train_000000.bin"
    on_disk = json.loads((tmp_path / "out" / "index.json").read_text())
    assert on_disk == index
    assert (index["dtype"], index["vocab_size"]) == ("uint16", len(tokenizer))
    assert (index["bos_id"], index["eos_id"], index["num_documents"]) == (
        tokenizer.bos_token_id, tokenizer.eos_token_id, len(docs))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the temp build folder is gone


def test_single_document_split_and_tokens_across_shard_boundaries(tmp_path, tokenizer):
    text = " ".join(SENTENCES) * 5
    build_shards([text], tokenizer, tmp_path / "one", val_fraction=0.25, shard_size=10, num_workers=1)
    stream = reference_stream(tokenizer, [text])
    train = TokenShards(tmp_path / "one", "train")
    assert len(train) == len(stream) - round(len(stream) * 0.25)
    np.testing.assert_array_equal(train.tokens(7, 25), stream[7:32])  # spans three shards
    with pytest.raises(IndexError):
        train.tokens(len(train) - 1, 2)


def test_fallback_to_tokenizer_call_without_backend(tmp_path, tokenizer):
    class SlowInterface:  # the generic HF interface, without backend_tokenizer
        bos_token_id, eos_token_id, pad_token_id = (tokenizer.bos_token_id, tokenizer.eos_token_id,
                                                    tokenizer.pad_token_id)
        __len__ = lambda self: len(tokenizer)  # noqa: E731
        __call__ = lambda self, texts, **kw: tokenizer(texts, **kw)  # noqa: E731
        get_vocab = lambda self: tokenizer.get_vocab()  # noqa: E731

    docs = corpus(10)
    build_shards(docs, SlowInterface(), tmp_path / "slow", val_fraction=0.0, num_workers=1)
    np.testing.assert_array_equal(read_split(tmp_path / "slow", "train"), reference_stream(tokenizer, docs))


def test_dtype_choice_and_too_small_dtype(tmp_path):
    words = [f"w{i}" for i in range(70_000)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)} | {"[UNK]": 70_000}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    big = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|eos|>")
    assert len(big) > 65536
    index = build_shards(["w1 w69999 w65536", "w65535"], big, tmp_path / "big", val_fraction=0.0, num_workers=1)
    assert index["dtype"] == "uint32" and index["bos_id"] is None
    stored = np.fromfile(tmp_path / "big" / "train_000000.bin", dtype=np.uint32)
    np.testing.assert_array_equal(stored, [1, 69999, 65536, big.eos_token_id, 65535, big.eos_token_id])
    with pytest.raises(LLMLabError, match=r"uint16.*65535.*70002 tokens"):
        build_shards(["w1"], big, tmp_path / "small", dtype="uint16", num_workers=1)
    assert not (tmp_path / "small").exists()


def test_small_vocab_is_uint16(tmp_path, tokenizer):
    build_shards(corpus(5), tokenizer, tmp_path / "s", num_workers=1)
    assert TokenShards(tmp_path / "s", "train").dtype == np.uint16
    assert (tmp_path / "s" / "train_000000.bin").stat().st_size == 2 * len(TokenShards(tmp_path / "s", "train"))


def test_tokenizer_without_any_separator_is_an_error(tmp_path):
    with pytest.raises(LLMLabError, match="neither a bos_token nor an eos_token"):
        build_shards(corpus(3), make_tokenizer(bos=False, eos=False), tmp_path / "x", num_workers=1)


def test_eos_only_tokenizer_frames_documents_with_eos(tmp_path):
    tok = make_tokenizer(bos=False)
    docs = corpus(4)
    build_shards(docs, tok, tmp_path / "eos", val_fraction=0.0, num_workers=1)
    expected = np.concatenate([tok(d, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for d in docs])
    np.testing.assert_array_equal(read_split(tmp_path / "eos", "train"), expected)


def test_killed_build_leaves_nothing_and_rebuild_replaces(tmp_path, tokenizer):
    def dies_midway():
        yield from corpus(300)
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        build_shards(dies_midway(), tokenizer, tmp_path / "out", num_workers=1)
    assert list(tmp_path.iterdir()) == []
    build_shards(corpus(5), tokenizer, tmp_path / "out", num_workers=1)
    build_shards(corpus(9), tokenizer, tmp_path / "out", num_workers=1)
    assert json.loads((tmp_path / "out" / "index.json").read_text())["num_documents"] == 9
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("keep me")
    with pytest.raises(LLMLabError, match="refusing to replace"):
        build_shards(corpus(5), tokenizer, tmp_path / "other", num_workers=1)


def test_vocab_hash_detects_another_tokenizer(tmp_path, tokenizer):
    build_shards(corpus(5), tokenizer, tmp_path / "s", num_workers=1)
    shards = TokenShards(tmp_path / "s", "train")
    assert shards.index["tokenizer_hash"] == tokenizer_fingerprint(make_tokenizer())  # same training → same vocab
    shards.check_tokenizer(tokenizer)
    other = make_tokenizer()
    other.add_tokens(["<|extra|>"])
    with pytest.raises(LLMLabError, match="different tokenizer"):
        shards.check_tokenizer(other)


def test_truncated_shard_is_reported(tmp_path, tokenizer):
    build_shards(corpus(), tokenizer, tmp_path / "s", num_workers=1)
    path = tmp_path / "s" / "train_000000.bin"
    path.write_bytes(path.read_bytes()[:-2])
    with pytest.raises(LLMLabError, match="train_000000.bin: expected"):
        TokenShards(tmp_path / "s", "train")
    with pytest.raises(LLMLabError, match="index.json: not found"):
        TokenShards(tmp_path, "train")


# --- packing ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory, tokenizer):
    out = tmp_path_factory.mktemp("shards") / "s"
    build_shards(corpus(), tokenizer, out, val_fraction=0.1, shard_size=64, num_workers=1)
    return out


@pytest.mark.parametrize("max_length", [1, 7, 16, 1000])
def test_packing_every_target_exactly_once(shard_dir, max_length):
    shards = TokenShards(shard_dir, "train")
    stream = shards.tokens(0, len(shards)).astype(np.int64)
    packed = PackedSequences(shards, max_length)
    assert len(packed) == -(-(len(stream) - 1) // max_length)
    targets, inputs0 = [], []
    for i in range(len(packed)):
        x, y = packed[i]
        assert x.dtype == y.dtype == torch.int64 and x.shape == y.shape == (max_length,)
        kept = y != -100
        targets.append(y[kept])
        np.testing.assert_array_equal(x[1:][kept[:-1]], y[:-1][kept[:-1]])  # y is x shifted by one
        inputs0.append(int(x[0]))
    # the targets, in row order, are the stream without its first token: none lost, none duplicated
    np.testing.assert_array_equal(torch.cat(targets).numpy(), stream[1:])
    assert inputs0[0] == stream[0]


def test_bos_aligned_rows_start_with_bos_and_hold_whole_documents(shard_dir, tokenizer):
    shards = TokenShards(shard_dir, "train")
    stream = shards.tokens(0, len(shards)).astype(np.int64)
    bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
    longest_doc = max(np.diff(np.flatnonzero(np.append(stream, bos) == bos)))
    max_length = int(longest_doc) + 5
    packed = PackedSequences(shards, max_length, bos_aligned=True)
    contents = []
    for i in range(len(packed)):
        x, y = packed[i]
        n = int((y != -100).sum()) + 1  # tokens of real content in the row
        content = x[:n].numpy()
        assert content[0] == bos
        assert (y[n - 1:] == -100).all() and (x[n:] == pad).all()
        np.testing.assert_array_equal(y[:n - 1].numpy(), content[1:])
        contents.append(content)
    # rows are whole documents, in order, and packing is greedy: the next row's first document did not fit
    np.testing.assert_array_equal(np.concatenate(contents), stream[:sum(map(len, contents))])
    assert sum(map(len, contents)) == len(stream) or stream[sum(map(len, contents))] != bos
    for row, nxt in zip(contents, contents[1:]):
        first_doc = np.flatnonzero(np.append(nxt[1:], bos) == bos)[0] + 1
        assert len(row) + first_doc > max_length + 1
        assert row[-1] == eos


def test_bos_aligned_long_document_is_cut_without_losing_targets(tmp_path, tokenizer):
    long_doc = " ".join(SENTENCES) * 3
    build_shards(["Short.", long_doc], tokenizer, tmp_path / "s", val_fraction=0.0, num_workers=1)
    packed = PackedSequences(TokenShards(tmp_path / "s", "train"), 16, bos_aligned=True)
    doc_ids = reference_stream(tokenizer, [long_doc])
    assert len(doc_ids) > 3 * 17
    rows = [packed[i] for i in range(len(packed))]
    starts = [i for i, (x, _) in enumerate(rows) if int(x[0]) == tokenizer.bos_token_id]
    assert starts == [0, 1]  # "Short." alone (the long document does not fit after it), then the long document
    assert all((y != -100).all() for _, y in rows[1:-1])  # its pieces are full rows, only the last is padded
    targets = torch.cat([y[y != -100] for _, y in rows[1:]]).numpy()
    np.testing.assert_array_equal(targets, doc_ids[1:])  # every token after its BOS is a target, once


def test_bos_aligned_val_split_starting_mid_document(tmp_path, tokenizer):
    text = " ".join(SENTENCES) * 4
    build_shards([text], tokenizer, tmp_path / "s", val_fraction=0.3, num_workers=1)
    val = TokenShards(tmp_path / "s", "val")
    packed = PackedSequences(val, 8, bos_aligned=True)
    stream = val.tokens(0, len(val)).astype(np.int64)
    targets = torch.cat([packed[i][1][packed[i][1] != -100] for i in range(len(packed))]).numpy()
    np.testing.assert_array_equal(targets, stream[1:])  # no BOS in it: the whole split is one document piece


def test_the_max_length_rule():
    """Unset means the model's context; up to the context is kept; more is an error naming the field."""
    assert resolve_max_length(None, 128) == 128 and resolve_max_length(64, 128) == 64
    assert resolve_max_length(128, 128) == 128
    with pytest.raises(LLMLabError, match=r"data.max_length=256 exceeds .* 128"):
        resolve_max_length(256, 128)
    with pytest.raises(LLMLabError, match=r"sft.max_length=9 exceeds .* 8"):
        resolve_max_length(9, 8, where="sft.max_length")


# --- sampler ------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def packed(shard_dir):
    return PackedSequences(TokenShards(shard_dir, "train"), 8)


def expected_batch(packed, seed, epoch, step, batch):
    order = torch.randperm(len(packed), generator=torch.Generator().manual_seed(seed + epoch))
    rows = [packed[int(i)] for i in order[step * batch:(step + 1) * batch]]
    return torch.stack([r[0] for r in rows]), torch.stack([r[1] for r in rows])


def test_sampler_follows_the_seeded_permutation_and_wraps_epochs(packed):
    sampler = BatchSampler(packed, 4, seed=3)
    steps = len(packed) // 4
    assert sampler.steps_per_epoch == steps
    for epoch in range(2):
        for step in range(steps):
            x, y = sampler.next_batch()
            ex, ey = expected_batch(packed, 3, epoch, step, 4)
            assert torch.equal(x, ex) and torch.equal(y, ey) and x.shape == (4, 8)
    assert sampler.state_dict() == {"epoch": 2, "position": 0}
    other = BatchSampler(packed, 4, seed=4)
    assert not torch.equal(other.next_batch()[0], expected_batch(packed, 3, 0, 0, 4)[0])


def test_sampler_resume_reproduces_the_uninterrupted_run(packed):
    steps = len(packed) // 3
    uninterrupted = BatchSampler(packed, 3, seed=1)
    reference = [uninterrupted.next_batch() for _ in range(steps + 6)]  # crosses an epoch boundary
    for k in (0, 2, steps - 1, steps + 1):
        first = BatchSampler(packed, 3, seed=1)
        for _ in range(k):
            first.next_batch()
        state = json.loads(json.dumps(first.state_dict()))  # plain ints survive a JSON checkpoint
        assert all(type(v) is int for v in state.values())
        resumed = BatchSampler(packed, 3, seed=1)
        resumed.load_state_dict(state)
        for want in reference[k:k + 5]:
            got = resumed.next_batch()
            assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_rank_split_equals_the_one_process_global_batch(packed):
    world = 3
    single = BatchSampler(packed, 2 * world, seed=5)
    ranks = [BatchSampler(packed, 2, seed=5, rank=r, world_size=world) for r in range(world)]
    for _ in range(len(packed) // (2 * world) + 2):
        x, y = single.next_batch()
        parts = [s.next_batch() for s in ranks]
        assert torch.equal(torch.cat([p[0] for p in parts]), x) and torch.equal(torch.cat([p[1] for p in parts]), y)


def test_sampler_without_drop_last_covers_every_row(packed):
    sampler = BatchSampler(packed, 5, shuffle=False, drop_last=False)
    xs = torch.cat([sampler.next_batch()[0] for _ in range(sampler.steps_per_epoch)])
    assert sampler.steps_per_epoch == -(-len(packed) // 5)
    assert torch.equal(xs[:len(packed)], torch.stack([packed[i][0] for i in range(len(packed))]))
    assert torch.equal(xs[len(packed):], torch.stack([packed[i][0] for i in range(len(xs) - len(packed))]))


def test_sampler_errors(packed):
    with pytest.raises(LLMLabError, match="one global batch needs"):
        BatchSampler(packed, len(packed), world_size=2)
    with pytest.raises(LLMLabError, match="rank=2"):
        BatchSampler(packed, 1, rank=2, world_size=2)
    with pytest.raises(LLMLabError, match="position"):
        BatchSampler(packed, 2).load_state_dict({"epoch": 0, "position": 10**6})
    for drop_last in (True, False):
        with pytest.raises(LLMLabError, match="empty"):
            BatchSampler([], 2, drop_last=drop_last)


# --- sources ------------------------------------------------------------------------------------------------------

DOCS = ["first document,\nwith a newline", "second: ünïcödé 🙂", "third " * 50]


def write_all_formats(root):
    (root / "txt").mkdir()
    for i, doc in enumerate(DOCS):
        (root / "txt" / f"doc_{i:02d}.txt").write_text(doc, encoding="utf-8")
    lines = "".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(DOCS))
    (root / "c.jsonl").write_text(lines + "\n", encoding="utf-8")  # a trailing blank line is skipped
    with gzip.open(root / "c.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(lines)
    pq.write_table(pa.table({"body": DOCS, "id": list(range(len(DOCS)))}), root / "c.parquet", row_group_size=2)


def test_every_source_format_yields_the_same_documents(tmp_path):
    import datasets

    write_all_formats(tmp_path)
    assert list(iter_documents(str(tmp_path / "txt"))) == DOCS
    assert list(iter_documents(str(tmp_path / "txt" / "doc_01.txt"))) == [DOCS[1]]
    for name in ("c.jsonl", "c.jsonl.gz", "c.parquet"):
        assert list(iter_documents(str(tmp_path / name), text_field="body")) == DOCS, name
    datasets.Dataset.from_dict({"body": DOCS}).save_to_disk(str(tmp_path / "saved"))
    assert list(iter_documents(str(tmp_path / "saved"), text_field="body")) == DOCS
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": DOCS[:1]}),
                          "test": datasets.Dataset.from_dict({"body": DOCS[1:]})}).save_to_disk(str(tmp_path / "dd"))
    assert list(iter_documents(str(tmp_path / "dd"), text_field="body", split="test")) == DOCS[1:]
    mixed = tmp_path / "mixed"
    (mixed / "sub").mkdir(parents=True)
    (mixed / "b.jsonl").write_text((tmp_path / "c.jsonl").read_text())
    (mixed / "a.txt").write_text("from a.txt")
    (mixed / "sub" / "c.txt").write_text("from sub/c.txt")
    (mixed / "README.md").write_text("not a supported file")
    assert list(iter_documents(str(mixed), text_field="body")) == ["from a.txt", *DOCS, "from sub/c.txt"]
    both = iter_documents_many([str(tmp_path / "c.jsonl"), str(tmp_path / "txt")], text_field="body")
    assert list(both) == DOCS + DOCS


def test_source_errors(tmp_path, monkeypatch):
    import datasets

    with pytest.raises(LLMLabError, match="no such file: .*missing.jsonl"):
        list(iter_documents(str(tmp_path / "missing.jsonl")))
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\n\n{"text": broken}\n', encoding="utf-8")
    with pytest.raises(LLMLabError, match=r"bad.jsonl, line 3: not valid JSON"):
        list(iter_documents(str(bad)))
    (tmp_path / "latin1.jsonl").write_bytes('{"text": "ok"}\n{"text": "fine"}\n{"text": "café"}\n'.encode("latin-1"))
    with pytest.raises(LLMLabError, match=r"latin1.jsonl, line 3: not UTF-8 text"):
        list(iter_documents(str(tmp_path / "latin1.jsonl")))
    packed = bytearray(gzip.compress(b'{"text": "ok"}\n' * 200))
    packed[len(packed) // 2] ^= 0xFF                        # a corrupted block inside a well-formed gzip header
    (tmp_path / "broken.jsonl.gz").write_bytes(bytes(packed))
    with pytest.raises(LLMLabError, match=r"broken.jsonl.gz: not a readable gzip file"):
        list(iter_documents(str(tmp_path / "broken.jsonl.gz")))
    (tmp_path / "field.jsonl").write_text('{"text": "ok"}\n{"body": "x"}\n')
    with pytest.raises(LLMLabError, match=r"field.jsonl, line 2: no field 'text' \(fields: body\)"):
        list(iter_documents(str(tmp_path / "field.jsonl")))
    (tmp_path / "empty.jsonl").write_text('{"text": ""}\n{"text": "  \\n"}\n')
    with pytest.raises(LLMLabError, match="empty corpus"):
        list(iter_documents(str(tmp_path / "empty.jsonl")))
    (tmp_path / "nothing").mkdir()
    with pytest.raises(LLMLabError, match="empty corpus"):
        list(iter_documents(str(tmp_path / "nothing")))
    pq.write_table(pa.table({"body": ["x"]}), tmp_path / "p.parquet")
    with pytest.raises(LLMLabError, match=r"p.parquet: no column 'text' \(columns: body\)"):
        list(iter_documents(str(tmp_path / "p.parquet")))
    with pytest.raises(LLMLabError, match="empty corpus"):
        build_shards([], make_tokenizer(), tmp_path / "out", num_workers=1)

    def unreachable(name, split):
        raise ConnectionError(f"Couldn't reach '{name}' on the Hub")

    monkeypatch.setattr(datasets, "load_dataset", unreachable)
    with pytest.raises(LLMLabError, match="user/corpus: no such local file.*hub.*pass a local path"):
        list(iter_documents("user/corpus"))


# --- built-in corpora ---------------------------------------------------------------------------------------------

def test_a_builtin_corpus_name_reads_the_cached_file(llmlab_cache, tmp_path, monkeypatch):
    cached = llmlab_cache / "data" / "tinyshakespeare.txt"
    assert list(iter_documents("tinyshakespeare")) == [cached.read_text(encoding="utf-8")]
    monkeypatch.chdir(tmp_path)                        # a local file or folder of that name wins over the cache
    (tmp_path / "tinyshakespeare").mkdir()
    (tmp_path / "tinyshakespeare" / "input.txt").write_text("my own copy")
    assert list(iter_documents("tinyshakespeare")) == ["my own copy"]


def test_a_builtin_corpus_is_downloaded_once_checked_and_renamed_into_place(tmp_path, monkeypatch):
    text = b"First Citizen:\nBefore we proceed any further, hear me speak.\n"
    spec = sources.Builtin("https://example.org/input.txt", len(text), hashlib.sha256(text).hexdigest())
    monkeypatch.setitem(sources.BUILTIN, "tinyshakespeare", spec)
    monkeypatch.setenv("LLMLAB_CACHE", str(tmp_path / "cache"))
    fetched = []

    def fetch(url):
        fetched.append(url)
        return text if len(fetched) > 1 else b"<html>429 Too Many Requests</html>"

    monkeypatch.setattr(sources, "_fetch", fetch)
    with pytest.raises(LLMLabError, match=r"sent 34 bytes.*not the expected 61 bytes.*--set data.path="):
        sources.builtin_corpus("tinyshakespeare")
    assert not (tmp_path / "cache").exists()                                 # nothing written
    path = sources.builtin_corpus("tinyshakespeare")
    assert path == tmp_path / "cache" / "data" / "tinyshakespeare.txt" and path.read_bytes() == text
    assert list((tmp_path / "cache" / "data").iterdir()) == [path]          # no temporary file left behind
    assert list(iter_documents("tinyshakespeare")) == [text.decode()]
    assert fetched == [spec.url, spec.url]                                  # the second read came from the cache


def test_an_offline_machine_gets_an_error_that_says_what_to_do(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMLAB_CACHE", str(tmp_path / "cache"))

    def offline(url):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(sources, "_fetch", offline)
    cached = tmp_path / "cache" / "data" / "tinyshakespeare.txt"
    with pytest.raises(LLMLabError) as e:
        list(iter_documents("tinyshakespeare"))
    message = str(e.value)
    assert "downloading https://raw.githubusercontent.com/karpathy/char-rnn/" in message
    assert "failed (URLError" in message and "Temporary failure in name resolution" in message
    assert "--set data.path=/path/to/input.txt" in message and f"put the file at {cached}" in message
    assert not cached.exists()
    assert cli.main(["pretrain", "--config", "shakespeare-char", "--out", str(tmp_path / "run")]) == 2


# --- command line -------------------------------------------------------------------------------------------------

def test_cli_end_to_end(tmp_path, tokenizer, capsys):
    tokenizer.save_pretrained(tmp_path / "tok")
    write_all_formats(tmp_path)
    rc = cli.main(["shards", "--data", str(tmp_path / "c.jsonl"), str(tmp_path / "c.parquet"),
                   "--tokenizer", str(tmp_path / "tok"), "--out", str(tmp_path / "out"),
                   "--text-field", "body", "--val-fraction", "0.2"])
    assert rc == 0
    assert "6 documents" in capsys.readouterr().out
    stream = reference_stream(tokenizer, DOCS + DOCS)
    got = np.concatenate([read_split(tmp_path / "out", "train"), read_split(tmp_path / "out", "val")])
    np.testing.assert_array_equal(got, stream)
    assert len(read_split(tmp_path / "out", "val")) == round(0.2 * len(stream))
    TokenShards(tmp_path / "out", "train").check_tokenizer(tokenizer)

    rc = cli.main(["shards", "--data", str(tmp_path / "nope.txt"), "--tokenizer", str(tmp_path / "tok"),
                   "--out", str(tmp_path / "out2")])
    assert rc == 2
    assert "no such file" in capsys.readouterr().err
    assert not (tmp_path / "out2").exists()
