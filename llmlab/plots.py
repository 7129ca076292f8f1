"""Figures from ``metrics.jsonl`` (one JSON object per logged step), drawn with matplotlib's Agg canvas.

No pyplot: a ``Figure`` is built and saved directly, so plotting works without a display and leaves no global
state behind.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from .errors import LLMLabError


def save(fig: Figure, out_png: str | Path) -> Path:
    """Write ``fig`` to ``out_png`` (its folder created as needed) and return the path. Atomically: a reader (or
    another process writing the same figure) never sees half a file."""
    out = Path(out_png)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.{os.getpid()}.tmp{out.suffix}")
    fig.savefig(tmp)
    tmp.replace(out)
    return out


def read_metrics(metrics_jsonl: str | Path) -> list[dict]:
    """All records of a ``metrics.jsonl`` file, in order."""
    path = Path(metrics_jsonl)
    if not path.is_file():
        raise LLMLabError(f"{path}: metrics file not found")
    records = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except ValueError as e:
            raise LLMLabError(f"{path}:{lineno}: not a JSON object ({e})") from None
    return records


def series(records: list[dict], key: str) -> tuple[list[float], list[float]]:
    """``(steps, values)`` of the records that hold a finite number under ``key``."""
    steps, values = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and "step" in r:
            steps.append(r["step"])
            values.append(float(v))
    return steps, values


def plot_metrics(metrics_jsonl: str | Path, out_png: str | Path, keys=("loss", "val_loss"),
                 title: str | None = None) -> Path:
    """Plot each of ``keys`` against ``step`` on one axes and save a PNG; keys with no data are left out."""
    records = read_metrics(metrics_jsonl)
    fig = Figure(figsize=(7, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    plotted = 0
    for key in keys:
        steps, values = series(records, key)
        if steps:
            ax.plot(steps, values, marker="o" if len(steps) < 30 else None, markersize=3, label=key)
            plotted += 1
    if plotted:
        ax.legend()
    else:
        ax.text(0.5, 0.5, f"no values for {', '.join(keys)}", ha="center", va="center", transform=ax.transAxes)
    return _finish(fig, ax, out_png, "step", "", title or Path(metrics_jsonl).parent.name)


def bar_chart(categories: list[str], series: dict[str, list[float]], out_png: str | Path, *,
              title: str = "", ylabel: str = "", ylim: tuple[float, float] | None = None,
              errors: dict[str, list[float]] | None = None) -> Path:
    """Grouped bars: one group per category, one bar per series (e.g. before/after per model), values printed
    on the bars (a NaN is no bar: a value that does not apply); ``errors`` (same keys as ``series``) draws ± error
    bars, e.g. the standard deviation over seeds."""
    fig = Figure(figsize=(min(11.0, max(5.0, 0.7 * len(categories) * max(1, len(series)) + 2)), 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / max(1, len(series))
    for i, (name, values) in enumerate(series.items()):
        xs = [c + (i - (len(series) - 1) / 2) * width for c in range(len(categories))]
        yerr = (errors or {}).get(name)
        bars = ax.bar(xs, values, width, label=name, yerr=yerr, capsize=3 if yerr else 0)
        ax.bar_label(bars, labels=["" if not math.isfinite(v) else f"{v:.2f}" if abs(v) < 10 else f"{v:.0f}"
                                   for v in values], fontsize=7)
    ax.set_xticks(range(len(categories)), categories)
    if ylim:
        ax.set_ylim(*ylim)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if len(series) > 1:
        ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return save(fig, out_png)


def curve_grid(panels: list[tuple[str, dict[str, list[tuple[list, list]]]]], out_png: str | Path, *, cols: int,
               ylabel: str = "", title: str = "", logy: bool = False, ylim: tuple[float, float] | None = None,
               xlabel: str = "step") -> Path:
    """Small multiples: one axes per panel ``(title, {label: [(steps, values), …]})``, one line per run (e.g. per
    seed) in the label's colour, the same colours in every panel and one legend."""
    rows = max(1, math.ceil(len(panels) / cols))
    fig = Figure(figsize=(3.4 * cols, 2.7 * rows + 0.5), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False, sharex=True)
    labels = list(dict.fromkeys(label for _, lines in panels for label in lines))
    colours = {label: f"C{i % 10}" for i, label in enumerate(labels)}
    for ax, (name, lines) in zip(axes.flat, panels):
        for label, runs in lines.items():
            for i, (steps, values) in enumerate(runs):
                ax.plot(steps, values, color=colours[label], linewidth=1.0, alpha=0.85,
                        label=label if i == 0 else None)
        if logy:
            ax.set_yscale("log")
        if ylim:
            ax.set_ylim(*ylim)
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel(ylabel)
    for ax in axes[-1, :]:
        ax.set_xlabel(xlabel)
    handles, names = axes.flat[0].get_legend_handles_labels()
    top = 1.0 - 0.75 / (2.7 * rows + 0.5)          # room for the title and the legend above the panels
    if title:
        fig.suptitle(title, y=0.995, fontsize=10, va="top")
    fig.legend(handles, names, loc="lower center", bbox_to_anchor=(0.5, top), ncol=max(1, len(names)), fontsize=8,
               frameon=False)
    fig.tight_layout(rect=(0, 0, 1, top))
    return save(fig, out_png)


def line_chart(curves: dict[str, list[float]], out_png: str | Path, *, xlabel: str = "step", ylabel: str = "",
               title: str = "") -> Path:
    """One line per named series against 1, 2, 3, ... (e.g. the GCG loss of each behaviour); the legend is left
    out when there are more than ten series."""
    fig = Figure(figsize=(7, 4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, values in curves.items():
        ax.plot(range(1, len(values) + 1), values, label=name, linewidth=1)
    if 1 < len(curves) <= 10:
        ax.legend(fontsize=8)
    return _finish(fig, ax, out_png, xlabel, ylabel, title)


def xy_chart(curves: dict[str, tuple[list[float], list[float]]], out_png: str | Path, *, xlabel: str = "",
             ylabel: str = "", title: str = "", marks: dict[str, tuple[float, float]] | None = None,
             ylim: tuple[float, float] | None = None) -> Path:
    """One line with markers per named series of (x, y) points (e.g. ASR against false-refusal rate as a threshold
    moves); ``marks`` adds labelled single points (e.g. the calibrated setting)."""
    fig = Figure(figsize=(6, 4.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for name, (xs, ys) in curves.items():
        ax.plot(xs, ys, marker="o", markersize=3, linewidth=1, label=name)
    for name, (x, y) in (marks or {}).items():
        ax.plot([x], [y], marker="*", markersize=12, linestyle="none", color="black")
        ax.annotate(name, (x, y), textcoords="offset points", xytext=(6, 6), fontsize=8)
    if curves:
        ax.legend(fontsize=8)
    if ylim:
        ax.set_ylim(*ylim)
    return _finish(fig, ax, out_png, xlabel, ylabel, title)


def _finish(fig: Figure, ax, out_png: str | Path, xlabel: str, ylabel: str, title: str) -> Path:
    """The axis labels, title and grid of a one-axes line chart, then the PNG."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    return save(fig, out_png)
