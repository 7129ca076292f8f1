"""``llmlab defend``: prepare the defenses that need data before they run.

    llmlab defend calibrate --model M --benign FILE [FILE ...] --fpr 0.05 --out DIR
        scores the benign prompts with M (the reference LM of the perplexity filter), writes DIR/perplexity.json
        with the threshold of each mode (whole prompt, windowed) at that false-positive rate, the rate each reaches
        on the calibration set and its size; use it with --defense perplexity --defense-set perplexity.calibration=DIR
    llmlab defend guard --model M --data WORLD_DIR --out DIR [--config NAME] [--set key=value ...]
        trains the guard classifier (forbidden vs allowed requests) with the ``llmlab classify`` stage, recipe
        ``classify-world`` by default; use it with --defense guard --defense-set guard.model=DIR/<name>

This module sits above the stages (it calls ``llmlab classify``'s ``run``), beside ``llmlab run``'s pipeline; the
defenses themselves (``defenses.py``) import no stage, so ``llmlab eval`` can use them.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..data.chat_data import iter_jsonl, load_prompts
from ..device import pick_device
from ..errors import LLMLabError
from ..hub.folder import ModelDir
from ..hub.load import load_model
from ..stages.classify import DEFAULTS as CLASSIFY_DEFAULTS
from ..stages.classify import run as run_classify
from ..stages.common import resolve_recipe
from .defended import last_user_text
from .perplexity import PerplexityScorer, calibrate, write_calibration


def read_benign(path) -> list[str]:
    """User texts of a benign prompt file: ``.txt`` (one per line), or ``.jsonl`` prompts (``load_prompts``: the
    last user message) or records with a ``text`` field (classification files: only label 0 when labelled)."""
    path = Path(path)
    if path.suffix == ".txt":
        if not path.is_file():
            raise LLMLabError(f"no such file: {path}")
        texts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    else:
        records = list(iter_jsonl(path))
        if records and all("text" in r for _, r in records):
            texts = [r["text"] for _, r in records if r.get("label", 0) in (0, "allowed", "benign")]
        else:
            texts = [last_user_text(item["prompt"]) for item in load_prompts(path)]
    if not texts:
        raise LLMLabError(f"{path}: no benign prompts in the file")
    return texts


def calibrate_command(args) -> int:
    texts = [t for path in args.benign for t in read_benign(path)][:args.limit]
    model = ModelDir(args.model)
    scorer = PerplexityScorer(load_model(model, device=pick_device(args.device)), model.tokenizer(),
                              batch_size=args.batch_size)
    result = calibrate(scorer, texts, args.fpr, args.window)
    result.update(model=str(args.model), benign=[str(p) for p in args.benign])
    path = write_calibration(result, args.out)
    for mode, m in result["modes"].items():
        print(f"{mode}: threshold {m['threshold']:.4f} (false positives on the {result['n_calibration']} "
              f"calibration prompts: {m['calibration_fpr']:.3f} ≤ {args.fpr})")
    print(f"wrote {path}", file=sys.stderr)
    return 0


def guard_command(args) -> int:
    recipe = resolve_recipe(CLASSIFY_DEFAULTS, args.config, args.sets)
    summary = run_classify([args.model], args.data, args.out, recipe)
    result = summary["results"][0]
    print(f"guard: {result['out']} (held-out accuracy {result['after']:.3f}); use it with --defense guard "
          f"--defense-set guard.model={result['out']}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("defend", help="calibrate the perplexity filter, train the guard classifier",
                              description=__doc__.split("\n\nThis module")[0].replace("``", ""),
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="defend_command", required=True, metavar="<step>")
    c = sub.add_parser("calibrate", help="perplexity-filter thresholds at a false-positive rate on benign prompts")
    c.add_argument("--model", required=True, help="reference LM (usually the target): folder, hub id or .gguf")
    c.add_argument("--benign", required=True, nargs="+", metavar="FILE", help="benign prompts: .jsonl or .txt")
    c.add_argument("--fpr", type=float, default=0.05, help="false-positive rate on the benign prompts")
    c.add_argument("--out", required=True, metavar="DIR", help="folder for perplexity.json")
    c.add_argument("--window", type=int, default=10, help="tokens per window of the windowed score")
    c.add_argument("--limit", type=int, default=None, help="use the first N benign prompts only")
    c.add_argument("--batch-size", type=int, default=16)
    c.add_argument("--device", default="cpu")
    c.set_defaults(func=calibrate_command)
    g = sub.add_parser("guard", help="train the guard classifier with `llmlab classify`")
    g.add_argument("--model", required=True, help="pre-trained model to put the classification head on")
    g.add_argument("--data", required=True, help="the task world's folder (classify_train/classify_eval) or a file")
    g.add_argument("--out", required=True, metavar="DIR", help="run folder; the guard is DIR/<model name>")
    g.add_argument("--config", default="classify-world", help="classify recipe (default classify-world)")
    g.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE")
    g.set_defaults(func=guard_command)
