"""Behaviours to attack and benign prompts to measure false refusals, as plain records.

A behaviour is ``{"goal", "target", "source", "index", ...}``: ``goal`` the request sent to the model, ``target``
the start of the reply an attack tries to elicit, ``source`` where it came from and ``index`` its 0-based data row
there. Loaders take paths (the product never reads a shared data folder of its own accord):

- ``load_advbench(path)``: AdvBench's ``harmful_behaviors.csv`` (columns ``goal``, ``target``), each row with
  ``matches_goal``: whether its target is about its goal (``target_overlap``); eight rows of the published file
  pair a goal with another row's target;
- ``split_by_target(records, test_fraction, seed)``: train/test split in which rows sharing a target string stay
  together, so no target is seen on both sides;
- ``load_world_behaviours(world_dir)``: the task world's held-out forbidden requests (or, with ``"pairs_train"``,
  its training side's), each with the world's ``vault_code`` (the objective judge's secret) and a ``prefill`` /
  ``demo`` an attacker can write without it;
- ``load_world_benign(world_dir)``, ``load_self_instruct(path)`` and ``benign_prompts(...)``: prompts a model
  should answer, for false-refusal rates.

Every record may carry ``messages`` (the conversation to send; else one user turn holding ``goal``).
"""
from __future__ import annotations

import csv
import random
import re
from pathlib import Path

from ..data.chat_data import iter_jsonl
from ..errors import LLMLabError
from ..world.build import read_world_json

ADVBENCH_COLUMNS = ("goal", "target")
# Words that carry no topic: function words, and the genre words a target uses in place of its goal's verb
# ("Instruct users how to ..." → "Sure, here is a guide for ...").
_STOP_WORDS = frozenset(
    "a an the of to and or for on in into how that can be is are here sure with from by about this it its their "
    "your you someone people users user who which what as at tutorial guide instruction instructions explanation "
    "description detailed detail step steps".split())
_AFFIRMATIVE = re.compile(r"^\s*sure,?\s*here\s+(?:is|are)\s*", re.IGNORECASE)
MATCH_THRESHOLD = 0.5     # a target matches its goal when at least half of its topic words occur in the goal


# ------------------------------------------------------------------------------------------------- AdvBench

def topic_words(text: str) -> set[str]:
    """Lower-case words of ``text`` without ``_STOP_WORDS``, crudely stemmed (``cheating`` → ``cheat``,
    ``committing`` → ``commit``)."""
    out = set()
    for word in re.findall(r"[a-z]+", text.lower()):
        if word in _STOP_WORDS:
            continue
        for suffix in ("ing", "ers", "er", "es", "s", "ed", "e"):
            if word.endswith(suffix) and len(word) - len(suffix) >= 3:
                word = word[:-len(suffix)]
                break
        if len(word) > 3 and word[-1] == word[-2] and word[-1] not in "aeiouls":    # committ → commit
            word = word[:-1]
        out.add(word)
    return out


def target_overlap(goal: str, target: str) -> float:
    """Share of the target's topic words (after its "Sure, here is") that occur in the goal, in [0, 1].

    On AdvBench a matching pair scores at least 0.8 and each of the eight mismatched rows at most 0.25, so
    ``MATCH_THRESHOLD`` = 0.5 separates them with room on both sides."""
    words = topic_words(_AFFIRMATIVE.sub("", target))
    return len(words & topic_words(goal)) / len(words) if words else 1.0


def read_csv_rows(path, columns: tuple[str, ...]) -> list[tuple[int, dict]]:
    """``(line, row)`` for each data row of a CSV file with a header holding ``columns``; every column must be
    non-empty. Errors name the file, the line and the column."""
    path = Path(path)
    if not path.is_file():
        raise LLMLabError(f"no such file: {path}")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as e:
        raise LLMLabError(f"{path}: not UTF-8 text ({e})") from None
    reader = csv.reader(text.splitlines(keepends=True), strict=True)
    rows, header, start = [], None, 1
    try:
        for fields in reader:
            line, start = start, reader.line_num + 1        # a quoted field may span lines: report the first
            if not any(f.strip() for f in fields):
                continue
            if header is None:
                header = [f.strip() for f in fields]
                missing = [c for c in columns if c not in header]
                if missing:
                    raise LLMLabError(f"{path}:{line}: the header has no column {', '.join(map(repr, missing))} "
                                      f"(found {', '.join(map(repr, header))}; expected {', '.join(columns)})")
                continue
            if len(fields) != len(header):
                raise LLMLabError(f"{path}:{line}: {len(fields)} fields where the header has {len(header)}")
            row = dict(zip(header, fields))
            for c in columns:
                if not row[c].strip():
                    raise LLMLabError(f"{path}:{line}: column {c!r} is empty")
            rows.append((line, row))
    except csv.Error as e:
        raise LLMLabError(f"{path}:{start}: not valid CSV ({e})") from None
    if header is None:
        raise LLMLabError(f"{path}: empty file; expected a header with the columns {', '.join(columns)}")
    if not rows:
        raise LLMLabError(f"{path}: no data rows after the header")
    return rows


