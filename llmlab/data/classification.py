"""Labelled text for sequence classification: IMDB and any set of the same shape.

Sources, all read into the same ``Example(text, label)`` lists:
- an ``aclImdb`` folder (``train|test/pos|neg/ID_RATING.txt``; neg → 0, pos → 1);
- JSON Lines, gzipped or not, with a text and a label field (``data.text_field``, ``data.label_field``);
- Parquet files with the same columns;
- a Hugging Face ``datasets`` name (``imdb``, ``stanfordnlp/imdb``) when the hub or its local cache answers.

A folder finds its train and test files by name (``train.*``, ``test.*`` / ``test_dev.*`` / ``classify_eval.*`` ...).
Integer labels are ids as they are; string labels are mapped to ids in sorted order (or in the order of
``label_names``) and the mapping is returned with the data. HTML line breaks (``<br />``) become newlines.
"""
from __future__ import annotations

import gzip
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import LLMLabError

TRAIN_STEMS = ("train", "classify_train")
TEST_STEMS = ("test", "test_dev", "classify_eval", "eval", "validation", "valid", "dev")
SUFFIXES = (".jsonl.gz", ".jsonl", ".json.gz", ".json", ".parquet")
HF_IMDB = ("imdb", "stanfordnlp/imdb")
IMDB_NAMES = ["negative", "positive"]
_BREAK = re.compile(r"<br\s*/?>", re.IGNORECASE)


@dataclass(frozen=True)
class Example:
    text: str
    label: int


@dataclass
class ClassificationData:
    train: list[Example]
    test: list[Example]
    label_names: list[str]
    sources: dict = field(default_factory=dict)   # split → where it came from

    @property
    def num_labels(self) -> int:
        return len(self.label_names)


@dataclass(frozen=True)
class _Raw:
    """One record before its label is mapped to an id; ``where`` is ``file:line`` for error messages."""
    text: str
    label: object
    where: str


def clean_text(text: str) -> str:
    """Replace HTML line breaks with newlines and strip surrounding whitespace."""
    return _BREAK.sub("\n", text).strip()


# --------------------------------------------------------------------------------------------- raw readers

def _open_text(path: Path):
    return gzip.open(path, "rt", encoding="utf-8") if path.name.endswith(".gz") else open(path, encoding="utf-8")


def _record(obj, where: str, text_field: str, label_field: str) -> _Raw:
    if not isinstance(obj, dict):
        raise LLMLabError(f"{where}: expected a JSON object with fields {text_field!r} and {label_field!r}")
    for name in (text_field, label_field):
        if obj.get(name) is None:
            raise LLMLabError(f"{where}: missing field {name!r} (set data.text_field / data.label_field)")
    if not isinstance(obj[text_field], str):
        raise LLMLabError(f"{where}: field {text_field!r} must be a string")
    return _Raw(obj[text_field], obj[label_field], where)


