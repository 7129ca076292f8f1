"""Atomic training checkpoints holding everything an exact resume needs.

Layout of ``OUT/checkpoints/``::

    step_00001000/
        model.safetensors   full model state dict (tied/shared tensors stored once, aliases in the metadata)
        optimizer.pt        optimizer state dict (parameter names as keys), read back with weights_only=True
        state.pt            step, RNG states of every rank, data-sampler position, the stage's extra state
        state.json          the human-readable part: step, learning rate, elapsed seconds, world size
    latest                  text file naming the newest checkpoint directory (for people and scripts;
                            ``load_latest`` scans the step directories)

A checkpoint is written into a hidden sibling ``.tmp-step_…`` directory, every file and the directory are
fsynced, and only then is it renamed into place (``os.rename`` is atomic on one file system) and ``latest``
replaced (write a temporary file, fsync, ``os.replace``). A crash at any moment therefore leaves the previous
checkpoints untouched, and ``load_latest`` only ever sees complete ones. Writing a step that already exists moves
the old copy aside to ``.old-step_…`` first; a crash between the two renames is repaired on the next read or
write, which moves that copy back.
"""
from __future__ import annotations

import json
import os
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from ..errors import LLMLabError
from ..files import write_text_atomic

CHECKPOINT_FILES = ("model.safetensors", "optimizer.pt", "state.pt", "state.json")
_STEP_DIR = re.compile(r"^step_(\d+)$")
_ALIASES_KEY = "llmlab_aliases"


@dataclass
class Checkpoint:
    path: Path
    step: int
    model: dict          # parameter/buffer name -> tensor (CPU)
    optimizer: dict      # optimizer state dict keyed by parameter names
    state: dict          # contents of state.pt
    info: dict           # contents of state.json


def checkpoints_root(out_dir: str | Path) -> Path:
    return Path(out_dir) / "checkpoints"


def step_dir_name(step: int) -> str:
    return f"step_{step:08d}"


# --- RNG state -------------------------------------------------------------------------------------------------

def capture_rng() -> dict:
    """Python ``random``, NumPy, torch CPU and (when initialised) CUDA generator states, in a form
    ``torch.load(weights_only=True)`` accepts (the NumPy key array becomes a tensor)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    """Inverse of ``capture_rng``."""
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# --- safetensors with shared tensors ----------------------------------------------------------------------------

def _dedupe_shared(state_dict: dict[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Split a state dict into tensors safetensors can store (no two sharing memory) and ``alias -> name`` for
    entries that are the very same tensor as an earlier one (tied embeddings). Other overlapping views are copied."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, t in state_dict.items():
        t = t.detach()
        identity = (t.data_ptr(), t.dtype, tuple(t.shape), tuple(t.stride()))
        if t.numel() and identity in seen:
            aliases[name] = seen[identity]
            continue
        storage = t.untyped_storage().data_ptr()
        if t.numel() and storage in storages:
            t = t.clone()
        else:
            storages.add(storage)
            seen[identity] = name
        tensors[name] = t.contiguous().cpu()
    return tensors, aliases


def save_safetensors(state_dict: dict[str, torch.Tensor], path: str | Path) -> None:
    """Write a state dict to ``path``; shared tensors are stored once and restored by ``load_safetensors``."""
    tensors, aliases = _dedupe_shared(state_dict)
    save_file(tensors, str(path), metadata={_ALIASES_KEY: json.dumps(aliases)})


def load_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        tensors = load_file(str(path), device="cpu")
    except Exception as e:  # safetensors raises its own error types for truncated or foreign files
        raise LLMLabError(f"{path}: not a readable safetensors file ({e})") from None
    for alias, name in json.loads(metadata.get(_ALIASES_KEY, "{}")).items():
        tensors[alias] = tensors[name]
    return tensors


# --- optimizer state keyed by parameter names -----------------------------------------------------------------

def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Names of the optimizer's parameters in the order ``optimizer.state_dict()`` numbers them."""
    names = {id(p): n for n, p in model.named_parameters()}
    try:
        return [names[id(p)] for group in optimizer.param_groups for p in group["params"]]
    except KeyError:
        raise LLMLabError("the optimizer holds a parameter that is not part of the model") from None


