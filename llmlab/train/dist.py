"""Process-group helpers: one code path for a single process and for ``torchrun`` launches.

``torchrun --nproc_per_node N`` sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in each process's environment;
``init_distributed`` reads them, joins the process group (NCCL on CUDA, gloo on CPU) and picks this process's
device. Without those variables everything here is a no-op and the world has one process.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

from ..device import pick_device
from ..errors import LLMLabError


def _env_int(name: str, default: int) -> int:
    raw = os.environ.get(name, "")
    try:
        return int(raw) if raw else default
    except ValueError:
        raise LLMLabError(f"environment variable {name}={raw!r} is not an integer") from None


def init_distributed(device: str | None = "auto") -> tuple[int, int, int, torch.device]:
    """Join the process group when launched by ``torchrun``; return ``(rank, world_size, local_rank, device)``.

    Safe to call more than once. On CUDA each process uses ``cuda:LOCAL_RANK``.
    """
    world_size = _env_int("WORLD_SIZE", 1)
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    dev = pick_device(device)
    if world_size <= 1:
        return 0, 1, 0, dev
    if dev.type == "cuda":
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world_size)
    return dist.get_rank(), dist.get_world_size(), local_rank, dev


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def is_main() -> bool:
    """True on rank 0 (and in a single process): the one process that logs and writes files."""
    return rank() == 0


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group (call once, at the very end of a ``torchrun`` script), after a barrier, so that no
    rank tears its connections down while another still uses them."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over all processes (in place); identity in a single process."""
    if is_distributed():
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_gather_object(obj) -> list:
    """Every process's ``obj``, in rank order (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out
