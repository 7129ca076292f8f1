"""Our model configs and weights in the Hugging Face layout: one translation, used in both directions.

Our configurations map onto these Hugging Face families:

    ours                                          Hugging Face
    decoder, rmsnorm + rope + swiglu              LlamaForCausalLM   (Llama 2, 3, 3.1/3.2 with rope_scaling llama3,
                                                                      SmolLM2: tied embeddings)
    ... with qkv_bias                             Qwen2ForCausalLM   (Qwen2, Qwen2.5; sliding-window layers)
    ... with qk_norm                              Qwen3ForCausalLM
    decoder, the gemma2 preset's switches         Gemma2ForCausalLM  (soft-capping; sliding-window layers)
    decoder, the gemma3 preset's switches         Gemma3ForCausalLM  (model_type gemma3_text; sliding-window layers)
    decoder, layernorm + learned + gelu(_tanh)    GPT2LMHeadModel
    encoder, post-norm layernorm + learned + gelu BertForMaskedLM
    ... with num_labels > 0                       *ForSequenceClassification (heads ``score`` / ``classifier``)

Weights map name by name through one table per family (``weight_plan``), used in both directions. Our fused
matrices are split into row ranges: ``qkv`` = [W_q; W_k; W_v] ↔ q_proj, k_proj, v_proj (query, key, value in BERT),
and the SwiGLU ``up`` = [W_gate; W_up] ↔ gate_proj, up_proj. GPT-2 keeps its fused ``c_attn`` but stores every
projection as a Conv1D, i.e. the transposed matrix Wᵀ. Tied weights (lm_head = embed, the BERT decoder = word
embeddings) are written once, under the embedding's name, as ``save_pretrained`` does. Gemma's RMSNorm scales by
(1 + w) where ours scales by g, so its norm gains are folded on import, g = w + 1, and unfolded on export, w = g − 1.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch
from torch import nn

from ..errors import LLMLabError
from ..model.config import ROPE_SCALING_KEYS, ModelConfig, preset

FAMILIES = ("llama", "qwen2", "qwen3", "gemma2", "gemma3_text", "gpt2", "bert")      # transformers' model_type
ARCHITECTURES = {   # family → (language-model head, classification head)
    "llama": ("LlamaForCausalLM", "LlamaForSequenceClassification"),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification"),
    "qwen3": ("Qwen3ForCausalLM", "Qwen3ForSequenceClassification"),
    "gemma2": ("Gemma2ForCausalLM", "Gemma2ForSequenceClassification"),
    "gemma3_text": ("Gemma3ForCausalLM", "Gemma3TextForSequenceClassification"),
    "gpt2": ("GPT2LMHeadModel", "GPT2ForSequenceClassification"),
    "bert": ("BertForMaskedLM", "BertForSequenceClassification"),
}
# Buffers some checkpoints carry that are not weights (recomputed by every implementation).
IGNORED_KEYS = re.compile(r"(position_ids|rotary_emb\.inv_freq|\.attn\.bias|\.attn\.masked_bias)$")


# ----------------------------------------------------------------------------------------------- configurations

def _family(cfg: ModelConfig) -> str:
    """The Hugging Face family that represents ``cfg`` exactly, or an LLMLabError naming the first field that
    no family can represent."""
    def need(field: str, value, why: str) -> None:
        if getattr(cfg, field) != value:
            raise LLMLabError(f"model.{field} = {getattr(cfg, field)!r} has no Hugging Face equivalent here: {why} "
                              f"needs model.{field} = {value!r}")

    if cfg.arch == "encoder":
        for field, value in (("norm", "layernorm"), ("norm_position", "post"), ("pos", "learned"), ("mlp", "gelu"),
                             ("bias", True), ("qkv_bias", False), ("qk_norm", False), ("attn_softcap", None),
                             ("rope_scaling", None), ("n_kv_head", cfg.n_head),
                             ("head_dim", cfg.d_model // cfg.n_head)):
            need(field, value, "BERT")
        if cfg.type_vocab_size <= 0:
            raise LLMLabError("model.type_vocab_size = 0 has no Hugging Face equivalent: BERT always has token-type "
                              "embeddings (use type_vocab_size ≥ 1)")
        return "bert"
    need("norm_position", "pre", "a decoder (Llama, Qwen, Gemma, GPT-2)")
    if cfg.post_block_norms:      # Gemma: with QK-norm Gemma 3, without it Gemma 2
        why = "Gemma 3 (post_block_norms and qk_norm)" if cfg.qk_norm else "Gemma 2 (post_block_norms, no qk_norm)"
        for field, value in (("norm", "rmsnorm"), ("pos", "rope"), ("mlp", "geglu"), ("bias", False),
                             ("qkv_bias", False), ("embed_scale", True)):
            need(field, value, why)
        if cfg.qk_norm:
            for field in ("attn_softcap", "logit_softcap", "rope_scaling"):
                need(field, None, why)
            return "gemma3_text"
        need("rope_local_theta", None, why + " with one RoPE θ")
        return "gemma2"
    why = "a decoder without post_block_norms (Llama, Qwen, GPT-2)"
    for field, value in (("embed_scale", False), ("attn_scale", None), ("attn_softcap", None),
                         ("logit_softcap", None)):
        need(field, value, why)
    family = None
    if cfg.pos == "rope":
        for field, value in (("norm", "rmsnorm"), ("mlp", "swiglu")):
            need(field, value, "Llama (RoPE)")
        if cfg.qk_norm:
            for field in ("bias", "qkv_bias"):
                need(field, False, "Qwen3 (Llama with QK-norm)")
            family = "qwen3"
        elif cfg.qkv_bias:
            need("bias", False, "Qwen2 (biases on q, k, v only: qkv_bias)")
            family = "qwen2"
        else:
            family = "llama"
    if any(cfg.window(i) for i in range(cfg.n_layer)):
        if family != "qwen2":
            raise LLMLabError(f"model.layer_types = {cfg.layer_types!r} has no Hugging Face equivalent here: {why} "
                              "needs every layer 'full' (only Qwen2, i.e. qkv_bias, has sliding-window layers)")
        need("rope_local_theta", None, "Qwen2 (one RoPE θ)")
    if family:
        return family
    for field, value in (("qkv_bias", False), ("rope_scaling", None)):
        need(field, value, "GPT-2 (learned positions)")
    need("norm", "layernorm", "GPT-2 (learned positions)")
    if cfg.mlp not in ("gelu", "gelu_tanh"):
        raise LLMLabError(f"model.mlp = {cfg.mlp!r} has no Hugging Face equivalent: GPT-2 (learned positions) needs "
                          "model.mlp = 'gelu' or 'gelu_tanh'")
    for field, value in (("bias", True), ("qk_norm", False), ("n_kv_head", cfg.n_head),
                         ("head_dim", cfg.d_model // cfg.n_head)):
        need(field, value, "GPT-2")
    return "gpt2"


def hf_layout_problem(cfg: ModelConfig) -> str | None:
    """Why ``cfg`` has no Hugging Face equivalent (the error ``save_model`` would raise), or None when it has one."""
    try:
        _family(cfg)
    except LLMLabError as e:
        return str(e)
    return None


def config_to_hf(cfg: ModelConfig):
    """The ``transformers`` config (with ``architectures``) that describes the same network as ``cfg``."""
    import transformers

    family = _family(cfg)
    common = dict(vocab_size=cfg.vocab_size, initializer_range=cfg.init_std, tie_word_embeddings=cfg.tie_embeddings,
                  bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id, pad_token_id=cfg.pad_token_id)
    if cfg.num_labels:
        common["num_labels"] = cfg.num_labels
    if family in ("llama", "qwen2", "qwen3"):
        fields = dict(hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layer,
                      num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim,
                      max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps, hidden_act="silu",
                      rope_parameters=_rope_parameters(cfg), attention_dropout=cfg.dropout)
        if family == "llama":
            hf = transformers.LlamaConfig(attention_bias=cfg.bias, mlp_bias=cfg.bias, **fields, **common)
        elif family == "qwen2":     # q, k, v biases are built in
            window = cfg.sliding_window if any(cfg.window(i) for i in range(cfg.n_layer)) else None
            hf = transformers.Qwen2Config(use_sliding_window=window is not None, sliding_window=window,
                                          layer_types=_hf_layer_types(cfg), **fields, **common)
        else:
            hf = transformers.Qwen3Config(attention_bias=False, **fields, **common)
    elif family == "gemma2":
        hf = transformers.Gemma2Config(**_gemma_fields(cfg), rope_parameters=_rope_parameters(cfg),
                                       final_logit_softcapping=cfg.logit_softcap,
                                       attn_logit_softcapping=cfg.attn_softcap, **common)
    elif family == "gemma3_text":
        local_theta = cfg.rope_local_theta or cfg.rope_theta
        hf = transformers.Gemma3TextConfig(
            **_gemma_fields(cfg), **common,
            rope_parameters={"full_attention": {"rope_type": "default", "rope_theta": cfg.rope_theta},
                             "sliding_attention": {"rope_type": "default", "rope_theta": local_theta}})
    elif family == "gpt2":
        hf = transformers.GPT2Config(n_embd=cfg.d_model, n_layer=cfg.n_layer, n_head=cfg.n_head, n_inner=cfg.d_ff,
                                     n_positions=cfg.max_seq_len, layer_norm_epsilon=cfg.norm_eps,
                                     activation_function="gelu_new" if cfg.mlp == "gelu_tanh" else "gelu",
                                     resid_pdrop=cfg.dropout, embd_pdrop=cfg.dropout, attn_pdrop=cfg.dropout,
                                     **common)
    else:
        hf = transformers.BertConfig(hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layer,
                                     num_attention_heads=cfg.n_head, intermediate_size=cfg.d_ff,
                                     max_position_embeddings=cfg.max_seq_len, type_vocab_size=cfg.type_vocab_size,
                                     layer_norm_eps=cfg.norm_eps, hidden_act="gelu",
                                     hidden_dropout_prob=cfg.dropout, attention_probs_dropout_prob=cfg.dropout,
                                     **common)
    hf.architectures = [ARCHITECTURES[family][cfg.num_labels > 0]]
    return hf


def _rope_parameters(cfg: ModelConfig) -> dict:
    """config.json's ``rope_parameters`` (``rope_scaling`` before transformers 5) for one RoPE θ."""
    return {"rope_type": "default", "rope_theta": cfg.rope_theta, **(cfg.rope_scaling or {})}


