"""One training loop for every stage (pretrain, SFT, reward, DPO, classification).

A stage builds a model, a batch sampler and a loss function, then calls ``train``. The loop owns the rest:
AdamW with decoupled weight decay on matrices only, the learning-rate schedule (``schedule.lr_at``), gradient
accumulation, gradient clipping, bfloat16 autocast on CUDA, ``torch.compile`` of the training forward pass,
periodic evaluation, ``metrics.jsonl`` logging (plus TensorBoard and a tqdm bar), atomic checkpoints with exact
resume, and DDP/FSDP under ``torchrun``.

Gradient accumulation: with ``k = grad_accum`` micro-batches whose mean losses are ``L_1 … L_k``, the loop
back-propagates ``Σ_i L_i / k``; when the micro-batches hold equal token counts this is exactly the gradient of
the mean loss over one batch ``k`` times larger. Under DDP/FSDP the gradients are also averaged over the ``N``
processes, so the update equals that of one process whose batch is the union of all ranks' micro-batches, and
the logged loss is the same mean ``Σ_ranks Σ_i L_i / (N k)``.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from torch import nn

from ..device import autocast_dtype
from ..errors import LLMLabError
from ..progress import progress_bar
from . import dist
from .checkpoint import (capture_rng, list_checkpoints, load_latest, load_optimizer_state_by_name,
                         optimizer_state_by_name, restore_rng, save_checkpoint)
from .schedule import SCHEDULES, lr_at

PARALLEL = ("none", "ddp", "fsdp")
ON_NAN = ("stop", "skip")


@dataclass
class TrainConfig:
    """The ``train:`` section of a recipe. Steps count optimizer updates; ``*_every = 0`` turns that off
    (evaluation still runs once at the end when the stage passes an ``eval_fn``)."""
    max_steps: int = 1000
    lr: float = 3e-4
    min_lr_ratio: float = 0.1          # cosine / WSD floor = lr · min_lr_ratio
    warmup_steps: int = 100
    schedule: str = "cosine"           # cosine | constant | wsd
    decay_fraction: float = 0.2        # WSD: share of max_steps spent decaying
    weight_decay: float = 0.1
    betas: tuple = (0.9, 0.95)
    eps: float = 1e-8
    grad_clip: float = 1.0             # ≤ 0: no clipping (the norm is still logged)
    grad_accum: int = 1
    eval_every: int = 0
    eval_batches: int = 20             # read by the stages' eval functions
    log_every: int = 10
    checkpoint_every: int = 1000
    keep_checkpoints: int = 2          # ≤ 0 keeps all
    seed: int = 1337
    on_nan: str = "stop"               # stop | skip
    tensorboard: bool = False
    parallel: str = "ddp"              # none | ddp | fsdp; used only when launched with more than one process
    device: str = "auto"
    progress: bool = True
    peak_flops: float | None = None    # per device, FLOP/s, for MFU
    compile: bool = False              # torch.compile the training forward (nanoGPT's compile); pretrain only
    trace_updates: int = 0             # log update_norm ‖Δθ‖ and update_ratio ‖Δθ‖/‖θ‖ for the first N updates

    def __post_init__(self):
        self._validate()

    def _validate(self) -> None:
        checks = [
            (self.max_steps >= 1, "max_steps must be ≥ 1"),
            (self.lr > 0, "lr must be > 0"),
            (0.0 <= self.min_lr_ratio <= 1.0, "min_lr_ratio must be in [0, 1]"),
            (self.warmup_steps >= 0, "warmup_steps must be ≥ 0"),
            (self.schedule in SCHEDULES, f"schedule must be one of {', '.join(SCHEDULES)}"),
            (0.0 < self.decay_fraction <= 1.0, "decay_fraction must be in (0, 1]"),
            (len(self.betas) == 2 and all(0 <= b < 1 for b in self.betas), "betas must be two numbers in [0, 1)"),
            (self.grad_accum >= 1, "grad_accum must be ≥ 1"),
            (self.trace_updates >= 0, "trace_updates must be ≥ 0"),
            (self.log_every >= 1, "log_every must be ≥ 1"),
            (self.eval_every >= 0 and self.checkpoint_every >= 0, "eval_every/checkpoint_every must be ≥ 0"),
            (self.on_nan in ON_NAN, f"on_nan must be one of {', '.join(ON_NAN)}"),
            (self.parallel in PARALLEL, f"parallel must be one of {', '.join(PARALLEL)}"),
        ]
        for ok, message in checks:
            if not ok:
                raise LLMLabError(f"train config: {message}")


# --- optimizer -------------------------------------------------------------------------------------------------

def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups: weight decay on parameters with ≥ 2 dimensions (matrices, embeddings), none on
    vectors (biases, norm gains). Frozen parameters are left out; tied parameters appear once."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def make_optimizer(model: nn.Module, cfg: TrainConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``param_groups``; the fused kernel (one pass over all parameters) on CPU and CUDA, as
    transformers' Trainer uses, PyTorch's default implementation elsewhere."""
    groups = param_groups(model, cfg.weight_decay)
    if not groups:
        raise LLMLabError("the model has no trainable parameters (all have requires_grad=False)")
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                             fused=True if device.type in ("cpu", "cuda") else None)


