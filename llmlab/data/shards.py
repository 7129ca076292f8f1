"""Pre-training data on disk: text → token shards (memory-mapped), packed rows, a resumable batch sampler.

The pipeline, as in nanoGPT and nanochat:

1. ``build_shards`` tokenizes documents in parallel, frames each as ``[BOS] + ids + [EOS]``, concatenates them
   into one token stream and writes it as flat binary files (``train_000000.bin``, ..., ``val_000000.bin``) plus an
   ``index.json``. The last ``val_fraction`` of the stream is the validation split.
2. ``TokenShards`` maps one split back into memory (``np.memmap``) and reads any token range.
3. ``PackedSequences`` cuts the stream into rows of ``max_length + 1`` tokens: inputs ``row[:-1]``, targets
   ``row[1:]``.
4. ``BatchSampler`` draws rows in a seeded order, splits each global batch across ranks, and resumes exactly from
   ``{"epoch", "position"}``.

``llmlab shards --data PATH... --tokenizer DIR --out DIR`` runs step 1 from the command line.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import multiprocessing
import os
import shutil
import tempfile
from collections import deque
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
import torch

from ..errors import LLMLabError
from ..progress import progress_bar
from ..tokenizer import load_tokenizer
from .sources import iter_documents_many

INDEX_FILE = "index.json"
INDEX_FORMAT = "llmlab-token-shards"
IGNORE_INDEX = -100
DOCS_PER_BATCH = 256


# ---------------------------------------------------------------------------------------------------------------
# Building shards
# ---------------------------------------------------------------------------------------------------------------

def build_shards(documents: Iterable[str], tokenizer, out_dir, *, val_fraction: float = 0.1,
                 shard_size: int = 2**24, dtype=None, num_workers: int | None = None) -> dict:
    """Tokenize ``documents`` into ``out_dir`` and return its index (the content of ``index.json``).

    Each document becomes ``[BOS] + ids + [EOS]`` (whichever of the two the tokenizer has); the documents are
    concatenated into one stream of N tokens. The split is by position, so it is deterministic and works for one
    big document: ``n_val = round(N * val_fraction)`` (at least 1 when ``val_fraction > 0``), train is
    ``stream[:N - n_val]`` and val is ``stream[N - n_val:]``. Shards hold ``shard_size`` tokens each (the last one
    fewer), as ``uint16`` when ``len(tokenizer) <= 65536``, else ``uint32``, unless ``dtype`` says otherwise.

    The build happens in a temporary folder beside ``out_dir`` that is renamed into place at the end, so a killed
    build never leaves a half-written index. An existing shard folder at ``out_dir`` is replaced.
    """
    if not 0.0 <= val_fraction < 1.0:
        raise LLMLabError(f"val_fraction={val_fraction}: must be in [0, 1)")
    if shard_size < 1:
        raise LLMLabError(f"shard_size={shard_size}: must be a positive number of tokens")
    vocab_size = len(tokenizer)
    np_dtype = choose_dtype(vocab_size, dtype)
    bos_id, eos_id = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos_id is None and eos_id is None:
        raise LLMLabError("the tokenizer has neither a bos_token nor an eos_token: documents would run together "
                          "in the token stream; add one of them (e.g. <|eos|>) to the tokenizer")
    out_dir = Path(out_dir)
    _check_out_dir(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp_dir = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.building-", dir=out_dir.parent))
    writer = _ShardWriter(tmp_dir, "train", np_dtype, shard_size)
    try:
        num_docs = 0
        for num_batch_docs, ids in _tokenize_parallel(documents, tokenizer, np_dtype, num_workers):
            writer.write(ids)
            num_docs += num_batch_docs
        if num_docs == 0:
            raise LLMLabError("empty corpus: no documents to tokenize")
        splits = _split_tail(tmp_dir, writer.close(), np_dtype, shard_size, val_fraction)
        index = {
            "format": INDEX_FORMAT, "version": 1,
            "dtype": np_dtype.name, "vocab_size": vocab_size,
            "bos_id": bos_id, "eos_id": eos_id, "pad_id": tokenizer.pad_token_id,
            "tokenizer_hash": tokenizer_fingerprint(tokenizer),
            "num_documents": num_docs, "val_fraction": val_fraction, "shard_size": shard_size,
            "splits": splits,
        }
        (tmp_dir / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        _move_into_place(tmp_dir, out_dir)
    finally:
        writer.close()
        shutil.rmtree(tmp_dir, ignore_errors=True)
    return index


def choose_dtype(vocab_size: int, dtype=None) -> np.dtype:
    """The unsigned integer type for token ids: ``uint16`` up to 65536 tokens, else ``uint32``; or check ``dtype``."""
    if dtype is None:
        return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)
    try:
        chosen = np.dtype(dtype)
    except TypeError:
        raise LLMLabError(f"dtype {dtype!r}: not a numpy dtype; use uint16 or uint32") from None
    if chosen.kind != "u":
        raise LLMLabError(f"dtype {chosen.name}: token ids need an unsigned integer type (uint16 or uint32)")
    if vocab_size > np.iinfo(chosen).max + 1:
        raise LLMLabError(f"dtype {chosen.name} holds ids up to {np.iinfo(chosen).max} but the tokenizer has "
                          f"{vocab_size} tokens; use uint32 (or leave dtype unset to choose automatically)")
    return chosen


def tokenizer_fingerprint(tokenizer) -> str:
    """``sha256`` of the tokenizer's vocabulary (token → id, added tokens included), to detect a mismatch later."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]), ensure_ascii=False)
    return "sha256:" + hashlib.sha256(vocab.encode("utf-8")).hexdigest()


