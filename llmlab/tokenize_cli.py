"""``llmlab tokenize``: what a model's tokenizer makes of a text: its tokens, their ids and the bytes each covers.

    llmlab tokenize --model DIR|HUB-ID|FILE.gguf TEXT [--json] [--no-special]

The text is encoded as the model's tokenizer encodes it by default, ``tokenizer(text)``: a tokenizer that puts a
BOS in front (Gemma, Llama) or wraps the text in ``[CLS] … [SEP]`` (BERT) does so here too, and those tokens are
marked *special* with no bytes of the text. A special-token string written in the text itself
(``<|im_start|>``) becomes that special token, as in a rendered chat template, and is marked special with its
bytes. ``--no-special`` encodes with nothing added.

Byte spans ``[start, end)`` index the UTF-8 encoding of the text. The tokenizer reports *character* offsets; each
becomes a byte offset (the UTF-8 length of the text before it). A byte-level BPE may split one character into
several tokens (an emoji is 4 bytes, often 2 tokens), which then share that character's offsets; their spans are
laid one after the other by each token's own byte count (from its byte-level vocabulary string, or 1 for a
SentencePiece byte-fallback token ``<0xF0>``), so that for a byte-level tokenizer the spans of the tokens tile the
text exactly: ``b"".join(data[s:e] for s, e in spans) == text.encode()``. A tokenizer that normalises the text
(BERT's lowercasing, whitespace stripping) has spans that skip the bytes it dropped.

The table ends with the compression: bytes per token = (UTF-8 bytes of the text) / (tokens of the text, the
special tokens the tokenizer added left out).
"""
from __future__ import annotations

import json
import re
import sys
from functools import lru_cache

from .errors import LLMLabError

_BYTE_FALLBACK = re.compile(r"<0x[0-9A-Fa-f]{2}>")


def register(subparsers) -> None:
    p = subparsers.add_parser("tokenize", help="show the tokens, ids and byte spans a model's tokenizer gives a text",
                              description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, metavar="DIR|HUB|FILE.gguf",
                   help="model or tokenizer folder, Hugging Face hub id, or .gguf file (only its tokenizer is read)")
    p.add_argument("text", metavar="TEXT", help="the text to tokenize ('-' reads standard input)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--no-special", action="store_true", help="add no special tokens (no BOS, [CLS], ...)")
    p.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    from .hub.folder import model_name, tokenizer_of

    text = sys.stdin.read() if args.text == "-" else args.text
    result = tokenize(tokenizer_of(args.model), text, add_special_tokens=not args.no_special)
    result = {"model": model_name(args.model), **result}
    print(json.dumps(result, ensure_ascii=False, indent=1) if args.json else table(result))
    return 0


# --- tokens and byte spans -------------------------------------------------------------------------------------

def tokenize(tokenizer, text: str, *, add_special_tokens: bool = True) -> dict:
    """The tokens of ``text`` with their ids, vocabulary strings, byte spans and whether each is special.

    Returns ``{"text", "bytes", "tokens": [{"index", "id", "token", "special", "added", "start", "end",
    "text"}], "bytes_per_token"}``; ``added`` marks a special token the tokenizer put there (no bytes: ``start``
    and ``end`` are None), ``text`` the bytes of the span decoded (undecodable partial characters as ``\\xNN``).
    """
    if not getattr(tokenizer, "is_fast", False):
        raise LLMLabError("llmlab tokenize needs a fast (Rust) tokenizer, which reports offsets; this model's "
                          f"tokenizer ({type(tokenizer).__name__}) has no tokenizer.json")
    try:
        encoded = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    except Exception as e:      # the tokenizers library raises its own types (a character-level vocabulary
        raise LLMLabError(f"the tokenizer cannot encode this text ({type(e).__name__}: {e}); a character-level "
                          "tokenizer knows only the characters of its training text") from e
    ids = list(encoded["input_ids"])
    pieces = tokenizer.convert_ids_to_tokens(ids)
    specials = special_token_ids(tokenizer)
    data = text.encode("utf-8")
    spans = byte_spans(text, encoded["offset_mapping"], pieces, byte_level=is_byte_level(tokenizer))
    tokens = []
    for i, (token_id, piece, span) in enumerate(zip(ids, pieces, spans)):
        added = span is None
        start, end = span if span else (None, None)
        tokens.append({"index": i, "id": int(token_id), "token": piece, "special": added or token_id in specials,
                       "added": added, "start": start, "end": end,
                       "text": None if added else data[start:end].decode("utf-8", errors="backslashreplace")})
    counted = sum(1 for t in tokens if not t["added"])
    return {"text": text, "bytes": len(data), "tokens": tokens,
            "bytes_per_token": len(data) / counted if counted else None}


