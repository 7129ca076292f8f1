"""A guard classifier (trained by ``llmlab classify``, e.g. through ``llmlab defend guard``) as an input and output
filter, and erase-and-check (Kumar et al. 2023) with it.

The guard reads a text as ``llmlab classify`` trained it (the tokenizer's special tokens around the text, cut to
its length) and flags it when P(harmful | text) > θ, the harmful class being the label named ``forbidden`` (the
task world's) unless told otherwise.

Erase-and-check, suffix mode: an adversarial suffix of at most d tokens is appended to a request; erasing the
last i tokens for every i = 0 … d recovers the bare request for some i, so the prompt is flagged when the guard
flags any of the d + 1 truncations: a harmful request is caught whenever the guard catches it bare, whatever
suffix of ≤ d tokens follows (the certificate of the paper), at the price of d + 1 guard passes.
"""
from __future__ import annotations

import torch

from ..data.batching import pad
from ..encoding import special_affixes
from ..errors import LLMLabError
from ..hub.folder import ModelDir
from ..hub.load import load_our_model
from ..hub.mapping import unsupported
from ..model.heads import SequenceClassifier
from ..tokenizer import ensure_pad_token
from .defended import Cost, Defense, Flag, Messages, Reply, last_user_text

HARMFUL_NAMES = ("forbidden", "harmful", "unsafe", "jailbreak")
SIDES = ("input", "output", "both")


class GuardClassifier:
    """A sequence classifier folder that ``llmlab classify`` saved, as P(harmful | text)."""

    def __init__(self, model: SequenceClassifier, tokenizer, harmful: int, max_length: int, batch_size: int = 32):
        self.model, self.tokenizer, self.harmful = model.eval(), tokenizer, harmful
        self.max_length, self.batch_size = max_length, batch_size
        self.prefix, self.suffix = special_affixes(tokenizer)

    @classmethod
    def load(cls, path, label: str | None = None, max_length: int | None = None, device="cpu") -> "GuardClassifier":
        folder = ModelDir(path)
        raw = folder.raw_config
        if not any(a.endswith("ForSequenceClassification") for a in raw.get("architectures") or []):
            raise LLMLabError(f"{folder.path}: not a sequence classifier (train one with `llmlab defend guard` or "
                              "`llmlab classify`)")
        names = {int(i): n for i, n in (raw.get("id2label") or {}).items()}
        tokenizer = ensure_pad_token(folder.tokenizer())
        if unsupported(folder.config) is None:
            backbone = load_our_model(folder)
            model = SequenceClassifier(backbone, backbone.config.arch)
        else:
            from transformers import AutoModelForSequenceClassification
            model = SequenceClassifier(AutoModelForSequenceClassification.from_pretrained(folder.path), "transformers")
        wanted = [label] if label else list(HARMFUL_NAMES)
        harmful = next((i for name in wanted for i, n in names.items() if n == name), None)
        if harmful is None:
            if label:
                raise LLMLabError(f"{folder.path}: no class named {label!r}; its classes: {sorted(names.values())}")
            harmful = 1
        return cls(model.to(device), tokenizer, harmful, max_length or min(folder.context, 512))

    def body(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def harmful_logprob(self, ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """log P(harmful) of each row of ``ids`` (B, T; special tokens included), with gradients when enabled: the
        term an attack on guard and model together adds to its loss."""
        return torch.log_softmax(self.model(ids, attention_mask).float(), -1)[:, self.harmful]

    @torch.no_grad()
    def probabilities(self, bodies: list[list[int]]) -> list[float]:
        """P(harmful) of each text given as its token ids without special tokens (cut to ``max_length``)."""
        room = self.max_length - len(self.prefix) - len(self.suffix)
        rows = [self.prefix + b[:room] + self.suffix for b in bodies]
        device = next(self.model.parameters()).device
        out = []
        for start in range(0, len(rows), self.batch_size):
            ids, mask = pad(rows[start:start + self.batch_size], self.tokenizer.pad_token_id, side="right")
            out += self.harmful_logprob(ids.to(device), mask.to(device)).exp().tolist()
        return out

    def tokens(self, bodies: list[list[int]]) -> int:
        return sum(len(b) + len(self.prefix) + len(self.suffix) for b in bodies)


class GuardFilter(Defense):
    """Refuse a prompt (``side`` input), withhold a reply (output), or both, when the guard flags the text."""

    name = "guard"

    def __init__(self, guard: GuardClassifier, threshold: float = 0.5, side: str = "input"):
        if side not in SIDES:
            raise LLMLabError(f"guard.side = {side!r}; choose one of {', '.join(SIDES)}")
        self.guard, self.threshold, self.side = guard, threshold, side

    def _flags(self, texts: list[str], costs: list[Cost]) -> list[Flag]:
        bodies = [self.guard.body(t) for t in texts]
        probs = self.guard.probabilities(bodies)
        for cost, body in zip(costs, bodies):
            cost.add(tokens=self.guard.tokens([body]))
        return [Flag(p > self.threshold, p) for p in probs]

    def check_input(self, conversations: list[Messages], costs: list[Cost]) -> list[Flag] | None:
        if self.side == "output":
            return None
        return self._flags([last_user_text(m) for m in conversations], costs)

    def check_output(self, conversations: list[Messages], replies: list[Reply], costs: list[Cost]) -> list[Flag] | None:
        if self.side == "input":
            return None
        return self._flags([r.text for r in replies], costs)


def erasures(body: list[int], max_erase: int) -> list[list[int]]:
    """The token list with its last i tokens erased, i = 0 … min(d, n − 1) (never the empty text)."""
    return [body[:len(body) - i] for i in range(min(max_erase, max(len(body) - 1, 0)) + 1)]


class EraseAndCheck(Defense):
    """Suffix-mode erase-and-check: flag when the guard flags any of the prompt's d + 1 trailing erasures."""

    name = "erase-check"

    def __init__(self, guard: GuardClassifier, max_erase: int = 20, threshold: float = 0.5):
        if max_erase < 0:
            raise LLMLabError(f"erase-check.max_erase must be ≥ 0, got {max_erase}")
        self.guard, self.max_erase, self.threshold = guard, max_erase, threshold

    def check_input(self, conversations: list[Messages], costs: list[Cost]) -> list[Flag]:
        flags = []
        for messages, cost in zip(conversations, costs):
            cut = erasures(self.guard.body(last_user_text(messages)), self.max_erase)
            probs = self.guard.probabilities(cut)
            cost.add(tokens=self.guard.tokens(cut))
            hits = [i for i, p in enumerate(probs) if p > self.threshold]
            flags.append(Flag(bool(hits), max(probs), {"erased": hits[0] if hits else None, "checked": len(cut)}))
        return flags
