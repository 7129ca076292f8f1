"""``llmlab ppo``: RLHF with proximal policy optimisation (Ziegler et al. 2019; Ouyang et al. 2022), TRL's defaults.

One PPO step on a batch of prompts x:

  1. rollout   y ~ π(·|x), one response per prompt, sampled by the engine (KV cache) at temperature 1 with no
               top-k / top-p, so the tokens follow π exactly and log π(y_t) is the true log-probability;
  2. score     s = reward model r(x, y), or a programmatic reward (the task world's ``Judge.reward``);
  3. rewards   r_t = −β · (log π(y_t) − log π_ref(y_t)) on every response token, plus s on the last one,
               where π_ref is the frozen initial policy (per-token KL penalty, k1 estimator);
  4. GAE       δ_t = r_t + γ V_{t+1} − V_t,  A_t = δ_t + γλ A_{t+1},  R_t = A_t + V_t  (γ = 1, λ = 0.95);
               A is whitened over the batch's response tokens;
  5. update    ``epochs`` passes over the batch in shuffled minibatches, each one AdamW step on
               L = clipped policy loss (ε = 0.2) + vf_coef · clipped value loss (ε_V = 0.2).

β is fixed, or adaptive when ``ppo.kl_target`` is set (Ziegler et al.): with KL the batch's mean sequence KL and
n its size, e = clip(KL / KL_target − 1, −0.2, 0.2) and β ← β · (1 + e · n / horizon).

The value function is a separate head, Linear(d, 1), on the policy's own final hidden states (one network, two
heads, as in Ziegler et al. and TRL's original trainer) rather than a second value model: one forward pass gives
both the log-probabilities and the values, so a step costs one network's compute and memory instead of two.
The price is that value-loss gradients reach the shared backbone, which is why ``vf_coef`` is small (0.1).
The head is dropped when the policy is saved. Dropout is off throughout (the model stays in eval mode), so the
log-probabilities of the rollout and of the first update agree.

PPO alternates generation and optimisation, which the shared training loop (one optimizer step per batch)
does not express; this file holds its own loop with the same outputs: ``metrics.jsonl``, a tqdm bar, atomic
resumable checkpoints (``llmlab.train.checkpoint``), ``reward.png`` and the final policy via ``save_model``.
It runs in one process.
"""
from __future__ import annotations

import contextlib
import copy
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..chat import encode_chat
from ..config import from_dict
from ..data import chat_data
from ..data.batching import pad
from ..data.shards import BatchSampler
from ..device import autocast_dtype, pick_device
from ..errors import LLMLabError
from ..hub.folder import ModelDir
from ..hub.load import load_our_model
from ..hub.save import save_model
from ..infer.engine import Engine, SamplingParams
from ..infer.replies import engine_for
from ..losses import (entropy_from_logits, gae, kl_per_token, masked_mean, masked_whiten, ppo_policy_loss,
                      ppo_value_loss, token_logprobs)
from ..model.heads import PolicyWithValue, RewardModel
from ..plots import plot_metrics
from ..progress import progress_bar
from ..train.checkpoint import (capture_rng, load_latest, load_optimizer_state_by_name,
                                optimizer_state_by_name, restore_rng, save_checkpoint)
from ..train.loop import MetricsLog, make_optimizer, refuse_existing_checkpoints, seed_everything
from ..train.schedule import lr_at
from ..world.build import load_world
from .common import add_stage_args, deep_merge, stage_recipe, start_run, train_config

DEFAULTS = {
    "data": {"eval_path": None},
    "ppo": {},
    "reward": {"world": None, "batch_size": 16},
    "template": None,     # a built-in chat template name or a .jinja file; None: the model folder's own
    "train": {"max_steps": 100, "lr": 1e-5, "warmup_steps": 0, "schedule": "constant", "weight_decay": 0.0,
              "log_every": 1, "eval_every": 0, "checkpoint_every": 20},
}
Scorer = Callable[[list[dict], list[str]], list[float]]


