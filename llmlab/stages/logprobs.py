"""Log-probabilities of target tokens under a causal language model: what SFT, DPO, the reward model, PPO and the
evaluation's KL all read.

    log p(y_t | x_≤t) = ℓ_t[y_t] − log Σ_v exp ℓ_t[v],    log π(y | x) = Σ_t log p(y_t | x, y_<t)
"""
from __future__ import annotations

import torch
from torch import nn

from ..losses import IGNORE_INDEX, token_logprobs
from ..model.decoder import Decoder


def causal_logits(model: nn.Module, input_ids: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Next-token logits (B, T, V) from our ``Decoder`` or a ``transformers`` causal LM (also inside DDP or peft).
    No attention mask is passed: batches are right-padded, so causal attention never lets a real token see a pad.
    ``segment_ids`` (packed rows) reach our decoder only; a ``transformers`` model sees plain causal rows."""
    if segment_ids is not None and isinstance(getattr(model, "module", model), Decoder):
        return model(input_ids, segment_ids=segment_ids)
    out = model(input_ids)
    return out if isinstance(out, torch.Tensor) else out.logits


def token_logps(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(y_t | x_≤t) for every target of ``batch["labels"]`` that is not ``IGNORE_INDEX``.

    Returns the flat log-probs (N,) in row-major order and the boolean target mask (B, T). Only the N target
    positions go through log-softmax, so the float32 (B·T·V) log-probabilities are never materialised; for our
    (unwrapped) Decoder only they go through the LM head at all."""
    labels, segments = batch["labels"], batch.get("segment_ids")
    keep = labels != IGNORE_INDEX
    if isinstance(model, Decoder):     # not wrapped (DDP must be called whole): project only the targets
        logits = model.logits(model.hidden_states(batch["input_ids"], segment_ids=segments)[keep])
    else:
        logits = causal_logits(model, batch["input_ids"], segments)[keep]
    return token_logprobs(logits, labels[keep]), keep


def sequence_logps(model: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """log π(y | x) = Σ_t log p(y_t | x, y_<t) over each sequence's targets, and the number of targets; both (B,).
    A sequence is a row, or in packed batches a segment (``segment_ids`` numbers the B sequences 0 … B − 1)."""
    logps, keep = token_logps(model, batch)
    segments = batch.get("segment_ids")
    owner = segments[keep] if segments is not None else keep.nonzero(as_tuple=True)[0]
    n = int(segments.max()) + 1 if segments is not None else keep.shape[0]
    sums = torch.zeros(n, dtype=logps.dtype, device=logps.device).index_add(0, owner, logps)
    counts = torch.zeros(n, dtype=torch.long, device=logps.device).index_add(0, owner, torch.ones_like(owner))
    return sums, counts