def _rope_scaling(rope_parameters: dict) -> dict | None:
    """Our ``rope_scaling`` from config.json's RoPE parameters (whose type ``unsupported`` has checked)."""
    if rope_parameters["rope_type"] == "default":
        return None
    return {"rope_type": "llama3", **{k: rope_parameters[k] for k in ROPE_SCALING_KEYS}}


def _hf_layer_types(cfg: ModelConfig) -> list[str]:
    return [f"{'sliding' if cfg.window(i) else 'full'}_attention" for i in range(cfg.n_layer)]


def _layer_windows(hf) -> dict:
    """Our ``layer_types`` and ``sliding_window`` from a config's ``layer_types`` (None when no layer slides)."""
    types = ["sliding" if kind == "sliding_attention" else "full" for kind in hf.layer_types]
    if "sliding" not in types or hf.sliding_window is None:
        return dict(layer_types=None, sliding_window=None)
    return dict(layer_types=types, sliding_window=hf.sliding_window)


def _gemma_fields(cfg: ModelConfig) -> dict:
    """The fields Gemma2Config and Gemma3TextConfig share: attn_scale = query_pre_attn_scalar^-½ (an integer
    there), and a mask per layer type (full_attention: causal; sliding_attention: ``sliding_window``; transformers
    wants a window even when no layer slides, and then never uses it)."""
    scalar = cfg.head_dim if cfg.attn_scale is None else cfg.attn_scale ** -2
    if abs(scalar - round(scalar)) > 1e-6:
        raise LLMLabError(f"model.attn_scale = {cfg.attn_scale!r} has no Hugging Face equivalent here: Gemma needs "
                          "attn_scale = n^-½ for an integer query_pre_attn_scalar n")
    return dict(hidden_size=cfg.d_model, intermediate_size=cfg.d_ff, num_hidden_layers=cfg.n_layer,
                num_attention_heads=cfg.n_head, num_key_value_heads=cfg.n_kv_head, head_dim=cfg.head_dim,
                max_position_embeddings=cfg.max_seq_len, rms_norm_eps=cfg.norm_eps,
                hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=round(scalar),
                sliding_window=cfg.sliding_window or cfg.max_seq_len, layer_types=_hf_layer_types(cfg),
                attention_bias=False, attention_dropout=cfg.dropout)