def optimizer_state_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """``optimizer.state_dict()`` with parameter names instead of positions, the layout
    ``torch.distributed.checkpoint.state_dict`` produces for FSDP, so checkpoints read the same either way."""
    sd = optimizer.state_dict()
    names = _param_names(model, optimizer)
    return {"state": {names[i]: s for i, s in sd["state"].items()},
            "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in sd["param_groups"]]}


def load_optimizer_state_by_name(model: torch.nn.Module, optimizer: torch.optim.Optimizer, named: dict) -> None:
    """Inverse of ``optimizer_state_by_name``: load a name-keyed state into ``optimizer``."""
    index = {n: i for i, n in enumerate(_param_names(model, optimizer))}
    try:
        sd = {"state": {index[n]: s for n, s in named["state"].items()},
              "param_groups": [{**g, "params": [index[n] for n in g["params"]]} for g in named["param_groups"]]}
        optimizer.load_state_dict(sd)
    except (KeyError, ValueError) as e:
        raise LLMLabError(f"the checkpoint's optimizer state does not match this model's parameters ({e})") from None


# --- writing ---------------------------------------------------------------------------------------------------

def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_files(folder: Path, model_state: dict, optimizer_state: dict, state: dict, info: dict) -> None:
    save_safetensors(model_state, folder / "model.safetensors")
    torch.save(optimizer_state, folder / "optimizer.pt")
    torch.save(state, folder / "state.pt")
    (folder / "state.json").write_text(json.dumps(info, indent=2, sort_keys=True), encoding="utf-8")
    for name in CHECKPOINT_FILES:
        _fsync_path(folder / name)
    _fsync_path(folder)


def _write_latest(root: Path, name: str) -> None:
    write_text_atomic(root / "latest", name + "\n")
    _fsync_path(root)


def save_checkpoint(out_dir: str | Path, step: int, model_state: dict, optimizer_state: dict, state: dict,
                    info: dict | None = None, keep: int | None = None) -> Path:
    """Atomically write checkpoint ``step`` under ``out_dir/checkpoints`` and keep only the newest ``keep``
    (all when ``keep`` is None or ≤ 0). Returns the checkpoint directory."""
    root = checkpoints_root(out_dir)
    root.mkdir(parents=True, exist_ok=True)
    _restore_moved_aside(root)
    for stale in root.glob(".tmp-*"):          # left behind by a run killed mid-write
        shutil.rmtree(stale, ignore_errors=True)
    name = step_dir_name(step)
    tmp = root / f".tmp-{name}-{os.getpid()}"
    tmp.mkdir()
    try:
        _write_files(tmp, model_state, optimizer_state, state, {"step": step, **(info or {})})
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    final = root / name
    if final.exists():                          # same step written again: move the old copy aside first
        old = root / f".old-{name}-{os.getpid()}"
        os.rename(final, old)
        os.rename(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    _fsync_path(root)
    _write_latest(root, name)
    if keep and keep > 0:
        for _, path in list_checkpoints(out_dir)[:-keep]:
            shutil.rmtree(path, ignore_errors=True)
    return final


# --- reading ---------------------------------------------------------------------------------------------------

def _restore_moved_aside(root: Path) -> None:
    """Undo a same-step rewrite that a crash stopped between its two renames: the old copy, moved aside to
    ``.old-step_…-PID``, goes back to its name when no new copy took it, and is dropped when one did."""
    for old in root.glob(".old-step_*"):
        final = root / old.name[len(".old-"):].rsplit("-", 1)[0]
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(old, final)


def list_checkpoints(out_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (every file present) as ``(step, path)``, oldest first."""
    root = checkpoints_root(out_dir)
    if not root.is_dir():
        return []
    _restore_moved_aside(root)
    found = []
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if match and path.is_dir() and all((path / f).is_file() for f in CHECKPOINT_FILES):
            found.append((int(match.group(1)), path))
    return sorted(found)


def _torch_load(path: Path):
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle, zip and weights_only errors all mean "not a checkpoint file we wrote"
        raise LLMLabError(f"{path}: cannot read checkpoint file ({e})") from None


def load_checkpoint(path: str | Path) -> Checkpoint:
    """Read one checkpoint directory (tensors on CPU)."""
    path = Path(path)
    missing = [f for f in CHECKPOINT_FILES if not (path / f).is_file()]
    if missing:
        raise LLMLabError(f"{path}: incomplete checkpoint, missing {', '.join(missing)}")
    try:
        info = json.loads((path / "state.json").read_text(encoding="utf-8"))
    except ValueError as e:
        raise LLMLabError(f"{path / 'state.json'}: not valid JSON ({e})") from None
    return Checkpoint(path=path, step=int(info["step"]), model=load_safetensors(path / "model.safetensors"),
                      optimizer=_torch_load(path / "optimizer.pt"), state=_torch_load(path / "state.pt"), info=info)


def load_latest(out_dir: str | Path) -> Checkpoint | None:
    """The newest complete checkpoint under ``out_dir/checkpoints``, or None when there is none."""
    found = list_checkpoints(out_dir)
    return load_checkpoint(found[-1][1]) if found else None