@dataclass
class PPOConfig:
    """The ``ppo:`` section of a recipe (defaults from TRL)."""
    rollout_batch: int = 16        # prompts, hence responses, per PPO step
    minibatch: int = 4             # sequences per optimizer update
    epochs: int = 4                # passes over each rollout batch
    max_new_tokens: int = 48
    clip_range: float = 0.2        # ε of the policy ratio
    value_clip: float = 0.2        # ε_V of the value change
    vf_coef: float = 0.1
    value_lr_scale: float = 1.0    # the value head's learning rate = this × train.lr
    gamma: float = 1.0
    lam: float = 0.95
    kl_coef: float = 0.05          # β (its initial value when adaptive)
    kl_target: float | None = None  # set: adaptive β (Ziegler et al.)
    kl_horizon: int = 10000
    whiten_advantages: bool = True

    def __post_init__(self):
        self._validate()

    def _validate(self) -> None:
        for name in ("rollout_batch", "minibatch", "epochs", "max_new_tokens", "kl_horizon"):
            if int(getattr(self, name)) < 1:
                raise LLMLabError(f"ppo.{name} must be ≥ 1, got {getattr(self, name)}")
        if self.rollout_batch % self.minibatch:
            raise LLMLabError(f"ppo.rollout_batch ({self.rollout_batch}) must be a multiple of ppo.minibatch "
                              f"({self.minibatch})")
        if self.value_lr_scale <= 0:
            raise LLMLabError(f"ppo.value_lr_scale must be > 0, got {self.value_lr_scale}")
        for name in ("clip_range", "value_clip", "vf_coef", "kl_coef"):
            if float(getattr(self, name)) < 0:
                raise LLMLabError(f"ppo.{name} must be ≥ 0, got {getattr(self, name)}")
        if not (0 <= self.gamma <= 1 and 0 <= self.lam <= 1):
            raise LLMLabError(f"ppo.gamma and ppo.lam must lie in [0, 1], got {self.gamma} and {self.lam}")
        if self.kl_target is not None and self.kl_target <= 0:
            raise LLMLabError(f"ppo.kl_target must be > 0 (or null for a fixed β), got {self.kl_target}")


