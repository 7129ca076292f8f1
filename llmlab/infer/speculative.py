"""Speculative greedy decoding with prompt lookup: the same tokens as plain greedy decoding, several per forward pass.

Batch-1 decoding reads every weight once per token (memory-bound), while a forward pass over k + 1 tokens reads
them once for all k + 1. So guess k tokens cheaply, run the model once on

    [x, d₁, …, d_k]     (x: the last token, not yet fed; d: the draft)

and read its greedy choice after each: g₀ = argmax p(· | …, x), g_i = argmax p(· | …, x, d₁ … d_i). The draft is
right as far as d_i = g_{i−1}; with n such tokens, d₁ … d_n and g_n (the model's own next token after them) are
exactly what n + 1 plain greedy steps would have produced, and the cache is cut back to x, d₁ … d_n. A wrong draft
costs one pass over k + 1 tokens instead of one token's; a right one saves n passes.

The guesses come from prompt lookup (Saxena, 2023; ``prompt_lookup_num_tokens`` in transformers, the ``ngram``
speculator in vLLM): find the last earlier place where the sequence's final n = 3 tokens occurred, and propose
the k tokens that followed it there. (Falling back to n = 2 drafts more often and more often wrongly, which made
fresh prose slower than no speculation; README.) Text that quotes its prompt (answers about a document, code edits)
or repeats itself (small models' greedy continuations) is guessed right most of the time; other text gets few
drafts and decodes one token a pass, as before.
"""
from __future__ import annotations

from typing import Iterator


class PromptLookup:
    """Drafts from earlier occurrences of the sequence's last ``n`` tokens (largest ``n`` of ``sizes`` first).

    ``index[n]`` maps each n-gram to where its latest continuation starts; an n-gram is entered only once a token
    follows it, so the sequence's own final n tokens never match themselves. O(1) per token.
    """

    def __init__(self, ids: list[int], sizes: tuple[int, ...] = (3,)):
        self.sizes = sizes
        self.ids: list[int] = []
        self.index: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in sizes}
        for token in ids:
            self.append(token)

    def append(self, token: int) -> None:
        end = len(self.ids)
        for n in self.sizes:
            if end >= n:
                self.index[n][tuple(self.ids[end - n:end])] = end
        self.ids.append(token)

    def draft(self, k: int) -> list[int]:
        """The ``k`` tokens that followed the latest earlier occurrence of the current last n-gram; [] if none.

        Where that occurrence is so recent that fewer than k tokens follow it, the text since then is a period
        about to repeat (… a b c a b | c a b …), and the draft repeats it."""
        if k <= 0:
            return []
        for n in self.sizes:
            start = self.index[n].get(tuple(self.ids[-n:]))
            if start is not None:
                period = len(self.ids) - start
                return [self.ids[start + i % period] for i in range(k)]
        return []


def accepted_length(draft: list[int], greedy: list[int]) -> int:
    """How many leading draft tokens equal the model's greedy choices: d_i = g_{i−1} for i ≤ n."""
    n = 0
    while n < len(draft) and draft[n] == greedy[n]:
        n += 1
    return n


def speculative_greedy(lm, prompt: list[int], first: int, budget: int, eos: set[int],
                       max_draft: int) -> Iterator[int]:
    """Yield the greedy continuation of ``prompt`` (``first``: its first token, from the prefill's logits), at most
    ``budget`` tokens, ending after an end-of-sequence token. ``lm`` is the ``OurLM`` adapter whose cache holds the
    prompt; it gives ``greedy_next`` (one token) and ``greedy_after`` (the greedy choice after each of several
    tokens fed at once).

    The draft length k adapts as in transformers' assisted generation: k + 2 after a draft accepted whole, k − 1
    after one that was not (1 ≤ k ≤ ``max_draft``), since a pass costs more the more tokens it checks."""
    lookup = PromptLookup(prompt)
    token, produced, k = first, 0, min(4, max_draft)
    while True:
        yield token
        produced += 1
        if token in eos or produced == budget:
            return
        lookup.append(token)
        draft = lookup.draft(min(k, budget - produced - 1))    # the pass adds one token of its own after the draft
        if not draft:
            token = lm.greedy_next(token)
            continue
        fed = lm.cache.length
        greedy = lm.greedy_after([token, *draft])
        n = accepted_length(draft, greedy)
        lm.cache.truncate(fed + 1 + n)
        k = min(k + 2, max_draft) if n == len(draft) else max(k - 1, 1)
        for token in draft[:n]:
            yield token
            produced += 1
            if token in eos:
                return
            lookup.append(token)
        token = greedy[n]

