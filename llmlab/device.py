"""Device and dtype are chosen once and passed down; nothing else in llmlab hard-codes CUDA."""
from __future__ import annotations

import torch

from .errors import LLMLabError


def pick_device(name: str | None = None) -> torch.device:
    """``None``/``"auto"``: CUDA when present, else CPU."""
    if name in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """Training precision: bfloat16 autocast on CUDA; float32 on CPU, where bf16 matmuls are ~100x slower
    on CPUs without bf16 units."""
    return torch.bfloat16 if device.type == "cuda" else None


def parse_dtype(name: str | None) -> torch.dtype | None:
    table = {None: None, "": None, "auto": None, "float32": torch.float32, "fp32": torch.float32,
             "bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise LLMLabError(f"unknown dtype {name!r}; use float32, bfloat16 or float16")
    return table[name]