def unsupported(hf) -> str | None:
    """Why ``hf`` (a transformers config) has no exact llmlab equivalent, or None when it has one."""
    family = hf.model_type
    if family not in FAMILIES:
        return f"model_type {family!r} (llmlab maps {', '.join(FAMILIES)})"
    checks = []
    layer_kinds = ("layer_types", set(getattr(hf, "layer_types", None) or ()) <= {"full_attention",
                                                                                 "sliding_attention"}, True)
    if family in ("llama", "qwen2", "qwen3", "gemma2"):
        # one RoPE for every layer; "rope_scaling" in config.json, "rope_parameters" since transformers 5
        checks.append(("rope_scaling.rope_type", (hf.rope_parameters or {}).get("rope_type"), ("default", "llama3")))
    if family in ("llama", "qwen2", "qwen3"):
        checks.append(("hidden_act", hf.hidden_act, "silu"))
        if family == "llama":
            checks.append(("mlp_bias", hf.mlp_bias, hf.attention_bias))
        elif family == "qwen2":
            checks.append(layer_kinds)
        else:
            checks += [("attention_bias", hf.attention_bias, False),
                       ("use_sliding_window", hf.use_sliding_window, False)]
    elif family == "gemma2":
        checks += [("hidden_activation", hf.hidden_activation, "gelu_pytorch_tanh"),
                   ("attention_bias", hf.attention_bias, False),
                   ("use_bidirectional_attention", hf.use_bidirectional_attention, (None, False)), layer_kinds]
    elif family == "gemma3_text":
        rope = hf.rope_parameters or {}
        checks += [("hidden_activation", hf.hidden_activation, "gelu_pytorch_tanh"),
                   ("attention_bias", hf.attention_bias, False),
                   ("use_bidirectional_attention", hf.use_bidirectional_attention, False),
                   ("attn_logit_softcapping", hf.attn_logit_softcapping, None),
                   ("final_logit_softcapping", hf.final_logit_softcapping, None), layer_kinds]
        checks += [(f"rope_parameters.{kind}.rope_type", (rope.get(kind) or {}).get("rope_type"), "default")
                   for kind in ("full_attention", "sliding_attention")]
    elif family == "gpt2":
        checks += [("activation_function", hf.activation_function in ("gelu", "gelu_new", "gelu_pytorch_tanh"), True),
                   ("scale_attn_by_inverse_layer_idx", hf.scale_attn_by_inverse_layer_idx, False),
                   ("add_cross_attention", hf.add_cross_attention, False)]
    else:
        checks += [("hidden_act", hf.hidden_act, "gelu"),
                   ("position_embedding_type", getattr(hf, "position_embedding_type", "absolute"), "absolute"),
                   ("is_decoder", hf.is_decoder, False)]
    for field, value, wanted in checks:     # wanted: the one value llmlab maps, or a tuple of them
        allowed = wanted if isinstance(wanted, tuple) else (wanted,)
        if value not in allowed:
            return f"{field} = {getattr(hf, field, value)!r} (llmlab needs {' or '.join(map(repr, allowed))})"
    return None