# --- small helpers ---------------------------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor inside nested dicts/lists/tuples to ``device``."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def unwrap(model: nn.Module) -> nn.Module:
    """The user's module inside a DDP wrapper (FSDP2 shards the module in place, so it is its own unwrap)."""
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def compiled(model: nn.Module, cfg: TrainConfig) -> nn.Module:
    """``torch.compile(model)`` with ``train.compile`` (the module that computes the training loss: inductor fuses
    its element-wise work, such as norms, RoPE, SwiGLU and the cross-entropy, into a few kernels), else ``model``.
    The compiled module shares its parameters with ``model``, which evaluation, checkpoints and saving keep using.
    Only ``model(...)`` calls are compiled: a ``loss_fn`` that calls other methods of the model runs them eagerly,
    so stages whose loss does so refuse the option (``stages.common.train_config``)."""
    return torch.compile(model) if cfg.compile else model


def _is_fsdp(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def _gradient_sync(model: nn.Module, sync: bool):
    """Skip the gradient all-reduce on accumulation micro-steps (DDP ``no_sync``; FSDP2's switch)."""
    model = getattr(model, "_orig_mod", model)        # inside torch.compile's wrapper
    if isinstance(model, nn.parallel.DistributedDataParallel) and not sync:
        with model.no_sync():
            yield
    else:
        if _is_fsdp(model):
            model.set_requires_gradient_sync(sync)
        yield


def _wrap(model: nn.Module, cfg: TrainConfig, world: int, device: torch.device) -> nn.Module:
    """DDP, or FSDP2 (``fully_shard`` on each block of every ``nn.ModuleList``, then on the root)."""
    if world == 1:
        return model
    if cfg.parallel == "ddp":
        return nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    for t in list(model.parameters()) + list(model.buffers()):   # every rank starts from rank 0's weights
        torch.distributed.broadcast(t.data, src=0)
    mesh = init_device_mesh(device.type, (world,))
    for module in list(model.modules()):
        if isinstance(module, nn.ModuleList):
            for block in module:
                fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def _full_tensor(t: torch.Tensor) -> torch.Tensor:
    from torch.distributed.tensor import DTensor
    return t.full_tensor() if isinstance(t, DTensor) else t


def _check_sampler(batches) -> None:
    missing = [m for m in ("next_batch", "state_dict", "load_state_dict") if not callable(getattr(batches, m, None))]
    if missing:
        raise LLMLabError(f"train(): the batch source {type(batches).__name__} lacks {', '.join(missing)}(); "
                          "pass a sampler with next_batch(), state_dict() and load_state_dict()")


def _logged_step(line: str) -> int | None:
    """The step of one metrics.jsonl line; None for a line cut short by a kill."""
    try:
        return int(json.loads(line)["step"])
    except (ValueError, KeyError, TypeError):
        return None


class MetricsLog:
    """``metrics.jsonl`` (+ TensorBoard) on rank 0; other ranks write nothing."""

    def __init__(self, out_dir: Path, cfg: TrainConfig, resume_step: int | None, main: bool):
        self.path = out_dir / "metrics.jsonl"
        self.file = self.writer = None
        if not main:
            return
        kept = []
        if resume_step is not None and self.path.is_file():   # keep what was logged up to the checkpoint
            kept = [ln for ln in self.path.read_text(encoding="utf-8").splitlines()
                    if _logged_step(ln) is not None and _logged_step(ln) <= resume_step]
        self.path.write_text("".join(ln + "\n" for ln in kept), encoding="utf-8")
        self.file = open(self.path, "a", encoding="utf-8")
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(out_dir / "tensorboard"))
            except ImportError:
                print("llmlab: train.tensorboard=true but the tensorboard package is not installed "
                      "(pip install tensorboard); logging to metrics.jsonl only", file=sys.stderr)

    def write(self, record: dict) -> None:
        if self.file is None:
            return
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        if self.writer is not None:
            for key, value in record.items():
                if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(key, value, record["step"])

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.writer is not None:
            self.writer.close()


