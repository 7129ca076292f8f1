"""``llmlab <stage>``: one entry point, a thin subcommand per stage.

Each module in ``COMMANDS`` defines ``register(subparsers)``, which adds its subcommand and sets ``func`` to a
handler taking the parsed arguments. Only the module of the subcommand being run is imported (the others bring
in torch, transformers, fastapi, matplotlib ...): the rest of the parser holds a one-line stub per subcommand, so
``llmlab --help`` lists them all. Errors a user can fix (``LLMLabError``) are printed without a traceback;
``--debug`` shows it.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .errors import LLMLabError

COMMANDS = {       # subcommand → (module, one-line help), in the order of a model's life
    "run": ("pipeline", "the whole life cycle on the built-in task world, with a report"),
    "world": ("world.build", "generate the built-in task world's data files"),
    "tokenizer": ("tokenizer", "train a tokenizer"),
    "tokenize": ("tokenize_cli", "show the tokens, ids and byte spans a model's tokenizer gives a text"),
    "template": ("template_cli", "show a chat template's rendering: special tokens and the tokens the loss trains"),
    "shards": ("data.shards", "tokenize text into memory-mapped token shards"),
    "pretrain": ("stages.pretrain", "pre-train a language model (decoder) or a masked-LM encoder on text"),
    "experiment": ("experiments", "small experiments that explain a design choice"),
    "sft": ("stages.sft", "supervised fine-tuning on chat conversations"),
    "pairs": ("stages.pairs", "preference pairs from a model's samples, scored by a judge"),
    "rm": ("stages.reward", "train a reward model on preference pairs (Bradley–Terry)"),
    "dpo": ("stages.dpo", "direct preference optimisation on chosen/rejected pairs"),
    "ppo": ("stages.ppo", "RLHF: tune a policy with PPO against a reward model or the world reward"),
    "eval": ("stages.evaluate", "compare chat models on held-out prompts"),
    "classify": ("stages.classify", "fine-tune pretrained models as text classifiers (before/after)"),
    "generate": ("infer.engine", "complete a prompt with a model directory, Hugging Face folder or GGUF file"),
    "chat": ("infer.chat_cli", "chat in the terminal with a model directory, Hugging Face folder or GGUF file"),
    "serve": ("infer.server", "OpenAI-compatible API (continuous batching) and a chat page for a model"),
    "ask": ("infer.client", "send one message to a hosted chat API and print the answer"),
    "defend": ("redteam.defend", "calibrate the perplexity filter, train the guard classifier"),
    "attack": ("redteam.attack_cli", "attack a chat model (GCG, ...) and record what it takes"),
    "safety-data": ("redteam.safety_data", "refusal SFT data and preference pairs from harmful behaviours"),
    "redteam": ("redteam.redteam", "attack a model, defend it, measure both: one report"),
}


def _command_in(argv: list[str]) -> str | None:
    """The subcommand named on the command line: the first argument that is not an option."""
    first = next((a for a in argv if not a.startswith("-")), None)
    return first if first in COMMANDS else None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser with ``command``'s real subparser (its module imported) and a stub for every other one;
    ``command=None`` imports every module (for tests and tools that need every full subparser)."""
    parser = argparse.ArgumentParser(prog="llmlab", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = parser.add_subparsers(dest="command", required=True, metavar="<stage>")
    for name, (module, help_text) in COMMANDS.items():
        if command is None or name == command:
            importlib.import_module(f"llmlab.{module}").register(sub)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    debug = "--debug" in argv
    command = _command_in(argv)
    try:
        args = build_parser(command or "").parse_args(argv)
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
