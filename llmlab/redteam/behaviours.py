"""Behaviours to attack: what to ask (``goal``, or a whole conversation in ``messages``) and the start of the reply an
attack aims for (``target``, "Sure, here is ...").

Two formats:

- ``.jsonl``: one object per line with ``target`` and either ``goal`` (a string; the attack string goes where it
  says ``{optim_str}``, else after it) or ``messages`` (a list of ``{"role", "content"}`` holding ``{optim_str}``
  once); optional ``system`` (a system prompt for ``goal``) and ``id``;
- ``.csv`` with the columns ``goal`` and ``target`` (AdvBench's ``harmful_behaviors.csv``).

Every error names the file and the line (or the column) at fault.
"""
from __future__ import annotations

import csv
import json
from pathlib import Path

from ..errors import LLMLabError

OPTIM_STR = "{optim_str}"


def load_behaviours(path: str | Path) -> list[dict]:
    """Behaviours as dicts with ``target``, ``goal`` or ``messages``, ``system`` (or None), ``id`` and ``where``
    (``file:line``, for later error messages)."""
    path = Path(path)
    if not path.is_file():
        raise LLMLabError(f"{path}: behaviours file not found")
    rows = _read_csv(path) if path.suffix == ".csv" else _read_jsonl(path)
    if not rows:
        raise LLMLabError(f"{path}: no behaviours in the file (it is empty)")
    return [_check(row, where, i) for i, (where, row) in enumerate(rows)]


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LLMLabError(f"{where}: not valid JSON ({e.msg})") from None
        if not isinstance(row, dict):
            raise LLMLabError(f"{where}: each line must be a JSON object with 'goal' (or 'messages') and 'target'")
        rows.append((where, row))
    return rows


def _read_csv(path: Path) -> list[tuple[str, dict]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in ("goal", "target") if c not in (reader.fieldnames or [])]
        if reader.fieldnames and missing:
            raise LLMLabError(f"{path}: missing column(s) {', '.join(missing)} (the header has "
                              f"{', '.join(reader.fieldnames)})")
        return [(f"{path}:{reader.line_num}", dict(row)) for row in reader]


def _check(row: dict, where: str, index: int) -> dict:
    target = row.get("target")
    if not isinstance(target, str) or not target.strip():
        raise LLMLabError(f"{where}: field 'target' must be a non-empty string")
    messages, goal = row.get("messages"), row.get("goal")
    if messages is not None:
        if goal is not None:
            raise LLMLabError(f"{where}: give 'goal' or 'messages', not both")
        if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
            raise LLMLabError(f"{where}: field 'messages' must be a list of {{\"role\", \"content\"}} objects")
        if sum(str(m.get("content", "")).count(OPTIM_STR) for m in messages) != 1:
            raise LLMLabError(f"{where}: field 'messages' must hold {OPTIM_STR} exactly once (where the attack "
                              "string goes)")
    elif not isinstance(goal, str) or not goal.strip():
        raise LLMLabError(f"{where}: field 'goal' must be a non-empty string (or give 'messages')")
    system = row.get("system")
    if system is not None and not isinstance(system, str):
        raise LLMLabError(f"{where}: field 'system' must be a string")
    return {"id": str(row.get("id", index)), "goal": goal, "messages": messages, "system": system,
            "target": target, "where": where}
