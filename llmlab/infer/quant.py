"""Weight-only int8 and int4 quantisation for decoding, where reading the weights is the cost.

Batch-1 decoding multiplies a single vector by every weight matrix, so its speed is set by how many bytes of
weights cross the memory bus per token. Two formats, both computed by torch's fused CPU kernels with bfloat16
activations (only the weights are quantised):

int8, one scale per output channel o (``_weight_int8pack_mm``; 8 bits a weight, 4× fewer bytes than float32):

    s_o = max_i |W_oi| / 127,    Q_oi = round(W_oi / s_o) ∈ [−127, 127],    y_o = s_o · Σ_i Q_oi x_i + b_o

int4, asymmetric, one scale and one offset per group of G = 32 consecutive inputs i of row o
(``_weight_int4pack_mm_for_cpu``, whose layout is (K/G, N, 2) = (scale, zero) and whose weight is (Q − 8)·s + z):

    W'_oi = (Q_oi − 8) · s + z,   Q_oi = round((W_oi − z) / s) + 8 ∈ [0, 15],   y_o = Σ_i W'_oi x_i + b_o

where the group's grid z − 8s, z − 7s, …, z + 7s is the least-squares one of a few candidates around its
min/max grid (``fit_int4_groups``), and s and z are stored in bfloat16 (Q is rounded against the stored values).
That is 4 + 32/G bits a weight: 5 for G = 32, 6.4× fewer bytes than float32. G = 32 because the kernel's speed
hardly depends on G while the error grows with it (the README's "Precision, per phase" has the measurements), and
because GGUF's 4-bit formats (Q4_0, Q4_1, Q4_K) use blocks of 32: a model dequantised from such a file keeps its
grid. The kernel takes a group of 32, 64, 128 or 256 with K
divisible by it, and N divisible by 16 (N is padded here with zero rows, cut off after the product); a layer whose
K does not fit falls back to int8, with a warning.

The language-model head is quantised too (for Gemma 3 270M it is 168M of the 268M weights): for tied embeddings
the head gets its own quantised copy while the embedding lookup keeps its float table. ``MODES`` names the
combinations, e.g. ``int4-head-int8`` or ``int4-head-float`` (the head left as it is).

``perplexity`` and ``quantization_error`` measure what the rounding costs.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import LLMLabError

GROUP_SIZE = 32
CHUNK_ROWS = 2048       # rows quantised and packed at a time: the kernel packs blocks of 64 rows, so chunks of a
                        # multiple of 64 pack exactly as the whole matrix would (a test checks it)
INT4_GROUPS = (32, 64, 128, 256)         # the group sizes the CPU kernel accepts
MODES = {                                # name: (scheme of the body's Linear layers, of the head; None = float)
    "int8": ("int8", "int8"),
    "int4": ("int4", "int4"),
    "int4-head-int8": ("int4", "int8"),
    "int8-head-float": ("int8", None),
    "int4-head-float": ("int4", None),
}


class Int8Linear(nn.Module):
    """A frozen nn.Linear with int8 weights and per-output-channel scales."""

    def __init__(self, linear: nn.Linear, act_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        w = linear.weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scale", scale.to(act_dtype))
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(act_dtype))
        self.act_dtype = act_dtype
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(self.act_dtype)
        if flat.device.type == "cpu":
            y = torch._weight_int8pack_mm(flat, self.qweight, self.scale)   # fused int8 × bf16 kernel
        else:
            y = (flat @ self.qweight.to(self.act_dtype).T) * self.scale
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def fit_int4_groups(x: torch.Tensor, spans=(-1.0, -0.5, 0.0, 0.5, 1.0)) -> tuple[torch.Tensor, torch.Tensor]:
    """Per group (the last dimension of ``x``, n values), the step s > 0 and offset m of the 16-level grid
    m + s·q, q ∈ [0, 15], with the least squared error among a few candidates: for each span δ, round to the grid of
    step (max − min) / (15 + δ) from min, then refit s and m by least squares to the levels q so found.

    With e = x − min, the refit of e ≈ s·q + c and the error it explains away are, from the sums over the group,
        s = (n·Σqe − Σq·Σe) / D,   c = (Σq²·Σe − Σq·Σqe) / D,   explained = (n·Σqe − Σq·Σe)² / (n·D),
    D = n·Σq² − (Σq)² (0 when every value landed on one level), so the best candidate is the one that explains the
    most. δ = 0 alone is the plain min/max grid; the search lets outliers clip and recovers the grid of weights that
    were already 4-bit (a GGUF's Q4_K blocks: 10× less error there than min/max)."""
    n = x.shape[-1]
    lo, hi = x.amin(-1, keepdim=True), x.amax(-1, keepdim=True)
    e = x - lo
    se = e.sum(-1)
    best_explained = torch.full_like(se, -1.0)
    best_scale, best_offset = ((hi - lo) / 15).squeeze(-1), torch.zeros_like(se)
    for span in spans:
        q = (e * ((15 + span) / (hi - lo).clamp(min=1e-12))).round_().clamp_(0, 15)
        sq, sqq, sqe = q.sum(-1), torch.einsum("...i,...i->...", q, q), torch.einsum("...i,...i->...", q, e)
        det = n * sqq - sq * sq
        ok = det > 0
        det = torch.where(ok, det, torch.ones_like(det))
        num = n * sqe - sq * se
        explained = torch.where(ok & (num > 0), num * num / (n * det), torch.full_like(det, -1.0))
        better = explained > best_explained
        best_explained = torch.where(better, explained, best_explained)
        best_scale = torch.where(better, num / det, best_scale)
        best_offset = torch.where(better, (sqq * se - sq * sqe) / det, best_offset)
    return best_scale, best_offset + lo.squeeze(-1)


def quantize_int4(w: torch.Tensor, group_size: int = GROUP_SIZE,
                  dtype: torch.dtype = torch.bfloat16) -> tuple[torch.Tensor, torch.Tensor]:
    """(Q, scales_and_zeros) for a (N, K) weight: Q (N, K) int32 in [0, 15] and (K/G, N, 2) = (s, z) in ``dtype``,
    so that W ≈ (Q − 8)·s + z group by group (the module docstring's formula), s and m from ``fit_int4_groups``."""
    n, k = w.shape
    groups = w.detach().float().reshape(n, k // group_size, group_size)
    scale, offset = fit_int4_groups(groups)
    scale = scale.clamp(min=1e-8).to(dtype)
    zero = (offset + 8 * scale.float()).to(dtype)
    q = torch.round((groups - zero.float()[..., None]) / scale.float()[..., None]) + 8      # nearest stored level
    return q.clamp_(0, 15).to(torch.int32).reshape(n, k), torch.stack([scale, zero], dim=-1).transpose(0, 1)


def dequantize_int4(q: torch.Tensor, scales_and_zeros: torch.Tensor, group_size: int = GROUP_SIZE) -> torch.Tensor:
    """The float32 weight W' = (Q − 8)·s + z that the int4 kernel multiplies by."""
    n, k = q.shape
    scale, zero = scales_and_zeros.float().transpose(0, 1).unbind(-1)          # (N, K/G) each
    groups = (q.float().reshape(n, k // group_size, group_size) - 8) * scale[..., None] + zero[..., None]
    return groups.reshape(n, k)


class Int4Linear(nn.Module):
    """A frozen nn.Linear with group-wise asymmetric int4 weights, packed for torch's CPU kernel. Activations in
    bfloat16 are the kernel's fast path: in torch 2.13 float32 or float16 ones take ~25× longer."""

    def __init__(self, linear: nn.Linear, group_size: int = GROUP_SIZE, act_dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        if not int4_fits(linear, group_size):
            raise ValueError(f"int4 needs a CPU weight with in_features divisible by the group ({group_size}), "
                             f"got {linear.in_features} on {linear.weight.device}")
        w = linear.weight.detach()
        if linear.out_features % 16:                        # the kernel wants N divisible by 16
            w = F.pad(w, (0, 0, 0, -linear.out_features % 16))
        packed, params = [], []
        for start in range(0, w.shape[0], CHUNK_ROWS):      # bounds the temporary memory of quantising
            q, scales_and_zeros = quantize_int4(w[start:start + CHUNK_ROWS], group_size, act_dtype)
            packed.append(torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2))
            params.append(scales_and_zeros)
        self.register_buffer("qweight", torch.cat(packed))
        self.register_buffer("scales_and_zeros", torch.cat(params, dim=1).contiguous())
        self.register_buffer("bias", None if linear.bias is None else linear.bias.detach().to(act_dtype))
        self.group_size, self.act_dtype = group_size, act_dtype
        self.in_features, self.out_features = linear.in_features, linear.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).to(self.act_dtype).contiguous()
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.qweight, self.group_size, self.scales_and_zeros)
        y = y[:, :self.out_features]
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features).to(x.dtype)


def int4_fits(linear: nn.Linear, group_size: int = GROUP_SIZE) -> bool:
    """Whether torch's int4 CPU kernel can take this layer (the output rows are padded, the inputs cannot be)."""
    return linear.weight.device.type == "cpu" and linear.in_features % group_size == 0


def output_head(model: nn.Module) -> nn.Module | None:
    """The Linear that maps hidden states to vocabulary logits (ours: ``lm_head``; transformers' models say)."""
    get = getattr(model, "get_output_embeddings", None)
    return get() if callable(get) else getattr(model, "lm_head", None)


def quantize(model: nn.Module, mode: str, act_dtype: torch.dtype = torch.bfloat16,
             group_size: int = GROUP_SIZE) -> nn.Module:
    """Replace (in place) the nn.Linear layers of ``model`` by int8 / int4 ones as ``mode`` (a key of ``MODES``)
    says; returns the model. A tied head gets its own quantised copy: the embedding table is left as it is.
    int4 layers whose inputs do not split into groups fall back to int8, with a warning naming them."""
    if mode not in MODES:
        raise LLMLabError(f"quantize={mode!r}: choose one of {', '.join(MODES)}")
    if group_size not in INT4_GROUPS:
        raise LLMLabError(f"int4 group size {group_size}: torch's CPU kernel takes {INT4_GROUPS}")
    body, head_scheme = MODES[mode]
    head = output_head(model)
    fallback = []
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear):
                continue
            scheme = head_scheme if child is head else body
            if scheme == "int4" and child.weight.device.type != "cpu":
                raise LLMLabError(f"int4 decoding runs on torch's CPU kernel; the model is on "
                                  f"{child.weight.device}: use int8 or a bfloat16 decode dtype there")
            if scheme == "int4" and not int4_fits(child, group_size):
                fallback.append(f"{name}.{child_name}".lstrip(".") + f" (in_features {child.in_features})")
                scheme = "int8"
            if scheme == "int4":
                setattr(module, child_name, Int4Linear(child, group_size, act_dtype))
            elif scheme == "int8":
                setattr(module, child_name, Int8Linear(child, act_dtype))
    if fallback:
        warnings.warn(f"int4 needs in_features divisible by {group_size}; int8 for: {', '.join(fallback)}",
                      stacklevel=2)
    return model


