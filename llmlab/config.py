"""Recipes: YAML files of nested defaults, overridden from the command line with ``--set a.b=value``.

A recipe is plain data (nested dicts). ``load_recipe`` finds ``llmlab/configs/NAME.yaml`` (shipped as package data,
so ``--config NAME`` works from any directory and in a non-editable install) or reads a path,
``apply_overrides`` applies ``key=value`` strings (values parsed as YAML scalars, so ``3``, ``1e-3``,
``true`` and ``[1, 2]`` get their natural types), and ``from_dict`` turns a section into a dataclass,
rejecting unknown keys with the full dotted name so a typo never passes silently.
"""
from __future__ import annotations

import copy
import dataclasses
import os
from pathlib import Path
from typing import Any, Iterable

import yaml

from .errors import LLMLabError

CONFIG_DIR = Path(__file__).resolve().parent / "configs"      # shipped inside the package


def cache_root() -> Path:
    """Where llmlab keeps what it downloads or converts once: ``$LLMLAB_CACHE``, by default ``~/.cache/llmlab``."""
    return Path(os.environ.get("LLMLAB_CACHE") or Path.home() / ".cache" / "llmlab")


def recipe_path(name: str) -> Path:
    """Where the shipped recipe ``name`` lives: ``llmlab/configs/NAME.yaml``."""
    return CONFIG_DIR / f"{name}.yaml"


def known_recipes() -> list[str]:
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def load_recipe(name_or_path: str | None) -> dict:
    """Read a recipe by name (``llmlab/configs/NAME.yaml``) or by path; ``None`` gives an empty recipe."""
    if not name_or_path:
        return {}
    path = Path(name_or_path)
    if not path.suffix:
        path = recipe_path(name_or_path)
    if not path.is_file():
        raise LLMLabError(
            f"recipe {name_or_path!r} not found (looked for {path}); known recipes: {', '.join(known_recipes())}")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as e:
        raise LLMLabError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise LLMLabError(f"{path}: a recipe must be a mapping of keys to values")
    return data


def apply_overrides(recipe: dict, sets: Iterable[str]) -> dict:
    """Return a copy of ``recipe`` with each ``a.b.c=value`` applied (nested dicts created as needed)."""
    out = copy.deepcopy(recipe)
    for item in sets or ():
        if "=" not in item:
            raise LLMLabError(f"--set {item!r}: expected key=value, e.g. --set train.lr=3e-4")
        key, raw = item.split("=", 1)
        try:
            value = yaml.safe_load(raw) if raw != "" else ""
        except yaml.YAMLError:
            value = raw
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise LLMLabError(f"--set {key}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return out


def from_dict(cls, data: dict | None, where: str = ""):
    """Build dataclass ``cls`` from ``data``, each value given its field's declared type (``coerce``); unknown keys
    raise an error naming ``where.key`` with the known ones, so a typo never passes silently."""
    data = dict(data or {})
    fields = {f.name: f for f in dataclasses.fields(cls)}

    def key(name: str) -> str:
        return f"{where}.{name}" if where else name
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise LLMLabError(f"unknown config key(s) {', '.join(map(key, unknown))}; known: {', '.join(sorted(fields))}")
    return cls(**{name: coerce(value, fields[name].type, key(name)) for name, value in data.items()})


def coerce(value, annotation, where: str):
    """``value`` as the type a dataclass field declares: YAML reads ``3e-4`` as a string and ``10.0`` as a float,
    so a number field takes a number or a numeric string (an ``int`` field only a whole one, ``whole_number``); a
    ``bool`` field takes only true or false (``--set data.padding_free=maybe`` would otherwise count as true); a
    ``tuple`` of numbers its items as floats. ``None`` stays ``None`` in an optional field; other types pass."""
    kind = str(getattr(annotation, "__name__", annotation)).replace(" ", "")
    optional = "|None" in kind or "None|" in kind
    kind = kind.replace("|None", "").replace("None|", "")
    if value is None and optional:
        return None
    if kind == "bool":
        if not isinstance(value, bool):
            raise LLMLabError(f"{where} = {value!r}: expected true or false")
        return value
    try:
        if kind == "int" and not isinstance(value, bool):
            return whole_number(value, where)
        if kind == "float" and not isinstance(value, bool):
            return float(value)
        if kind == "tuple" and isinstance(value, (list, tuple)):
            return tuple(float(v) for v in value)
    except (TypeError, ValueError):
        raise LLMLabError(f"{where}: expected a number, got {value!r}") from None
    return value


def whole_number(value, field: str) -> int:
    """An int from an int, a whole float (10.0) or a string ("20", "1e3"); 2.5 is an error naming ``field``, not 2.
    A string that is no number raises ``ValueError`` for the caller to report."""
    if isinstance(value, str):
        try:
            return int(value)
        except ValueError:
            value = float(value)
    if isinstance(value, float):
        if not value.is_integer():
            raise LLMLabError(f"{field}: expected a whole number, got {value!r}")
        return int(value)
    return int(value)


def to_dict(obj: Any) -> Any:
    """Dataclasses (nested) to plain dicts, for ``run.yaml``."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    return obj


def save_yaml(data: dict, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(data), sort_keys=False), encoding="utf-8")
