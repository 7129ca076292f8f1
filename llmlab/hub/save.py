"""Writing a model directory in the Hugging Face layout, atomically.

A model directory holds ``config.json`` (a ``transformers`` config), ``model.safetensors`` (weights under the Hugging
Face names, ``mapping.state_dict_to_hf``), the tokenizer files, ``chat_template.jinja`` and
``generation_config.json``, so that ``transformers.AutoModelForCausalLM.from_pretrained`` loads it as it is.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from torch import nn

from ..chat import end_of_turn_id
from ..errors import LLMLabError
from .mapping import config_to_hf, state_dict_to_hf

# Files a model directory owns; anything else in an existing output directory (run.yaml, checkpoints/) is kept.
MODEL_FILES = re.compile(r"(config\.json|generation_config\.json|model.*\.safetensors(\.index\.json)?|tokenizer.*|"
                         r"special_tokens_map\.json|added_tokens\.json|chat_template\.jinja|vocab\.(txt|json)|"
                         r"merges\.txt)$")


@contextmanager
def atomic_dir(out_dir: Path):
    """Yield an empty staging directory beside ``out_dir``; when the block succeeds, it takes ``out_dir``'s place.

    Entries of an existing ``out_dir`` that are not model files (run.yaml, metrics.jsonl, checkpoints/) are moved
    into the new directory. The swap is two renames on one filesystem: a crash before it leaves the old directory
    untouched, a crash between them leaves both complete copies beside each other; never a half-written one.
    When the block fails, the staging directory is removed and ``out_dir`` is untouched.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise LLMLabError(f"{out_dir} exists and is not a directory")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".saving", dir=out_dir.parent))
    try:
        yield stage
    except BaseException:
        shutil.rmtree(stage, ignore_errors=True)
        raise
    os.chmod(stage, 0o755)
    if not out_dir.exists():
        os.rename(stage, out_dir)
        return
    for entry in out_dir.iterdir():
        if not MODEL_FILES.fullmatch(entry.name) and not (stage / entry.name).exists():
            os.rename(entry, stage / entry.name)
    old = tempfile.mkdtemp(prefix=f".{out_dir.name}.", suffix=".old", dir=out_dir.parent)
    os.rename(out_dir, old)        # replaces the empty placeholder
    os.rename(stage, out_dir)
    shutil.rmtree(old)


def _as_hf_tokenizer(tokenizer):
    """A ``transformers`` tokenizer: passed through, or wrapped around a bare ``tokenizers.Tokenizer``."""
    if hasattr(tokenizer, "save_pretrained"):
        return tokenizer
    from tokenizers import Tokenizer
    if isinstance(tokenizer, Tokenizer):
        from transformers import PreTrainedTokenizerFast
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer)
    raise LLMLabError(f"cannot save a tokenizer of type {type(tokenizer).__name__}: pass a transformers tokenizer "
                      "or a tokenizers.Tokenizer")


def generation_settings(hf_config, tokenizer=None, chat_template: str | None = None,
                        extra: dict | None = None) -> dict:
    """The content of ``generation_config.json``: bos/eos/pad ids, with the end-of-turn id as a second eos when
    there is a chat template, then ``extra`` (e.g. temperature) on top."""
    eos = hf_config.eos_token_id
    eos_ids = list(eos) if isinstance(eos, (list, tuple)) else ([eos] if eos is not None else [])
    if chat_template and tokenizer is not None:
        turn_end = end_of_turn_id(tokenizer, chat_template)
        if turn_end is not None and turn_end not in eos_ids:
            eos_ids.append(turn_end)
    settings = {"bos_token_id": hf_config.bos_token_id,
                "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else (eos_ids or None),
                "pad_token_id": hf_config.pad_token_id}
    return {**settings, **(extra or {})}


def _write_weights(model: nn.Module, path: Path, keep_lm_head: bool = False) -> None:
    from safetensors.torch import save_file
    save_file(state_dict_to_hf(model, keep_lm_head), str(path), metadata={"format": "pt"})


def save_model(model: nn.Module, out_dir, tokenizer=None, chat_template: str | None = None,
               generation_config: dict | None = None, keep_lm_head: bool = False,
               extra_files: dict[str, str] | None = None) -> Path:
    """Write ``model`` (our Decoder or Encoder) as a Hugging Face directory, atomically.

    ``config.json`` and ``model.safetensors`` always; the tokenizer files when ``tokenizer`` is given (a
    transformers tokenizer or a ``tokenizers.Tokenizer``); ``chat_template.jinja`` when ``chat_template`` is given
    (else the tokenizer's own, if any); ``generation_config.json`` from the ids (``generation_config`` adds keys).
    Token ids the model config leaves unset are taken from the tokenizer. ``keep_lm_head``: see
    ``state_dict_to_hf``; ``extra_files`` (name → text) are written in the same atomic step.
    """
    if chat_template and tokenizer is None:
        raise LLMLabError("save_model: a chat_template needs the tokenizer (to find its end-of-turn token id)")
    out_dir = Path(out_dir)
    hf = config_to_hf(model.config)
    hf.dtype = next(model.parameters()).dtype
    if tokenizer is not None:
        tokenizer = _as_hf_tokenizer(tokenizer)
        for field in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(hf, field) is None:
                setattr(hf, field, getattr(tokenizer, field, None))
    template = chat_template or getattr(tokenizer, "chat_template", None)
    with atomic_dir(out_dir) as stage:
        hf.save_pretrained(stage)
        _write_weights(model, stage / "model.safetensors", keep_lm_head)
        for name, text in (extra_files or {}).items():
            (stage / name).write_text(text, encoding="utf-8")
        if tokenizer is not None:
            tokenizer.save_pretrained(stage)
        if chat_template:
            (stage / "chat_template.jinja").write_text(chat_template)
        settings = generation_settings(hf, tokenizer, template, generation_config)
        (stage / "generation_config.json").write_text(json.dumps(settings, indent=2) + "\n")
    return out_dir
