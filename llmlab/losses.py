"""The losses of every stage as pure functions on tensors, with the math in their docstrings.

Conventions: ``B`` batch, ``T`` time, ``V`` vocabulary, ``C`` hidden width. A ``mask`` is 0/1 (bool or float) and
marks the positions that count; ``ignore_index`` (-100) marks targets that do not count. Reductions are means over
the counted positions; a batch with nothing to count gives a loss of 0 (still connected to the graph), never NaN.
Softmax-based quantities are computed in float32 whatever the input dtype.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import LLMLabError

IGNORE_INDEX = -100


def _check_same_shape(**tensors: torch.Tensor) -> None:
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    if len(set(shapes.values())) > 1:
        raise LLMLabError(f"shape mismatch: {shapes}; these tensors must have the same shape")


# ---------------------------------------------------------------------------------------------------- masking helpers

def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1: Σ x·m / max(Σ m, 1) (over ``dim``, or everything)."""
    _check_same_shape(x=x, mask=mask)
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp_min(1.0)
    return (x * mask).sum(dim) / mask.sum(dim).clamp_min(1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the masked positions: Σ m·(x − μ)² / (n − 1), with μ the masked mean, n = Σ m."""
    mean = masked_mean(x, mask)
    n = mask.to(x.dtype).sum()
    return masked_mean((x - mean) ** 2, mask) * n / (n - 1).clamp_min(1.0)


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise ``x`` with the statistics of its masked positions: (x − μ) / sqrt(σ² + 1e-8).

    μ and σ² (unbiased) come from the masked positions only; with ``shift_mean=False`` the mean is added back, so
    only the scale changes. Positions outside the mask are transformed too; callers ignore them.
    """
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    return whitened if shift_mean else whitened + mean


# ------------------------------------------------------------------------------------------------- language modelling

def lm_loss(logits: torch.Tensor, targets: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Mean cross-entropy over the targets that are not ``ignore_index``.

    L = −(1/N) Σ_{t: y_t ≠ ignore} log softmax(z_t)[y_t], with logits z (B, T, V), targets y (B, T) already aligned
    (shift them before calling for next-token prediction) and N the number of counted targets.
    """
    if logits.shape[:-1] != targets.shape:
        raise LLMLabError(f"lm_loss: logits {tuple(logits.shape)} do not match targets {tuple(targets.shape)}; "
                          "expected logits (..., V) and targets (...)")
    total = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), targets.reshape(-1),
                            ignore_index=ignore_index, reduction="sum")
    count = (targets != ignore_index).sum()
    return total / count.clamp_min(1)


def _chunk_cross_entropy(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, ignore_index: int,
                         with_grad: bool, softcap: float | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Σ_t CE(z_t, y_t) = −Σ_t log softmax(z_t)[y_t] over the counted targets (y_t ≠ ignore_index) of one chunk of
    logits z = h Wᵀ (at least float32), and with ``with_grad`` its gradient ∂/∂z = softmax(z) − onehot(y) (zero
    on ignored rows), computed in place of the log-probabilities (one fused log-softmax: about twice as fast on
    CPU as logsumexp followed by z − lse). Ignored rows are masked, not removed: no data-dependent shapes, so no
    host synchronisation and no break in a ``torch.compile`` graph.

    With a ``softcap`` c the logits are z = c·tanh(u/c) with u = h Wᵀ (Gemma 2), and the gradient returned is the
    one for u: ∂/∂u = (softmax(z) − onehot(y)) ⊙ (1 − tanh²(u/c))."""
    z = hidden @ weight.T
    z = z.to(torch.promote_types(z.dtype, torch.float32))
    if softcap is not None:
        tanh = torch.tanh(z / softcap)
        z = softcap * tanh
    logp = torch.log_softmax(z, dim=-1)
    counted = targets != ignore_index
    safe = torch.where(counted, targets, 0)[:, None]
    total = -(logp.gather(1, safe).squeeze(1) * counted).sum()
    if not with_grad:
        return total, None
    grad = logp.exp_()                                                  # softmax(z)
    grad.scatter_add_(1, safe, torch.full_like(safe, -1.0, dtype=grad.dtype))   # − onehot(y)
    if softcap is not None:
        grad.mul_(tanh.square_().neg_().add_(1))                          # ⊙ (1 − tanh²(u/c))
    return total, grad.mul_(counted[:, None])


class _LinearCrossEntropy(torch.autograd.Function):
    """Σ_t CE(h_t Wᵀ, y_t) whose gradients are computed chunk by chunk during the forward pass (the idea of Liger
    Kernel's fused linear cross-entropy): with G = ∂L/∂Z = softmax(Z) − onehot(Y) for a chunk (times
    1 − tanh²(Z/c) with a soft-cap c), ∂L/∂H = G W and ∂L/∂W = Σ_chunks Gᵀ H, so the (N × V) logits never exist
    whole and are never recomputed. The backward only scales the stored gradients by the incoming one (a scalar)."""

    @staticmethod
    def forward(ctx, hidden, weight, targets, chunk_size, ignore_index, softcap):
        grad_hidden = torch.empty_like(hidden)
        grad_weight = torch.zeros(weight.shape, dtype=torch.promote_types(weight.dtype, torch.float32),
                                  device=weight.device)
        total = hidden.new_zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
        w = weight.to(hidden.dtype)                      # cast once, not per chunk (a no-op in float32)
        for i in range(0, len(targets), chunk_size):
            h = hidden[i:i + chunk_size]
            chunk_total, grad_z = _chunk_cross_entropy(h, w, targets[i:i + chunk_size], ignore_index, with_grad=True,
                                                       softcap=softcap)
            total += chunk_total
            grad_z = grad_z.to(hidden.dtype)
            grad_hidden[i:i + chunk_size] = grad_z @ w
            grad_weight.addmm_(grad_z.T.to(grad_weight.dtype), h.to(grad_weight.dtype))
        ctx.save_for_backward(grad_hidden, grad_weight.to(weight.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_output):
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_output.to(grad_hidden.dtype), grad_weight * grad_output.to(grad_weight.dtype), \
            None, None, None, None


def chunked_lm_loss(hidden: torch.Tensor, lm_head_weight: torch.Tensor, targets: torch.Tensor,
                    chunk_size: int = 512, ignore_index: int = IGNORE_INDEX,
                    softcap: float | None = None) -> torch.Tensor:
    """``lm_loss(hidden @ W.T, targets)`` without ever holding the full (B·T·V) logits, and faster than it; with a
    ``softcap`` c, ``lm_loss(c·tanh(hidden @ W.T / c), targets)`` (Gemma 2's soft-capped logits).

    All positions go through the LM head ``chunk_size`` tokens at a time, those whose target is ``ignore_index``
    masked out: L = −(1/N) Σ_chunks Σ_{t ∈ chunk, y_t counted} log softmax(h_t Wᵀ)[y_t], N the number of counted
    targets (0 when there are none, as ``lm_loss``). When gradients are needed, each chunk's gradient is computed
    right away from its logits (``_LinearCrossEntropy``), so the peak memory is one chunk of logits (chunk_size·V)
    and nothing is recomputed in the backward. hidden (B, T, C), W (V, C), targets (B, T).
    """
    if hidden.shape[:-1] != targets.shape or lm_head_weight.dim() != 2 or lm_head_weight.shape[1] != hidden.shape[-1]:
        raise LLMLabError(f"chunked_lm_loss: expected hidden (..., C), lm_head_weight (V, C), targets (...); got "
                          f"{tuple(hidden.shape)}, {tuple(lm_head_weight.shape)}, {tuple(targets.shape)}")
    if chunk_size < 1:
        raise LLMLabError(f"chunked_lm_loss: chunk_size must be >= 1, got {chunk_size}")
    h, y = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)
    count = (y != ignore_index).sum().clamp_min(1)
    if torch.is_grad_enabled() and (h.requires_grad or lm_head_weight.requires_grad):
        return _LinearCrossEntropy.apply(h, lm_head_weight, y, chunk_size, ignore_index, softcap) / count
    total = sum(_chunk_cross_entropy(h[i:i + chunk_size], lm_head_weight, y[i:i + chunk_size], ignore_index,
                                     with_grad=False, softcap=softcap)[0] for i in range(0, len(y), chunk_size))
    return total / count


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log p(label_t | context) = z_t[y_t] − logsumexp(z_t) per position, shape of ``labels``.

    ``logits`` (..., V) must already be aligned with ``labels`` (...). Positions with a negative label (ignored)
    get the log-probability of token 0: mask them out.
    """
    if logits.shape[:-1] != labels.shape:
        raise LLMLabError(f"token_logprobs: logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}")
    logits = logits.float()
    index = labels.clamp_min(0).unsqueeze(-1)
    return logits.gather(-1, index).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def mlm_mask(input_ids: torch.Tensor, *, mask_token_id: int, vocab_size: int, special_ids,
             prob: float = 0.15, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: returns (inputs, labels) for the masked-LM loss.

    Each non-special position is chosen with probability ``prob``; a chosen position becomes ``mask_token_id`` with
    probability 0.8, a uniformly random id in [0, vocab_size) with probability 0.1, and stays unchanged otherwise.
    labels = the original id at chosen positions, -100 elsewhere. ``special_ids`` (e.g. CLS, SEP, PAD) are never
    chosen. Draws from ``generator`` when given, so the masking is reproducible.
    """
    if not 0.0 <= prob <= 1.0:
        raise LLMLabError(f"mlm_mask: prob must be in [0, 1], got {prob}")
    if vocab_size < 1 or not 0 <= mask_token_id < vocab_size:
        raise LLMLabError(f"mlm_mask: need 0 <= mask_token_id < vocab_size, got {mask_token_id} and {vocab_size}")
    device = input_ids.device
    special = torch.isin(input_ids, torch.as_tensor(list(special_ids), dtype=input_ids.dtype, device=device))
    chosen = (torch.rand(input_ids.shape, generator=generator, device=device) < prob) & ~special
    labels = torch.where(chosen, input_ids, torch.full_like(input_ids, IGNORE_INDEX))
    action = torch.rand(input_ids.shape, generator=generator, device=device)
    random_ids = torch.randint(vocab_size, input_ids.shape, generator=generator, device=device, dtype=input_ids.dtype)
    inputs = torch.where(chosen & (action < 0.8), torch.full_like(input_ids, mask_token_id), input_ids)
    inputs = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, inputs)
    return inputs, labels


# ----------------------------------------------------------------------------------------------------- preferences

def bradley_terry_loss(r_chosen: torch.Tensor, r_rejected: torch.Tensor,
                       margin: torch.Tensor | float | None = None) -> torch.Tensor:
    """Reward-model loss: mean of −log σ(r_c − r_r − m); log 2 when the two rewards are equal and m = 0."""
    _check_same_shape(r_chosen=r_chosen, r_rejected=r_rejected)
    diff = r_chosen.float() - r_rejected.float()
    if margin is not None:
        diff = diff - margin
    return -F.logsigmoid(diff).mean()


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float = 0.1,
             loss_type: str = "sigmoid",
             label_smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct preference optimisation; returns (loss, chosen_rewards, rejected_rewards), rewards detached.

    With sequence log-probs, h = [log π(y_w) − log π_ref(y_w)] − [log π(y_l) − log π_ref(y_l)]:
      sigmoid (DPO, cDPO with label smoothing ε): L = −(1 − ε)·log σ(β h) − ε·log σ(−β h)
      ipo:                                        L = (h − 1/(2β))²
    Both are means over the batch. rewards = β·(log π − log π_ref) for the chosen and the rejected answers.
    When policy == reference, h = 0 and the sigmoid loss is exactly log 2.
    """
    _check_same_shape(policy_chosen_logps=policy_chosen_logps, policy_rejected_logps=policy_rejected_logps,
                      ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps)
    if beta <= 0:
        raise LLMLabError(f"dpo_loss: beta must be > 0, got {beta}")
    if not 0.0 <= label_smoothing < 0.5:
        raise LLMLabError(f"dpo_loss: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    chosen_ratio = policy_chosen_logps.float() - ref_chosen_logps.float()
    rejected_ratio = policy_rejected_logps.float() - ref_rejected_logps.float()
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise LLMLabError(f"dpo_loss: unknown loss_type {loss_type!r}; choose 'sigmoid' or 'ipo'")
    return losses.mean(), beta * chosen_ratio.detach(), beta * rejected_ratio.detach()


# -------------------------------------------------------------------------------------------------------------- PPO

def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0,
        lam: float = 0.95) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over (B, T); returns (advantages, returns), both 0 outside the mask.

    Walking back over the valid tokens (mask = 1): δ_t = r_t + γ V_{t+1} − V_t and A_t = δ_t + γλ A_{t+1}, where
    t+1 is the next valid token and, after the last valid token, V = 0 and A = 0. returns = A + V. Invalid
    positions inside the sequence are skipped. Inputs are detached: these are targets, not part of the graph.
    """
    _check_same_shape(rewards=rewards, values=values, mask=mask)
    rewards, values, valid = rewards.detach().float(), values.detach().float(), mask.bool()
    advantages = torch.zeros_like(values)
    next_value = values.new_zeros(values.shape[0])
    next_advantage = values.new_zeros(values.shape[0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        m = valid[:, t]
        advantages[:, t] = torch.where(m, advantage, 0.0)
        next_advantage = torch.where(m, advantage, next_advantage)
        next_value = torch.where(m, values[:, t], next_value)
    returns = torch.where(valid, advantages + values, 0.0)
    return advantages, returns


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, clip_range: float = 0.2) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO clipped surrogate: mean over the mask of max(−A·ρ, −A·clip(ρ, 1−ε, 1+ε)), ρ = exp(log π − log π_old).

    stats (detached scalars): ``clip_fraction``, the share of tokens where the clipped term is the larger one;
    ``approx_kl``, the mean k3 estimate of KL(π_old ‖ π): (ρ − 1) − log ρ.
    """
    _check_same_shape(logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages, mask=mask)
    log_ratio = logprobs.float() - old_logprobs.float()
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - clip_range, 1 + clip_range)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)
    with torch.no_grad():
        stats = {"clip_fraction": masked_mean((clipped > unclipped).float(), mask),
                 "approx_kl": masked_mean((ratio - 1) - log_ratio, mask)}
    return loss, stats


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   clip_range: float = 0.2) -> torch.Tensor:
    """Clipped value loss: ½ · mean over the mask of max((V − R)², (V_old + clip(V − V_old, −ε, ε) − R)²)."""
    _check_same_shape(values=values, old_values=old_values, returns=returns, mask=mask)
    clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    return 0.5 * masked_mean(torch.maximum((values - returns) ** 2, (clipped - returns) ** 2), mask)


# --------------------------------------------------------------------------------------------- KL and entropy

def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Schulman's per-token estimators of KL(π ‖ π_ref) from tokens sampled from π, with r = π_ref/π:

    k1 = −log r (unbiased, high variance, can be negative); k2 = ½ (log r)² (biased, low variance);
    k3 = (r − 1) − log r (unbiased, low variance, always >= 0).
    """
    _check_same_shape(logprobs=logprobs, ref_logprobs=ref_logprobs)
    log_r = ref_logprobs.float() - logprobs.float()
    if kind == "k1":
        return -log_r
    if kind == "k2":
        return 0.5 * log_r ** 2
    if kind == "k3":
        return torch.expm1(log_r) - log_r
    raise LLMLabError(f"kl_per_token: unknown kind {kind!r}; choose 'k1', 'k2' or 'k3'")


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(z) over the last dim, computed stably: H = logsumexp(z) − Σ_i softmax(z)_i · z_i."""
    logits = logits.float()
    return torch.logsumexp(logits, dim=-1) - (torch.softmax(logits, dim=-1) * logits).sum(-1)