def config_from_hf(hf_config) -> ModelConfig:
    """Our ModelConfig for a ``transformers`` config of the Llama, Qwen2, Qwen3, Gemma 2, Gemma 3 (text), GPT-2
    or BERT family."""
    reason = unsupported(hf_config)
    if reason:
        raise LLMLabError(f"this Hugging Face config has no llmlab equivalent: {reason}")
    hf, family = hf_config, hf_config.model_type
    eos = hf.eos_token_id[0] if isinstance(hf.eos_token_id, (list, tuple)) else hf.eos_token_id
    is_classifier = any(a.endswith("ForSequenceClassification") for a in (hf.architectures or []))
    common = dict(vocab_size=hf.vocab_size, init_std=hf.initializer_range, tie_embeddings=hf.tie_word_embeddings,
                  bos_token_id=hf.bos_token_id, eos_token_id=eos, pad_token_id=hf.pad_token_id,
                  num_labels=hf.num_labels if is_classifier else 0)
    if family in ("llama", "qwen2", "qwen3"):
        return preset("llama", d_model=hf.hidden_size, d_ff=hf.intermediate_size, n_layer=hf.num_hidden_layers,
                      n_head=hf.num_attention_heads, n_kv_head=hf.num_key_value_heads,
                      head_dim=getattr(hf, "head_dim", None), max_seq_len=hf.max_position_embeddings,
                      norm_eps=hf.rms_norm_eps, rope_theta=hf.rope_parameters["rope_theta"],
                      rope_scaling=_rope_scaling(hf.rope_parameters), bias=family != "qwen2" and hf.attention_bias,
                      qkv_bias=family == "qwen2", qk_norm=family == "qwen3", dropout=hf.attention_dropout,
                      **(_layer_windows(hf) if family == "qwen2" else {}), **common)
    if family in ("gemma2", "gemma3_text"):
        windows = _layer_windows(hf)
        scalar = hf.query_pre_attn_scalar
        gemma = dict(d_model=hf.hidden_size, d_ff=hf.intermediate_size, n_layer=hf.num_hidden_layers,
                     n_head=hf.num_attention_heads, n_kv_head=hf.num_key_value_heads, head_dim=hf.head_dim,
                     max_seq_len=hf.max_position_embeddings, norm_eps=hf.rms_norm_eps,
                     attn_scale=None if scalar == hf.head_dim else scalar ** -0.5, dropout=hf.attention_dropout,
                     **windows, **common)
        if family == "gemma2":
            return preset("gemma2", rope_theta=hf.rope_parameters["rope_theta"],
                          rope_scaling=_rope_scaling(hf.rope_parameters), attn_softcap=hf.attn_logit_softcapping,
                          logit_softcap=hf.final_logit_softcapping, **gemma)
        theta = {kind: hf.rope_parameters[kind]["rope_theta"] for kind in ("full_attention", "sliding_attention")}
        return preset("gemma3", rope_theta=theta["full_attention"],
                      rope_local_theta=theta["sliding_attention"] if windows["layer_types"] else None, **gemma)
    if family == "gpt2":
        return preset("gpt2", d_model=hf.n_embd, d_ff=hf.n_inner or 4 * hf.n_embd, n_layer=hf.n_layer,
                      n_head=hf.n_head, max_seq_len=hf.n_positions, norm_eps=hf.layer_norm_epsilon,
                      mlp="gelu" if hf.activation_function == "gelu" else "gelu_tanh", dropout=hf.resid_pdrop,
                      **common)
    return preset("bert", d_model=hf.hidden_size, d_ff=hf.intermediate_size, n_layer=hf.num_hidden_layers,
                  n_head=hf.num_attention_heads, max_seq_len=hf.max_position_embeddings,
                  type_vocab_size=hf.type_vocab_size, norm_eps=hf.layer_norm_eps, dropout=hf.hidden_dropout_prob,
                  **common)


