"""Text sources: every way a corpus reaches llmlab, turned into one stream of documents (strings).

``iter_documents(source)`` accepts

- the name of a built-in corpus (``tinyshakespeare``): a file llmlab downloads once from its canonical address into
  ``$LLMLAB_CACHE/data/`` (default ``~/.cache/llmlab``), checks (size and sha256) and renames into place, so an
  interrupted download never leaves half a corpus; a local file or folder of the same name wins;
- a ``.txt`` file: the whole file is one document (Tiny Shakespeare is one ``input.txt``);
- a ``.jsonl`` or ``.jsonl.gz`` file: one JSON object per line, the document is its ``text_field``;
- a ``.parquet`` file: the ``text_field`` column, read with pyarrow in batches (never the whole file at once);
- a folder saved by ``datasets.Dataset.save_to_disk`` (or a ``DatasetDict``, from which ``split`` is taken);
- any other folder: its supported files, recursively, in sorted order of their relative paths;
- a Hugging Face hub dataset name (``datasets.load_dataset(name, split=split)``).

Documents that are empty or only whitespace are skipped; a source that yields no document at all is an error,
so a wrong path or field never trains on nothing.
"""
from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

from ..config import cache_root
from ..errors import LLMLabError

SUFFIXES = (".txt", ".jsonl", ".jsonl.gz", ".parquet")
PARQUET_BATCH_ROWS = 1024
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def iter_documents(source: str, text_field: str = "text", split: str = "train") -> Iterator[str]:
    """Yield the non-empty documents of one source (file, folder or hub dataset name), in a fixed order."""
    found = False
    for doc in _iter_raw(str(source), text_field, split):
        if doc.strip():
            found = True
            yield doc
    if not found:
        raise LLMLabError(f"{source}: empty corpus: no documents, or only empty ones (text field {text_field!r})")


def iter_documents_many(sources: Iterable[str], text_field: str = "text", split: str = "train") -> Iterator[str]:
    """The documents of several sources, one source after the other."""
    for source in sources:
        yield from iter_documents(source, text_field=text_field, split=split)


def _iter_raw(source: str, text_field: str, split: str) -> Iterator[str]:
    path = Path(source).expanduser()
    if source in BUILTIN and not path.exists():
        path = builtin_corpus(source)
    if path.is_dir():
        yield from _iter_folder(path, text_field, split)
    elif path.is_file():
        yield from _iter_file(path, text_field)
    elif _looks_like_hub_name(source):
        yield from _iter_hub(source, text_field, split)
    else:
        raise LLMLabError(f"no such file: {source}")


# --- built-in corpora ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Builtin:
    """A small corpus known by name: where it comes from and what it must be."""
    url: str
    size: int
    sha256: str


BUILTIN = {
    # Karpathy's char-rnn Tiny Shakespeare (public domain text), as nanoGPT's shakespeare_char uses it
    "tinyshakespeare": Builtin(
        "https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
        1_115_394, "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"),
}
DOWNLOAD_TIMEOUT = 60       # seconds without an answer before a download counts as failed


def builtin_path(name: str) -> Path:
    """Where built-in corpus ``name`` is kept: ``$LLMLAB_CACHE/data/<name>.txt``."""
    return cache_root() / "data" / f"{name}.txt"


def builtin_corpus(name: str) -> Path:
    """The local file of built-in corpus ``name``, downloaded on first use (a file already there is used as is)."""
    spec, path = BUILTIN[name], builtin_path(name)
    if path.is_file():
        return path
    advice = (f"download it yourself and pass its path as the data (llmlab pretrain: --set data.path=/path/to/"
              f"input.txt; llmlab experiment: --data /path/to/input.txt), or put the file at {path}")
    try:
        data = _fetch(spec.url)
    except OSError as e:        # URLError, HTTPError, timeouts, refused connections
        raise LLMLabError(f"built-in corpus {name!r}: downloading {spec.url} failed ({type(e).__name__}: {e}); "
                          f"{advice}") from None
    digest = hashlib.sha256(data).hexdigest()
    if len(data) != spec.size or digest != spec.sha256:
        raise LLMLabError(f"built-in corpus {name!r}: {spec.url} sent {len(data):,} bytes with sha256 "
                          f"{digest[:12]}…, not the expected {spec.size:,} bytes ({spec.sha256[:12]}…); {advice}")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)           # atomic: a reader sees no file or the whole file
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _fetch(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT) as response:
        return response.read()


def _looks_like_hub_name(source: str) -> bool:
    """``user/name`` or ``name`` without a file suffix; anything else is taken as a (missing) local path."""
    return bool(_HUB_NAME.match(source)) and not source.endswith(SUFFIXES)


def _suffix(path: Path) -> str | None:
    name = path.name.lower()
    return next((s for s in SUFFIXES if name.endswith(s)), None)


