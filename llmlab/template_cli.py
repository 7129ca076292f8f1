"""``llmlab template show``: a chat template's rendering, its special tokens, and what the assistant-only loss trains.

    llmlab template show NAME|MODEL [--messages FILE.json] [--tokenizer MODEL] [--no-generation-prompt]

``NAME`` is a built-in template (``chat.TEMPLATES``: llama-2, llama-3, gemma, chatml, glm-4, llmlab); anything else
is a model (a folder, a hub id or a ``.gguf`` file, ``hub.folder.ModelDir``) whose own template and tokenizer are
used. A built-in name wins over a hub id of the same name. The conversation is a default example (system, user,
assistant, user) or ``--messages FILE.json`` (a list of ``{"role", "content"}`` or an object with a
``"messages"`` list). It is rendered as ``apply_chat_template`` renders it, with the generation prompt that asks for
the next assistant turn (``--no-generation-prompt`` leaves it out).

Two things are marked: the special tokens (a tokenizer's control tokens, which a user cannot type as text:
``<|im_start|>``, ``<start_of_turn>``, BOS/EOS; Llama-2's ``[INST]`` and ``<<SYS>>`` are plain text), and the
characters the SFT loss trains on (``chat.assistant_spans``: each assistant answer from the end of its generation
prompt through its end-of-turn token, as ``chat.encode_chat`` masks them). On a terminal the special tokens are
bold magenta and the trained text is underlined green; otherwise (or with ``--plain``) a special token is
written ``⟦<|im_start|>⟧`` and the trained text sits between ``«`` and ``»``.

With a tokenizer (a model's, or ``--tokenizer`` for a built-in name) the command also lists the tokens of the
rendering, each marked special and/or trained (1 in ``encode_chat``'s assistant mask). Without one, the special
tokens of a built-in template are found by their strings (``SPECIAL_STRINGS``) and its BOS/EOS strings are the
ones its models use (``TOKENS``).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path

from . import chat
from .errors import LLMLabError

# The BOS / EOS strings the models of each built-in template use, rendered when no tokenizer is given.
TOKENS = {"llama-2": ("<s>", "</s>"), "llama-3": ("<|begin_of_text|>", "<|end_of_text|>"),
          "gemma": ("<bos>", "<eos>"), "chatml": ("", "<|endoftext|>"), "glm-4": ("", "<|endoftext|>"),
          "llmlab": ("<|bos|>", "<|eos|>")}
# The special tokens each built-in template writes (its models' tokenizers hold them as single control tokens).
SPECIAL_STRINGS = {
    "llama-2": ("<s>", "</s>"),
    "llama-3": ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|end_of_text|>"),
    "gemma": ("<bos>", "<start_of_turn>", "<end_of_turn>", "<eos>"),
    "chatml": ("<|im_start|>", "<|im_end|>", "<|endoftext|>"),
    "glm-4": ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>", "<|endoftext|>"),
    "llmlab": ("<|bos|>", "<|eos|>", "<|im_start|>", "<|im_end|>"),
}
EXAMPLE = [
    {"role": "system", "content": "You are a helpful assistant. Answer in one sentence."},
    {"role": "user", "content": "What is the capital of France?"},
    {"role": "assistant", "content": "The capital of France is Paris."},
    {"role": "user", "content": "And of Italy?"},
]
BRACKETS = {"special": ("⟦", "⟧"), "trained": ("«", "»")}
COLOURS = {"special": "\033[1;35m", "trained": "\033[4;32m", "reset": "\033[0m"}


def register(subparsers) -> None:
    p = subparsers.add_parser("template", help="show a chat template's rendering: special tokens and the tokens the "
                                               "loss trains", description=__doc__.splitlines()[0])
    actions = p.add_subparsers(dest="template_command", required=True, metavar="<action>")
    show = actions.add_parser("show", help="render an example conversation and mark special and trained tokens")
    show.add_argument("name", metavar="NAME|MODEL",
                      help=f"a built-in template ({', '.join(chat.TEMPLATES)}) or a model folder, hub id or .gguf")
    show.add_argument("--messages", default=None, metavar="FILE.json",
                      help="the conversation: a JSON list of {role, content}, or {\"messages\": [...]}")
    show.add_argument("--tokenizer", default=None, metavar="MODEL",
                      help="with a built-in NAME: this model's tokenizer (its BOS/EOS, the token list)")
    show.add_argument("--no-generation-prompt", action="store_true",
                      help="leave out the generation prompt after the last message")
    show.add_argument("--plain", action="store_true", help="brackets instead of colours, even on a terminal")
    show.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    messages = read_messages(args.messages) if args.messages else EXAMPLE
    template, tokenizer, label = resolve(args.name, args.tokenizer)
    shown = show(template, messages, tokenizer=tokenizer, label=label,
                 add_generation_prompt=not args.no_generation_prompt)
    colour = sys.stdout.isatty() and not args.plain
    print(format_show(shown, colour=colour))
    return 0


# --- inputs ----------------------------------------------------------------------------------------------------

def read_messages(path) -> list[dict]:
    """The conversation of a JSON file: a list of messages or an object with a ``messages`` list; errors name the
    file, the line of a JSON error, and the field at fault."""
    path = Path(path)
    if not path.is_file():
        raise LLMLabError(f"--messages {path}: no such file")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LLMLabError(f"{path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError as e:
        raise LLMLabError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    if isinstance(data, dict):
        if "messages" not in data:
            raise LLMLabError(f"{path}: missing field 'messages' (give a list of {{role, content}} objects, or an "
                              "object with a 'messages' list)")
        data = data["messages"]
    chat.validate_messages(data, str(path))
    return data


def resolve(name: str, tokenizer_model: str | None) -> tuple[str, object, str]:
    """The template, the tokenizer (or None) and a label, for a built-in name or a model."""
    if name in chat.TEMPLATES:
        tokenizer = _tokenizer(tokenizer_model) if tokenizer_model else None
        return chat.TEMPLATES[name], tokenizer, name
    if tokenizer_model:
        raise LLMLabError(f"--tokenizer is for a built-in template name; {name!r} is a model, whose own tokenizer "
                          "is used")
    looks_like_model = Path(name).expanduser().exists() or "/" in name or name.endswith(".gguf")
    if not looks_like_model:
        raise LLMLabError(f"unknown chat template {name!r}; known templates: {', '.join(chat.TEMPLATES)} (or give a "
                          "model folder, hub id org/name, or .gguf file)")
    from .hub.folder import ModelDir, model_name, tokenizer_of
    if name.endswith(".gguf") and not Path(name).expanduser().is_dir():
        # only the tokenizer is needed, and a GGUF file's carries the template: no weights are converted
        tokenizer = tokenizer_of(name)
        return tokenizer.chat_template or chat.TEMPLATES[chat.DEFAULT_TEMPLATE], tokenizer, model_name(name)
    model = ModelDir(name)
    return model.template(), model.tokenizer(), model.name


def _tokenizer(given: str):
    from .hub.folder import tokenizer_of
    return tokenizer_of(given)


# --- the rendering and its marks -------------------------------------------------------------------------------

def show(template: str, messages: list[dict], *, tokenizer=None, label: str = "template",
         add_generation_prompt: bool = True) -> dict:
    """Render ``messages`` and mark it: ``{"label", "text", "special": [(s, e)], "trained": [(s, e)],
    "tokens": [...] or None}``, character spans of ``text``. With a tokenizer the special spans are its special
    tokens' offsets and ``tokens`` lists ``{"id", "token", "start", "end", "special", "trained"}`` (``trained``
    from ``chat.encode_chat``'s mask); without, they are the template's ``SPECIAL_STRINGS`` found in the text."""
    chat.validate_messages(messages, "template show")
    if tokenizer is not None:
        bos, eos = tokenizer.bos_token or "", tokenizer.eos_token or ""
    else:
        bos, eos = next((TOKENS[n] for n, t in chat.TEMPLATES.items() if t == template), ("", ""))
    text, trained = chat.assistant_spans(messages, template, bos_token=bos, eos_token=eos,
                                         add_generation_prompt=add_generation_prompt)
    tokens = None
    if tokenizer is not None:
        from .tokenize_cli import special_token_ids
        ids, mask = chat.encode_chat(tokenizer, messages, template, add_generation_prompt, require_assistant=False)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if list(encoded["input_ids"]) != ids:
            raise LLMLabError("template show: the rendering does not tokenize as encode_chat does")
        specials = special_token_ids(tokenizer)
        pieces = tokenizer.convert_ids_to_tokens(ids)
        tokens = [{"id": int(i), "token": p, "start": s, "end": e, "special": int(i) in specials, "trained": bool(m)}
                  for i, p, (s, e), m in zip(ids, pieces, encoded["offset_mapping"], mask)]
        special = [(t["start"], t["end"]) for t in tokens if t["special"] and t["end"] > t["start"]]
    else:
        special = find_strings(text, _special_strings(template, bos, eos))
    return {"label": label, "text": text, "special": special, "trained": trained, "tokens": tokens}


def _special_strings(template: str, bos: str, eos: str) -> tuple[str, ...]:
    name = next((n for n, t in chat.TEMPLATES.items() if t == template), None)
    strings = SPECIAL_STRINGS.get(name, ())
    return tuple(dict.fromkeys([*strings, *(s for s in (bos, eos) if s)]))


def find_strings(text: str, strings) -> list[tuple[int, int]]:
    """Character spans of every occurrence of any of ``strings`` in ``text``, longest first at each place."""
    if not strings:
        return []
    pattern = re.compile("|".join(re.escape(s) for s in sorted(strings, key=len, reverse=True)))
    return [m.span() for m in pattern.finditer(text)]


def span_ids(length: int, spans) -> list[int]:
    """For each character, the index of the span of ``spans`` that holds it, or -1."""
    ids = [-1] * length
    for k, (s, e) in enumerate(spans):
        for i in range(s, min(e, length)):
            ids[i] = k
    return ids


def marked_text(shown: dict, *, colour: bool) -> str:
    """The rendering with each special token and the trained text marked (ANSI colours, or brackets)."""
    text = shown["text"]
    special = span_ids(len(text), shown["special"])
    trained = [k >= 0 for k in span_ids(len(text), shown["trained"])]
    out, i = [], 0
    while i < len(text):
        j = i
        while j < len(text) and special[j] == special[i] and trained[j] == trained[i]:
            j += 1
        piece, is_special = text[i:j], special[i] >= 0
        if colour:
            codes = (COLOURS["trained"] if trained[i] else "") + (COLOURS["special"] if is_special else "")
            out.append(f"{codes}{piece}{COLOURS['reset']}" if codes else piece)
        else:
            if is_special:
                piece = BRACKETS["special"][0] + piece + BRACKETS["special"][1]
            starts = trained[i] and (i == 0 or not trained[i - 1])
            ends = trained[i] and (j == len(text) or not trained[j])
            out.append((BRACKETS["trained"][0] if starts else "") + piece + (BRACKETS["trained"][1] if ends else ""))
        i = j
    return "".join(out)


def format_show(shown: dict, *, colour: bool) -> str:
    """The whole output: a legend, the marked rendering, and (with a tokenizer) the token list."""
    if colour:
        legend = (f"{COLOURS['special']}special token{COLOURS['reset']}; "
                  f"{COLOURS['trained']}trained by the assistant-only loss{COLOURS['reset']}")
    else:
        legend = (f"{BRACKETS['special'][0]}special token{BRACKETS['special'][1]}; "
                  f"{BRACKETS['trained'][0]}trained by the assistant-only loss{BRACKETS['trained'][1]}")
    n_chars = sum(e - s for s, e in shown["trained"])
    lines = [f"template {shown['label']}: {legend}", "", marked_text(shown, colour=colour), ""]
    tokens = shown["tokens"]
    if tokens is None:
        lines.append(f"{n_chars} of {len(shown['text'])} characters trained; {len(shown['special'])} special tokens "
                     "(found by their strings: no tokenizer given)")
        return "\n".join(lines)
    rows = [["#", "id", "special", "trained", "token"]]
    for i, t in enumerate(tokens):
        rows.append([str(i), str(t["id"]), "yes" if t["special"] else "", "yes" if t["trained"] else "",
                     repr(t["token"])])
    widths = [max(len(r[k]) for r in rows) for k in range(len(rows[0]))]
    lines += ["  ".join(c.rjust(w) if k < 2 else c.ljust(w) for k, (c, w) in enumerate(zip(row, widths))).rstrip()
              for row in rows]
    lines.append(f"{len(tokens)} tokens: {sum(t['special'] for t in tokens)} special, "
                 f"{sum(t['trained'] for t in tokens)} trained ({n_chars} of {len(shown['text'])} characters)")
    return "\n".join(lines)