# -------------------------------------------------------------------------------------------------- weights

@dataclass(frozen=True)
class Entry:
    """One Hugging Face tensor: ``ours[rows]`` (a row range of a fused matrix), transposed for GPT-2's Conv1D,
    minus ``shift`` (Gemma's (1 + w) norm gains: hf = ours − 1)."""
    hf: str
    ours: str
    rows: tuple[int, int] | None = None
    transpose: bool = False
    shift: float = 0.0
    export: bool = True      # written by state_dict_to_hf
    required: bool = True    # must be present in load_hf_state_dict


def _linear(hf: str, ours: str, bias: bool, rows=None, transpose=False, **flags) -> list[Entry]:
    """Weight (and bias) of one projection; a bias takes the same row range as its weight."""
    out = [Entry(f"{hf}.weight", f"{ours}.weight", rows, transpose, **flags)]
    if bias:
        out.append(Entry(f"{hf}.bias", f"{ours}.bias", rows, **flags))
    return out


def _norm(hf: str, ours: str, cfg: ModelConfig, **flags) -> list[Entry]:
    return _linear(hf, ours, cfg.norm == "layernorm", **flags)


def _split(ours: str, names: list[str], sizes: list[int], hf_prefix: str, bias: bool) -> list[Entry]:
    """Row ranges of a fused projection: ``names[i]`` gets rows [Σ sizes[:i], Σ sizes[:i+1])."""
    out, start = [], 0
    for name, size in zip(names, sizes):
        out += _linear(f"{hf_prefix}{name}", ours, bias, rows=(start, start + size))
        start += size
    return out


