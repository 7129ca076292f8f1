"""GGUF files (llama.cpp's format) as Hugging Face folders: each file is dequantized once into the llmlab cache.

transformers reads a GGUF file (``from_pretrained(folder, gguf_file=name)``) but refuses to ``save_pretrained`` the
model it builds from one, and dequantizing takes long for a real model; so the first use converts the file into a
plain float32 folder, ``cache_dir(path)``, and every later use reads that folder.
"""
from __future__ import annotations

import copy
import hashlib
import json
from pathlib import Path

import torch

from ..config import cache_root
from ..errors import LLMLabError
from .save import atomic_dir, generation_settings


SAMPLES, SAMPLE_BYTES = 64, 1 << 16


def cache_dir(gguf_path) -> Path:
    """Where the converted folder of a ``.gguf`` file lives: ``$LLMLAB_CACHE/gguf/<name>-<size>-<fingerprint>``
    (default ``~/.cache/llmlab``).

    The fingerprint is a hash of the file's content, not of its path or modification time, so the same model
    installed in another virtual environment (each ``pip install`` writes a new copy) finds the folder converted
    before, while a changed file is converted again. It hashes ``SAMPLES`` evenly spaced blocks of
    ``SAMPLE_BYTES`` (the header and the end included) rather than the whole file: 4 MiB read instead of hundreds,
    and an edit that keeps the size and touches none of the blocks is the one change it misses."""
    path = Path(gguf_path).resolve()
    size = path.stat().st_size
    digest = hashlib.sha256(str(size).encode())
    with path.open("rb") as f:
        for i in range(SAMPLES):
            f.seek(i * max(size - SAMPLE_BYTES, 0) // (SAMPLES - 1))
            digest.update(f.read(SAMPLE_BYTES))
    return cache_root() / "gguf" / f"{path.stem}-{size}-{digest.hexdigest()[:12]}"


def converted(gguf_path: Path) -> Path:
    """The cached Hugging Face folder of ``gguf_path``, converting the file first when it has none."""
    if not gguf_path.is_file():
        raise LLMLabError(f"GGUF file not found: {gguf_path}")
    dest = cache_dir(gguf_path)
    if not (dest / "config.json").is_file():
        convert(gguf_path, dest)
    return dest


def gguf_tokenizer(gguf_path: Path):
    """The tokenizer of a ``.gguf`` file without its weights: the converted folder's when the file was converted
    already, else read from the file's metadata (seconds), so that a command that needs only the tokenizer
    (``llmlab tokenize``) does not dequantize the whole model."""
    from transformers import AutoTokenizer

    from ..tokenizer import load_tokenizer

    if not gguf_path.is_file():
        raise LLMLabError(f"GGUF file not found: {gguf_path}")
    folder = cache_dir(gguf_path)
    if (folder / "config.json").is_file():
        return load_tokenizer(folder)
    try:
        return AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    except Exception as e:      # transformers raises many types for a file it cannot read
        raise LLMLabError(f"{gguf_path}: transformers cannot read the tokenizer of this GGUF file "
                          f"({type(e).__name__}: {e})") from e


def convert(gguf_path: Path, dest: Path) -> None:
    """Dequantize a GGUF file into a plain Hugging Face folder ``dest`` (written atomically).

    A plain model is rebuilt from the loaded config without its ``quantization_config`` and the weights are copied
    in, because transformers refuses ``save_pretrained`` on a GGUF-loaded model.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_path.parent, gguf_path.name
    try:
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    except Exception as e:
        raise LLMLabError(f"{gguf_path}: transformers cannot load this GGUF file ({type(e).__name__}: {e})") from e
    config = copy.deepcopy(loaded.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict())
    with atomic_dir(dest) as stage:
        plain.save_pretrained(stage)
        tokenizer.save_pretrained(stage)
        settings = generation_settings(config, tokenizer, tokenizer.chat_template)
        (stage / "generation_config.json").write_text(json.dumps(settings, indent=2) + "\n")
