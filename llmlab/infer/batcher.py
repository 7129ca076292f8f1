"""Continuous batching: one scheduler thread owns the engine and steps every active sequence together.

Each turn of the scheduler loop:

  1. admit  — waiting requests take the free slots (up to ``max_batch`` rows); their prompts are prefilled together
              and their rows join the running batch, each with the logits of its first token;
  2. sample — one token per row from its pending logits, with that request's own sampling parameters and RNG;
  3. emit   — text pieces go to each request's sink; rows that finished (end-of-sequence token, stop string, token
              budget) or whose client went away (``cancel``) leave the batch;
  4. decode — the remaining rows take one forward step together, which gives their next pending logits.

So a request arriving while others decode starts at the next step, not when the batch drains.

How a row joins a running batch (our ``Decoder``)
-------------------------------------------------
Our KV cache has one write position for the whole batch: row r keeps its n_r tokens right-aligned in columns
[L − n_r, L), with masked-out padding in front. New prompts are prefilled on their own (left-padded among
themselves) into a fresh cache, which is then merged: a new row of length p gets L − p columns of padding in front,
or, when p > L, every running row gets p − L more. Keys are stored after RoPE and positions are counted over real
tokens only (``positions_from_mask``), so moving a row's keys to other columns changes nothing: every row computes
what it would compute alone. When rows leave, the columns that are padding in every remaining row are cut off the
front, so L stays the length of the longest remaining row and never exceeds the context.

``transformers`` models (the HF adapter) keep their own cache objects; for them a join re-runs the prefill of
every row's whole history (prompt + tokens so far) together with the new prompts: the same admission at the next
step, paid for with recomputation.
"""
from __future__ import annotations

import logging
import threading
from collections import deque
from dataclasses import dataclass
from typing import Callable

import torch

from ..data.batching import pad
from .engine import Engine, OurLM, SamplingParams, TextStream, next_tokens

log = logging.getLogger(__name__)


@dataclass
class Event:
    """What a request's sink receives: a text piece; the last event has ``finish_reason`` ("stop", "length",
    "error") and the number of generated tokens (every token the model sampled, end-of-sequence included)."""
    text: str
    finish_reason: str | None = None
    completion_tokens: int = 0
    error: str | None = None


@dataclass(eq=False)
class Sequence:
    """One generation request in the scheduler (one choice of an API request)."""
    prompt: list[int]
    params: SamplingParams
    sink: Callable[[Event], None]
    budget: int                                   # max new tokens, capped so prompt + output fits the context
    stream: TextStream
    generator: torch.Generator | None = None
    seen: torch.Tensor | None = None              # (V,) tokens seen so far, for the repetition penalty
    generated: int = 0
    cancelled: bool = False                       # set by ``Batcher.cancel`` from any thread
    done: bool = False


