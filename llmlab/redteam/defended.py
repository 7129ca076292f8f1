"""The common shape of a defense: how a guarded chat model answers a batch of conversations.

    input filters ──flag──► refuse          (perplexity, guard classifier, erase-and-check)
        │ pass
    prompt transforms                        (self-reminder, in-context refusal demonstrations)
        │
    generation                               (the plain engine, or SmoothLLM's N perturbed copies and a vote)
        │
    output filters ──flag──► refuse          (the guarded secret, the guard on the reply)

A ``Defense`` overrides any of ``check_input``, ``transform``, ``generate`` and ``check_output``; ``DefendedChat``
runs a list of them in that order (the first input flag wins; at most one defense may replace generation). Each
answer carries a ``Cost``: the tokens the defense pushed through a model beyond the plain answer, its extra
generations, and the wall-clock of the whole defended answer (overhead = this minus the undefended run's).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from .. import chat
from ..errors import LLMLabError
from ..infer.engine import Engine, SamplingParams
from ..infer.replies import generate_from_ids
from ..world.vocab import REFUSAL

Messages = list[dict]


@dataclass
class Cost:
    """What one defended answer cost beyond the plain answer (``seconds``: the whole defended answer)."""
    forward_tokens: int = 0     # tokens a defense ran through a model: scoring, guard passes, extra generations
    generations: int = 0        # generations beyond the one plain answer
    seconds: float = 0.0

    def add(self, tokens: int = 0, generations: int = 0) -> None:
        self.forward_tokens += int(tokens)
        self.generations += int(generations)


@dataclass
class Reply:
    """A defended answer. ``blocked_by`` names the filter that replaced the model's answer by a refusal."""
    text: str
    token_ids: list[int] = field(default_factory=list)
    finish_reason: str = "stop"                 # "stop", "length" or "blocked"
    blocked_by: str | None = None
    cost: Cost = field(default_factory=Cost)
    notes: dict = field(default_factory=dict)   # per-defense details: scores, votes, ...


@dataclass
class Flag:
    """An input or output filter's verdict on one item."""
    flagged: bool
    score: float | None = None
    detail: dict = field(default_factory=dict)


class Answerer:
    """The undefended model: one engine, its chat template and sampling parameters, in batches."""

    def __init__(self, engine: Engine, template: str, params: SamplingParams | None = None, batch_size: int = 16,
                 skip_too_long: bool = False):
        self.engine, self.template, self.batch_size = engine, template, batch_size
        self.params = params or SamplingParams(max_new_tokens=64, temperature=0.0)
        self.skip_too_long = skip_too_long

    def prompt_tokens(self, messages: Messages) -> int:
        return len(chat.generation_prompt_ids(self.engine.tokenizer, messages, self.template))

    def __call__(self, conversations: list[Messages]) -> list[Reply]:
        """The model's answers. With ``skip_too_long``, a conversation that leaves the model no room to answer gets
        an empty reply (finish reason "too_long"): a red-team run counts it as an attack that could not be sent,
        where a chat would rather raise the engine's error."""
        encoded = [chat.generation_prompt_ids(self.engine.tokenizer, m, self.template) for m in conversations]
        fits = list(range(len(conversations)))
        if self.skip_too_long:
            fits = [i for i, ids in enumerate(encoded) if len(ids) < self.engine.context]
        out = generate_from_ids(self.engine, [encoded[i] for i in fits], self.template, self.params, self.batch_size)
        replies = [Reply("", finish_reason="too_long") for _ in conversations]
        for i, c in zip(fits, out):
            replies[i] = Reply(c.text, c.token_ids, c.finish_reason, notes={"prompt_tokens": c.prompt_tokens})
        return replies


class Defense:
    """Base class: every hook passes everything through unchanged. ``name`` keys the notes and ``blocked_by``."""

    name = "none"
    replaces_generation = False

    def check_input(self, conversations: list[Messages], costs: list[Cost]) -> list[Flag] | None:
        """One ``Flag`` per conversation (a flagged one is refused without generating), or None: no input check."""
        return None

    def transform(self, messages: Messages) -> Messages:
        """The conversation the model is shown (a new list; the caller's is not changed)."""
        return messages

    def generate(self, answer: Answerer, conversations: list[Messages], costs: list[Cost]) -> list[Reply]:
        """The answers; only a defense with ``replaces_generation`` is asked."""
        return answer(conversations)

    def check_output(self, conversations: list[Messages], replies: list[Reply], costs: list[Cost]) -> list[Flag] | None:
        """One ``Flag`` per reply (a flagged reply becomes the refusal), or None: no output check."""
        return None


