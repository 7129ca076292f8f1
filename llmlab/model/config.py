"""One configuration for every network in llmlab; switches pick GPT-2-, Llama-, Gemma- or BERT-style parts."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import LLMLabError

CHOICES = {
    "arch": ("decoder", "encoder"),
    "norm": ("layernorm", "rmsnorm"),
    "norm_position": ("pre", "post"),
    "pos": ("learned", "rope"),
    "mlp": ("gelu", "gelu_tanh", "swiglu", "geglu"),
}
LAYER_TYPES = ("full", "sliding")


@dataclass
class ModelConfig:
    arch: str = "decoder"            # decoder: causal LM; encoder: bidirectional, masked-LM
    vocab_size: int = 4096
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int | None = None     # None: = n_head (MHA); fewer: GQA; 1: MQA
    d_model: int = 128
    head_dim: int | None = None      # None: d_model // n_head
    d_ff: int | None = None          # None: 4·d_model (GELU) or ≈ 8/3·d_model rounded up to 32 (SwiGLU, GeGLU)
    max_seq_len: int = 256
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    norm_position: str = "pre"       # pre-norm (GPT-2, Llama) or post-norm (BERT)
    post_block_norms: bool = False   # Gemma: also normalise the attention and MLP outputs before the residual add
    pos: str = "rope"
    rope_theta: float = 10000.0
    rope_local_theta: float | None = None  # θ of the "sliding" layers (Gemma 3: 10⁴, global 10⁶); None: rope_theta
    # Llama 3.1's RoPE frequency rescaling (``attention.llama3_frequencies``), as in config.json: {"rope_type":
    # "llama3", "factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}; None: plain θ
    rope_scaling: dict | None = None
    mlp: str = "swiglu"
    bias: bool = False               # biases in attention and MLP projections
    qkv_bias: bool = False           # Qwen2: biases on the query, key and value projections only (bias: on all)
    tie_embeddings: bool = True      # lm_head shares the token-embedding matrix
    qk_norm: bool = False            # RMSNorm on each query/key head before RoPE
    attn_scale: float | None = None  # softmax(s·QKᵀ) scale s; None: 1/√head_dim (Gemma: query_pre_attn_scalar^-½)
    attn_softcap: float | None = None  # Gemma 2: scores a = s·QKᵀ become c·tanh(a/c) before the mask (c = 50)
    logit_softcap: float | None = None  # Gemma 2: next-token logits z become c·tanh(z/c) (c = 30)
    layer_types: list[str] | None = None  # per layer "full" (causal) or "sliding" (sliding_window); None: all full
    sliding_window: int | None = None  # W: a "sliding" layer's query at position i sees keys j with i − W < j ≤ i
    embed_scale: bool = False        # Gemma: token embeddings × √d_model
    dropout: float = 0.0
    init_std: float = 0.02
    scale_residual_init: bool = False  # GPT-2: output projections start at init_std / √(2·n_layer)
    type_vocab_size: int = 0         # encoder: token-type (segment) embeddings
    num_labels: int = 0              # > 0: a classification head (encoder: on the pooled [CLS]; decoder: last token)
    attn_impl: str = "sdpa"          # sdpa: torch's fused kernel; math: the formula step by step
    bos_token_id: int | None = None
    eos_token_id: int | None = None
    pad_token_id: int | None = None

    def __post_init__(self):
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise LLMLabError(f"model.{name} = {getattr(self, name)!r}; choose one of {', '.join(allowed)}")
        if self.attn_impl not in ("sdpa", "math"):
            raise LLMLabError(f"model.attn_impl = {self.attn_impl!r}; choose sdpa or math")
        self.n_kv_head = self.n_kv_head or self.n_head
        if self.n_head % self.n_kv_head:
            raise LLMLabError(f"model.n_head ({self.n_head}) must be a multiple of model.n_kv_head ({self.n_kv_head})")
        if self.head_dim is None:
            if self.d_model % self.n_head:
                raise LLMLabError(f"model.d_model ({self.d_model}) must be divisible by model.n_head ({self.n_head})")
            self.head_dim = self.d_model // self.n_head
        if self.pos == "rope" and self.head_dim % 2:
            raise LLMLabError(f"RoPE needs an even head_dim, got {self.head_dim}")
        if self.d_ff is None:
            gated = self.mlp in ("swiglu", "geglu")
            self.d_ff = 32 * -(-(8 * self.d_model // 3) // 32) if gated else 4 * self.d_model
        if self.post_block_norms and self.norm_position != "pre":
            raise LLMLabError("model.post_block_norms needs model.norm_position = 'pre'")
        if self.layer_types is not None:
            if len(self.layer_types) != self.n_layer or not set(self.layer_types) <= set(LAYER_TYPES):
                raise LLMLabError(f"model.layer_types must list 'full' or 'sliding' for each of the {self.n_layer} "
                                  f"layers, got {self.layer_types!r}")
            if "sliding" in self.layer_types and (self.sliding_window is None or self.sliding_window <= 0):
                raise LLMLabError(f"model.layer_types has sliding layers: model.sliding_window must be a positive "
                                  f"number of positions, got {self.sliding_window!r}")
        for name in ("attn_softcap", "logit_softcap"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise LLMLabError(f"model.{name} must be a positive number or null, got {getattr(self, name)!r}")
        if self.rope_scaling is not None:
            _check_rope_scaling(self.rope_scaling)
        for name in ("vocab_size", "n_layer", "n_head", "d_model", "max_seq_len"):
            if getattr(self, name) <= 0:
                raise LLMLabError(f"model.{name} must be positive, got {getattr(self, name)}")

    def window(self, layer: int) -> int | None:
        """The sliding window W of ``layer``'s attention, or None when it attends to every earlier position."""
        return self.sliding_window if self.layer_types is not None and self.layer_types[layer] == "sliding" else None