class KLController:
    """β of the KL penalty: fixed, or Ziegler et al.'s proportional controller toward ``target``:
    e = clip(KL / target − 1, −0.2, 0.2), β ← β · (1 + e · n / horizon) after a batch of n samples."""

    def __init__(self, coef: float, target: float | None = None, horizon: int = 10000):
        self.coef, self.target, self.horizon = float(coef), target, horizon

    def update(self, kl: float, n: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * n / self.horizon


# ----------------------------------------------------------------------------------------------- the math

def per_token_rewards(scores: torch.Tensor, logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
                      mask: torch.Tensor, kl_coef: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards, kl), both (B, R) and 0 outside the mask: kl_t = log π(y_t) − log π_ref(y_t) and
    r_t = −β · kl_t, plus the sequence score s on the last response token (responses start at column 0)."""
    mask = mask.float()
    kl = kl_per_token(logprobs, ref_logprobs, "k1") * mask
    rewards = -kl_coef * kl
    last = (mask.sum(-1).long() - 1).clamp_min(0)
    rewards[torch.arange(rewards.shape[0], device=rewards.device), last] += scores.float()
    return rewards * mask, kl


def advantages_and_returns(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                           cfg: PPOConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """GAE(γ, λ) advantages (whitened over the masked tokens when ``cfg.whiten_advantages``) and returns
    R = A + V (from the raw advantages); 0 outside the mask."""
    advantages, returns = gae(rewards, values, mask, cfg.gamma, cfg.lam)
    if cfg.whiten_advantages:
        advantages = masked_whiten(advantages, mask) * mask.float()
    return advantages, returns


def ppo_losses(logprobs: torch.Tensor, values: torch.Tensor, batch: dict,
               cfg: PPOConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """L = clipped policy loss + vf_coef · clipped value loss for a minibatch, with its statistics."""
    mask = batch["response_mask"]
    policy_loss, stats = ppo_policy_loss(logprobs, batch["logprobs"], batch["advantages"], mask, cfg.clip_range)
    value_loss = ppo_value_loss(values, batch["values"], batch["returns"], mask, cfg.value_clip)
    loss = policy_loss + cfg.vf_coef * value_loss
    return loss, {"policy_loss": policy_loss.item(), "value_loss": value_loss.item(),
                  "clip_fraction": stats["clip_fraction"].item(), "approx_kl": stats["approx_kl"].item()}


# ----------------------------------------------------------------------------------------------- data and reward

def encode_prompts(path, tokenizer, template: str, max_prompt_tokens: int) -> list[dict]:
    """The prompt items of a ``.jsonl`` file (``chat_data.load_prompts``: a ``prompt`` field, a conversation or a
    preference pair; other fields kept, e.g. the world's ``kind``/``reference``/``key``), each with ``ids``: the
    prompt rendered with the generation prompt. Prompts longer than ``max_prompt_tokens`` are skipped with a
    warning."""
    records, skipped = [], 0
    for item in chat_data.load_prompts(path):
        ids, _ = encode_chat(tokenizer, item["prompt"], template, add_generation_prompt=True, require_assistant=False)
        if len(ids) > max_prompt_tokens:
            skipped += 1
            continue
        records.append({**item, "ids": ids})
    if skipped:
        print(f"llmlab ppo: {path}: skipped {skipped} prompts longer than {max_prompt_tokens} tokens (the model's "
              "context minus ppo.max_new_tokens)", file=sys.stderr)
    if not records:
        raise LLMLabError(f"{path}: no usable prompts")
    return records


NO_REWARD = ("ppo needs a reward: --reward RM_DIR (a reward model from `llmlab rm`), or --reward world "
             "--set reward.world=WORLD_DIR for the task world's programmatic reward")


def make_scorer(reward, recipe: dict, data, prompts: list[dict], device) -> Scorer:
    """``scorer(items, texts) -> scores`` from a reward-model directory, ``"world"`` (the world folder in
    ``reward.world``, else the folder of ``data`` when it holds ``world.json``) or a function ``f(item, text)``."""
    if callable(reward):
        return lambda items, texts: [float(reward(item, text)) for item, text in zip(items, texts)]
    if not reward:
        raise LLMLabError(NO_REWARD)
    if reward == "world":
        folder = recipe["reward"].get("world")
        if not folder and (Path(data).parent / "world.json").is_file():
            folder = Path(data).parent
        if not folder:
            raise LLMLabError("--reward world needs the world folder: --set reward.world=WORLD_DIR")
        judge = load_world(folder).judge
        judge.check_items(prompts)
        return lambda items, texts: [judge.reward(item, text) for item, text in zip(items, texts)]
    rm = RewardModel.load(reward, device=device)
    batch_size = int(recipe["reward"].get("batch_size") or 16)
    return lambda items, texts: rm.score([item["prompt"] for item in items], texts, batch_size)


# ----------------------------------------------------------------------------------------------- rollouts

def sample_rollouts(engine: Engine, prompts: list[list[int]], max_new_tokens: int, seed: int) -> list[list[int]]:
    """One sampled response per prompt (its end-of-sequence token included when it stopped)."""
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=1.0, top_k=0, top_p=1.0, seed=seed)
    responses: list[list[int]] = [[] for _ in prompts]
    for step in engine.generate_ids(prompts, params):
        for row, token in enumerate(step):
            if token is not None:
                responses[row].append(token)
    return responses


def rollout_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> dict:
    """Prompts left-padded to a common width P, responses (never empty) right-padded after them, the engine's layout:
    ``input_ids`` and ``attention_mask`` (B, P + R), ``response_mask`` (B, R), ``response_start`` = P."""
    prompt_ids, prompt_mask = pad(prompts, pad_id, side="left")
    response_ids, response_mask = pad(responses, pad_id)
    return {"input_ids": torch.cat([prompt_ids, response_ids], 1),
            "attention_mask": torch.cat([prompt_mask, response_mask], 1),
            "response_mask": response_mask, "response_start": prompt_ids.shape[1]}


@torch.no_grad()
def rollout_stats(model: PolicyWithValue, ref: nn.Module, batch: dict, chunk: int, amp) -> dict:
    """log π, log π_ref, V and the policy's entropy on every response token, ``chunk`` sequences at a time."""
    start = batch["response_start"]
    out = {"logprobs": [], "ref_logprobs": [], "values": [], "entropy": []}
    for i in range(0, batch["input_ids"].shape[0], chunk):
        ids, mask = batch["input_ids"][i:i + chunk], batch["attention_mask"][i:i + chunk]
        targets = ids[:, start:]
        with amp:
            logits, values = model(ids, mask, start)
            ref_logits = ref.logits(ref.hidden_states(ids, attention_mask=mask)[:, start - 1:-1])
        out["logprobs"].append(token_logprobs(logits, targets))
        out["ref_logprobs"].append(token_logprobs(ref_logits, targets))
        out["values"].append(values)
        out["entropy"].append(entropy_from_logits(logits))
    return {k: torch.cat(v) for k, v in out.items()}


# ----------------------------------------------------------------------------------------------- one PPO step

def ppo_optimizer(net: PolicyWithValue, train_cfg, cfg: PPOConfig, device) -> torch.optim.AdamW:
    """The training loop's AdamW for the policy, plus the value head in its own group (no weight decay) whose
    learning rate is ``value_lr_scale`` times the policy's. The head starts at zero; at the policy's small learning
    rate it learns the per-prompt baseline too slowly, the advantages stay close to the whitened scores, and every
    answer to a hard prompt gets pushed down, its entropy and the KL rising with no reward gained."""
    optimizer = make_optimizer(net.policy, train_cfg, device)
    for group in optimizer.param_groups:
        group["lr_scale"] = 1.0
    optimizer.add_param_group({"params": list(net.value_head.parameters()), "weight_decay": 0.0,
                               "lr_scale": cfg.value_lr_scale})
    return optimizer


def ppo_update(model: PolicyWithValue, optimizer, batch: dict, cfg: PPOConfig, grad_clip: float,
               generator: torch.Generator, amp) -> dict[str, float]:
    """``cfg.epochs`` passes over the rollout batch in shuffled minibatches; mean statistics over the updates."""
    n, start = batch["input_ids"].shape[0], batch["response_start"]
    keys = ("input_ids", "attention_mask", "response_mask", "logprobs", "values", "advantages", "returns")
    totals: dict[str, float] = {}
    updates = 0
    for _ in range(cfg.epochs):
        for index in torch.randperm(n, generator=generator).split(cfg.minibatch):
            mb = {k: batch[k][index.to(batch[k].device)] for k in keys}
            with amp:
                logits, values = model(mb["input_ids"], mb["attention_mask"], start)
            logprobs = token_logprobs(logits, mb["input_ids"][:, start:])
            loss, stats = ppo_losses(logprobs, values, mb, cfg)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            max_norm = grad_clip if grad_clip > 0 else math.inf
            stats["grad_norm"] = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm).item()
            if math.isfinite(stats["grad_norm"]) and math.isfinite(loss.item()):
                optimizer.step()
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v
            updates += 1
    optimizer.zero_grad(set_to_none=True)
    return {k: v / updates for k, v in totals.items()}


def ppo_step(model: PolicyWithValue, ref: nn.Module, engine: Engine, optimizer, items: list[dict],
             scorer: Scorer, kl: KLController, cfg: PPOConfig, grad_clip: float, seed: int, amp) -> dict:
    """Rollout, score, rewards and advantages, then the PPO updates; returns the step's metrics."""
    device = engine.device
    responses = sample_rollouts(engine, [item["ids"] for item in items], cfg.max_new_tokens, seed)
    texts = [engine.tokenizer.decode(r, skip_special_tokens=True).lstrip() for r in responses]
    scores = torch.tensor(scorer(items, texts), dtype=torch.float32, device=device)
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v
             for k, v in rollout_batch([item["ids"] for item in items], responses, engine.pad_id).items()}
    batch.update(rollout_stats(model, ref, batch, cfg.minibatch, amp))
    mask = batch["response_mask"]
    rewards, kl_tokens = per_token_rewards(scores, batch["logprobs"], batch["ref_logprobs"], mask, kl.coef)
    batch["advantages"], batch["returns"] = advantages_and_returns(rewards, batch["values"], mask, cfg)
    record = {"score": scores.mean().item(), "reward": rewards.sum(-1).mean().item(),
              "kl": kl_tokens.sum(-1).mean().item(), "kl_coef": kl.coef,
              "entropy": masked_mean(batch["entropy"], mask).item(),
              "response_length": mask.float().sum(-1).mean().item()}
    record.update(ppo_update(model, optimizer, batch, cfg, grad_clip,
                             torch.Generator().manual_seed(seed), amp))
    kl.update(record["kl"], len(items))
    return record