def _check_out_dir(out_dir: Path) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise LLMLabError(f"{out_dir}: exists and is not a folder; choose another --out")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / INDEX_FILE).is_file():
        raise LLMLabError(f"{out_dir}: exists, is not empty and holds no {INDEX_FILE}; refusing to replace it, "
                          f"choose an empty or new folder")


def _move_into_place(tmp_dir: Path, out_dir: Path) -> None:
    """Rename the finished build onto ``out_dir``; an old build there is moved aside first, then deleted."""
    old = None
    if out_dir.is_dir() and any(out_dir.iterdir()):
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / out_dir.name)
    os.replace(tmp_dir, out_dir)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


class _ShardWriter:
    """Appends token arrays to ``{split}_000000.bin``, ``{split}_000001.bin``, ... of ``shard_size`` tokens each."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, shard_size: int):
        self.directory, self.split, self.dtype, self.shard_size = directory, split, dtype, shard_size
        self.files: list[str] = []
        self.counts: list[int] = []
        self._handle = None

    def write(self, ids: np.ndarray) -> None:
        ids = ids.astype(self.dtype, copy=False)
        while len(ids):
            if self._handle is None or self.counts[-1] == self.shard_size:
                self._next_file()
            room = self.shard_size - self.counts[-1]
            self._handle.write(ids[:room].tobytes())
            self.counts[-1] += len(ids[:room])
            ids = ids[room:]

    def _next_file(self) -> None:
        if self._handle is not None:
            self._handle.close()
        name = f"{self.split}_{len(self.files):06d}.bin"
        self._handle = open(self.directory / name, "wb")
        self.files.append(name)
        self.counts.append(0)

    def close(self) -> tuple[list[str], list[int]]:
        if self._handle is not None:
            self._handle.close()
            self._handle = None
        return self.files, self.counts


def _split_tail(directory: Path, stream: tuple[list[str], list[int]], dtype: np.dtype, shard_size: int,
                val_fraction: float) -> dict:
    """Move the last ``val_fraction`` of the stream (written as train shards) into val shards; return both splits."""
    files, counts = stream
    total = sum(counts)
    n_val = max(1, round(total * val_fraction)) if val_fraction > 0 else 0
    n_train = total - n_val
    if n_train < 1:
        raise LLMLabError(f"the corpus has only {total} tokens: too few to split off val_fraction={val_fraction}")
    val = _ShardWriter(directory, "val", dtype, shard_size)
    train_files, train_counts = [], []
    start = 0
    for name, count in zip(files, counts):
        keep = min(max(n_train - start, 0), count)
        path = directory / name
        if keep < count:
            val.write(np.fromfile(path, dtype=dtype, count=count - keep, offset=keep * dtype.itemsize))
        if keep == 0:
            path.unlink()
        else:
            os.truncate(path, keep * dtype.itemsize)
            train_files.append(name)
            train_counts.append(keep)
        start += count
    val_files, val_counts = val.close()
    return {"train": _split_entry(train_files, train_counts), "val": _split_entry(val_files, val_counts)}


def _split_entry(files: list[str], counts: list[int]) -> dict:
    return {"files": files, "tokens": counts, "num_tokens": sum(counts)}


# ---------------------------------------------------------------------------------------------------------------
# Parallel tokenization
# ---------------------------------------------------------------------------------------------------------------

def encode_documents(tokenizer, texts: list[str]) -> list[list[int]]:
    """Token ids of each text, without special tokens; the fast Rust batch encoder when the tokenizer has one."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        return [encoding.ids for encoding in backend.encode_batch(texts, add_special_tokens=False)]
    return list(tokenizer(texts, add_special_tokens=False)["input_ids"])


