"""``llmlab <stage>``: one entry point, a thin subcommand per stage.

Each module in ``COMMAND_MODULES`` defines ``register(subparsers)``, which adds its subcommand(s) and sets
``func`` to a handler taking the parsed arguments. Errors a user can fix (``LLMLabError``) are printed without a
traceback; ``--debug`` shows it.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import LLMLabError

COMMAND_MODULES = [       # in the order of a model's life
    "pipeline",
    "data.world", "tokenizer", "data.shards",
    "stages.pretrain", "stages.experiment",
    "stages.sft", "stages.pairs", "stages.reward", "stages.dpo", "stages.ppo", "stages.evaluate",
    "stages.classify",
    "infer.engine", "infer.chat_cli", "infer.server", "infer.client",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llmlab", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<stage>")
    for name in COMMAND_MODULES:
        importlib.import_module(f"llmlab.{name}").register(sub)
    return parser


def add_config_args(p: argparse.ArgumentParser) -> None:
    """The flags every training stage shares: ``--config NAME|PATH`` and repeated ``--set key=value``."""
    p.add_argument("--config", default=None, help="recipe name (llmlab/configs/NAME.yaml) or path")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a recipe key with dotted names, e.g. --set train.lr=1e-3 (repeatable)")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    try:
        args = build_parser().parse_args(argv)
        result = args.func(args)
        return int(result or 0)
    except LLMLabError as e:
        if debug:
            raise
        print(f"llmlab: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmlab: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