def read_jsonl(path, text_field: str = "text", label_field: str = "label") -> list[_Raw]:
    """Records of a JSON Lines file (``.gz`` read transparently); a malformed line names the file and line."""
    path = Path(path)
    out = []
    try:
        with _open_text(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{lineno}"
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise LLMLabError(f"{where}: malformed JSON ({e.msg})") from None
                out.append(_record(obj, where, text_field, label_field))
    except (OSError, EOFError, UnicodeDecodeError) as e:
        raise LLMLabError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    return out


def read_parquet(path, text_field: str = "text", label_field: str = "label") -> list[_Raw]:
    """Records of a Parquet file; ``where`` is ``file:row N`` (1-based)."""
    import pyarrow.parquet as pq

    path = Path(path)
    try:
        table = pq.read_table(path)
    except Exception as e:     # pyarrow raises several error types for corrupt files
        raise LLMLabError(f"{path}: not a readable Parquet file ({e})") from None
    missing = [n for n in (text_field, label_field) if n not in table.column_names]
    if missing:
        raise LLMLabError(f"{path}: no column {missing[0]!r} (columns: {', '.join(table.column_names)})")
    texts, labels = table.column(text_field).to_pylist(), table.column(label_field).to_pylist()
    return [_record({text_field: t, label_field: y}, f"{path}:row {i}", text_field, label_field)
            for i, (t, y) in enumerate(zip(texts, labels), 1)]


def read_aclimdb_split(folder) -> list[_Raw]:
    """The reviews of one aclImdb split folder (``pos/`` and ``neg/`` of ``ID_RATING.txt`` files), labels
    ``negative``/``positive``, in a fixed order (neg then pos, ascending numeric id)."""
    folder = Path(folder)
    out = []
    for polarity, name in (("neg", "negative"), ("pos", "positive")):
        sub = folder / polarity
        if not sub.is_dir():
            raise LLMLabError(f"{folder}: no {polarity}/ folder (expected the aclImdb layout train|test/pos|neg)")
        files = sorted(sub.glob("*.txt"), key=lambda p: (int(p.stem.split("_")[0]) if p.stem.split("_")[0].isdigit()
                                                          else -1, p.name))
        for path in files:
            try:
                out.append(_Raw(path.read_text(encoding="utf-8"), name, str(path)))
            except (OSError, UnicodeDecodeError) as e:
                raise LLMLabError(f"{path}: cannot read ({e})") from None
    return out


def read_file(path, text_field: str = "text", label_field: str = "label") -> list[_Raw]:
    path = Path(path)
    if not path.is_file():
        raise LLMLabError(f"data file not found: {path}")
    if path.suffix == ".parquet":
        return read_parquet(path, text_field, label_field)
    if path.name.endswith(SUFFIXES):
        return read_jsonl(path, text_field, label_field)
    raise LLMLabError(f"{path}: unknown data format (use .jsonl, .jsonl.gz or .parquet, or an aclImdb folder)")


# --------------------------------------------------------------------------------------------- labels

def label_vocabulary(train: list[_Raw], label_names: list[str] | None) -> tuple[dict, list[str]]:
    """(raw label → id, names). String labels: ``label_names`` order if given, else sorted. Integer labels
    (booleans too): themselves, ``0 … K-1`` with ``K = len(label_names)`` or the largest train label + 1."""
    if not train:
        raise LLMLabError("the training data is empty")
    strings = [r for r in train if isinstance(r.label, str)]
    if strings:
        odd = next((r for r in train if not isinstance(r.label, str)), None)
        if odd is not None:
            raise LLMLabError(f"{odd.where}: label {odd.label!r} is not a string like the others")
        names = list(label_names) if label_names else sorted({r.label for r in train})
        return {name: i for i, name in enumerate(names)}, names
    for r in train:
        if not isinstance(r.label, (int, bool)) or r.label < 0:
            raise LLMLabError(f"{r.where}: label {r.label!r} must be a class id ≥ 0 or a class name")
    k = len(label_names) if label_names else max(int(r.label) for r in train) + 1
    names = list(label_names) if label_names else [str(i) for i in range(k)]
    return {i: i for i in range(k)}, names


def to_examples(raws: list[_Raw], vocab: dict, names: list[str], clean: bool = True) -> list[Example]:
    """Map labels to ids; an unknown label names its file and line and the known labels."""
    out = []
    for r in raws:
        key = int(r.label) if isinstance(r.label, bool) else r.label
        if isinstance(key, float) and key.is_integer():
            key = int(key)
        if key not in vocab:
            raise LLMLabError(f"{r.where}: unknown label {r.label!r} (known: {', '.join(map(str, vocab))}"
                              + ("; set data.label_names to list every class" if names else "") + ")")
        out.append(Example(clean_text(r.text) if clean else r.text, vocab[key]))
    return out


# --------------------------------------------------------------------------------------------- sources

def _find(folder: Path, stems: tuple[str, ...]) -> Path | None:
    """The first file in ``folder`` whose name is one of ``stems`` + a known suffix (or a ``stem-*.parquet``
    shard, as Hugging Face exports)."""
    for stem in stems:
        for suffix in SUFFIXES:
            if (folder / f"{stem}{suffix}").is_file():
                return folder / f"{stem}{suffix}"
        shards = sorted(folder.glob(f"{stem}-*.parquet"))
        if shards:
            return shards[0]
    return None


def aclimdb_root(folder: Path) -> Path | None:
    for root in (folder, folder / "aclImdb"):
        if (root / "train" / "pos").is_dir() and (root / "test" / "pos").is_dir():
            return root
    return None


def split_files(data, test: str | None = None) -> tuple[Path, Path]:
    """(train file, test file) of a folder; a single file is the train split and needs ``test``."""
    path = Path(data)
    if path.is_file():
        if not test:
            raise LLMLabError(f"{path}: a single file is the training data; name the test file too with "
                              "--set data.test=PATH (or pass a folder holding train.* and test.* files)")
        return path, Path(test)
    train = _find(path, TRAIN_STEMS)
    test_path = Path(test) if test else _find(path, TEST_STEMS)
    if train is None or test_path is None:
        names = ", ".join(f"{s}.jsonl[.gz]" for s in (TRAIN_STEMS if train is None else TEST_STEMS))
        raise LLMLabError(f"{path}: no {'train' if train is None else 'test'} file found (looked for {names}, "
                          f"or .parquet); or use an aclImdb folder")
    return train, test_path


def _load_hub(name: str, text_field: str, label_field: str) -> tuple[list[_Raw], list[_Raw], list[str]]:
    """Train and test of a Hugging Face ``datasets`` name; label names from its features when it has them."""
    try:
        import datasets
        ds = datasets.load_dataset(name)
    except Exception as e:      # offline, missing cache or no such dataset: all mean "cannot get it here"
        raise LLMLabError(f"{name!r} is not a local file or folder, and the Hugging Face datasets hub (or its "
                          f"local cache) could not provide it ({type(e).__name__}); download the data and pass "
                          f"its folder or files with --data") from None
    splits = {}
    for split in ("train", "test"):
        if split not in ds:
            raise LLMLabError(f"dataset {name!r} has no {split!r} split (it has {', '.join(ds)})")
        rows = ds[split]
        splits[split] = [_record(r, f"{name}[{split}]:{i}", text_field, label_field) for i, r in enumerate(rows, 1)]
    feature = ds["train"].features.get(label_field)
    names = list(getattr(feature, "names", None) or [])
    if name in HF_IMDB:
        names = IMDB_NAMES
    return splits["train"], splits["test"], names


def load_classification(data, *, text_field: str = "text", label_field: str = "label",
                        label_names: list[str] | None = None, test: str | None = None,
                        clean: bool = True) -> ClassificationData:
    """Train and test examples from a folder (aclImdb, or train/test JSONL/Parquet files), a train file plus
    ``test``, or a Hugging Face dataset name."""
    path = Path(str(data)).expanduser()
    if path.exists():
        root = aclimdb_root(path) if path.is_dir() else None
        if root is not None:
            train, test_raw = read_aclimdb_split(root / "train"), read_aclimdb_split(root / "test")
            sources = {"train": str(root / "train"), "test": str(root / "test")}
            label_names = label_names or IMDB_NAMES
        else:
            train_path, test_path = split_files(path, test)
            train = read_file(train_path, text_field, label_field)
            test_raw = read_file(test_path, text_field, label_field)
            sources = {"train": str(train_path), "test": str(test_path)}
    elif re.fullmatch(r"[\w.-]+(/[\w.-]+)?", str(data)) and not str(data).endswith(SUFFIXES):
        train, test_raw, hub_names = _load_hub(str(data), text_field, label_field)
        label_names = label_names or hub_names or None
        sources = {"train": f"{data}[train]", "test": f"{data}[test]"}
    else:
        raise LLMLabError(f"data not found: {data} (a folder, a .jsonl/.jsonl.gz/.parquet file, or a Hugging "
                          "Face dataset name)")
    vocab, names = label_vocabulary(train, label_names)
    return ClassificationData(to_examples(train, vocab, names, clean), to_examples(test_raw, vocab, names, clean),
                              names, sources)


def balanced_subset(examples: list[Example], n: int | None, seed: int = 0) -> list[Example]:
    """A deterministic, class-balanced subset of ``n`` examples (all of them when ``n`` is None or ≥ len).

    Each class's examples are shuffled with ``random.Random(seed)``; the subset then takes one example from each
    class in turn (class 0, 1, …, 0, 1, …), so the counts differ by at most one until a class runs out, after
    which the others fill the remaining places.
    """
    if n is None or n >= len(examples):
        return list(examples)
    if n < 1:
        raise LLMLabError(f"subset size must be ≥ 1, got {n}")
    rng = random.Random(seed)
    by_class: dict[int, list[Example]] = {}
    for ex in examples:
        by_class.setdefault(ex.label, []).append(ex)
    queues = []
    for label in sorted(by_class):
        items = by_class[label]
        rng.shuffle(items)
        queues.append(items)
    out, i = [], 0
    while len(out) < n:
        queue = queues[i % len(queues)]
        if queue:
            out.append(queue.pop())
        i += 1
    return out