# Hugging Face → our norm names in a Llama/Qwen block and in a Gemma 2/3 ("sandwich") block
BLOCK_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "mlp_norm"}
GEMMA_BLOCK_NORMS = {"input_layernorm": "attn_norm", "post_attention_layernorm": "attn_out_norm",
                     "pre_feedforward_layernorm": "mlp_norm", "post_feedforward_layernorm": "mlp_out_norm"}


def weight_plan(cfg: ModelConfig) -> list[Entry]:
    """Every Hugging Face tensor of ``cfg``'s family, with where it lives in our model."""
    family = _family(cfg)
    qkv_sizes = [cfg.n_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim, cfg.n_kv_head * cfg.head_dim]
    classifier = cfg.num_labels > 0
    plan: list[Entry] = []
    if family in ("llama", "qwen2", "qwen3", "gemma2", "gemma3_text"):
        gemma = family in ("gemma2", "gemma3_text")
        shift = 1.0 if gemma else 0.0
        plan.append(Entry("model.embed_tokens.weight", "embed.weight"))
        for i in range(cfg.n_layer):
            hf, us = f"model.layers.{i}.", f"blocks.{i}."
            plan += _split(f"{us}attn.qkv", ["q_proj", "k_proj", "v_proj"], qkv_sizes, f"{hf}self_attn.",
                           cfg.bias or cfg.qkv_bias)
            plan += _linear(f"{hf}self_attn.o_proj", f"{us}attn.o_proj", cfg.bias)
            if cfg.qk_norm:
                plan += [Entry(f"{hf}self_attn.q_norm.weight", f"{us}attn.q_norm.weight", shift=shift),
                         Entry(f"{hf}self_attn.k_norm.weight", f"{us}attn.k_norm.weight", shift=shift)]
            plan += _split(f"{us}mlp.up", ["gate_proj", "up_proj"], [cfg.d_ff, cfg.d_ff], f"{hf}mlp.", cfg.bias)
            plan += _linear(f"{hf}mlp.down_proj", f"{us}mlp.down", cfg.bias)
            for theirs, ours in (GEMMA_BLOCK_NORMS if gemma else BLOCK_NORMS).items():
                plan += _norm(f"{hf}{theirs}", f"{us}{ours}", cfg, shift=shift)
        plan += _norm("model.norm", "final_norm", cfg, shift=shift)
    elif family == "gpt2":
        plan += [Entry("transformer.wte.weight", "embed.weight"), Entry("transformer.wpe.weight", "pos_embed.weight")]
        for i in range(cfg.n_layer):
            hf, us = f"transformer.h.{i}.", f"blocks.{i}."
            plan += _norm(f"{hf}ln_1", f"{us}attn_norm", cfg)
            plan += _linear(f"{hf}attn.c_attn", f"{us}attn.qkv", True, transpose=True)
            plan += _linear(f"{hf}attn.c_proj", f"{us}attn.o_proj", True, transpose=True)
            plan += _norm(f"{hf}ln_2", f"{us}mlp_norm", cfg)
            plan += _linear(f"{hf}mlp.c_fc", f"{us}mlp.up", True, transpose=True)
            plan += _linear(f"{hf}mlp.c_proj", f"{us}mlp.down", True, transpose=True)
        plan += _norm("transformer.ln_f", "final_norm", cfg)
    else:
        return _bert_plan(cfg, qkv_sizes)
    if classifier:
        plan.append(Entry("score.weight", "score.weight", required=False))   # a fresh head may start untrained
    if not cfg.tie_embeddings:   # a classifier keeps its language-model head only when asked (see state_dict_to_hf)
        plan.append(Entry("lm_head.weight", "lm_head.weight", required=not classifier, export=not classifier))
    return plan