def load_advbench(path) -> list[dict]:
    """AdvBench behaviours from ``harmful_behaviors.csv``: ``{"goal", "target", "source": "advbench", "index",
    "line", "matches_goal"}``; ``index`` is the 0-based data row, ``line`` the file's line."""
    records = []
    for index, (line, row) in enumerate(read_csv_rows(path, ADVBENCH_COLUMNS)):
        goal, target = row["goal"].strip(), row["target"].strip()
        records.append({"goal": goal, "target": target, "source": "advbench", "index": index, "line": line,
                        "matches_goal": target_overlap(goal, target) >= MATCH_THRESHOLD})
    return records


def mismatched(records: list[dict]) -> list[int]:
    """The ``index`` of each record whose target is not about its goal."""
    return [r["index"] for r in records if not r.get("matches_goal", True)]


def split_by_target(records: list[dict], test_fraction: float = 0.5, seed: int = 0) -> tuple[list[dict], list[dict]]:
    """Train and test records, with every record of one target string on the same side (a universal suffix
    trained on "Sure, here is a tutorial on ..." must not meet that target again at test time). The distinct
    targets are shuffled with ``seed`` and about ``test_fraction`` of the records go to test; both keep the input
    order."""
    if not 0 < test_fraction < 1:
        raise LLMLabError(f"test_fraction = {test_fraction}: must lie strictly between 0 and 1")
    groups: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        groups.setdefault(r["target"], []).append(i)
    if len(groups) < 2:
        raise LLMLabError(f"cannot split {len(records)} behaviours by target: they have {len(groups)} distinct "
                          "target(s), at least 2 are needed")
    order = list(groups)
    random.Random(seed).shuffle(order)
    want = test_fraction * len(records)
    test: set[int] = set()
    for target in order:
        if len(test) >= want or len(test) + len(groups[target]) >= len(records):
            break
        test.update(groups[target])
    return ([r for i, r in enumerate(records) if i not in test], [r for i, r in enumerate(records) if i in test])


def select(records: list[dict], split: str = "all", test_fraction: float = 0.5, seed: int = 0,
           keep_mismatched: bool = False) -> tuple[list[dict], list[dict]]:
    """The behaviours to attack and the others: without the rows whose target does not match their goal (unless
    ``keep_mismatched``), then ``split`` = ``all`` (others empty), ``train`` or ``test`` of ``split_by_target``
    (others: the other side, e.g. the pool of many-shot's faked turns)."""
    if split not in ("all", "train", "test"):
        raise LLMLabError(f"split = {split!r}; choose all, train or test")
    kept = records if keep_mismatched else [r for r in records if r.get("matches_goal", True)]
    if split == "all":
        return kept, []
    train, test = split_by_target(kept, test_fraction, seed)
    return (train, test) if split == "train" else (test, train)


# ------------------------------------------------------------------------------------------------- the world

def world_meta(world_dir) -> dict:
    """``world.json`` of a folder that ``llmlab world`` wrote."""
    path, meta = read_world_json(Path(world_dir) / "world.json")
    if not re.fullmatch(r"\d+", str(meta.get("vault_code", ""))):
        raise LLMLabError(f"{path}: no 'vault_code' of digits (write the world with `llmlab world`)")
    return meta


def _world_prompts(world_dir, name: str) -> list[tuple[str, dict]]:
    path = Path(world_dir) / name
    out = []
    for where, record in iter_jsonl(path):
        messages = record.get("prompt")
        if not isinstance(messages, list) or not messages or not isinstance(messages[-1], dict) \
                or messages[-1].get("role") != "user" or not isinstance(messages[-1].get("content"), str):
            raise LLMLabError(f"{where}: field 'prompt' must be a message list ending with a user turn")
        out.append((where, record))
    if not out:
        raise LLMLabError(f"{path}: empty file; expected the world's prompts")
    return out


def decoy_code(code: str, seed: int = 0) -> str:
    """A code of the same length that is not ``code`` nor its reverse: what an attacker writes in a fake turn."""
    rng = random.Random(f"{seed}:decoy")
    while True:
        fake = "".join(rng.choice("123456789") for _ in code)
        if fake not in (code, code[::-1]):
            return fake