class DefendedChat:
    """A chat model behind a list of defenses: ``answer(conversations)`` returns one ``Reply`` each."""

    def __init__(self, answer: Answerer, defenses: list[Defense], refusal: str = REFUSAL):
        generators = [d.name for d in defenses if d.replaces_generation]
        if len(generators) > 1:
            raise LLMLabError(f"defenses {', '.join(generators)} both replace generation; use at most one of them")
        self.answerer, self.defenses, self.refusal = answer, list(defenses), refusal

    @property
    def names(self) -> str:
        return ",".join(d.name for d in self.defenses) or "none"

    def answer(self, conversations: list[Messages]) -> list[Reply]:
        start = time.perf_counter()
        n = len(conversations)
        costs = [Cost() for _ in range(n)]
        replies: list[Reply | None] = [None] * n
        notes: list[dict] = [{} for _ in range(n)]
        for d in self.defenses:                      # input filters, on the items no earlier filter refused
            open_rows = [i for i in range(n) if replies[i] is None]
            if not open_rows:
                break
            flags = d.check_input([conversations[i] for i in open_rows], [costs[i] for i in open_rows])
            for i, flag in zip(open_rows, flags or ()):
                notes[i][d.name] = _note(flag)
                if flag.flagged:
                    replies[i] = Reply(self.refusal, finish_reason="blocked", blocked_by=d.name)
        todo = [i for i in range(n) if replies[i] is None]
        shown = [conversations[i] for i in todo]
        for d in self.defenses:
            shown = [d.transform(m) for m in shown]
        for i, before, after in zip(todo, (conversations[i] for i in todo), shown):
            if after != before:                      # a longer prompt: its extra tokens are the defense's cost
                costs[i].add(self.answerer.prompt_tokens(after) - self.answerer.prompt_tokens(before))
        generator = next((d for d in self.defenses if d.replaces_generation), None)
        todo_costs = [costs[i] for i in todo]
        if not todo:
            made = []
        elif generator is not None:
            made = generator.generate(self.answerer, shown, todo_costs)
        else:
            made = self.answerer(shown)
        for d in self.defenses:                      # output filters, on the model's answers
            open_rows = [k for k, r in enumerate(made) if r.blocked_by is None]
            flags = d.check_output([shown[k] for k in open_rows], [made[k] for k in open_rows],
                                   [todo_costs[k] for k in open_rows]) if open_rows else None
            for k, flag in zip(open_rows, flags or ()):
                made[k].notes[d.name + ":output"] = _note(flag)
                if flag.flagged:
                    made[k] = Reply(self.refusal, finish_reason="blocked", blocked_by=d.name,
                                    notes={**made[k].notes, "withheld": made[k].text})
        for i, reply in zip(todo, made):
            replies[i] = reply
        seconds = (time.perf_counter() - start) / max(n, 1)     # a batch's time, shared evenly
        for i, reply in enumerate(replies):
            reply.cost = costs[i]
            reply.cost.seconds = seconds
            reply.notes = {**notes[i], **reply.notes}
        return replies


def _note(flag: Flag) -> dict:
    return {"flagged": flag.flagged, **({"score": flag.score} if flag.score is not None else {}), **flag.detail}


def last_user_text(messages: Messages) -> str:
    """The content of the last user message: the text an attacker controls (and filters inspect)."""
    for m in reversed(messages):
        if m["role"] == "user":
            return m["content"]
    raise LLMLabError("the conversation has no user message")


def with_last_user_text(messages: Messages, text: str) -> Messages:
    """A copy of ``messages`` whose last user message says ``text``."""
    out = [dict(m) for m in messages]
    for m in reversed(out):
        if m["role"] == "user":
            m["content"] = text
            return out
    raise LLMLabError("the conversation has no user message")