def _iter_file(path: Path, text_field: str) -> Iterator[str]:
    suffix = _suffix(path)
    if suffix == ".txt":
        yield _read_text(path)
    elif suffix in (".jsonl", ".jsonl.gz"):
        yield from _iter_jsonl(path, text_field)
    elif suffix == ".parquet":
        yield from _iter_parquet(path, text_field)
    else:
        raise LLMLabError(f"{path}: unsupported file type; expected one of {', '.join(SUFFIXES)} or a folder")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LLMLabError(f"{path}: not UTF-8 text ({e})") from None


def _iter_jsonl(path: Path, text_field: str) -> Iterator[str]:
    """Each line's text field; lines are read as bytes and decoded one by one, so that a bad byte is reported
    with its line number."""
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            for line_no, raw in enumerate(f, start=1):
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise LLMLabError(f"{path}, line {line_no}: not UTF-8 text ({e})") from None
                if line.strip():
                    yield _jsonl_text(path, line_no, line, text_field)
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        raise LLMLabError(f"{path}: not a readable gzip file ({e})") from None


def _jsonl_text(path: Path, line_no: int, line: str, text_field: str) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise LLMLabError(f"{path}, line {line_no}: not valid JSON ({e.msg})") from None
    if not isinstance(record, dict):
        raise LLMLabError(f"{path}, line {line_no}: expected a JSON object, got {type(record).__name__}")
    if text_field not in record:
        raise LLMLabError(f"{path}, line {line_no}: no field {text_field!r} (fields: {', '.join(record) or 'none'}); "
                          f"choose the field with --text-field")
    return _as_text(record[text_field], f"{path}, line {line_no}, field {text_field!r}")


def _as_text(value: object, where: str) -> str:
    if not isinstance(value, str):
        raise LLMLabError(f"{where}: expected a string, got {type(value).__name__}")
    return value


def _iter_parquet(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise LLMLabError(f"{path}: not a readable parquet file ({e})") from None
    columns = parquet.schema_arrow.names
    if text_field not in columns:
        raise LLMLabError(f"{path}: no column {text_field!r} (columns: {', '.join(columns)}); "
                          f"choose the column with --text-field")
    row = 0
    for batch in parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS, columns=[text_field]):
        for value in batch.column(0).to_pylist():
            row += 1
            yield _as_text(value, f"{path}, row {row}, column {text_field!r}")


def _iter_folder(path: Path, text_field: str, split: str) -> Iterator[str]:
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        yield from _iter_saved_dataset(path, text_field, split)
        return
    files = sorted((p for p in path.rglob("*") if p.is_file() and _suffix(p) and not _hidden(p, path)),
                   key=lambda p: p.relative_to(path).as_posix())
    if not files:
        raise LLMLabError(f"{path}: empty corpus: the folder holds no {', '.join(SUFFIXES)} files "
                          f"and is not a datasets.save_to_disk folder")
    for file in files:
        yield from _iter_file(file, text_field)


def _hidden(file: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in file.relative_to(root).parts)


def _iter_saved_dataset(path: Path, text_field: str, split: str) -> Iterator[str]:
    import datasets

    dataset = datasets.load_from_disk(str(path))
    if isinstance(dataset, datasets.DatasetDict):
        if split not in dataset:
            raise LLMLabError(f"{path}: no split {split!r} (splits: {', '.join(dataset)})")
        dataset = dataset[split]
    yield from _iter_dataset_rows(dataset, text_field, str(path))


def _iter_hub(name: str, text_field: str, split: str) -> Iterator[str]:
    import datasets

    try:
        dataset = datasets.load_dataset(name, split=split)
    except Exception as e:  # noqa: BLE001 - any failure to fetch is reported the same way, with its cause
        raise LLMLabError(
            f"{name}: no such local file or folder, and loading it from the Hugging Face hub failed "
            f"({type(e).__name__}: {_first_line(e)}); the hub is unreachable or has no "
            f"such dataset: pass a local path ({', '.join(SUFFIXES)}, a folder, or a save_to_disk folder)") from None
    yield from _iter_dataset_rows(dataset, text_field, name)


def _first_line(error: Exception) -> str:
    return (str(error).splitlines() or [""])[0]


def _iter_dataset_rows(dataset, text_field: str, where: str) -> Iterator[str]:
    if text_field not in dataset.column_names:
        raise LLMLabError(f"{where}: no column {text_field!r} (columns: {', '.join(dataset.column_names)}); "
                          f"choose the column with --text-field")
    for row, value in enumerate(_column_values(dataset, text_field), start=1):
        yield _as_text(value, f"{where}, row {row}, column {text_field!r}")


def _column_values(dataset, text_field: str) -> Iterator[object]:
    for batch in dataset.select_columns([text_field]).iter(batch_size=PARQUET_BATCH_ROWS):
        yield from batch[text_field]