def _bert_plan(cfg: ModelConfig, qkv_sizes: list[int]) -> list[Entry]:
    """BERT: the body is required; the pooler, masked-LM head and classifier are optional on import (a
    ``BertModel`` folder has no MLM head, a ``BertForMaskedLM`` one no pooler)."""
    plan = [Entry("bert.embeddings.word_embeddings.weight", "embed.weight"),
            Entry("bert.embeddings.position_embeddings.weight", "pos_embed.weight"),
            Entry("bert.embeddings.token_type_embeddings.weight", "type_embed.weight"),
            *_norm("bert.embeddings.LayerNorm", "embed_norm", cfg)]
    for i in range(cfg.n_layer):
        hf, us = f"bert.encoder.layer.{i}.", f"blocks.{i}."
        plan += _split(f"{us}attn.qkv", ["query", "key", "value"], qkv_sizes, f"{hf}attention.self.", True)
        plan += _linear(f"{hf}attention.output.dense", f"{us}attn.o_proj", True)
        plan += _norm(f"{hf}attention.output.LayerNorm", f"{us}attn_norm", cfg)
        plan += _linear(f"{hf}intermediate.dense", f"{us}mlp.up", True)
        plan += _linear(f"{hf}output.dense", f"{us}mlp.down", True)
        plan += _norm(f"{hf}output.LayerNorm", f"{us}mlp_norm", cfg)
    classifier = cfg.num_labels > 0
    head = dict(export=not classifier, required=False)
    plan += _linear("cls.predictions.transform.dense", "mlm_dense", True, **head)
    plan += _norm("cls.predictions.transform.LayerNorm", "mlm_norm", cfg, **head)
    plan.append(Entry("cls.predictions.bias", "mlm_decoder.bias", **head))
    if not cfg.tie_embeddings:   # untied, transformers stores the decoder's bias under both names
        plan += _linear("cls.predictions.decoder", "mlm_decoder", True, **head)
    plan += _linear("bert.pooler.dense", "pooler", True, export=classifier, required=False)
    if classifier:
        plan += _linear("classifier", "classifier", True, required=False)
    return plan