def _frame_batch(tokenizer, texts: list[str], dtype: np.dtype) -> np.ndarray:
    """``[BOS] + ids + [EOS]`` for every text, concatenated into one array."""
    head = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    tail = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    pieces = [np.asarray(head + ids + tail, dtype=dtype) for ids in encode_documents(tokenizer, texts)]
    return np.concatenate(pieces)


_worker_state: dict = {}


def _init_worker(tokenizer, dtype: np.dtype) -> None:
    _worker_state["tokenizer"], _worker_state["dtype"] = tokenizer, dtype


def _worker_frame_batch(texts: list[str]) -> np.ndarray:
    return _frame_batch(_worker_state["tokenizer"], texts, _worker_state["dtype"])


def _document_batches(documents: Iterable[str]) -> Iterator[list[str]]:
    batch: list[str] = []
    for number, doc in enumerate(documents, start=1):
        if not isinstance(doc, str):
            raise LLMLabError(f"document {number} is a {type(doc).__name__}, not a string")
        batch.append(doc)
        if len(batch) == DOCS_PER_BATCH:
            yield batch
            batch = []
    if batch:
        yield batch


def _tokenize_parallel(documents: Iterable[str], tokenizer, dtype: np.dtype,
                       num_workers: int | None) -> Iterator[tuple[int, np.ndarray]]:
    """Yield ``(number of documents, framed ids)`` per batch, in document order, with a tqdm bar.

    With more than one worker, batches go to a process pool; at most ``2 * num_workers`` batches are in flight, so
    a corpus larger than memory streams through.
    """
    workers = num_workers or os.cpu_count() or 1
    total = len(documents) if hasattr(documents, "__len__") else None
    with progress_bar(total=total, desc="tokenizing", unit="doc") as bar:
        if workers == 1:
            for batch in _document_batches(documents):
                ids = _frame_batch(tokenizer, batch, dtype)
                bar.update(len(batch))
                yield len(batch), ids
            return
        with _no_tokenizers_threads_in_children(), multiprocessing.Pool(
                workers, initializer=_init_worker, initargs=(tokenizer, dtype)) as pool:
            pending: deque = deque()
            for batch in _document_batches(documents):
                pending.append((len(batch), pool.apply_async(_worker_frame_batch, (batch,))))
                if len(pending) >= 2 * workers:
                    yield _collect(pending, bar)
            while pending:
                yield _collect(pending, bar)


def _collect(pending: deque, bar) -> tuple[int, np.ndarray]:
    count, result = pending.popleft()
    ids = result.get()
    bar.update(count)
    return count, ids


@contextlib.contextmanager
def _no_tokenizers_threads_in_children():
    """Start pool workers with ``TOKENIZERS_PARALLELISM=false``: the processes are the parallelism, so each worker
    encodes on one thread instead of starting a Rust thread pool as large as the machine (and a forked child of a
    parent that already used that pool does not warn about it)."""
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        yield
    finally:
        if previous is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


# ---------------------------------------------------------------------------------------------------------------
# Reading shards
# ---------------------------------------------------------------------------------------------------------------