def left_pad(rows: list[list[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, mask), each (len(rows), longest) on ``device``: every row right-aligned, mask 1 on real tokens."""
    ids, mask = pad(rows, pad_id, side="left")
    return ids.to(device), mask.to(device)


def _mask_or_none(mask: torch.Tensor) -> torch.Tensor | None:
    return None if bool(mask.all()) else mask


class DecoderRows:
    """The running batch of our ``Decoder``: a KV cache whose rows can join (merge) and leave (select + trim)."""

    def __init__(self, model, pad_id: int, device):
        self.model, self.pad_id, self.device = model, pad_id, device
        self.cache = None
        self.mask = None                          # (B, L), 1 on real tokens

    def admit(self, prompts: list[list[int]]) -> torch.Tensor:
        """Prefill ``prompts`` on their own, merge them into the batch as its last rows; their (n, V) logits."""
        ids, mask = left_pad(prompts, self.pad_id, self.device)
        fresh = self.model.new_cache(len(prompts), ids.shape[1])
        logits = self.model(ids, attention_mask=_mask_or_none(mask), cache=fresh)[:, -1]
        self._merge(fresh, mask)
        return logits

    def _merge(self, fresh, fresh_mask: torch.Tensor) -> None:
        if self.cache is None:
            self.cache, self.mask = fresh, fresh_mask
            return
        old_len, new_len = self.cache.length, fresh.length
        length = max(old_len, new_len)
        capacity = max(length, self.cache.max_len)
        b_old, b_new = self.mask.shape[0], fresh_mask.shape[0]
        for store, new in ((self.cache.k, fresh.k), (self.cache.v, fresh.v)):
            for layer, (a, b) in enumerate(zip(store, new)):
                merged = a.new_zeros((b_old + b_new, a.shape[1], capacity, a.shape[3]))
                merged[:b_old, :, length - old_len:length] = a[:, :, :old_len]
                merged[b_old:, :, length - new_len:length] = b[:, :, :new_len]
                store[layer] = merged
        mask = self.mask.new_zeros((b_old + b_new, length))
        mask[:b_old, length - old_len:] = self.mask
        mask[b_old:, length - new_len:] = fresh_mask
        self.cache.length, self.cache.max_len, self.mask = length, capacity, mask

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """One step for every row: (B,) tokens in, (B, V) logits out."""
        self._reserve(1)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        return self.model(tokens[:, None], attention_mask=_mask_or_none(self.mask), cache=self.cache)[:, -1]

    def _reserve(self, n: int) -> None:
        """Grow the cache's capacity (doubling) so that ``n`` more positions fit."""
        cache = self.cache
        if cache.length + n <= cache.max_len:
            return
        capacity = max(2 * cache.max_len, cache.length + n)
        for store in (cache.k, cache.v):
            for layer, t in enumerate(store):
                grown = t.new_zeros((*t.shape[:2], capacity, t.shape[3]))
                grown[:, :, :cache.length] = t[:, :, :cache.length]
                store[layer] = grown
        cache.max_len = capacity

    def keep(self, rows: list[int]) -> None:
        """Keep only ``rows``; cut the leading columns that are padding in every remaining row."""
        if not rows:
            self.cache = self.mask = None
            return
        index = torch.tensor(rows, device=self.mask.device)
        self.cache.select(index)
        self.mask = self.mask[index]
        cut = int(self.mask.any(0).int().argmax())  # first column holding a real token of some row
        if cut:
            length = self.cache.length - cut
            for store in (self.cache.k, self.cache.v):
                for layer, t in enumerate(store):
                    store[layer] = t[:, :, cut:cut + length].clone()
            self.cache.length = self.cache.max_len = length
            self.mask = self.mask[:, cut:]


class RecomputeRows:
    """The running batch of a ``transformers`` model: a join re-prefills every row's history with the new
    prompts (its cache objects cannot merge); leaving rows are dropped with ``batch_select_indices``."""

    def __init__(self, lm, pad_id: int, device):
        self.lm, self.pad_id, self.device = lm, pad_id, device
        self.histories: list[list[int]] = []
        self.mask = None

    def admit(self, prompts: list[list[int]]) -> torch.Tensor:
        self.histories += [list(p) for p in prompts]
        ids, self.mask = left_pad(self.histories, self.pad_id, self.device)
        return self.lm.prefill(ids, self.mask, ids.shape[1])[-len(prompts):]

    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        for history, token in zip(self.histories, tokens.tolist()):
            history.append(token)
        self.mask = torch.cat([self.mask, torch.ones_like(self.mask[:, :1])], dim=1)
        return self.lm.decode(tokens, self.mask)

    def keep(self, rows: list[int]) -> None:
        self.histories = [self.histories[r] for r in rows]
        if not rows:
            self.lm.cache = self.mask = None
            return
        index = torch.tensor(rows, device=self.mask.device)
        self.lm.cache.batch_select_indices(index)
        self.mask = self.mask[index]


class Batcher:
    """A scheduler thread that serves generation requests with continuous batching (see the module docstring).

    ``submit`` is thread-safe and returns at once; the request's ``sink`` is then called from the scheduler
    thread with ``Event``s until one carries a ``finish_reason``. ``cancel`` makes a request leave at the next step.
    """

    def __init__(self, engine: Engine, max_batch: int = 32):
        if max_batch < 1:
            raise ValueError(f"max_batch must be ≥ 1, got {max_batch}")
        self.engine, self.max_batch = engine, max_batch
        rows_class = DecoderRows if isinstance(engine.lm, OurLM) else RecomputeRows
        self.rows = rows_class(engine.model if rows_class is DecoderRows else engine.lm, engine.pad_id,
                               engine.device)
        self.seqs: list[Sequence] = []            # the running batch, in row order (scheduler thread only)
        self.logits: torch.Tensor | None = None   # (B, V) pending logits of the running batch
        self.waiting: deque[Sequence] = deque()
        self.cancelled = 0                        # sequences that left because their client went away
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------------------------ public side

    @property
    def active(self) -> int:
        """Sequences in the running batch."""
        return len(self.seqs)

    def start(self) -> None:
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name="llmlab-batcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def submit(self, prompt: list[int], params: SamplingParams, sink: Callable[[Event], None]) -> Sequence:
        """Queue one generation; the prompt must fit the context (``Engine.check_prompt``)."""
        params.validate()
        self.engine.check_prompt(prompt)
        seq = Sequence(prompt=list(prompt), params=params, sink=sink,
                       budget=min(params.max_new_tokens, self.engine.context - len(prompt)),
                       stream=TextStream(self.engine.tokenizer, params.stop, params.lstrip))
        if params.seed is not None:
            seq.generator = torch.Generator(device=self.engine.device).manual_seed(params.seed)
        if seq.budget <= 0:
            seq.done = True
            sink(Event("", "length", 0))
            return seq
        with self._cond:
            self.waiting.append(seq)
            self._cond.notify()
        return seq

    def cancel(self, seq: Sequence) -> None:
        """Stop ``seq`` at the next step (no more events are sent); nothing happens if it already finished."""
        seq.cancelled = True
        with self._cond:
            self._cond.notify()

    # ------------------------------------------------------------------------------------------ scheduler side

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stopping and not self.seqs and not self.waiting:
                        self._cond.wait()
                    if self._stopping:
                        break
                try:
                    self._step()
                except Exception as e:    # a failing step must not hang the clients: end every sequence
                    log.exception("generation step failed")
                    self._fail_all(f"{type(e).__name__}: {e}")
        self._fail_all("server shutting down")

    def _step(self) -> None:
        self._admit()
        if not self.seqs:
            return
        tokens = self._sample()
        for seq, token in zip(self.seqs, tokens):
            if not seq.cancelled:
                self._emit(seq, token)
        keep = [r for r, seq in enumerate(self.seqs) if not seq.done and not seq.cancelled]
        if len(keep) < len(self.seqs):
            self.cancelled += sum(1 for seq in self.seqs if seq.cancelled and not seq.done)
            for seq in self.seqs:
                seq.done = seq.done or seq.cancelled
            self.rows.keep(keep)
            self.seqs = [self.seqs[r] for r in keep]
            tokens = [tokens[r] for r in keep]
        if self.seqs:
            self.logits = self.rows.decode(torch.tensor(tokens, device=self.engine.device))
        else:
            self.logits = None

    def _admit(self) -> None:
        with self._cond:
            new = []
            while self.waiting and len(self.seqs) + len(new) < self.max_batch:
                seq = self.waiting.popleft()
                if seq.cancelled:
                    seq.done = True
                    self.cancelled += 1
                else:
                    new.append(seq)
        if not new:
            return
        logits = self.rows.admit([s.prompt for s in new])
        self.logits = logits if self.logits is None else torch.cat([self.logits, logits])
        for seq in new:
            if seq.params.repetition_penalty != 1.0:
                seq.seen = torch.zeros(logits.shape[-1], dtype=torch.bool, device=logits.device)
                seq.seen[torch.tensor(seq.prompt, device=logits.device)] = True
        self.seqs += new

    def _sample(self) -> list[int]:
        """One token per row: a batched argmax for greedy rows, each other row with its own parameters and RNG."""
        tokens = self.logits.argmax(-1).tolist()
        for row, seq in enumerate(self.seqs):
            p = seq.params
            if p.temperature == 0 and p.repetition_penalty == 1.0:
                continue
            seen = seq.seen[None] if seq.seen is not None else None
            tokens[row] = int(next_tokens(self.logits[row:row + 1], p, seen, seq.generator)[0])
        return tokens

    def _emit(self, seq: Sequence, token: int) -> None:
        """Account for one sampled token: send its text, decide whether the sequence is done."""
        seq.generated += 1
        if seq.seen is not None:
            seq.seen[token] = True
        finish = None
        if token in self.engine.eos_token_ids:
            piece, finish = seq.stream.flush(), "stop"
        else:
            piece = seq.stream.add(token)
            if seq.stream.stopped:
                finish = "stop"
            elif seq.generated >= seq.budget:
                piece, finish = piece + seq.stream.flush(), "length"
        if finish:
            seq.done = True
        if piece or finish:
            seq.sink(Event(piece, finish, seq.generated))

    def _fail_all(self, message: str) -> None:
        """End every running and waiting sequence with an error event; reset the batch."""
        with self._cond:
            pending = self.seqs + list(self.waiting)
            self.waiting.clear()
        for seq in pending:
            if not seq.done and not seq.cancelled:
                seq.done = True
                seq.sink(Event("", "error", seq.generated, error=message))
        self.seqs, self.logits = [], None
        self.rows.keep([])