# --- one optimizer step ----------------------------------------------------------------------------------------

def accumulate_gradients(model: nn.Module, loss_fn: Callable, next_batch: Callable[[], Any], k: int,
                         device: torch.device, amp=contextlib.nullcontext()) -> tuple[list[torch.Tensor], int, list]:
    """Back-propagate ``L_i / k`` for ``k`` micro-batches drawn from ``next_batch()``, so the summed gradient is
    that of the mean loss over one batch ``k`` times larger (for equal token counts). Gradient all-reduce runs
    only on the last micro-batch. Returns the detached losses, the token count and the metric dicts."""
    losses, n_tokens, metrics = [], 0, []
    for i in range(k):
        batch = to_device(next_batch(), device)
        with _gradient_sync(model, sync=i == k - 1):
            with amp:
                loss, n, m = loss_fn(model, batch)
            if not isinstance(loss, torch.Tensor) or loss.ndim != 0:
                raise LLMLabError("loss_fn must return (scalar loss tensor, n_tokens, metrics dict)")
            (loss / k).backward()
        losses.append(loss.detach().float())
        n_tokens += int(n)
        metrics.append(dict(m or {}))
    return losses, n_tokens, metrics


def _reduce_step(losses: list[torch.Tensor], n_tokens: int, metrics: list[dict], device) -> tuple[float, int, dict]:
    """Mean loss and stage metrics over micro-batches and ranks; the token count summed over ranks."""
    keys = sorted(metrics[0])
    local = [float(torch.stack(losses).mean())] + [sum(float(m[key]) for m in metrics) / len(metrics) for key in keys]
    packed = dist.all_reduce_sum(torch.tensor(local + [float(n_tokens)], dtype=torch.float64, device=device)).tolist()
    world = dist.world_size()
    return packed[0] / world, int(packed[-1]), {key: v / world for key, v in zip(keys, packed[1:-1])}


def _update_size(params: list[torch.Tensor], before: list[torch.Tensor]) -> dict:
    """The whole update Δθ = θ_after − θ_before of one optimizer step: ‖Δθ‖ and ‖Δθ‖ / ‖θ_before‖ (global L2
    norms over every trained parameter)."""
    update = _full_tensor(torch.nn.utils.get_total_norm([p.detach() - b for p, b in zip(params, before)])).item()
    size = _full_tensor(torch.nn.utils.get_total_norm(before)).item()
    return {"update_norm": update, "update_ratio": update / max(size, 1e-12)}


