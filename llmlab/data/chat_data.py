"""Conversations (for SFT) and preference pairs (for reward models, DPO) from JSON Lines files.

``load_conversations`` reads ``.jsonl`` / ``.jsonl.gz``, one conversation per line, in any of three forms, told
apart line by line:

- OpenAI: ``{"messages": [{"role": "system|user|assistant", "content": "..."}, ...]}``
- Alpaca: ``{"instruction": "...", "input": "...", "output": "..."}`` (a non-empty input is appended to the
  instruction after a blank line)
- ShareGPT: ``{"conversations": [{"from": "system|human|gpt", "value": "..."}, ...]}``

``load_pairs`` reads preference pairs, normalised to ``{"prompt": [messages], "chosen": str, "rejected": str}``:

- ``{"prompt", "chosen", "rejected"}``: the prompt a string (one user turn) or a message list; each reply a string
  or a message list ending with the assistant reply (messages before it must repeat the prompt);
- ``{"chosen", "rejected"}`` message lists (implicit prompt): the shared messages before the last one;
- HH-RLHF transcripts ``{"chosen": "\\n\\nHuman: ...\\n\\nAssistant: ...", "rejected": ...}``: the prompt is the
  dialogue up to the last ``Assistant:`` turn, the reply is that turn.

``load_prompts`` reads prompts (for sampling, PPO and evaluation) from a ``prompt`` field or from any of the forms
above, each cut before its last assistant turn.

Every error names the file, the line and the field.
"""
from __future__ import annotations

import gzip
import json
import re
import warnings
from pathlib import Path
from typing import Iterator

from ..chat import ROLES, validate_messages
from ..errors import LLMLabError

