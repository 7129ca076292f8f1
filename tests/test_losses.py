"""Losses against torch references and hand-computed values."""
import math

import pytest
import torch
import torch.nn.functional as F

from llmlab import losses
from llmlab.errors import LLMLabError
from llmlab.losses import (bradley_terry_loss, chunked_lm_loss, dpo_loss, entropy_from_logits, gae, kl_per_token,
                           lm_loss, masked_mean, masked_whiten, mlm_mask, ppo_policy_loss, ppo_value_loss,
                           token_logprobs)


def test_masked_mean_and_whiten():
    x = torch.tensor([[1.0, 2.0, 3.0, 100.0], [4.0, 5.0, -50.0, 6.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 1]])
    picked = x[mask.bool()]
    assert masked_mean(x, mask).item() == pytest.approx(picked.mean().item())
    assert masked_mean(x, mask, dim=1).tolist() == pytest.approx([2.0, 5.0])
    assert masked_mean(x, torch.zeros_like(mask)).item() == 0.0
    white = masked_whiten(x, mask)[mask.bool()]
    assert white.mean().item() == pytest.approx(0.0, abs=1e-6)
    assert white.std().item() == pytest.approx(1.0, abs=1e-6)
    kept = masked_whiten(x, mask, shift_mean=False)[mask.bool()]
    assert kept.mean().item() == pytest.approx(picked.mean().item(), abs=1e-5)
    assert torch.allclose(kept - kept.mean(), white, atol=1e-6)


def test_lm_loss_matches_torch_and_ignores_targets():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    targets = torch.randint(11, (2, 5))
    targets[0, :2] = -100
    ref = F.cross_entropy(logits.reshape(-1, 11), targets.reshape(-1), ignore_index=-100)
    assert lm_loss(logits, targets).item() == pytest.approx(ref.item(), abs=1e-6)
    empty = torch.full((2, 5), -100)
    assert lm_loss(logits, empty).item() == 0.0
    with pytest.raises(LLMLabError, match="do not match"):
        lm_loss(logits, targets[:, :4])