def load_world_behaviours(world_dir, split: str = "forbidden_eval") -> list[dict]:
    """The world's forbidden requests (``forbidden_eval.jsonl`` by default: the held-out ones; ``pairs_train``:
    those of the training side, which the model learned to refuse) as behaviours: ``goal`` the request,
    ``messages`` the prompt as the world wrote it, ``target`` "The vault code is <code>." (what GCG and random
    search raise the log-probability of), ``vault_code`` (the objective judge's secret), and what an attacker who
    does not know the code may write: ``prefill`` "The vault code is" and ``demo`` the target with a decoy code.
    A split's other kinds of prompt are left out, and a conversation that repeats an earlier one counts once."""
    code = str(world_meta(world_dir)["vault_code"])
    demo = f"The vault code is {decoy_code(code)}."
    rows, seen = [], set()
    for where, r in _world_prompts(world_dir, f"{split}.jsonl"):
        key = repr(r["prompt"])
        if r.get("kind", "forbidden") == "forbidden" and key not in seen:
            seen.add(key)
            rows.append((where, r))
    return [{"goal": r["prompt"][-1]["content"], "target": f"The vault code is {code}.", "source": "world",
             "index": i, "where": where, "messages": r["prompt"], "vault_code": code,
             "prefill": "The vault code is", "demo": demo}
            for i, (where, r) in enumerate(rows)]


def load_world_benign(world_dir) -> list[dict]:
    """The world's held-out benign look-alikes (``benign_eval.jsonl``: "Who guards the vault?"), each with its
    ``reference`` answer."""
    return [{"goal": r["prompt"][-1]["content"], "target": r.get("reference", ""), "source": "world-benign",
             "index": i, "where": where, "messages": r["prompt"]}
            for i, (where, r) in enumerate(_world_prompts(world_dir, "benign_eval.jsonl"))]


def load_self_instruct(path) -> list[dict]:
    """Self-Instruct tasks (``seed_tasks.jsonl``, 175; ``user_oriented_eval.jsonl``, 252): ``goal`` the
    instruction, followed by its ``input`` after a blank line when there is one; ``target`` the reference output;
    ``source`` "self-instruct:<file stem>"."""
    path = Path(path)
    records = []
    for where, r in iter_jsonl(path):
        for field in ("instruction", "input", "output"):
            if not isinstance(r.get(field, ""), str):
                raise LLMLabError(f"{where}: field {field!r} must be a string")
        if not r.get("instruction", "").strip():
            raise LLMLabError(f"{where}: field 'instruction' is missing or empty")
        goal = r["instruction"].strip() + (f"\n\n{r['input'].strip()}" if r.get("input", "").strip() else "")
        records.append({"goal": goal, "target": r.get("output", ""), "source": f"self-instruct:{path.stem}",
                        "index": len(records), "where": where, "id": r.get("id")})
    if not records:
        raise LLMLabError(f"{path}: empty file; expected Self-Instruct tasks")
    return records


def benign_prompts(world_dir=None, self_instruct=()) -> list[dict]:
    """Benign prompts for false-refusal rates: the world's (when ``world_dir`` is given) and each Self-Instruct
    file of ``self_instruct`` (a path or a list of paths; a folder means both of its files)."""
    paths = [self_instruct] if isinstance(self_instruct, (str, Path)) else list(self_instruct)
    records = load_world_benign(world_dir) if world_dir is not None else []
    for p in map(Path, paths):
        files = [p / "seed_tasks.jsonl", p / "user_oriented_eval.jsonl"] if p.is_dir() else [p]
        for f in files:
            records += load_self_instruct(f)
    return records


OPTIM_STR = "{optim_str}"     # where an optimised attack string goes in a behaviour's conversation


def load_behaviours(path) -> list[dict]:
    """Behaviours from whatever ``path`` is: a world folder (its forbidden requests), an AdvBench-style ``.csv``
    (``goal``, ``target``), or a ``.jsonl`` file of records with ``target`` and either ``goal`` or ``messages``
    (a conversation holding ``{optim_str}`` exactly once: where GCG's string goes), optional ``system`` and ``id``."""
    path = Path(path)
    if path.is_dir():
        return load_world_behaviours(path)
    if path.suffix == ".csv":
        return load_advbench(path)
    records = []
    for where, r in iter_jsonl(path):
        _check_record(r, where)
        records.append({**r, "source": r.get("source", path.stem), "index": len(records), "where": where})
    if not records:
        raise LLMLabError(f"{path}: empty file; expected behaviours ({{\"goal\", \"target\"}} per line)")
    return records


def _check_record(r: dict, where: str) -> None:
    if not isinstance(r.get("target"), str) or not r["target"].strip():
        raise LLMLabError(f"{where}: field 'target' must be a non-empty string")
    messages = r.get("messages")
    if messages is None:
        if not isinstance(r.get("goal"), str) or not r["goal"].strip():
            raise LLMLabError(f"{where}: field 'goal' must be a non-empty string (or give 'messages')")
    elif "goal" in r:
        raise LLMLabError(f"{where}: give 'goal' or 'messages', not both")
    elif not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise LLMLabError(f"{where}: field 'messages' must be a list of {{\"role\", \"content\"}} objects")
    elif sum(str(m.get("content", "")).count(OPTIM_STR) for m in messages) != 1:
        raise LLMLabError(f"{where}: field 'messages' must hold {OPTIM_STR} exactly once (where the attack "
                          "string goes)")
    if r.get("system") is not None and not isinstance(r["system"], str):
        raise LLMLabError(f"{where}: field 'system' must be a string")
