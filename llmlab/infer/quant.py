"""Weight-only int8 quantisation for decoding, where reading the weights is the cost.

Batch-1 decoding multiplies a single vector by every weight matrix, so its speed is set by how many bytes of
weights cross the memory bus per token. Storing each matrix as int8 with one scale per output channel,

    s_o = max_i |W_oi| / 127,    Q_oi = round(W_oi / s_o) ∈ [−127, 127],    y_o = s_o · Σ_i Q_oi x_i + b_o,

reads 4× fewer bytes than float32. Activations stay in bfloat16 (or float32); only the weights are quantised.
The per-channel rounding error is at most s_o / 2 per weight; ``quantization_error`` measures the effect on logits.
"""
from __future__ import annotations

import torch
from torch import nn


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


def quantize_int8(model: nn.Module, act_dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """Replace every nn.Linear of ``model`` (in place) by an Int8Linear; returns the model."""
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear):
                setattr(module, child_name, Int8Linear(child, act_dtype))
    return model


@torch.inference_mode()
def quantization_error(reference: nn.Module, quantized: nn.Module, input_ids: torch.Tensor) -> dict:
    """How far the quantised model's next-token distribution moves: max |Δlogit| and the mean KL(p_ref ‖ p_q)."""
    def logits_of(m):
        out = m(input_ids)
        return (out.logits if hasattr(out, "logits") else out).float()
    ref, q = logits_of(reference), logits_of(quantized)
    kl = torch.nn.functional.kl_div(q.log_softmax(-1), ref.log_softmax(-1), log_target=True, reduction="none")
    return {"max_abs_logit_error": float((ref - q).abs().max()), "mean_kl": float(kl.sum(-1).mean()),
            "top1_agreement": float((ref.argmax(-1) == q.argmax(-1)).float().mean())}
