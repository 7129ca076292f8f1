"""``llmlab experiment``: questions of the course answered by runs, each with a report.

    llmlab experiment --list
    llmlab experiment NAME [--preset test|default|large] [--seed N] [--seeds K] [--set key=value ...]
                           [--data PATH] [--steps N] --out DIR

One module per experiment (``EXPERIMENTS`` names them); ``common.py`` gives each one its presets, seeds, resume
and report (``report.md``, ``report.html``, ``summary.json`` and PNG figures in ``DIR``). ``--data`` and
``--steps`` are short for ``--set corpus=PATH`` and ``--set steps=N``.
"""
from __future__ import annotations

from .common import EXPERIMENTS


def register(subparsers) -> None:
    p = subparsers.add_parser("experiment", help="small experiments that explain a design choice",
                              description=__doc__.splitlines()[0])
    p.add_argument("name", nargs="?", metavar="NAME", help="the experiment (see --list)")
    p.add_argument("--list", action="store_true", help="name every experiment with one line each")
    p.add_argument("--preset", default="default", metavar="test|default|large",
                   help="the size of the run: test (seconds, for CI), default (minutes on a laptop CPU), large (GPU)")
    p.add_argument("--seed", type=int, default=0, help="the first seed (default 0)")
    p.add_argument("--seeds", type=int, default=None, metavar="K",
                   help="how many seeds, N … N+K−1 (default: the preset's; ≥ 3 at the default preset)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a setting of the experiment, e.g. --set steps=100 (repeatable)")
    p.add_argument("--data", default=None, metavar="PATH", help="the corpus: short for --set corpus=PATH")
    p.add_argument("--steps", type=int, default=None, help="training steps: short for --set steps=N")
    p.add_argument("--out", default=None, metavar="DIR", help="the experiment's folder (a rerun resumes it)")
    p.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    from ..errors import LLMLabError
    from . import common

    if args.list:
        width = max(map(len, EXPERIMENTS))
        for name, (_, line) in EXPERIMENTS.items():
            print(f"{name:{width}s}  {line}")
        return 0
    if not args.name:
        raise LLMLabError("name an experiment (llmlab experiment --list shows them), or pass --list")
    if not args.out:
        raise LLMLabError("--out DIR is required: the folder for the experiment's runs and report")
    sets = list(args.sets)
    if args.data is not None:
        sets.append(f"corpus={args.data}")
    if args.steps is not None:
        sets.append(f"steps={args.steps}")
    result = common.run_experiment(args.name, args.out, preset=args.preset, seed=args.seed, seeds=args.seeds,
                                   sets=sets)
    from ..train import dist
    if dist.is_main():
        print(f"{args.name}: {result['headline']}\nreport in {result['report']}")
    return 0
