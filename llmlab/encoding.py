"""How text becomes a prompt's token ids, the same way for every entry point (generate, serve, chat, eval, PPO).

Two kinds of text, two rules, as in ``transformers``:

- **raw text** (``llmlab generate --prompt``, ``/v1/completions``): encoded as the model's tokenizer does by
  default, ``tokenizer(text)``, so a model whose tokenizer puts a BOS token in front (Gemma, Llama) sees it. Gemma
  without its ``<bos>`` repeats one word ("The The The ..."). Only the special tokens *before* the text are kept:
  a prompt is continued, so an EOS a tokenizer would append is left out. A text that already starts with the BOS
  string gets no second one.
- **a rendered chat template**: the template writes every special token it wants (Gemma's and Llama's start with
  ``{{ bos_token }}``), so nothing is added (``apply_chat_template(tokenize=True)`` encodes so too).
"""
from __future__ import annotations


def special_affixes(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text by default ([CLS] … [SEP] for BERT, <bos> … for Gemma,
    nothing for GPT-2 or SmolLM2), found by encoding a probe with and without special tokens."""
    bare = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for i in range(len(full) - len(bare) + 1):
        if full[i:i + len(bare)] == bare:
            return full[:i], full[i + len(bare):]
    return [], []


def encode_text(tokenizer, text: str) -> list[int]:
    """Token ids of a raw-text prompt: the tokenizer's leading special tokens (its BOS, if it adds one), then the
    text; no BOS is added to a text that already begins with the BOS string."""
    prefix, _ = special_affixes(tokenizer)
    if tokenizer.bos_token and text.startswith(tokenizer.bos_token):
        prefix = []
    return list(prefix) + tokenizer.encode(text, add_special_tokens=False)


def encode_rendered(tokenizer, text: str) -> list[int]:
    """Token ids of a prompt rendered by a chat template: exactly the text's tokens, nothing added."""
    return tokenizer.encode(text, add_special_tokens=False)
