"""A run's results as ``report.md`` (figures beside it), ``report.html`` (the same, figures embedded) and
``summary.json`` (every number, one key per stage and metric).

A report is a title, an introduction and a list of ``Section``s; each section has prose, a table of key numbers,
figures and optional sample answers. Both documents are rendered from the same structure, so they never disagree.
"""
from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Section:
    title: str
    text: str = ""
    numbers: dict[str, float | int | str] = field(default_factory=dict)
    figures: list[str] = field(default_factory=list)          # paths relative to the report's folder
    table: list[list[str]] = field(default_factory=list)      # first row = header
    samples: list[tuple[str, str]] = field(default_factory=list)   # (label, text)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _markdown(title: str, intro: str, sections: list[Section]) -> str:
    lines = [f"# {title}", "", intro, ""]
    for s in sections:
        lines += [f"## {s.title}", ""]
        if s.text:
            lines += [s.text, ""]
        if s.numbers:
            lines += ["| metric | value |", "|---|---|"] + [f"| {k} | {_fmt(v)} |" for k, v in s.numbers.items()]
            lines.append("")
        if s.table:
            lines.append("| " + " | ".join(s.table[0]) + " |")
            lines.append("|" + "---|" * len(s.table[0]))
            lines += ["| " + " | ".join(_fmt(c) for c in row) + " |" for row in s.table[1:]]
            lines.append("")
        for fig in s.figures:
            lines += [f"![{Path(fig).stem}]({fig})", ""]
        for label, text in s.samples:
            quoted = "\n".join("> " + line for line in (text or "(empty)").splitlines() or ["(empty)"])
            lines += [f"**{label}**", "", quoted, ""]
    return "\n".join(lines)


def _html(title: str, intro: str, sections: list[Section], folder: Path) -> str:
    e = html.escape
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(title)}</title><style>"
             "body{font-family:system-ui,sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:.25em .6em;"
             "text-align:left}img{max-width:100%}blockquote{background:#f6f6f6;margin:.3em 0;padding:.4em .8em;"
             "white-space:pre-wrap}</style></head><body>", f"<h1>{e(title)}</h1><p>{e(intro)}</p>"]
    for s in sections:
        parts.append(f"<h2>{e(s.title)}</h2>")
        if s.text:
            parts += [f"<p>{e(p)}</p>" for p in s.text.split("\n\n")]
        rows = []
        if s.numbers:
            rows = [["metric", "value"]] + [[k, _fmt(v)] for k, v in s.numbers.items()]
        for table in (rows, s.table):
            if table:
                parts.append("<table><tr>" + "".join(f"<th>{e(str(c))}</th>" for c in table[0]) + "</tr>" +
                             "".join("<tr>" + "".join(f"<td>{e(_fmt(c))}</td>" for c in row) + "</tr>"
                                     for row in table[1:]) + "</table>")
        for fig in s.figures:
            data = base64.b64encode((folder / fig).read_bytes()).decode()
            parts.append(f"<p><img alt='{e(Path(fig).stem)}' src='data:image/png;base64,{data}'></p>")
        for label, text in s.samples:
            parts.append(f"<p><b>{e(label)}</b></p><blockquote>{e(text or '(empty)')}</blockquote>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(folder: str | Path, title: str, intro: str, sections: list[Section], summary: dict) -> dict:
    """Write report.md, report.html and summary.json into ``folder``; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = {"md": folder / "report.md", "html": folder / "report.html", "summary": folder / "summary.json"}
    paths["md"].write_text(_markdown(title, intro, sections), encoding="utf-8")
    paths["html"].write_text(_html(title, intro, sections, folder), encoding="utf-8")
    paths["summary"].write_text(json.dumps(summary, indent=2, sort_keys=True), encoding="utf-8")
    return paths