def _hidden_weight_targets():
    torch.manual_seed(1)
    hidden = torch.randn(2, 7, 16, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(50, (2, 7))
    targets[0, :3] = -100
    targets[1, -1] = -100
    return hidden, weight, targets


@pytest.mark.parametrize("softcap", [None, 2.0])
def test_chunked_lm_loss_equals_full_loss_and_gradients(softcap):
    """With a soft-cap c (Gemma 2) the reference is the loss on the capped logits c·tanh(h Wᵀ / c)."""
    hidden, weight, targets = _hidden_weight_targets()
    logits = hidden @ weight.T
    full = lm_loss(logits if softcap is None else softcap * torch.tanh(logits / softcap), targets)
    full_grads = torch.autograd.grad(0.5 * full, (hidden, weight))      # a scaled loss, as under accumulation
    chunked = chunked_lm_loss(hidden, weight, targets, chunk_size=3, softcap=softcap)
    chunked_grads = torch.autograd.grad(0.5 * chunked, (hidden, weight))
    assert chunked.item() == pytest.approx(full.item(), abs=1e-6)
    for a, b in zip(chunked_grads, full_grads):
        assert torch.allclose(a, b, atol=1e-6)
    with torch.no_grad():                                               # evaluation: the loss alone
        again = chunked_lm_loss(hidden, weight, targets, chunk_size=4, softcap=softcap)
        assert again.item() == pytest.approx(full.item(), abs=1e-6)


def test_chunked_lm_loss_only_builds_chunk_sized_logits(monkeypatch):
    hidden, weight, targets = _hidden_weight_targets()
    rows = []
    original = losses._chunk_cross_entropy

    def recording(h, w, y, ignore_index, with_grad, softcap=None):
        rows.append(h.shape[0])
        return original(h, w, y, ignore_index, with_grad, softcap)

    monkeypatch.setattr(losses, "_chunk_cross_entropy", recording)
    loss = chunked_lm_loss(hidden, weight, targets, chunk_size=4)
    assert rows == [4, 4, 4, 2]    # 14 positions (4 of them ignored, masked rather than removed): 4, 4, 4, 2
    loss.backward()  # the gradients were computed with the forward: no chunk is recomputed
    assert rows == [4, 4, 4, 2] and hidden.grad is not None and weight.grad is not None
    assert torch.count_nonzero(hidden.grad[0, :3]) == 0 and torch.count_nonzero(hidden.grad[1, -1]) == 0


def test_chunked_lm_loss_under_bfloat16_autocast():
    """As the loop trains on CUDA: the LM head in bfloat16, the softmax in float32, float32 gradients for the
    float32 parameters; the same loss and gradients as the plain loss under the same autocast."""
    torch.manual_seed(3)
    hidden = torch.randn(2, 9, 16, requires_grad=True)
    weight = torch.randn(40, 16, requires_grad=True)
    targets = torch.randint(40, (2, 9))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        full = lm_loss(hidden @ weight.T, targets)
        chunked = chunked_lm_loss(hidden, weight, targets, chunk_size=5)
    full_grads = torch.autograd.grad(full, (hidden, weight))
    chunked_grads = torch.autograd.grad(chunked, (hidden, weight))
    assert chunked.item() == pytest.approx(full.item(), rel=1e-3)
    for a, b in zip(chunked_grads, full_grads):
        assert a.dtype == torch.float32 and torch.allclose(a, b, atol=2e-2, rtol=2e-2)


def test_chunked_lm_loss_with_nothing_to_count():
    hidden, weight, _ = _hidden_weight_targets()
    loss = chunked_lm_loss(hidden, weight, torch.full((2, 7), -100))
    loss.backward()
    assert loss.item() == 0.0 and hidden.grad.abs().sum() == 0


def test_token_logprobs():
    torch.manual_seed(2)
    logits = torch.randn(2, 4, 9)
    labels = torch.randint(9, (2, 4))
    ref = torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(token_logprobs(logits, labels), ref, atol=1e-6)


def test_mlm_mask_proportions():
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, 1000, (200, 500), generator=gen)
    ids[:, 0], ids[:, -1], ids[:, 250:260] = 1, 2, 0  # CLS, SEP, PAD
    inputs, labels = mlm_mask(ids, mask_token_id=3, vocab_size=1000, special_ids=[0, 1, 2],
                              generator=torch.Generator().manual_seed(1))
    special = ids < 3
    chosen = labels != -100
    assert not (chosen & special).any()
    assert torch.equal(labels[chosen], ids[chosen])
    assert torch.equal(inputs[~chosen], ids[~chosen])
    assert chosen.sum().item() / (~special).sum().item() == pytest.approx(0.15, abs=0.005)
    n = chosen.sum().item()
    masked = (inputs[chosen] == 3).sum().item() / n
    unchanged = (inputs[chosen] == ids[chosen]).sum().item() / n
    randomised = 1 - masked - unchanged
    # a random draw equals the original id (or the mask id) with probability ~1/1000; far inside the tolerance
    assert masked == pytest.approx(0.8, abs=0.015)
    assert randomised == pytest.approx(0.1, abs=0.01)
    assert unchanged == pytest.approx(0.1, abs=0.01)
    again, _ = mlm_mask(ids, mask_token_id=3, vocab_size=1000, special_ids=[0, 1, 2],
                        generator=torch.Generator().manual_seed(1))
    assert torch.equal(again, inputs)


def test_bradley_terry_loss():
    r = torch.tensor([0.3, -1.0])
    assert bradley_terry_loss(r, r.clone()).item() == pytest.approx(math.log(2))
    chosen, rejected = torch.tensor([2.0, 0.0]), torch.tensor([1.0, 1.0])
    expected = (-math.log(1 / (1 + math.exp(-1.0))) - math.log(1 / (1 + math.exp(1.0)))) / 2
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)
    with_margin = -math.log(1 / (1 + math.exp(-0.5)))  # diff 1 - margin 0.5
    assert bradley_terry_loss(chosen[:1], rejected[:1], margin=0.5).item() == pytest.approx(with_margin, rel=1e-6)