@torch.no_grad()
def evaluate(engine: Engine, items: list[dict], scorer: Scorer, cfg: PPOConfig) -> dict:
    """Mean score of the greedy responses to the held-out prompts."""
    scores = []
    params = SamplingParams(max_new_tokens=cfg.max_new_tokens, temperature=0.0, lstrip=True)
    for i in range(0, len(items), cfg.rollout_batch):
        chunk = items[i:i + cfg.rollout_batch]
        done = engine.generate([item["ids"] for item in chunk], params)
        scores += scorer(chunk, [c.text for c in done])
    return {"eval_score": sum(scores) / len(scores)}


# ----------------------------------------------------------------------------------------------- the run

def _restore(out: Path, model, optimizer, sampler, kl: KLController) -> tuple[int, float]:
    """Load the newest checkpoint into model, optimizer, sampler, RNG and β; return (step, elapsed)."""
    ckpt = load_latest(out)
    if ckpt is None:
        print(f"llmlab: no checkpoint in {out / 'checkpoints'}; starting from step 0", file=sys.stderr)
        return 0, 0.0
    model.load_state_dict(ckpt.model)
    load_optimizer_state_by_name(model, optimizer, ckpt.optimizer)
    sampler.load_state_dict(ckpt.state["sampler"])
    restore_rng(ckpt.state["rng"])
    kl.coef = float(ckpt.state["kl_coef"])
    return ckpt.step, float(ckpt.state["elapsed"])