def quantize_int8(model: nn.Module, act_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace every nn.Linear of ``model`` (in place, the head included) by an Int8Linear; returns the model."""
    return quantize(model, "int8", act_dtype)


def _logits(model: nn.Module, input_ids: torch.Tensor) -> torch.Tensor:
    out = model(input_ids)
    return (out.logits if hasattr(out, "logits") else out).float()


@torch.inference_mode()
def quantization_error(reference: nn.Module, quantized: nn.Module, input_ids: torch.Tensor, start: int = 0) -> dict:
    """How far the quantised model's next-token distribution moves from the reference's at positions ≥ ``start``:
    max |Δlogit|, the mean KL(p_ref ‖ p_q) and how often both pick the same top token."""
    ref, q = _logits(reference, input_ids)[:, start:], _logits(quantized, input_ids)[:, start:]
    kl = F.kl_div(q.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none")
    return {"max_abs_logit_error": float((ref - q).abs().max()), "mean_kl": float(kl.sum(-1).mean()),
            "top1_agreement": float((ref.argmax(-1) == q.argmax(-1)).float().mean())}


@torch.inference_mode()
def perplexity(model: nn.Module, token_ids: list[int] | torch.Tensor, window: int = 512,
               bos_id: int | None = None) -> float:
    """exp(mean negative log-likelihood) of ``token_ids``, cut into consecutive windows of ``window`` tokens that
    are scored separately (each token sees the earlier ones of its window), every window after ``bos_id`` if one
    is given (models such as Gemma expect it). The first token of each window is context only."""
    ids = torch.as_tensor(token_ids, dtype=torch.long)
    param = next(model.parameters(), None)           # a wrapper of an outside engine may have none: cpu
    device = param.device if param is not None else torch.device("cpu")
    total, count = 0.0, 0
    for start in range(0, len(ids) - 1, window):
        chunk = ids[start:start + window]
        if bos_id is not None:
            chunk = torch.cat([torch.tensor([bos_id]), chunk])
        if len(chunk) < 2:
            break
        logits = _logits(model, chunk[None].to(device))[0, :-1]
        targets = chunk[1:].to(device)
        if bos_id is not None:                 # the window's first real token is predicted from BOS alone: skip
            logits, targets = logits[1:], targets[1:]
        total += float(F.cross_entropy(logits, targets, reduction="sum"))
        count += len(targets)
    if count == 0:
        raise LLMLabError(f"perplexity needs at least 2 tokens per window, got {len(ids)} tokens")
    return math.exp(total / count)
