"""Chat replies in bulk, for the stages that read a model's answers: evaluation, preference pairs, PPO's rollouts
and SFT's held-out exact match. Each prompt (a message list) is rendered with the model's chat template, and
generation stops at the model's end-of-sequence ids, the template's end-of-turn token and its stop strings.
"""
from __future__ import annotations

import sys

from .. import chat
from ..world.judge import exact_match
from ..errors import LLMLabError
from .engine import Completion, Engine, SamplingParams, default_eos_ids


def engine_for(model, tokenizer, template: str) -> Engine:
    """An engine that stops at the model's EOS ids and at the template's end-of-turn token."""
    eos = set(default_eos_ids(model, tokenizer))
    turn_end = chat.end_of_turn_id(tokenizer, template)
    if turn_end is not None:
        eos.add(turn_end)
    return Engine(model, tokenizer, eos_token_ids=sorted(eos))


def prompts_that_fit(engine: Engine, items: list[dict], template: str, who: str) -> list[dict]:
    """The items whose rendered prompt leaves the model room for at least one new token; the others are dropped
    with a warning (one such prompt would stop the whole run)."""
    kept = [item for item in items
            if len(chat.generation_prompt_ids(engine.tokenizer, item["prompt"], template)) < engine.context]
    if len(kept) < len(items):
        print(f"{who}: skipped {len(items) - len(kept)} of {len(items)} prompts that do not fit the model's context "
              f"of {engine.context} tokens", file=sys.stderr)
    if not kept:
        raise LLMLabError(f"{who}: no prompt fits the model's context of {engine.context} tokens")
    return kept


def generate_replies(engine: Engine, prompts: list[list[dict]], template: str, params: SamplingParams,
                     batch_size: int = 32) -> list[Completion]:
    """One completion per prompt (message list), rendered with ``template`` and generated in batches; generation
    also stops at the template's stop strings, and replies are left-stripped (``SamplingParams.lstrip``)."""
    encoded = [chat.generation_prompt_ids(engine.tokenizer, p, template) for p in prompts]
    return generate_from_ids(engine, encoded, template, params, batch_size)


def generate_from_ids(engine: Engine, encoded: list[list[int]], template: str, params: SamplingParams,
                      batch_size: int = 32) -> list[Completion]:
    """``generate_replies`` for prompts already rendered and encoded (``chat.generation_prompt_ids``)."""
    params = chat.reply_params(params, template, engine.tokenizer.eos_token)
    out = []
    for start in range(0, len(encoded), batch_size):
        out += engine.generate(encoded[start:start + batch_size], params)
    return out


def exact_match_rate(engine: Engine, items: list[dict], template: str, max_new_tokens: int = 64,
                     batch_size: int = 32) -> float:
    """Share of greedy answers that match each item's ``reference`` (``world.exact_match``)."""
    replies = generate_replies(engine, [i["prompt"] for i in items], template,
                               SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0), batch_size)
    return sum(exact_match(i, r.text) for i, r in zip(items, replies)) / len(items)
