"""SmoothLLM (Robey et al. 2023): an optimised adversarial suffix is brittle to character-level changes, so the model
answers N randomly perturbed copies of the prompt and the answer follows the majority.

For a user message of L characters and a rate q, k = ⌈q·L⌉ characters (at most L) change:

    swap:    k distinct positions, each character replaced by a different printable one;
    insert:  after each of k distinct positions, one random printable character inserted (length L + k);
    patch:   one run of k consecutive characters, each replaced by a different printable one.

(The paper draws the replacement from all printable characters, which may redraw the same one; here a swapped
character always changes, so exactly k do.) A judge J(reply) ∈ {jailbroken, not} votes on each of the N answers;
the prompt counts as a jailbreak when more than half are, and the defense returns one answer, drawn at random,
among those that agree with the majority.

``perturb`` (and ``SmoothLLM.sample``) is the perturbation sampler an adaptive attack averages its loss over
(expectation over transformations).
"""
from __future__ import annotations

import math
import random
import string
from typing import Callable

from ..errors import LLMLabError
from ..world.judge import is_refusal
from .defended import Answerer, Cost, Defense, Messages, Reply, last_user_text, with_last_user_text

ALPHABET = string.printable


def changed_count(length: int, q: float) -> int:
    """k = ⌈q·L⌉ characters of L (at most L)."""
    if not 0 < q <= 1:
        raise LLMLabError(f"smoothllm.q must lie in (0, 1], got {q}")
    return min(length, math.ceil(q * length - 1e-9))


def _other(rng: random.Random, char: str) -> str:
    """A printable character different from ``char``."""
    while (new := rng.choice(ALPHABET)) == char:
        pass
    return new


def swap(text: str, q: float, rng: random.Random) -> str:
    chars = list(text)
    for i in rng.sample(range(len(chars)), changed_count(len(chars), q)):
        chars[i] = _other(rng, chars[i])
    return "".join(chars)


def insert(text: str, q: float, rng: random.Random) -> str:
    after = set(rng.sample(range(len(text)), changed_count(len(text), q)))
    return "".join(c + (rng.choice(ALPHABET) if i in after else "") for i, c in enumerate(text))


def patch(text: str, q: float, rng: random.Random) -> str:
    k = changed_count(len(text), q)
    start = rng.randrange(len(text) - k + 1)
    return text[:start] + "".join(_other(rng, c) for c in text[start:start + k]) + text[start + k:]


PERTURBATIONS: dict[str, Callable[[str, float, random.Random], str]] = {"swap": swap, "insert": insert,
                                                                        "patch": patch}


def perturb(text: str, kind: str, q: float, rng: random.Random) -> str:
    """One random perturbation of ``text`` (``kind``: swap, insert or patch) at rate ``q``."""
    if kind not in PERTURBATIONS:
        raise LLMLabError(f"smoothllm.kind = {kind!r}; choose one of {', '.join(PERTURBATIONS)}")
    return PERTURBATIONS[kind](text, q, rng) if text else text


def keyword_judge(reply: str) -> bool:
    """Jailbroken unless the reply refuses (``world.judge.is_refusal``'s fixed keywords)."""
    return not is_refusal(reply)


class SmoothLLM(Defense):
    """N perturbed copies, a vote of ``judge`` (reply → jailbroken?), an answer that agrees with the majority."""

    name = "smoothllm"
    replaces_generation = True

    def __init__(self, n_copies: int = 10, q: float = 0.1, kind: str = "swap",
                 judge: Callable[[str], bool] = keyword_judge, seed: int = 0):
        if n_copies < 1:
            raise LLMLabError(f"smoothllm.n_copies must be ≥ 1, got {n_copies}")
        changed_count(1, q)
        perturb("", kind, q, random.Random(0))
        self.n_copies, self.q, self.kind, self.judge = n_copies, q, kind, judge
        self.rng = random.Random(seed)

    def sample(self, text: str, rng: random.Random | None = None) -> str:
        """One perturbed copy of ``text`` (the sampler for expectation over transformations)."""
        return perturb(text, self.kind, self.q, rng or self.rng)

    def generate(self, answer: Answerer, conversations: list[Messages], costs: list[Cost]) -> list[Reply]:
        n = self.n_copies
        copies = [with_last_user_text(m, self.sample(last_user_text(m))) for m in conversations for _ in range(n)]
        made = answer(copies)
        out = []
        for row, cost in enumerate(costs):
            group = made[row * n:(row + 1) * n]
            votes = [bool(self.judge(r.text)) for r in group]
            majority = sum(votes) > n / 2
            pick = self.rng.choice([i for i, v in enumerate(votes) if v == majority])
            cost.add(tokens=sum(r.notes.get("prompt_tokens", 0) + len(r.token_ids)
                                for i, r in enumerate(group) if i != pick), generations=n - 1)
            reply = group[pick]
            reply.notes["smoothllm"] = {"jailbroken_share": sum(votes) / n, "majority_jailbroken": majority,
                                        "shown": last_user_text(copies[row * n + pick])}
            out.append(reply)
        return out