def context_length(config) -> int:
    """The most positions a model attends over: our ``max_seq_len``, or a ``transformers`` config's (its text part's,
    for a multimodal one) ``max_position_embeddings`` (``n_positions`` in GPT-2's)."""
    if hasattr(config, "get_text_config"):
        config = config.get_text_config()
    for name in ("max_seq_len", "max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if value:
            return int(value)
    raise LLMLabError(f"{type(config).__name__} gives no context length (max_seq_len / max_position_embeddings / "
                      "n_positions): cannot tell how long an example may be")


ROPE_SCALING_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


def _check_rope_scaling(scaling) -> None:
    """model.rope_scaling must be Llama 3.1's: rope_type "llama3", every number given, high_freq_factor above
    low_freq_factor (their difference divides in the interpolation)."""
    if not isinstance(scaling, dict) or scaling.get("rope_type") != "llama3":
        kind = scaling.get("rope_type") if isinstance(scaling, dict) else scaling
        raise LLMLabError(f"model.rope_scaling.rope_type = {kind!r}; llmlab implements 'llama3' (or no "
                          "rope_scaling at all)")
    unknown = sorted(set(scaling) - {"rope_type", *ROPE_SCALING_KEYS})
    missing = [k for k in ROPE_SCALING_KEYS if not isinstance(scaling.get(k), (int, float)) or scaling[k] <= 0]
    if unknown or missing:
        raise LLMLabError(f"model.rope_scaling needs positive numbers {', '.join(ROPE_SCALING_KEYS)} and nothing "
                          f"else; wrong or missing: {', '.join(missing + unknown)}")
    if scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise LLMLabError(f"model.rope_scaling.high_freq_factor ({scaling['high_freq_factor']}) must exceed "
                          f"low_freq_factor ({scaling['low_freq_factor']})")


PRESETS = {
    # GPT-2: LayerNorm, learned positions, GELU (tanh approximation), biases, tied embeddings, scaled residual init.
    "gpt2": dict(norm="layernorm", pos="learned", mlp="gelu_tanh", bias=True, tie_embeddings=True,
                 norm_eps=1e-5, scale_residual_init=True),
    # Llama: RMSNorm, RoPE, SwiGLU, no biases, separate lm_head.
    "llama": dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, tie_embeddings=False, norm_eps=1e-5),
    # Gemma 3: Llama plus QK-norm, GeGLU, normalised attention/MLP outputs, embeddings × √d_model, tied embeddings
    # (the checkpoints' sliding-window layers, attention scale and local RoPE θ come from their config).
    "gemma3": dict(norm="rmsnorm", pos="rope", mlp="geglu", bias=False, tie_embeddings=True, qk_norm=True,
                   post_block_norms=True, embed_scale=True, norm_eps=1e-6),
    # Gemma 2: Gemma 3 without QK-norm, with soft-capped attention scores and logits (a single RoPE θ).
    "gemma2": dict(norm="rmsnorm", pos="rope", mlp="geglu", bias=False, tie_embeddings=True, post_block_norms=True,
                   embed_scale=True, norm_eps=1e-6, attn_softcap=50.0, logit_softcap=30.0),
    # Qwen2 / Qwen2.5: Llama with biases on the query, key and value projections.
    "qwen2": dict(norm="rmsnorm", pos="rope", mlp="swiglu", bias=False, qkv_bias=True, tie_embeddings=False,
                  norm_eps=1e-6),
    # BERT: bidirectional encoder, post-norm LayerNorm, learned positions and token types, exact GELU, biases.
    "bert": dict(arch="encoder", norm="layernorm", norm_position="post", pos="learned", mlp="gelu", bias=True,
                 tie_embeddings=True, norm_eps=1e-12, type_vocab_size=2),
}


def preset(name: str, **overrides) -> ModelConfig:
    """A named architecture with any field overridden, e.g. ``preset("llama", n_layer=2, d_model=64)``."""
    if name not in PRESETS:
        raise LLMLabError(f"unknown model preset {name!r}; known: {', '.join(PRESETS)}")
    known = {f.name for f in dataclasses.fields(ModelConfig)}
    unknown = sorted(set(overrides) - known - {"preset"})
    if unknown:
        raise LLMLabError(f"unknown model key(s) {', '.join('model.' + k for k in unknown)}")
    overrides.pop("preset", None)
    return ModelConfig(**{**PRESETS[name], **overrides})