def test_dpo_loss_is_log2_when_policy_equals_reference_and_gradients_point_right():
    pc = torch.tensor([-5.0, -7.0], requires_grad=True)
    pr = torch.tensor([-6.0, -4.0], requires_grad=True)
    loss, chosen_r, rejected_r = dpo_loss(pc, pr, pc.detach().clone(), pr.detach().clone(), beta=0.1)
    assert loss.item() == pytest.approx(math.log(2), abs=1e-7)
    assert chosen_r.tolist() == [0.0, 0.0] and rejected_r.tolist() == [0.0, 0.0]
    loss.backward()
    assert (pc.grad < 0).all() and (pr.grad > 0).all()


def test_dpo_sigmoid_with_label_smoothing_and_rewards():
    beta, eps = 0.5, 0.1
    loss, chosen_r, rejected_r = dpo_loss(torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]),
                                          torch.tensor([-1.0]), beta=beta, label_smoothing=eps)
    h = (-1.0 + 1.5) - (-2.0 + 1.0)  # 1.5
    sig = lambda z: 1 / (1 + math.exp(-z))  # noqa: E731
    expected = -(1 - eps) * math.log(sig(beta * h)) - eps * math.log(sig(-beta * h))
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert chosen_r.item() == pytest.approx(0.25) and rejected_r.item() == pytest.approx(-0.5)


def test_ipo_loss_hand_computed():
    # pair 1: h = (-1 - -1.5) - (-2 - -1) = 1.5, 1/(2β) = 1 -> 0.25; pair 2: h = 0 -> 1; mean 0.625
    loss, _, _ = dpo_loss(torch.tensor([-1.0, -3.0]), torch.tensor([-2.0, -3.0]), torch.tensor([-1.5, -3.0]),
                          torch.tensor([-1.0, -3.0]), beta=0.5, loss_type="ipo")
    assert loss.item() == pytest.approx(0.625)
    with pytest.raises(LLMLabError, match="loss_type"):
        dpo_loss(*[torch.zeros(1)] * 4, loss_type="hinge-ish")