def _save(out: Path, step: int, model, optimizer, sampler, kl: KLController, elapsed: float, keep: int) -> None:
    state = {"step": step, "sampler": sampler.state_dict(), "rng": capture_rng(), "kl_coef": kl.coef,
             "elapsed": elapsed}
    save_checkpoint(out, step, model.state_dict(), optimizer_state_by_name(model, optimizer), state,
                    info={"kl_coef": kl.coef, "elapsed": elapsed}, keep=keep)


def _load_policy(model: ModelDir) -> tuple[nn.Module, object]:
    policy = load_our_model(model)
    if policy.config.arch != "decoder" or policy.config.num_labels:
        raise LLMLabError(f"{model.given}: PPO needs a causal language model (e.g. the SFT model), not a "
                          f"{'classifier/reward model' if policy.config.num_labels else 'encoder'}")
    tokenizer = model.tokenizer()
    if tokenizer.pad_token_id is None:
        raise LLMLabError(f"{model.given}: PPO needs the model's tokenizer, with a pad token")
    return policy, tokenizer


def run(model_dir, data_path, out_dir, recipe: dict | None = None, *, reward=None, resume: bool = False) -> dict:
    """PPO from the policy in ``model_dir`` on the prompts in ``data_path``; the tuned policy goes to
    ``out_dir/model`` beside the run files.

    ``reward``: a reward-model directory, ``"world"`` (the world folder in ``reward.world``), or a function
    ``f(item, response_text) -> float`` (``item`` is the prompt's record). ``recipe`` (sections ``data``, ``ppo``,
    ``reward``, ``train``, key ``template``) is laid over ``DEFAULTS``. Returns a summary with the last step's
    metrics (``last``) and the held-out ``eval`` (when ``data.eval_path`` is set).
    """
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise LLMLabError("ppo runs in a single process; launch it without torchrun")
    recipe = deep_merge(DEFAULTS, recipe or {})
    cfg, train_cfg = from_dict(PPOConfig, recipe.get("ppo"), "ppo"), train_config(recipe)
    if not reward and not callable(reward):
        raise LLMLabError(NO_REWARD)
    model, data, out = model_dir, data_path, Path(out_dir)
    refuse_existing_checkpoints(out, resume)
    device = pick_device(train_cfg.device)
    seed_everything(train_cfg.seed)
    model = ModelDir(model)
    policy, tokenizer = _load_policy(model)
    template = model.template(recipe.get("template"))
    max_prompt = policy.config.max_seq_len - cfg.max_new_tokens
    prompts = encode_prompts(data, tokenizer, template, max_prompt)
    eval_path = recipe["data"].get("eval_path")
    eval_items = encode_prompts(eval_path, tokenizer, template, max_prompt) if eval_path else []
    scorer = make_scorer(reward, recipe, data, prompts + eval_items, device)
    out = start_run(out, recipe)

    ref = copy.deepcopy(policy).to(device).eval().requires_grad_(False)
    net = PolicyWithValue(policy).to(device).eval()
    engine = engine_for(policy, tokenizer, template)     # the policy itself: its weights change every step
    optimizer = ppo_optimizer(net, train_cfg, cfg, device)
    sampler = BatchSampler(prompts, cfg.rollout_batch, seed=train_cfg.seed, collate=list)
    kl = KLController(cfg.kl_coef, cfg.kl_target, cfg.kl_horizon)
    step, elapsed_before = _restore(out, net, optimizer, sampler, kl) if resume else (0, 0.0)
    dtype = autocast_dtype(device)
    amp = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

    log = MetricsLog(out, train_cfg, step if step else None, True)
    bar = progress_bar(total=train_cfg.max_steps, initial=step, disable=not train_cfg.progress, desc=out.name,
                       dynamic_ncols=True)
    start, record, last_eval = time.perf_counter(), {}, {}
    try:
        while step < train_cfg.max_steps:
            lr = lr_at(step, train_cfg)
            for group in optimizer.param_groups:
                group["lr"] = lr * group["lr_scale"]
            record = ppo_step(net, ref, engine, optimizer, sampler.next_batch(), scorer, kl, cfg,
                              train_cfg.grad_clip, train_cfg.seed + step, amp)
            step += 1
            elapsed = elapsed_before + time.perf_counter() - start
            record.update(step=step, lr=lr, elapsed=elapsed)
            final = step == train_cfg.max_steps
            periodic = train_cfg.eval_every > 0 and step % train_cfg.eval_every == 0
            evaluated = bool(eval_items) and (final or periodic)
            if evaluated:
                last_eval = evaluate(engine, eval_items, scorer, cfg)
                record.update(last_eval)
            if final or evaluated or step % train_cfg.log_every == 0:
                log.write(record)
            bar.set_postfix(score=f"{record['score']:.3f}", kl=f"{record['kl']:.3f}", refresh=False)
            bar.update(1)
            if train_cfg.checkpoint_every and (final or step % train_cfg.checkpoint_every == 0):
                _save(out, step, net, optimizer, sampler, kl, elapsed, train_cfg.keep_checkpoints)
    finally:
        bar.close()
        log.close()
    save_model(policy, out / "model", tokenizer, chat_template=template)
    plot_metrics(out / "metrics.jsonl", out / "reward.png", keys=("reward", "score", "kl"),
                 title=f"{out.name}: PPO reward and KL")
    return {"steps": step, "seconds": elapsed_before + time.perf_counter() - start, "last": record,
            "eval": last_eval}


# ----------------------------------------------------------------------------------------------- CLI

def register(subparsers) -> None:
    p = subparsers.add_parser("ppo", help="RLHF: tune a policy with PPO against a reward model or the world reward",
                              description="PPO with a per-token KL penalty to the initial policy; --data is a .jsonl "
                                          "of prompts (a 'prompt' field), e.g. the world's rl_train.jsonl.")
    add_stage_args(p)
    p.add_argument("--reward", default=None, metavar="RM_DIR|world",
                   help="reward-model directory (from `llmlab rm`), or 'world' with --set reward.world=WORLD_DIR")
    p.set_defaults(func=_command)


def _command(args) -> int:
    summary = run(args.model, args.data, args.out, stage_recipe(args, DEFAULTS), reward=args.reward, resume=args.resume)
    last = summary["last"]
    shown = f", held-out score {summary['eval']['eval_score']:.3f}" if summary["eval"] else ""
    print(f"ppo: {summary['steps']} steps; last score {last.get('score', math.nan):.3f}, KL "
          f"{last.get('kl', math.nan):.3f}{shown}; policy in {Path(args.out) / 'model'}")
    return 0
