"""``ModelDir``: what a user gave as ``--model``, resolved once into a local Hugging Face folder.

Four things name a model: our own run's model folder, a Hugging Face folder, a hub id (``org/name`` or ``name``,
taken from the local Hugging Face cache or downloaded with ``huggingface_hub.snapshot_download``), and a ``.gguf``
file (converted once into ``$LLMLAB_CACHE/gguf``, see ``gguf.py``). Every stage turns ``--model`` into a
``ModelDir`` and asks it for the folder, the config, the tokenizer and the chat template, so all four work
wherever a model is read.
"""
from __future__ import annotations

import json
import re
from functools import cached_property
from pathlib import Path

from .. import chat
from ..errors import LLMLabError
from ..model.config import context_length

# Fields config.json must have (alternatives separated by |), so that transformers' defaults never stand in.
REQUIRED_FIELDS = {
    "llama": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"),
    "qwen2": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"),
    "qwen3": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"),
    "gemma2": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "head_dim"),
    "gemma3_text": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                    "head_dim"),
    "gpt2": ("vocab_size", "n_embd|hidden_size", "n_layer|num_hidden_layers", "n_head|num_attention_heads"),
    "bert": ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads"),
}
HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")
# What a hub download fetches: configs, weights, tokenizer files and templates (not other formats' weights).
HUB_FILES = ["*.json", "*.safetensors", "*.jinja", "tokenizer*", "*.txt", "*.model"]


class ModelDir:
    """A model folder, resolved from a folder, a hub id or a ``.gguf`` file when it is made.

    ``path`` is the local folder, ``name`` a display name, ``config`` the parsed ``transformers`` config (read
    once), ``context`` the model's maximum positions; ``tokenizer()`` and ``template(override)`` load the rest.
    """

    def __init__(self, given):
        self.given = str(given)
        self.path = _resolve(given)

    @classmethod
    def of(cls, model) -> "ModelDir":
        """``model`` if it is a ModelDir already, else the ModelDir of that path or name."""
        return model if isinstance(model, ModelDir) else cls(model)

    def __repr__(self) -> str:
        return f"ModelDir({self.given!r} → {str(self.path)!r})"

    @property
    def name(self) -> str:
        """A readable name for what the user gave (``model_name``)."""
        return model_name(self.given)

    @cached_property
    def raw_config(self) -> dict:
        """``config.json`` as a dict, checked by ``read_config_json``."""
        return read_config_json(self.path)

    @cached_property
    def config(self):
        """The folder's ``transformers`` config, after ``read_config_json``'s checks."""
        import transformers

        model_type = self.raw_config["model_type"]
        try:
            return transformers.AutoConfig.from_pretrained(self.path)
        except (ValueError, KeyError, TypeError, OSError) as e:
            raise LLMLabError(f"{self.path}/config.json: transformers cannot read it (model_type "
                              f"{model_type!r}): {e}") from e

    @property
    def context(self) -> int:
        return context_length(self.config)

    def tokenizer(self):
        """The folder's tokenizer (a fresh ``AutoTokenizer``, chat template included), or an LLMLabError naming the
        folder when it has none or it does not load."""
        from ..tokenizer import load_tokenizer
        return load_tokenizer(self.path)

    def template(self, override: str | None = None) -> str:
        """The chat template: ``override`` (a built-in name or a ``.jinja`` file), else the folder's own, else the
        default (``chat.load_template``)."""
        return chat.load_template(self.path, override)


def tokenizer_of(given):
    """The tokenizer of what ``--model`` names, as ``ModelDir(given).tokenizer()`` gives it, except that a ``.gguf``
    file not converted yet has its tokenizer read from its metadata (``gguf.gguf_tokenizer``) rather than the whole
    model dequantized first."""
    p = Path(str(given)).expanduser()
    if p.suffix == ".gguf" and not p.is_dir():
        from .gguf import gguf_tokenizer
        return gguf_tokenizer(p)
    return ModelDir(given).tokenizer()


def model_name(given) -> str:
    """A readable name for a model path or hub id: the file's stem or the folder's name, or the parent's when the
    folder is just ``model`` (our run directories, some packages): ``runs/sft/model`` → ``sft``,
    ``org/name`` → ``name``."""
    p = Path(str(given).rstrip("/"))
    if p.suffix == ".gguf":
        return p.stem
    return p.parent.name if p.name == "model" and p.parent.name else p.name


def _resolve(given) -> Path:
    """A local folder for ``given``: a directory as is; a ``.gguf`` file converted once into the cache; a hub id
    from the local Hugging Face cache or a download."""
    p = Path(given).expanduser()
    if p.is_dir():
        return p
    if p.suffix == ".gguf":
        from .gguf import converted
        return converted(p)
    if p.exists():
        raise LLMLabError(f"{p} is neither a model directory nor a .gguf file")
    if HUB_ID.fullmatch(str(given)):
        return _download(str(given))
    raise LLMLabError(f"model directory not found: {p}")


def _download(hub_id: str) -> Path:
    from huggingface_hub import constants, snapshot_download
    try:
        return Path(snapshot_download(hub_id, allow_patterns=HUB_FILES))
    except Exception as e:
        why = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else type(e).__name__
        raise LLMLabError(f"{hub_id}: no such model directory, and the Hugging Face model of that name is not in "
                          f"the local cache and could not be downloaded ({why})") from e


def read_config_json(folder: Path) -> dict:
    """``config.json`` as a dict, checked: valid JSON, a ``model_type``, and for the families we map every
    field that would otherwise silently take a transformers default."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        raise LLMLabError(f"{folder}: no config.json (not a Hugging Face model directory)")
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise LLMLabError(f"{path}: invalid JSON at line {e.lineno}: {e.msg}") from e
    if not isinstance(raw, dict) or not isinstance(raw.get("model_type"), str):
        raise LLMLabError(f"{path}: missing field 'model_type' (e.g. \"llama\", \"gpt2\", \"bert\")")
    for field in REQUIRED_FIELDS.get(raw["model_type"], ()):
        names = field.split("|")
        value = next((raw[n] for n in names if n in raw), None)
        if value is None:
            raise LLMLabError(f"{path}: missing field '{names[0]}' for model_type {raw['model_type']!r}")
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise LLMLabError(f"{path}: field '{names[0]}' must be a positive integer, got {value!r}")
    return raw