def special_token_ids(tokenizer) -> set[int]:
    """Ids of the tokenizer's special tokens: its named ones (BOS, EOS, PAD, ...) and every added token flagged
    special (``<|im_start|>``, ``<start_of_turn>``)."""
    ids = set(tokenizer.all_special_ids)
    for token_id, added in getattr(tokenizer, "added_tokens_decoder", {}).items():
        if getattr(added, "special", False):
            ids.add(int(token_id))
    return ids


def is_byte_level(tokenizer) -> bool:
    """Whether the tokenizer's vocabulary strings spell bytes (GPT-2's byte-level BPE: one character per byte)."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    return "ByteLevel" in json.dumps(backend.get("decoder")) or "ByteLevel" in json.dumps(backend.get("pre_tokenizer"))


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    from transformers.convert_slow_tokenizer import bytes_to_unicode
    return {char: byte for byte, char in bytes_to_unicode().items()}


def token_byte_count(piece: str, byte_level: bool) -> int | None:
    """How many bytes of text a vocabulary string stands for, where the string says so exactly: one per character
    of a byte-level token, one for a byte-fallback token ``<0xF0>``; None otherwise."""
    if _BYTE_FALLBACK.fullmatch(piece):
        return 1
    if byte_level and piece and all(c in _byte_decoder() for c in piece):
        return len(piece)
    return None


def byte_spans(text: str, offsets, pieces: list[str], *, byte_level: bool) -> list[tuple[int, int] | None]:
    """Byte spans ``[start, end)`` in ``text.encode()`` of each token, from its character ``offsets``; None for a
    zero-width token (a special token the tokenizer added).

    A character offset c becomes the byte offset B(c) = len(text[:c].encode()). A token whose character span
    overlaps the previous token's (both hold parts of one multi-byte character) starts where the previous one
    ended; one whose byte count is known (``token_byte_count``) ends that many bytes after its start, within its
    character span."""
    cum = [0]
    for char in text:
        cum.append(cum[-1] + len(char.encode("utf-8")))
    spans: list[tuple[int, int] | None] = []
    previous_end = 0
    for (s, e), piece in zip(offsets, pieces):
        if e <= s:
            spans.append(None)
            continue
        lo, hi = cum[s], cum[e]
        start = min(previous_end, hi) if lo < previous_end else lo
        n = token_byte_count(piece, byte_level)
        end = min(start + n, hi) if n is not None else hi
        spans.append((start, end))
        previous_end = end
    return spans


# --- the table -------------------------------------------------------------------------------------------------

def shown(data: bytes) -> str:
    """Bytes as a quoted string: printable characters as they are, others escaped as ``repr`` escapes them, and
    the bytes of a partial character (a token that holds part of one) as ``\\xNN``."""
    out = []
    for c in data.decode("utf-8", errors="surrogateescape"):
        if 0xDC80 <= ord(c) <= 0xDCFF:
            out.append(f"\\x{ord(c) - 0xDC00:02x}")
        elif c.isprintable() and c not in "'\\":
            out.append(c)
        else:
            out.append(repr(c)[1:-1] if c != "'" else "\\'")
    return "'" + "".join(out) + "'"


def table(result: dict) -> str:
    """The tokens as an aligned table: index, id, byte span, special mark, vocabulary string, text covered."""
    rows = [["#", "id", "bytes", "special", "token", "text"]]
    for t in result["tokens"]:
        span = "-" if t["added"] else f"{t['start']}:{t['end']}"
        mark = "added" if t["added"] else ("yes" if t["special"] else "")
        rows.append([str(t["index"]), str(t["id"]), span, mark, repr(t["token"]),
                     "" if t["added"] else shown(result["text"].encode("utf-8")[t["start"]:t["end"]])])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    right = {0, 1}
    lines = ["  ".join(cell.rjust(w) if i in right else cell.ljust(w) for i, (cell, w) in
                       enumerate(zip(row, widths))).rstrip() for row in rows]
    n = len(result["tokens"])
    added = sum(t["added"] for t in result["tokens"])
    special = sum(t["special"] for t in result["tokens"])
    ratio = result["bytes_per_token"]
    lines.append(f"{result.get('model', 'tokenizer')}: {n} tokens ({special} special, {added} added by the "
                 f"tokenizer) for {result['bytes']} bytes"
                 + (f"; {ratio:.2f} bytes per token (added tokens left out)" if ratio is not None else ""))
    return "\n".join(lines)