class TokenShards:
    """One split of a shard folder as a single token stream, memory-mapped shard by shard.

    ``len(shards)`` is the number of tokens; ``shards.tokens(start, length)`` copies any range (across shard
    boundaries) into a new array of the stored dtype; ``shards.index`` is the folder's ``index.json``.
    """

    def __init__(self, directory, split: str = "train"):
        self.directory = Path(directory)
        self.split = split
        self.index = read_index(self.directory)
        if split not in self.index["splits"]:
            raise LLMLabError(f"{self.directory}: no split {split!r} (splits: {', '.join(self.index['splits'])})")
        entry = self.index["splits"][split]
        if entry["num_tokens"] == 0:
            raise LLMLabError(f"{self.directory}: the {split!r} split is empty "
                              f"(built with val_fraction={self.index['val_fraction']})")
        self.dtype = np.dtype(self.index["dtype"])
        self._maps = [self._open(name, count) for name, count in zip(entry["files"], entry["tokens"])]
        self._offsets = np.cumsum([0] + entry["tokens"])

    def _open(self, name: str, count: int) -> np.memmap:
        path = self.directory / name
        expected = count * self.dtype.itemsize
        if not path.is_file() or path.stat().st_size != expected:
            found = f"{path.stat().st_size} bytes" if path.is_file() else "missing"
            raise LLMLabError(f"{path}: expected {expected} bytes ({count} tokens of {self.dtype.name}), found "
                              f"{found}; rebuild the shards with `llmlab shards`")
        return np.memmap(path, dtype=self.dtype, mode="r", shape=(count,))

    def __len__(self) -> int:
        return int(self._offsets[-1])

    def tokens(self, start: int, length: int) -> np.ndarray:
        """A copy of ``stream[start : start + length]``."""
        if start < 0 or length < 0 or start + length > len(self):
            raise IndexError(f"tokens({start}, {length}) outside a stream of {len(self)} tokens")
        pieces = []
        shard = int(np.searchsorted(self._offsets, start, side="right")) - 1
        while length > 0:
            local = start - int(self._offsets[shard])
            take = min(length, len(self._maps[shard]) - local)
            pieces.append(self._maps[shard][local:local + take])
            start, length, shard = start + take, length - take, shard + 1
        return np.concatenate(pieces) if pieces else np.empty(0, dtype=self.dtype)

    def positions_of(self, token_id: int) -> np.ndarray:
        """Stream positions (int64, ascending) where ``token_id`` occurs, found shard by shard."""
        return np.concatenate([np.flatnonzero(m == token_id) + int(offset)
                               for m, offset in zip(self._maps, self._offsets)]).astype(np.int64)

    def check_tokenizer(self, tokenizer) -> None:
        """Raise when ``tokenizer`` is not the one the shards were built with (its vocabulary hash differs)."""
        if tokenizer_fingerprint(tokenizer) != self.index["tokenizer_hash"]:
            raise LLMLabError(f"{self.directory}: the shards were built with a different tokenizer (vocabulary "
                              f"hash differs); rebuild them with this tokenizer or use the one they were built with")


def read_index(directory) -> dict:
    """Load and sanity-check ``DIR/index.json``."""
    path = Path(directory) / INDEX_FILE
    if not path.is_file():
        raise LLMLabError(f"{path}: not found; build token shards first with `llmlab shards`")
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LLMLabError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    if not isinstance(index, dict) or index.get("format") != INDEX_FORMAT:
        raise LLMLabError(f"{path}: not an llmlab token-shard index (format must be {INDEX_FORMAT!r})")
    return index


# ---------------------------------------------------------------------------------------------------------------
# Packing
# ---------------------------------------------------------------------------------------------------------------

