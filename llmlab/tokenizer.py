"""Tokenizers: train our own (byte-level BPE or character-level), save and load any Hugging Face tokenizer.

Our tokenizers reserve ids 0..5 for the special tokens, in this order: ``<|bos|>``, ``<|eos|>``, ``<|pad|>``,
``<|mask|>`` (the encoder's masked-LM token), ``<|im_start|>``, ``<|im_end|>`` (the chat turns of our default,
ChatML-shaped template). Nothing is added automatically when encoding: each stage writes BOS/EOS itself.

``llmlab tokenizer train --data PATH [PATH ...] --vocab-size N --out DIR [--char] [--text-field text]``
trains one from ``.txt`` files (a file is one document) and ``.jsonl`` / ``.jsonl.gz`` files (a text field per
line) or folders of them, and writes a folder that ``transformers.AutoTokenizer.from_pretrained`` loads.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from .chat import DEFAULT_TEMPLATE, TEMPLATES, save_template
from .data.sources import iter_documents_many
from .errors import LLMLabError
from .progress import progress_bar

BOS = "<|bos|>"
EOS = "<|eos|>"
PAD = "<|pad|>"
MASK = "<|mask|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
SPECIAL_TOKENS = (BOS, EOS, PAD, MASK, IM_START, IM_END)  # ids 0..5
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.txt", "vocab.json")
BYTE_ALPHABET_SIZE = 256


def _wrap(backend: Tokenizer) -> PreTrainedTokenizerFast:
    """A transformers tokenizer around ``backend``, with our special tokens named."""
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=PAD, mask_token=MASK,
        additional_special_tokens=[IM_START, IM_END], clean_up_tokenization_spaces=False,
    )


def train_bpe(texts: Iterable[str], vocab_size: int, min_frequency: int = 2, *, split_digits: bool = True,
              show_progress: bool = False) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer (GPT-2 style) on ``texts``.

    Every one of the 256 bytes is in the vocabulary and text is split into bytes before merging, so
    ``decode(encode(x)) == x`` for every Unicode string; no normaliser, no prefix space. ``vocab_size`` counts
    the specials and the byte alphabet, so it must be at least 256 + 6. With ``split_digits`` (the default, as
    in Llama and DeepSeek) every digit is its own token, so ``"47"`` is ``4``, ``7`` and a model can learn
    arithmetic digit by digit instead of memorising one token per number.
    """
    smallest = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)
    if vocab_size < smallest:
        raise LLMLabError(f"vocab_size {vocab_size} is too small for a byte-level BPE: it needs at least {smallest} "
                          f"(256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    backend = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.pre_tokenizer = (pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
                             if split_digits else byte_level)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=min_frequency,
                                  special_tokens=list(SPECIAL_TOKENS),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=show_progress)
    backend.train_from_iterator(texts, trainer=trainer)
    return _wrap(backend)


def train_char(texts: Iterable[str], *, show_progress: bool = False) -> PreTrainedTokenizerFast:
    """A character-level tokenizer (as nanoGPT's shakespeare_char): one token per distinct character of ``texts``.

    Ids: the 6 specials, then the characters in sorted order. Encoding a character that is not in the vocabulary
    raises an exception from the ``tokenizers`` library ("WordLevel error: Missing [UNK] token from the
    vocabulary"): there is deliberately no unknown token, so a character never silently disappears.
    """
    chars: set[str] = set()
    for text in progress_bar(texts, desc="reading", unit="doc", disable=not show_progress):
        chars.update(text)
    if not chars:
        raise LLMLabError("train_char: the corpus is empty")
    vocab = {token: i for i, token in enumerate(SPECIAL_TOKENS)}
    for char in sorted(chars):
        vocab[char] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    return _wrap(backend)


def is_llmlab_tokenizer(tokenizer) -> bool:
    """Whether ``tokenizer`` has our special tokens at ids 0..5."""
    return [tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS] == list(range(len(SPECIAL_TOKENS)))


