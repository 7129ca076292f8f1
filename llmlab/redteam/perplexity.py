"""The perplexity filter (Alon & Kamfonas 2023; Jain et al. 2023): GCG's optimised suffixes are gibberish that a
language model finds very unlikely, so a prompt whose negative log-likelihood is too high is refused.

For the tokens x_1 … x_n of the user's message (the text an attacker controls, encoded as raw text, BOS first
when the tokenizer adds one), a reference LM (by default the target itself) gives ℓ_t = −log p(x_t | x_<t), and

    whole:   s = (1/n) Σ_t ℓ_t                              (log-perplexity)
    window:  s = max_j (1/w) Σ_{t=j}^{j+w−1} ℓ_t            (a short suffix cannot hide in a long benign prompt)

A prompt shorter than w tokens has one window: the whole prompt; one of a single token (nothing predicted) scores 0.
The prompt is flagged when s > τ, with τ
calibrated on benign prompts b_1 … b_m to a false-positive rate α: with their scores sorted in decreasing order
s_(1) ≥ … ≥ s_(m) and k = ⌊α m⌋, τ = s_(k+1), so at most k ≤ α m benign prompts score above it (ties only lower
the count).

``PerplexityScorer.penalty`` is the same score as a differentiable function of a batch of token ids, and
``window_scores`` of per-token losses computed elsewhere, for an adaptive attack that adds λ·s to its loss.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

from ..data.batching import pad
from ..encoding import encode_text
from ..errors import LLMLabError
from ..model.config import context_length
from .defended import Cost, Defense, Flag, Messages, last_user_text

MODES = ("whole", "window")
CALIBRATION_FILE = "perplexity.json"


def token_nll(logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """ℓ_t = −log p(ids_t | ids_<t) for t ≥ 1 from next-token ``logits`` (B, T, V): (B, T − 1)."""
    return F.cross_entropy(logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none")


def window_scores(nll: torch.Tensor, mask: torch.Tensor, window: int | None) -> torch.Tensor:
    """Per row of per-token losses ``nll`` (B, L) over the real positions ``mask`` (B, L; right-padded): the mean
    (``window`` None) or the largest mean over ``window`` consecutive real tokens (the mean when a row has fewer).
    Differentiable in ``nll``."""
    mask = mask.to(nll.dtype)
    counts = mask.sum(-1)
    whole = (nll * mask).sum(-1) / counts.clamp(min=1)
    if window is None:
        return whole
    if window < 1:
        raise LLMLabError(f"perplexity window must be ≥ 1 token, got {window}")
    width = max(nll.shape[1], window)
    nll, mask = F.pad(nll * mask, (0, width - nll.shape[1])), F.pad(mask, (0, width - mask.shape[1]))
    sums = nll.unfold(1, window, 1).sum(-1)                     # (B, width − window + 1)
    full = mask.unfold(1, window, 1).sum(-1) == window
    best = sums.masked_fill(~full, float("-inf")).max(-1).values / window
    return torch.where(counts >= window, best, whole)


class PerplexityScorer:
    """Scores texts with a reference causal LM (our ``Decoder`` or a ``transformers`` model) and its tokenizer."""

    def __init__(self, model, tokenizer, batch_size: int = 16):
        self.model, self.tokenizer, self.batch_size = model.eval(), tokenizer, batch_size
        self.context = context_length(model.config)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def ids(self, text: str) -> list[int]:
        """The text's token ids as a raw prompt (BOS first when the tokenizer adds one), cut to the context."""
        return encode_text(self.tokenizer, text)[:self.context]

    def _logits(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if hasattr(self.model, "hidden_states"):
            return self.model(ids)          # right padding: causal attention never lets a real token see a pad
        return self.model(input_ids=ids, attention_mask=mask).logits

    def penalty(self, ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                window: int | None = None) -> torch.Tensor:
        """The score s of each row of right-padded ``ids`` (B, T) as a tensor (B,), with gradients when enabled:
        the term an adaptive GCG adds to its loss to stay under the threshold."""
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask
        nll = token_nll(self._logits(ids, mask), ids)
        return window_scores(nll, mask[:, 1:], window)

    def scores(self, texts: list[str], window: int | None = None) -> tuple[list[float], list[int]]:
        """The score of each text and its number of tokens (a text of fewer than 2 tokens scores 0)."""
        found, lengths = self.scores_for(texts, [window])
        return found[window], lengths

    @torch.no_grad()
    def scores_for(self, texts: list[str], windows: list[int | None]) -> tuple[dict, list[int]]:
        """``{window: scores}`` for every window of ``windows`` (None: the whole prompt) from one pass of the
        model, and each text's number of tokens."""
        device = next(self.model.parameters()).device
        encoded = [self.ids(t) for t in texts]
        short = [i for i, ids in enumerate(encoded) if len(ids) < 2]       # nothing predicted: nothing to flag
        by_row = {w: {i: 0.0 for i in short} for w in windows}
        order = sorted(set(range(len(encoded))) - set(short), key=lambda i: len(encoded[i]))   # little padding
        for start in range(0, len(order), self.batch_size):
            rows = order[start:start + self.batch_size]
            ids, mask = (t.to(device) for t in pad([encoded[i] for i in rows], self.pad_id, side="right"))
            nll = token_nll(self._logits(ids, mask), ids)
            for w in windows:
                by_row[w].update(zip(rows, window_scores(nll, mask[:, 1:], w).tolist()))
        return {w: [v[i] for i in range(len(encoded))] for w, v in by_row.items()}, [len(ids) for ids in encoded]


def calibrate_threshold(scores: list[float], fpr: float) -> float:
    """τ = s_(k+1), k = ⌊fpr · m⌋, of the m benign scores sorted in decreasing order: at most fpr · m of them lie
    above it."""
    if not 0 <= fpr < 1:
        raise LLMLabError(f"--fpr must lie in [0, 1), got {fpr}")
    if not scores:
        raise LLMLabError("perplexity calibration needs at least one benign prompt")
    k = math.floor(fpr * len(scores) + 1e-9)
    return sorted(scores, reverse=True)[k]


def calibrate(scorer: PerplexityScorer, texts: list[str], fpr: float, window: int = 10) -> dict:
    """Thresholds of both modes on the benign ``texts`` at the false-positive rate ``fpr``, with the rate each
    reaches on those texts and the calibration set's size."""
    result = {"fpr": fpr, "n_calibration": len(texts), "modes": {}}
    found, _ = scorer.scores_for(texts, [None, window])
    for mode, w in (("whole", None), ("window", window)):
        scores = found[w]
        tau = calibrate_threshold(scores, fpr)
        result["modes"][mode] = {"window": w, "threshold": tau,
                                 "calibration_fpr": sum(s > tau for s in scores) / len(scores),
                                 "benign_max": max(scores), "benign_median": sorted(scores)[len(scores) // 2]}
    return result


def write_calibration(result: dict, out_dir) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    path = out / CALIBRATION_FILE
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return path


def read_calibration(path) -> dict:
    """A calibration written by ``llmlab defend calibrate`` (its folder or the JSON file)."""
    path = Path(path)
    path = path / CALIBRATION_FILE if path.is_dir() else path
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
        result["modes"]["whole"]["threshold"], result["modes"]["window"]["threshold"]
    except FileNotFoundError:
        raise LLMLabError(f"{path}: not found; write it with `llmlab defend calibrate`") from None
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise LLMLabError(f"{path}: not a perplexity calibration written by `llmlab defend calibrate` ({e})") from None
    return result


class PerplexityFilter(Defense):
    """Refuse a prompt whose user message scores above ``threshold`` (see the module docstring)."""

    name = "perplexity"

    def __init__(self, scorer: PerplexityScorer, threshold: float, mode: str = "window", window: int = 10):
        if mode not in MODES:
            raise LLMLabError(f"perplexity.mode = {mode!r}; choose one of {', '.join(MODES)}")
        self.scorer, self.threshold, self.mode = scorer, float(threshold), mode
        self.window = window if mode == "window" else None

    @classmethod
    def from_calibration(cls, scorer: PerplexityScorer, path, mode: str = "window") -> "PerplexityFilter":
        if mode not in MODES:
            raise LLMLabError(f"perplexity.mode = {mode!r}; choose one of {', '.join(MODES)}")
        found = read_calibration(path)["modes"][mode]
        return cls(scorer, found["threshold"], mode, found["window"] or 10)

    def score(self, texts: list[str]) -> tuple[list[float], list[int]]:
        return self.scorer.scores(texts, self.window)

    def check_input(self, conversations: list[Messages], costs: list[Cost]) -> list[Flag]:
        scores, lengths = self.score([last_user_text(m) for m in conversations])
        for cost, n in zip(costs, lengths):
            cost.add(tokens=n)
        return [Flag(s > self.threshold, s, {"threshold": self.threshold}) for s in scores]