class PackedSequences:
    """The token stream as training rows of ``max_length + 1`` tokens: ``x = row[:-1]``, ``y = row[1:]``.

    Each row is a contiguous range ``[start, end)`` of the stream, with ``end - start <= max_length + 1``; a short
    row is padded: inputs with the pad id (else EOS), targets with -100 (ignored by the loss).

    ``bos_aligned=False`` (nanoGPT): row i is ``[i*L, i*L + L + 1)`` with ``L = max_length``, so consecutive rows
    overlap by one token and every token of the stream except the very first is a target exactly once per epoch;
    only the last row may be padded. Rows start mid-document and attend across document boundaries, which wastes
    nothing and is what pre-training on a long stream usually wants.

    ``bos_aligned=True``: every row starts at a document start (its BOS; or the first token of the split when the
    split begins mid-document, as the val split usually does). Documents are placed greedily, in order, into the
    current row while they fit; a document that does not fit closes the row (its tail padded) and opens the next. A
    document longer than a row is cut into row-size pieces overlapping by one token, so none of its targets is
    lost; its last piece continues the next row, which then starts mid-document. The price: padding (fewer tokens
    of signal per row) and the BOS at each row start is never a target; the gain: the model always sees a
    document from its beginning, as at inference time, which matters most for short documents.
    """

    def __init__(self, shards: TokenShards, max_length: int, bos_aligned: bool = False):
        if max_length < 1:
            raise LLMLabError(f"max_length={max_length}: must be at least 1")
        if len(shards) < 2:
            raise LLMLabError(f"{shards.directory} ({shards.split}): {len(shards)} token, need at least 2 to "
                              f"make one (input, target) pair")
        self.shards, self.max_length, self.bos_aligned = shards, max_length, bos_aligned
        index = shards.index
        self.pad_id = next(i for i in (index["pad_id"], index["eos_id"], index["bos_id"], 0) if i is not None)
        if bos_aligned:
            self.starts, self.ends = _greedy_rows(_document_starts(shards), len(shards), max_length + 1)
        else:
            self.starts = np.arange(0, len(shards) - 1, max_length, dtype=np.int64)
            self.ends = np.minimum(self.starts + max_length + 1, len(shards))

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -len(self) <= i < len(self):
            raise IndexError(f"row {i} out of range for {len(self)} rows")
        start, end = int(self.starts[i]), int(self.ends[i])
        row = np.full(self.max_length + 1, self.pad_id, dtype=np.int64)
        row[:end - start] = self.shards.tokens(start, end - start)
        x = torch.from_numpy(row[:-1].copy())
        y = torch.from_numpy(row[1:].copy())
        y[end - start - 1:] = IGNORE_INDEX
        return x, y


def _document_starts(shards: TokenShards) -> np.ndarray:
    """Where documents begin: each BOS (or the token after each EOS when there is no BOS), and position 0."""
    bos_id, eos_id = shards.index["bos_id"], shards.index["eos_id"]
    starts = shards.positions_of(bos_id) if bos_id is not None else shards.positions_of(eos_id) + 1
    starts = starts[starts < len(shards)]
    if len(starts) == 0 or starts[0] != 0:
        starts = np.concatenate([[0], starts]).astype(np.int64)
    return starts


