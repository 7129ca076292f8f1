"""Token lists into batches, one rule each: pad, truncate, pack, and the label shift of next-token training.

An *example* is ``(ids, mask)``: token ids and a same-length 0/1 mask of the tokens that are targets (assistant
tokens in SFT, the answer in DPO). A *packed row* is ``(ids, mask, segments)``: several examples end to end,
``segments[t]`` numbering the example token t belongs to (0, 1, … within the row).
"""
from __future__ import annotations

import torch

from ..losses import IGNORE_INDEX

Example = tuple[list[int], list[int]]


def pad(rows: list[list[int]], value: int, side: str = "right") -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, mask)``, both long (len(rows), longest row): each row at the ``side`` end (``right``: left-aligned,
    then ``value``; ``left``: ``value`` first, the row at the end, as prompts for generation), ``mask`` 1 on the
    row's own entries."""
    width = max(len(r) for r in rows)
    values = torch.full((len(rows), width), value, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        span = slice(0, len(row)) if side == "right" else slice(width - len(row), width)
        values[i, span] = torch.tensor(row, dtype=torch.long)
        mask[i, span] = 1
    return values, mask


def truncate(ids: list[int], max_length: int, keep: str = "head") -> list[int]:
    """At most ``max_length`` ids: the first ones (``head``), or the first quarter and the last three quarters of
    the room (``head+tail``, which Sun et al. 2019 found best for long IMDB reviews)."""
    if len(ids) <= max_length:
        return ids
    if keep == "head":
        return ids[:max_length]
    head = max_length // 4
    return ids[:head] + ids[len(ids) - (max_length - head):]


def truncate_example(example: Example, max_length: int) -> Example | None:
    """The example's first ``max_length`` tokens, or None when no target is left (mask[1:] all zero: the first
    token is never a target)."""
    ids, mask = truncate(example[0], max_length), truncate(example[1], max_length)
    return (ids, mask) if any(mask[1:]) else None


def pack(examples: list[Example], max_length: int) -> list[tuple[list[int], list[int], list[int]]]:
    """Concatenate examples, in order, into rows of at most ``max_length`` tokens (a new row when the next one
    does not fit): ``(ids, mask, segments)``, every example keeping its own mask."""
    rows = []
    for e_ids, e_mask in examples:
        if not rows or len(rows[-1][0]) + len(e_ids) > max_length:
            rows.append(([], [], []))
        ids, mask, segments = rows[-1]
        segment = segments[-1] + 1 if segments else 0
        ids += e_ids
        mask += e_mask
        segments += [segment] * len(e_ids)
    return rows


def pack_batch(examples: list, max_length: int) -> list[tuple[list[int], list[int], list[int]]]:
    """One batch's examples ``pack``ed into rows of at most ``max_length`` tokens and twice the longest example:
    a packed row's attention grows with its length, so rows much longer than the examples cost more than they
    save."""
    return pack(examples, min(max_length, 2 * max(len(e[0]) for e in examples)))


def pad_collate(examples: list, pad_id: int, pack_length: int | None = None) -> dict:
    """Right-pad ``(ids, mask)`` examples, or packed ``(ids, mask, segments)`` rows, into a batch for next-token
    prediction; with ``pack_length`` the examples are first packed into rows of at most that many tokens
    (``pack_batch``: padding-free batches).

    ``input_ids`` = ids[:-1]; ``labels`` = ids[1:] where mask[1:] is 1, else ``IGNORE_INDEX`` (pads too);
    ``attention_mask`` = 1 on real input tokens. All (B, max len − 1) tensors of dtype long. Packed rows add
    ``segment_ids``: the example of each input token, numbered across the whole batch, −1 on padding. (The last
    token of a packed example predicts the next example's first token, which is never a target.)"""
    if pack_length:
        examples = pack_batch(examples, pack_length)
    input_ids, attention = pad([e[0][:-1] for e in examples], pad_id)
    labels, _ = pad([[i if m else IGNORE_INDEX for i, m in zip(e[0][1:], e[1][1:])] for e in examples], IGNORE_INDEX)
    batch = {"input_ids": input_ids, "labels": labels, "attention_mask": attention}
    if len(examples[0]) == 3:
        numbered, seen = [], 0
        for _, _, segments in examples:
            numbered.append([s + seen for s in segments[:-1]])
            seen += segments[-1] + 1
        batch["segment_ids"], _ = pad(numbered, -1)
    return batch


def pad_id_of(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id, else 0 (padding is never attended to nor a target)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return token_id
    return 0