def _train_step(model, optimizer, loss_fn, batches, cfg: TrainConfig, lr: float, device, amp,
                trace: bool = False) -> dict:
    """Accumulate ``grad_accum`` micro-batches, clip, and step unless the loss or gradient is not finite;
    ``trace``: also measure the size of the update (``_update_size``)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
    losses, n_tokens, metrics = accumulate_gradients(model, loss_fn, batches.next_batch, cfg.grad_accum, device, amp)
    loss, n_tokens, stage_metrics = _reduce_step(losses, n_tokens, metrics, device)
    max_norm = cfg.grad_clip if cfg.grad_clip > 0 else math.inf
    grad_norm = _full_tensor(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)).item()
    finite = math.isfinite(loss) and math.isfinite(grad_norm)
    update = {}
    if finite:
        params = [p for group in optimizer.param_groups for p in group["params"]] if trace else []
        before = [p.detach().clone() for p in params]
        optimizer.step()
        if trace:
            update = _update_size(params, before)
    optimizer.zero_grad(set_to_none=True)
    return {"loss": loss, "grad_norm": grad_norm, "tokens": n_tokens, "metrics": stage_metrics, "finite": finite,
            "update": update}


def _evaluate(model: nn.Module, eval_fn: Callable, amp, device) -> dict:
    """``eval_fn`` in eval mode without gradients; numeric results averaged over ranks."""
    model.eval()
    with torch.no_grad(), amp:
        result = dict(eval_fn(unwrap(model)) or {})
    model.train()
    keys = sorted(k for k, v in result.items() if isinstance(v, (int, float, torch.Tensor)) and not isinstance(v, bool))
    if not keys:
        return result
    local = torch.tensor([float(result[k]) for k in keys], dtype=torch.float64, device=device)
    means = (dist.all_reduce_sum(local) / dist.world_size()).tolist()
    return {**result, **dict(zip(keys, means))}


# --- checkpoints -----------------------------------------------------------------------------------------------

def _full_state(model: nn.Module, optimizer) -> tuple[dict, dict]:
    """Full model and optimizer state dicts keyed by parameter names. Under FSDP every rank must call this (the
    shards are gathered to rank 0's CPU); torch.distributed.checkpoint is imported only then, as it is slow."""
    if not _is_fsdp(model):
        return unwrap(model).state_dict(), optimizer_state_by_name(unwrap(model), optimizer)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
    return get_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _load_full_state(model: nn.Module, optimizer, model_state: dict, optim_state: dict) -> None:
    if not _is_fsdp(model):
        unwrap(model).load_state_dict(model_state)
        load_optimizer_state_by_name(unwrap(model), optimizer, optim_state)
        return
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict
    set_state_dict(model, optimizer, model_state_dict=model_state, optim_state_dict=optim_state,
                   options=StateDictOptions(full_state_dict=True))


def _save(out_dir: Path, model, optimizer, batches, cfg: TrainConfig, step: int, lr: float, tokens: int,
          elapsed: float, extra_state: dict | None) -> None:
    """Gather a full state (all ranks take part) and let rank 0 write it atomically."""
    model_state, optim_state = _full_state(model, optimizer)
    per_rank = dist.all_gather_object({"rng": capture_rng(), "sampler": batches.state_dict()})
    if dist.is_main():
        state = {"step": step, "tokens": tokens, "elapsed": elapsed, "world_size": dist.world_size(),
                 "ranks": per_rank, "extra": extra_state if extra_state is not None else {}}
        info = {"lr": lr, "tokens": tokens, "elapsed": elapsed, "world_size": dist.world_size()}
        save_checkpoint(out_dir, step, model_state, optim_state, state, info=info, keep=cfg.keep_checkpoints)
    dist.barrier()


def _restore(out_dir: Path, model, optimizer, batches, extra_state: dict | None) -> dict | None:
    """Load the newest complete checkpoint into model, optimizer, sampler, RNG and ``extra_state``."""
    ckpt = load_latest(out_dir)
    if ckpt is None:
        return None
    state = ckpt.state
    if state["world_size"] != dist.world_size():
        raise LLMLabError(f"{ckpt.path}: written by {state['world_size']} process(es); resume with the same "
                          f"number (now {dist.world_size()})")
    _load_full_state(model, optimizer, ckpt.model, ckpt.optimizer)
    mine = state["ranks"][dist.rank()]
    batches.load_state_dict(mine["sampler"])
    restore_rng(mine["rng"])
    if extra_state is not None:
        extra_state.clear()
        extra_state.update(state["extra"])
    return state


def _final_model(model: nn.Module, fsdp: bool, template: nn.Module | None) -> nn.Module | None:
    """The module ``save_fn`` receives on rank 0. Under FSDP every rank takes part in gathering the full
    weights, which rank 0 loads into ``template`` (its CPU copy of the model made before sharding)."""
    if not fsdp:
        return unwrap(model)
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if template is None:
        return None
    template.load_state_dict(full)
    return template


# --- the loop --------------------------------------------------------------------------------------------------

def refuse_existing_checkpoints(out_dir: str | Path, resume: bool) -> None:
    """A run directory that holds checkpoints is only continued (``--resume``), never silently overwritten."""
    existing = list_checkpoints(out_dir)
    if existing and not resume:
        raise LLMLabError(f"{Path(out_dir) / 'checkpoints'} already holds checkpoints (newest: step "
                          f"{existing[-1][0]}); pass --resume to continue that run, or choose another --out")


def train(model: nn.Module, loss_fn: Callable, batches, cfg: TrainConfig, out_dir: str | Path, *,
          eval_fn: Callable | None = None, save_fn: Callable | None = None, resume: bool = False,
          flops_per_token: float | None = None, extra_state: dict | None = None,
          on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Train ``model`` for ``cfg.max_steps`` optimizer updates and return a summary.

    ``loss_fn(model, batch) -> (loss, n_tokens, metrics)``: ``loss`` is the scalar mean over the micro-batch,
    ``n_tokens`` the tokens it covered (for throughput), ``metrics`` a dict of numbers logged beside the loss.
    ``model`` there may be a DDP wrapper: call it, do not read attributes from it.
    ``batches``: any object with ``next_batch()``, ``state_dict()`` and ``load_state_dict(state)``; under
    ``torchrun`` it should yield this rank's share of the global batch. Batches are moved to the device.
    ``eval_fn(model) -> dict`` runs every ``cfg.eval_every`` steps and after the last (no grad, eval mode).
    ``save_fn(model, out_dir)`` writes the final model on rank 0 (the unwrapped module, full weights).
    ``resume``: continue from the newest complete checkpoint in ``out_dir/checkpoints`` (fresh start if none).
    ``flops_per_token``: training FLOPs per token (≈ 6·params), with ``cfg.peak_flops`` gives MFU.
    ``extra_state``: a dict the stage owns, saved in every checkpoint and refilled in place on resume.
    ``on_step(step, record)``: called after each step (after its checkpoint), e.g. for tests or early stopping.

    A fresh run seeds Python, NumPy and torch with ``cfg.seed + rank`` (build the model before calling);
    a resumed run restores every generator instead. Returns ``{"steps", "tokens", "seconds", "final_loss",
    "val_loss", "eval"}`` (``val_loss`` is ``eval_fn``'s ``"val_loss"`` entry, if it has one).
    """
    out_dir = Path(out_dir)
    rank, world, _, device = dist.init_distributed(cfg.device)
    if world > 1 and cfg.parallel == "none":
        raise LLMLabError(f"train.parallel=none but launched with {world} processes; use ddp or fsdp")
    _check_sampler(batches)
    main = rank == 0
    if main:
        out_dir.mkdir(parents=True, exist_ok=True)
    refuse_existing_checkpoints(out_dir, resume)
    seed_everything(cfg.seed + rank)

    fsdp = world > 1 and cfg.parallel == "fsdp"
    template = copy.deepcopy(model).cpu() if fsdp and main else None
    model = _wrap(model.to(device), cfg, world, device)
    step_model = compiled(model, cfg)
    optimizer = make_optimizer(unwrap(model), cfg, device)
    state = _restore(out_dir, model, optimizer, batches, extra_state) if resume else None
    if resume and state is None and main:
        print(f"llmlab: no checkpoint in {out_dir / 'checkpoints'}; starting from step 0", file=sys.stderr)
    step = state["step"] if state else 0
    tokens = state["tokens"] if state else 0
    elapsed_before = state["elapsed"] if state else 0.0

    dtype = autocast_dtype(device)
    amp = torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()
    log = MetricsLog(out_dir, cfg, step if state else None, main)
    bar = progress_bar(total=cfg.max_steps, initial=step, disable=not (main and cfg.progress), desc=out_dir.name,
                       dynamic_ncols=True)
    start = time.perf_counter()
    last_log_time, tokens_since_log = start, 0
    last_loss, last_eval = math.nan, None
    model.train()
    try:
        while step < cfg.max_steps:
            lr = lr_at(step, cfg)
            result = _train_step(step_model, optimizer, loss_fn, batches, cfg, lr, device, amp,
                                 trace=step < cfg.trace_updates)
            step += 1
            tokens += result["tokens"]
            tokens_since_log += result["tokens"]
            if result["finite"]:
                last_loss = result["loss"]
            elif cfg.on_nan == "stop":
                raise LLMLabError(f"non-finite loss/gradient at step {step} (loss={result['loss']}, grad_norm="
                                  f"{result['grad_norm']}); lower train.lr, check the data, or set train.on_nan=skip")
            bar.set_postfix(loss=f"{result['loss']:.4f}", lr=f"{lr:.2e}", refresh=False)
            bar.update(1)
            now = time.perf_counter()
            elapsed = elapsed_before + now - start
            record = {**result["metrics"], "step": step, "loss": result["loss"], "lr": lr,
                      "grad_norm": result["grad_norm"], **result["update"], "tokens": tokens, "elapsed": elapsed}
            if not result["finite"]:
                record.update(loss=None, grad_norm=None, skipped=True)
            final = step == cfg.max_steps
            evaluated = eval_fn is not None and (final or (cfg.eval_every > 0 and step % cfg.eval_every == 0))
            if evaluated:
                last_eval = _evaluate(model, eval_fn, amp, device)
                record.update(last_eval)
            if evaluated or final or not result["finite"] or step % cfg.log_every == 0:
                record["tokens_per_s"] = tokens_since_log / max(now - last_log_time, 1e-9)
                if flops_per_token and cfg.peak_flops:
                    record["mfu"] = flops_per_token * record["tokens_per_s"] / (cfg.peak_flops * world)
                log.write(record)
                last_log_time, tokens_since_log = now, 0
            if cfg.checkpoint_every and (final or step % cfg.checkpoint_every == 0):
                _save(out_dir, model, optimizer, batches, cfg, step, lr, tokens, elapsed, extra_state)
            if on_step is not None:
                on_step(step, record)
        # Resumed at max_steps: evaluate the final weights for the summary; metrics.jsonl already holds that
        # evaluation, logged before the final checkpoint was written.
        if eval_fn is not None and last_eval is None:
            last_eval = _evaluate(model, eval_fn, amp, device)
        final_model = _final_model(model, fsdp, template)
        if main and save_fn is not None:
            save_fn(final_model, out_dir)
    finally:
        bar.close()
        log.close()
    seconds = elapsed_before + time.perf_counter() - start
    if main and log.path.is_file():
        from ..plots import plot_metrics       # matplotlib is only needed here
        plot_metrics(log.path, out_dir / "loss.png", title=f"{out_dir.name}: loss")
    dist.barrier()
    return {"steps": step, "tokens": tokens, "seconds": seconds, "final_loss": last_loss,
            "val_loss": (last_eval or {}).get("val_loss"), "eval": last_eval or {}}