def _greedy_rows(doc_starts: np.ndarray, total: int, row_len: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy packing of the documents ``[doc_starts[k], doc_starts[k+1])`` into rows of at most ``row_len`` tokens.

    Returns the rows' ``starts`` and ``ends``. A row grows while the next document fits; a longer-than-a-row
    document emits full rows ``[s, s + row_len)`` stepping by ``row_len - 1`` and leaves its remainder open. A row
    of a single token (no target) is left out.
    """
    rows: list[tuple[int, int]] = []
    row_start = None
    for doc_start, doc_end in zip(doc_starts.tolist(), doc_starts[1:].tolist() + [total]):
        if row_start is not None and doc_end - row_start <= row_len:
            continue
        if row_start is not None:
            rows.append((row_start, doc_start))
        while doc_end - doc_start > row_len:
            rows.append((doc_start, doc_start + row_len))
            doc_start += row_len - 1
        row_start = doc_start
    rows.append((row_start, total))
    bounds = np.asarray([(s, e) for s, e in rows if e - s >= 2], dtype=np.int64).reshape(-1, 2)
    return bounds[:, 0].copy(), bounds[:, 1].copy()


# ---------------------------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------------------------

def stack_pairs(rows: list) -> tuple[torch.Tensor, torch.Tensor]:
    """The default collate: stack (x, y) rows into (B, L) tensors."""
    xs, ys = zip(*rows)
    return torch.stack(xs), torch.stack(ys)


class BatchSampler:
    """Deterministic, resumable batches of rows, split across ``world_size`` ranks.

    ``rows`` is any sequence (packed token rows, or a list of SFT/preference/classification examples);
    ``collate`` turns this rank's list of rows into a batch (default: stack (x, y) pairs).

    Epoch e visits rows in the order ``torch.randperm(n, generator=torch.Generator().manual_seed(seed + e))`` (or
    ``0..n-1`` without shuffling). Step p of an epoch takes the global batch ``order[p*G : (p+1)*G]`` with
    ``G = batch_size * world_size``; rank r gets ``global[r*batch_size : (r+1)*batch_size]``, so N processes with
    batch B see exactly what one process with batch N*B sees. With ``drop_last`` an epoch has ``n // G`` steps;
    without it, ``ceil(n / G)`` steps and the last global batch is completed with rows from the start of the epoch's
    order (a few rows repeat), so every batch has the same shape on every rank.

    The state is two ints, ``{"epoch", "position"}`` (``position`` = steps taken in ``epoch``); loading it makes
    the following batches identical to those of an uninterrupted sampler.
    """

    def __init__(self, rows, batch_size: int, *, seed: int = 0, shuffle: bool = True,
                 rank: int = 0, world_size: int = 1, drop_last: bool = True, collate=stack_pairs):
        if batch_size < 1 or world_size < 1:
            raise LLMLabError(f"batch_size={batch_size}, world_size={world_size}: both must be at least 1")
        if not 0 <= rank < world_size:
            raise LLMLabError(f"rank={rank}: must be in [0, world_size={world_size})")
        self.rows, self.collate = rows, collate
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        self.global_batch = batch_size * world_size
        if len(rows) == 0:
            raise LLMLabError("no rows to sample batches from: the data set is empty")
        if drop_last and len(rows) < self.global_batch:
            raise LLMLabError(f"only {len(rows)} rows, but one global batch needs "
                              f"batch_size {batch_size} x world_size {world_size} = {self.global_batch} rows; "
                              f"use a smaller batch or max_length, or more data")
        self.epoch, self.position = 0, 0
        self._order_epoch, self._order = None, None

    @property
    def steps_per_epoch(self) -> int:
        n, g = len(self.rows), self.global_batch
        return n // g if self.drop_last else -(-n // g)

    def __len__(self) -> int:
        return self.steps_per_epoch

    def order(self, epoch: int) -> torch.Tensor:
        """The row order of ``epoch``."""
        if self._order_epoch != epoch:
            n = len(self.rows)
            self._order = (torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch))
                           if self.shuffle else torch.arange(n))
            self._order_epoch = epoch
        return self._order

    def next_batch(self):
        """This rank's batch (``collate`` of its ``batch_size`` rows); then advance one step."""
        order = self.order(self.epoch)
        first = self.position * self.global_batch + self.rank * self.batch_size
        rows = order[(first + torch.arange(self.batch_size)) % len(order)]
        batch = self.collate([self.rows[int(i)] for i in rows])
        self.position += 1
        if self.position == self.steps_per_epoch:
            self.epoch, self.position = self.epoch + 1, 0
        return batch

    def state_dict(self) -> dict:
        return {"epoch": int(self.epoch), "position": int(self.position)}

    def load_state_dict(self, state: dict) -> None:
        try:
            epoch, position = state["epoch"], state["position"]
        except (KeyError, TypeError):
            raise LLMLabError(f"sampler state {state!r}: expected a mapping with 'epoch' and 'position'") from None
        if not (isinstance(epoch, int) and isinstance(position, int) and epoch >= 0
                and 0 <= position < self.steps_per_epoch):
            raise LLMLabError(f"sampler state {state!r}: epoch must be an int >= 0 and position an int in "
                              f"[0, {self.steps_per_epoch}) for this data and batch size")
        self.epoch, self.position = epoch, position


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------

def register(subparsers) -> None:
    p = subparsers.add_parser("shards", help="tokenize text into memory-mapped token shards",
                              description="Tokenize text files, folders or datasets into train/val token shards.")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH",
                   help=".txt, .jsonl, .jsonl.gz, .parquet, a folder, or a datasets.save_to_disk folder")
    p.add_argument("--tokenizer", required=True, metavar="DIR", help="a tokenizer or model folder")
    p.add_argument("--out", required=True, metavar="DIR", help="the shard folder to write")
    p.add_argument("--text-field", default="text", help="the JSON field / column holding the text (default: text)")
    p.add_argument("--val-fraction", type=float, default=0.1, help="the tail of the stream kept for validation")
    p.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    tokenizer = load_tokenizer(args.tokenizer)
    documents = iter_documents_many(args.data, text_field=args.text_field)
    index = build_shards(documents, tokenizer, args.out, val_fraction=args.val_fraction)
    splits = index["splits"]
    print(f"wrote {args.out}: {index['num_documents']} documents, {splits['train']['num_tokens']} train and "
          f"{splits['val']['num_tokens']} val tokens ({index['dtype']}, vocabulary {index['vocab_size']})")
    return 0