def state_dict_to_hf(model: nn.Module, keep_lm_head: bool = False) -> dict[str, torch.Tensor]:
    """Our model's weights under the Hugging Face names and shapes (fresh contiguous tensors, tied ones once).
    A decoder with a classification head leaves out its language-model head unless ``keep_lm_head`` (a reward
    model whose reward reads the model's own likelihood; ``transformers`` ignores the extra tensor)."""
    params = dict(model.named_parameters(remove_duplicate=False))
    out = {}
    for e in weight_plan(model.config):
        if e.export or (keep_lm_head and e.hf == "lm_head.weight"):
            t = params[e.ours].detach()
            t = t[e.rows[0]:e.rows[1]] if e.rows else t
            t = t.t() if e.transpose else t
            out[e.hf] = (t - e.shift if e.shift else t).contiguous().clone()
    return out


def _normalize_keys(family: str, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Drop non-weight buffers and add the body prefix that base-model checkpoints (``BertModel``, the original
    ``gpt2``) leave out; resolve tied duplicates some checkpoints store anyway."""
    prefix = {"bert": "bert.", "gpt2": "transformer."}.get(family, "model.")
    heads = ("cls.", "classifier.", "score.", "lm_head.")
    out = {}
    for name, t in state.items():
        if IGNORED_KEYS.search(name):
            continue
        if not name.startswith(prefix) and not name.startswith(heads):
            name = prefix + name
        out[name] = t
    if "cls.predictions.decoder.bias" in out:    # the same tensor as cls.predictions.bias
        out.setdefault("cls.predictions.bias", out["cls.predictions.decoder.bias"])
    return out


def load_hf_state_dict(model: nn.Module, hf_state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Copy Hugging Face-named weights into ``model``; the inverse of ``state_dict_to_hf``.

    Raises LLMLabError for an unknown name, a missing required weight or a shape that does not match the model's
    config. Returns the optional weights that were absent (e.g. a new classification head), left as initialised.
    """
    cfg = model.config
    family = _family(cfg)
    state = _normalize_keys(family, hf_state_dict)
    plan = weight_plan(cfg)
    # tolerated extras: tied copies some checkpoints store anyway (a classifier's own LM head is an optional entry)
    extras = {"cls.predictions.decoder.bias"}
    if cfg.tie_embeddings:
        extras |= {"lm_head.weight", "cls.predictions.decoder.weight"}
    unknown = sorted(set(state) - {e.hf for e in plan} - extras)
    if unknown:
        raise LLMLabError(f"weights not part of a {family} model with this config: {', '.join(unknown[:5])}"
                          + (f" (+{len(unknown) - 5} more)" if len(unknown) > 5 else ""))
    missing = [e.hf for e in plan if e.required and e.hf not in state]
    if missing:
        raise LLMLabError(f"weights missing for this {family} config: {', '.join(missing[:5])}"
                          + (f" (+{len(missing) - 5} more)" if len(missing) > 5 else ""))
    params = dict(model.named_parameters(remove_duplicate=False))
    absent = []
    with torch.no_grad():
        for e in plan:
            if e.hf not in state:
                absent.append(e.hf)
                continue
            target = params[e.ours][e.rows[0]:e.rows[1]] if e.rows else params[e.ours]
            source = state[e.hf].t() if e.transpose else state[e.hf]
            if e.shift:    # in the model's precision: 1 + w of a bfloat16 checkpoint is not exact in bfloat16
                source = source.to(target.dtype) + e.shift
            if source.shape != target.shape:
                shown = tuple(state[e.hf].shape)
                wanted = tuple(target.t().shape if e.transpose else target.shape)
                raise LLMLabError(f"weight {e.hf} has shape {shown}, but the config needs {wanted}")
            target.copy_(source)
    return absent