def save_tokenizer(tokenizer, out_dir, chat_template: str | None = None) -> Path:
    """Save in the Hugging Face layout (``tokenizer.json``, ``tokenizer_config.json`` with the special tokens).

    ``chat_template`` (a template string) is written to ``chat_template.jinja``; when it is None, our own
    tokenizers get the ``llmlab`` default template and other tokenizers keep whatever template they carry.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if chat_template is None and is_llmlab_tokenizer(tokenizer):
        chat_template = TEMPLATES[DEFAULT_TEMPLATE]
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    tokenizer.save_pretrained(out)
    if chat_template is not None:
        save_template(out, chat_template)
    return out


def load_tokenizer(path_or_name) -> PreTrainedTokenizerFast:
    """Any Hugging Face tokenizer: a local folder (a tokenizer's or a model's) or a hub name (which needs the
    network or the local cache); an LLMLabError naming the folder when it holds none or it does not load."""
    source = str(path_or_name)
    path = Path(source).expanduser()
    if path.is_dir():
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise LLMLabError(f"{path}: no tokenizer files in this folder ({' / '.join(TOKENIZER_FILES)})")
        try:
            return AutoTokenizer.from_pretrained(path)
        except Exception as e:      # transformers raises many types for a broken tokenizer folder
            raise LLMLabError(f"{path}: cannot load the tokenizer ({type(e).__name__}: {e})") from e
    if path.exists() or _looks_like_path(source):
        raise LLMLabError(f"tokenizer folder not found: {source}")
    try:
        return AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError) as e:
        raise LLMLabError(f"cannot load tokenizer {source!r}: not a local folder, and the Hugging Face Hub could not "
                          f"provide it (no network, or no such repository): {e}") from None


def _looks_like_path(source: str) -> bool:
    """A hub name is ``name`` or ``owner/name``; anything with more slashes, a leading dot or ``~`` is a path."""
    return source.startswith((".", "/", "~")) or source.count("/") > 1 or "\\" in source


def special_ids(tokenizer) -> dict:
    """The ``bos``/``eos``/``pad``/``mask`` token ids (None where the tokenizer has none)."""
    return {name: getattr(tokenizer, f"{name}_token_id", None) for name in ("bos", "eos", "pad", "mask")}


def ensure_pad_token(tokenizer):
    """Give a tokenizer without a pad token (GPT-2 style) one, and return it.

    The pad token becomes the EOS token (no new embedding row is needed). Padding must then be told apart by the
    attention mask or by the labels, never by the pad id: masking every EOS id away would hide the real EOS
    that teaches the model to stop. A tokenizer with neither gets a new ``<|pad|>`` token (resize the model's
    embeddings to ``len(tokenizer)``).
    """
    if tokenizer.pad_token is not None:
        return tokenizer
    if tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    else:
        tokenizer.add_special_tokens({"pad_token": PAD})
    return tokenizer


def register(subparsers) -> None:
    """``llmlab tokenizer train ...``"""
    parser = subparsers.add_parser("tokenizer", help="train a tokenizer")
    actions = parser.add_subparsers(dest="tokenizer_command", required=True, metavar="<action>")
    train = actions.add_parser("train", help="train a byte-level BPE (or --char) tokenizer on text files")
    train.add_argument("--data", nargs="+", required=True, metavar="PATH",
                       help=".txt (one document per file), .jsonl / .jsonl.gz (a text field per line), or folders")
    train.add_argument("--vocab-size", type=int, help="BPE vocabulary size, specials and 256 bytes included")
    train.add_argument("--out", required=True, help="output folder")
    train.add_argument("--char", action="store_true", help="character-level tokenizer (no --vocab-size)")
    train.add_argument("--text-field", default="text", help="the JSONL field holding the text (default: text)")
    train.add_argument("--min-frequency", type=int, default=2, help="BPE: least count of a pair to merge it")
    train.set_defaults(func=_train_command)


def _train_command(args) -> int:
    documents = iter_documents_many(args.data, text_field=args.text_field)
    if args.char:
        tokenizer = train_char(documents, show_progress=True)
    elif args.vocab_size is None:
        raise LLMLabError("tokenizer train: give --vocab-size N (or --char for a character-level tokenizer)")
    else:
        tokenizer = train_bpe(documents, args.vocab_size, args.min_frequency, show_progress=True)
    out = save_tokenizer(tokenizer, args.out)
    print(f"wrote a {'character' if args.char else 'BPE'} tokenizer with {len(tokenizer)} tokens to {out}")
    return 0
