"""Reading a model folder's weights into our model, or into ``transformers``' own when ours has no equivalent.

``load_model`` returns our ``Decoder`` when the architecture maps (``mapping.py``), the ``transformers`` model itself
when it does not (Mistral, Phi, a RoPE type other than llama3, ...); ``load_our_model`` is for the training stages,
which need ours; ``load_encoder`` reads a BERT encoder. Each takes a ``ModelDir`` or anything ``ModelDir`` resolves.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch
from torch import nn

from ..device import parse_dtype
from ..errors import LLMLabError
from ..model.decoder import build_empty, init_weights
from .folder import ModelDir
from .mapping import config_from_hf, load_hf_state_dict, unsupported, weight_plan


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """All tensors of a folder's ``model.safetensors`` (or its shards, or ``pytorch_model.bin`` loaded with
    ``weights_only=True``)."""
    from safetensors.torch import load_file

    folder = Path(folder)
    index = folder / "model.safetensors.index.json"
    if (folder / "model.safetensors").is_file():
        files = [folder / "model.safetensors"]
    elif index.is_file():
        try:
            files = [folder / f for f in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise LLMLabError(f"{index}: not a valid safetensors index ({e})") from e
    elif (folder / "pytorch_model.bin").is_file():
        try:
            return torch.load(folder / "pytorch_model.bin", map_location="cpu", weights_only=True)
        except Exception as e:
            raise LLMLabError(f"{folder / 'pytorch_model.bin'}: unreadable weights ({e})") from e
    else:
        raise LLMLabError(f"{folder}: no model.safetensors (nor an index or pytorch_model.bin)")
    state = {}
    for f in files:
        try:
            state.update(load_file(str(f)))
        except Exception as e:    # safetensors raises its own error types for corrupt headers and data
            raise LLMLabError(f"{f}: corrupt or unreadable safetensors file ({e})") from e
    return state


def load_model(model, *, device="cpu", dtype=None) -> nn.Module:
    """A causal language model for inference from our directory, a Hugging Face folder or hub id, or a ``.gguf``
    file (its tokenizer: ``ModelDir.tokenizer()``).

    Llama, Qwen2, Qwen3, Gemma 2, Gemma 3 (text) and GPT-2 causal LMs become our ``Decoder`` with the weights
    imported (and the folder's ``generation_config`` attached as ``model.generation_config``); any other causal LM
    is returned as the ``transformers`` model itself (``AutoModelForCausalLM``, eval mode). ``dtype`` defaults to
    float32.
    """
    model = ModelDir.of(model)
    if model.config.model_type == "bert":
        raise LLMLabError(f"{model.path} is a BERT encoder, not a causal language model: use load_encoder")
    if unsupported(model.config) is None:
        return _to(_build_ours(model, {}), device, dtype)
    from transformers import AutoModelForCausalLM
    try:
        loaded = AutoModelForCausalLM.from_pretrained(model.path, dtype=torch.float32).eval()
    except Exception as e:
        raise LLMLabError(f"{model.path}: transformers cannot load it as a causal LM ({type(e).__name__}: {e})") from e
    return _to(loaded, device, dtype)


def load_our_model(model, **overrides) -> nn.Module:
    """Our Decoder or Encoder from our directory or a mappable Hugging Face folder, for training stages;
    ``overrides`` replace config fields (e.g. ``num_labels=2`` adds a fresh classification head)."""
    model = ModelDir.of(model)
    reason = unsupported(model.config)
    if reason:
        raise LLMLabError(f"{model.path}/config.json: no llmlab model for this architecture: {reason}; training "
                          "stages need a Llama, Qwen2, Qwen3, Gemma 2, Gemma 3, GPT-2 or BERT model")
    return _build_ours(model, overrides)


def load_encoder(model, *, device="cpu", dtype=None, **overrides) -> nn.Module:
    """Our Encoder from our directory or a Hugging Face BERT folder (``BertModel``, ``BertForMaskedLM``,
    ``BertForSequenceClassification``)."""
    model = ModelDir.of(model)
    if model.config.model_type != "bert":
        raise LLMLabError(f"{model.path}/config.json: model_type {model.config.model_type!r} is not a BERT encoder")
    return _to(load_our_model(model, **overrides), device, dtype)


def _to(model: nn.Module, device, dtype) -> nn.Module:
    dtype = parse_dtype(dtype) if isinstance(dtype, str) or dtype is None else dtype
    return model.to(device=device, dtype=dtype or torch.float32)


def _build_ours(model: ModelDir, overrides: dict) -> nn.Module:
    folder = model.path
    try:
        cfg = config_from_hf(model.config)
        if overrides:
            cfg = dataclasses.replace(cfg, **overrides)
    except LLMLabError as e:
        raise LLMLabError(f"{folder}/config.json: {e}") from e
    except TypeError as e:
        raise LLMLabError(f"unknown model field in overrides {sorted(overrides)}: {e}") from e
    built = build_empty(cfg)
    try:
        absent = load_hf_state_dict(built, read_weights(folder))
    except LLMLabError as e:
        raise LLMLabError(f"{folder}: {e}") from e
    ours = {e.hf: e.ours for e in weight_plan(cfg)}
    init_weights(built, cfg, only={ours[name] for name in absent})     # e.g. a new classification head
    if (folder / "generation_config.json").is_file():
        from transformers import GenerationConfig
        built.generation_config = GenerationConfig.from_pretrained(folder)
    return built.eval()