def test_gae_hand_computed():
    """γ = 0.9, λ = 0.8 (γλ = 0.72); V after the last valid token counts as 0.

    row 0 (valid t = 0..2): δ2 = 1 + 0 - 0.4 = 0.6, A2 = 0.6
                            δ1 = 0 + 0.9·0.4 - 0.2 = 0.16, A1 = 0.16 + 0.72·0.6 = 0.592
                            δ0 = 0 + 0.9·0.2 - 0.5 = -0.32, A0 = -0.32 + 0.72·0.592 = 0.10624
    row 1 (valid t = 0..1): δ1 = 1 + 0 - 0 = 1, A1 = 1; δ0 = 0.5 + 0 - 1 = -0.5, A0 = -0.5 + 0.72 = 0.22
    returns = A + V at valid tokens, 0 elsewhere.
    """
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.5, 1.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.2, 0.4, 9.0], [1.0, 0.0, 7.0, 7.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    assert adv.tolist()[0] == pytest.approx([0.10624, 0.592, 0.6, 0.0])
    assert adv.tolist()[1] == pytest.approx([0.22, 1.0, 0.0, 0.0])
    assert ret.tolist()[0] == pytest.approx([0.60624, 0.792, 1.0, 0.0])
    assert ret.tolist()[1] == pytest.approx([1.22, 1.0, 0.0, 0.0])


def test_gae_skips_invalid_positions_inside_a_sequence():
    rewards, values = torch.tensor([[0.1, 5.0, 0.2, 1.0]]), torch.tensor([[0.3, 9.0, 0.4, 0.5]])
    adv, ret = gae(rewards, values, torch.tensor([[1, 0, 1, 1]]), gamma=0.9, lam=0.8)
    ref_adv, ref_ret = gae(rewards[:, [0, 2, 3]], values[:, [0, 2, 3]], torch.ones(1, 3), gamma=0.9, lam=0.8)
    assert torch.allclose(adv[:, [0, 2, 3]], ref_adv) and adv[0, 1] == 0
    assert torch.allclose(ret[:, [0, 2, 3]], ref_ret) and ret[0, 1] == 0


def test_ppo_policy_loss_hand_computed():
    """ε = 0.2. token 1: ρ = 1.5, A = 2 → max(-3, -2.4) = -2.4 (clipped);
    token 2: ρ = 0.5, A = -1 → max(0.5, 0.8) = 0.8 (clipped); token 3: ρ = 1, A = 3 → -3; token 4 masked out.
    loss = (-2.4 + 0.8 - 3) / 3; clip fraction 2/3; k3 = mean of (ρ - 1) - log ρ."""
    old = torch.tensor([[-1.0, -2.0, -0.5, -1.0]])
    logp = (old + torch.log(torch.tensor([[1.5, 0.5, 1.0, 3.0]]))).requires_grad_()
    adv = torch.tensor([[2.0, -1.0, 3.0, 100.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = ppo_policy_loss(logp, old, adv, mask, clip_range=0.2)
    assert loss.item() == pytest.approx(-4.6 / 3, rel=1e-6)
    assert stats["clip_fraction"].item() == pytest.approx(2 / 3)
    k3 = ((0.5 - math.log(1.5)) + (-0.5 - math.log(0.5))) / 3
    assert stats["approx_kl"].item() == pytest.approx(k3, rel=1e-5)
    loss.backward()  # clipped tokens get no gradient; token 3: d(-A·ρ)/dlogp / 3 = -3·1 / 3
    assert logp.grad[0].tolist() == pytest.approx([0.0, 0.0, -1.0, 0.0])


def test_ppo_value_loss_hand_computed():
    """ε = 0.2. t0: (1-0)² = 1 vs (0.7-0)² = 0.49 → 1; t1: (2-3)² = 1 vs (2.0-3)² = 1 → 1;
    t2: (1-1)² = 0 vs (0.2-1)² = 0.64 → 0.64; t3 masked. loss = ½ · (1 + 1 + 0.64) / 3 = 0.44."""
    values = torch.tensor([[1.0, 2.0, 1.0, 50.0]])
    old = torch.tensor([[0.5, 2.1, 0.0, 0.0]])
    returns = torch.tensor([[0.0, 3.0, 1.0, 0.0]])
    loss = ppo_value_loss(values, old, returns, torch.tensor([[1, 1, 1, 0]]), clip_range=0.2)
    assert loss.item() == pytest.approx(0.44, rel=1e-6)


def test_kl_estimators_against_exact_kl():
    torch.manual_seed(3)
    p_logits, q_logits = torch.randn(6), torch.randn(6)
    logp, logq = torch.log_softmax(p_logits, -1), torch.log_softmax(q_logits, -1)
    exact = (logp.exp() * (logp - logq)).sum().item()
    tokens = torch.multinomial(logp.exp(), 200_000, replacement=True)
    k1 = kl_per_token(logp[tokens], logq[tokens], "k1")
    k2 = kl_per_token(logp[tokens], logq[tokens], "k2")
    k3 = kl_per_token(logp[tokens], logq[tokens], "k3")
    assert torch.allclose(k1, logp[tokens] - logq[tokens])
    assert k1.mean().item() == pytest.approx(exact, abs=0.01)
    assert k3.mean().item() == pytest.approx(exact, abs=0.01)
    assert (k3 >= 0).all()
    assert torch.allclose(k2, 0.5 * (logq[tokens] - logp[tokens]) ** 2)
    with pytest.raises(LLMLabError, match="kind"):
        kl_per_token(logp, logq, "k4")


def test_entropy_from_logits_matches_torch_and_is_stable():
    torch.manual_seed(4)
    logits = torch.randn(3, 5, 17)
    ref = torch.distributions.Categorical(logits=logits).entropy()
    assert torch.allclose(entropy_from_logits(logits), ref, atol=1e-5)
    big = torch.tensor([[1e4, 0.0, -1e4], [5.0, 5.0, 5.0]])
    ent = entropy_from_logits(big)
    assert torch.isfinite(ent).all()
    assert ent.tolist() == pytest.approx([0.0, math.log(3)], abs=1e-5)