SHAREGPT_ROLES = {"system": "system", "human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
HH_TURN = re.compile(r"\n\n(Human|Assistant): ?")
HH_ROLES = {"Human": "user", "Assistant": "assistant"}


def iter_jsonl(path) -> Iterator[tuple[str, dict]]:
    """``(where, record)`` for each non-blank line of a ``.jsonl`` / ``.jsonl.gz`` file; ``where`` is ``file:line``."""
    path = Path(path)
    if not path.is_file():
        raise LLMLabError(f"no such file: {path}")
    if not path.name.endswith((".jsonl", ".jsonl.gz")):
        raise LLMLabError(f"{path}: expected a .jsonl or .jsonl.gz file")
    opener = gzip.open if path.name.endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            for line_no, line in enumerate(f, start=1):
                if line.strip():
                    yield f"{path}:{line_no}", _parse_line(line, f"{path}:{line_no}")
    except UnicodeDecodeError as e:
        raise LLMLabError(f"{path}: not UTF-8 text ({e})") from None
    except (gzip.BadGzipFile, EOFError) as e:
        raise LLMLabError(f"{path}: not a readable gzip file ({e})") from None


def _parse_line(line: str, where: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise LLMLabError(f"{where}: bad JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(record, dict):
        raise LLMLabError(f"{where}: expected a JSON object, got {type(record).__name__}")
    return record


def _string(record: dict, field: str, where: str, *, required: bool = True) -> str:
    if field not in record:
        if required:
            raise LLMLabError(f"{where}: missing field {field!r}")
        return ""
    value = record[field]
    if not isinstance(value, str):
        raise LLMLabError(f"{where}: field {field!r} must be a string, got {type(value).__name__}")
    return value


def _list(record: dict, field: str, where: str) -> list:
    value = record[field]
    if not isinstance(value, list):
        raise LLMLabError(f"{where}: field {field!r} must be a list, got {type(value).__name__}")
    return value


def load_conversations(path) -> list[list[dict]]:
    """Every conversation of the file as a list of ``{"role", "content"}`` messages with an assistant turn."""
    conversations = []
    for where, record in iter_jsonl(path):
        messages, field = _conversation(record, where)
        validate_messages(messages, where, field)
        if not any(m["role"] == "assistant" for m in messages):
            raise LLMLabError(f"{where}: field {field!r} has no assistant turn, so there is nothing to learn")
        conversations.append(messages)
    if not conversations:
        raise LLMLabError(f"{path}: no conversations in the file")
    return conversations


def load_heldout_conversations(path) -> list[list[dict]]:
    """Conversations to measure held-out loss on: a record's conversation (OpenAI, ShareGPT or Alpaca) when it has
    an assistant turn, else its prompt followed by its ``reference`` as the answer (the task world's eval files).
    Records with neither are skipped; every conversation is checked, and errors name the file and line."""
    conversations = []
    for where, record in iter_jsonl(path):
        if "prompt" not in record and any(k in record for k in ("messages", "conversations", "instruction")):
            messages, field = _conversation(record, where)
            if any(m.get("role") == "assistant" for m in messages):
                validate_messages(messages, where, field)
                conversations.append(messages)
                continue
        if isinstance(record.get("reference"), str):
            prompt, field = _prompt_of(record, where)
            messages = prompt + [{"role": "assistant", "content": record["reference"]}]
            validate_messages(messages, where, f"{field} + reference")
            conversations.append(messages)
    if not conversations:
        raise LLMLabError(f"{path}: no held-out conversation (a conversation with an assistant turn, or a prompt "
                          "with a 'reference')")
    return conversations


def load_prompts(path) -> list[dict]:
    """Prompt items of a JSONL file: ``{"prompt": [messages], "where": "file:line", ...the record's other fields}``.

    The prompt is the ``prompt`` field (a string: one user turn, or a message list), else the messages of a
    conversation (OpenAI, ShareGPT, Alpaca) or of a preference pair's ``chosen`` side (a message list or an HH-RLHF
    transcript) before their last assistant turn. An Alpaca ``output`` becomes the item's ``reference`` (for exact
    match) unless the record has one. The prompt must end with a user turn."""
    items = []
    for where, record in iter_jsonl(path):
        prompt, field = _prompt_of(record, where)
        validate_messages(prompt, where, field)
        if prompt[-1]["role"] != "user":
            raise LLMLabError(f"{where}: field {field!r}: the prompt must end with a user message")
        extra = {k: v for k, v in record.items() if k != "prompt"}
        if "instruction" in record and "output" in record:
            extra.setdefault("reference", record["output"])
        items.append({**extra, "prompt": prompt, "where": where})
    if not items:
        raise LLMLabError(f"{path}: no prompts in the file")
    return items


def _prompt_of(record: dict, where: str) -> tuple[list[dict], str]:
    """The record's prompt messages and the field they came from."""
    if "prompt" in record:
        return _prompt(record, where), "prompt"
    if "chosen" in record and "messages" not in record:
        value = record["chosen"]
        turns = _hh_turns(value, where, "chosen") if isinstance(value, str) else _reply(value, where, "chosen")[0]
        return _before_last_answer(turns), "chosen"
    messages, field = _conversation(record, where)
    return _before_last_answer(messages), field


def _before_last_answer(messages: list[dict]) -> list[dict]:
    """The messages without the trailing assistant turn(s)."""
    end = len(messages)
    while end and messages[end - 1]["role"] == "assistant":
        end -= 1
    return messages[:end]


def _conversation(record: dict, where: str) -> tuple[list[dict], str]:
    """The record's messages and the name of the field they came from."""
    if "messages" in record:
        return _openai_messages(_list(record, "messages", where), where, "messages"), "messages"
    if "conversations" in record:
        return _sharegpt_messages(_list(record, "conversations", where), where), "conversations"
    if "instruction" in record:
        return _alpaca_messages(record, where), "instruction"
    raise LLMLabError(f"{where}: unknown format: expected a field 'messages' (OpenAI), 'conversations' (ShareGPT) "
                      f"or 'instruction' (Alpaca); found {', '.join(map(repr, record)) or 'no fields'}")


def _openai_messages(items: list, where: str, field: str) -> list[dict]:
    messages = []
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise LLMLabError(f"{where}: {field}[{i}] must be an object with 'role' and 'content'")
        for key in ("role", "content"):
            if key not in item:
                raise LLMLabError(f"{where}: {field}[{i}] is missing field {key!r}")
        if item["role"] not in ROLES:
            raise LLMLabError(f"{where}: {field}[{i}].role: unknown role {item['role']!r}; "
                              f"expected one of {', '.join(ROLES)}")
        messages.append({"role": item["role"], "content": item["content"]})
    return messages


def _sharegpt_messages(items: list, where: str) -> list[dict]:
    messages = []
    for i, item in enumerate(items):
        name = f"conversations[{i}]"
        if not isinstance(item, dict):
            raise LLMLabError(f"{where}: {name} must be an object with 'from' and 'value'")
        for key in ("from", "value"):
            if key not in item:
                raise LLMLabError(f"{where}: {name} is missing field {key!r}")
        if item["from"] not in SHAREGPT_ROLES:
            raise LLMLabError(f"{where}: {name}.from: unknown role {item['from']!r}; "
                              f"expected one of {', '.join(SHAREGPT_ROLES)}")
        if not isinstance(item["value"], str) or not item["value"].strip():
            raise LLMLabError(f"{where}: {name}.value must be a non-empty string")
        messages.append({"role": SHAREGPT_ROLES[item["from"]], "content": item["value"]})
    return messages


def _alpaca_messages(record: dict, where: str) -> list[dict]:
    instruction = _string(record, "instruction", where)
    extra = _string(record, "input", where, required=False)
    output = _string(record, "output", where)
    for field, value in (("instruction", instruction), ("output", output)):
        if not value.strip():
            raise LLMLabError(f"{where}: field {field!r} is empty")
    prompt = f"{instruction}\n\n{extra}" if extra.strip() else instruction
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}]


def load_pairs(path) -> list[dict]:
    """Every preference pair of the file as ``{"prompt": [messages], "chosen": str, "rejected": str}``.

    HH-RLHF transcripts that cannot be cut into one shared prompt and two non-empty replies (in the harmless-base
    test split: 5 pairs whose dialogues differ before the last turn, 4 with an empty reply) are skipped with a
    warning naming their lines; any other malformed pair is an error.
    """
    pairs, skipped = [], []
    for where, record in iter_jsonl(path):
        pair = _pair(record, where)
        if pair is None:
            skipped.append(where.rsplit(":", 1)[1])
            continue
        if pair["chosen"] == pair["rejected"]:
            raise LLMLabError(f"{where}: 'chosen' and 'rejected' are the same reply, so the pair prefers nothing")
        pairs.append(pair)
    if skipped:
        warnings.warn(f"{path}: skipped {len(skipped)} HH-RLHF pairs without one shared prompt and two non-empty "
                      f"replies (lines {', '.join(skipped)})", stacklevel=2)
    if not pairs:
        raise LLMLabError(f"{path}: no preference pairs in the file")
    return pairs


def _pair(record: dict, where: str) -> dict | None:
    for field in ("chosen", "rejected"):
        if field not in record:
            raise LLMLabError(f"{where}: missing field {field!r}")
    if "prompt" not in record and all(isinstance(record[f], str) for f in ("chosen", "rejected")):
        return _hh_pair(record["chosen"], record["rejected"], where)
    prompt = _prompt(record, where) if "prompt" in record else None
    replies = {}
    for field in ("chosen", "rejected"):
        context, replies[field] = _reply(record[field], where, field)
        if not prompt:
            prompt = context
        elif context and context != prompt:
            raise LLMLabError(f"{where}: the messages of {field!r} before its last one differ from the prompt")
    if not prompt:
        raise LLMLabError(f"{where}: no prompt: give a 'prompt' field, or put the prompt messages before the "
                          f"reply in 'chosen' and 'rejected'")
    validate_messages(prompt, where, "prompt")
    return {"prompt": prompt, **replies}


def _prompt(record: dict, where: str) -> list[dict]:
    value = record["prompt"]
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if isinstance(value, list):
        return _openai_messages(value, where, "prompt")
    raise LLMLabError(f"{where}: field 'prompt' must be a string or a list of messages, got {type(value).__name__}")


def _reply(value, where: str, field: str) -> tuple[list[dict], str]:
    """``(messages before the reply, reply)`` of a ``chosen``/``rejected`` value (a string or a message list)."""
    if isinstance(value, str):
        context, reply = [], value
    elif isinstance(value, list) and value:
        messages = _openai_messages(value, where, field)
        if messages[-1]["role"] != "assistant":
            raise LLMLabError(f"{where}: field {field!r} must end with an assistant message")
        context, reply = messages[:-1], messages[-1]["content"]
    else:
        raise LLMLabError(f"{where}: field {field!r} must be a string or a non-empty list of messages")
    if not isinstance(reply, str) or not reply.strip():
        raise LLMLabError(f"{where}: field {field!r}: the reply must be a non-empty string")
    return context, reply


def _hh_pair(chosen: str, rejected: str, where: str) -> dict | None:
    """A pair from two HH-RLHF transcripts; None when they do not share the prompt or a reply is empty."""
    prompts, replies = [], []
    for field, text in (("chosen", chosen), ("rejected", rejected)):
        turns = _hh_turns(text, where, field)
        if turns[-1]["role"] != "assistant":
            raise LLMLabError(f"{where}: field {field!r} must end with an 'Assistant:' turn")
        prompts.append(turns[:-1])
        replies.append(turns[-1]["content"])
    if prompts[0] != prompts[1] or not all(r.strip() for r in replies):
        return None
    validate_messages(prompts[0], where, "chosen")
    return {"prompt": prompts[0], "chosen": replies[0], "rejected": replies[1]}


def _hh_turns(text: str, where: str, field: str) -> list[dict]:
    """``"\\n\\nHuman: a\\n\\nAssistant: b"`` → ``[{"role": "user", "content": "a"}, {"role": "assistant", ...}]``."""
    if not text.startswith("\n\nHuman:"):
        raise LLMLabError(f"{where}: field {field!r}: an HH-RLHF transcript must start with '\\n\\nHuman:' "
                          f"(or give a 'prompt' field)")
    parts = HH_TURN.split(text)  # ["", role, content, role, content, ...]
    return [{"role": HH_ROLES[role], "content": content} for role, content in zip(parts[1::2], parts[2::2])]
