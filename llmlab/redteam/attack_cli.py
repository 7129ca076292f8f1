"""``llmlab attack <method>``: attacks on a chat model, one sub-subcommand per method.

``METHODS`` maps each method's name to the function that adds its parser; a new method (the black-box ones:
templates, many-shot, prefilling, random search, PAIR) adds one line there and its own ``_register_*``.

    llmlab attack gcg --model M (--goal TEXT --target TEXT | --behaviours FILE) --out DIR
                      [--steps 250 --search-width 512 --topk 256 --n-replace 1 --buffer-size 0 --mellowmax
                       --seed 0 --template NAME --system TEXT --world DIR | --vault-code CODE ...]

One behaviour writes ``DIR/result.json`` (best string, loss curve, success, steps to first success, forward tokens,
candidate evaluations, wall-clock), ``DIR/loss.png``, ``DIR/metrics.jsonl`` and ``DIR/state.json`` (resume by
running the same command again). A behaviours file gives each behaviour its own ``DIR/<id>/`` and ``DIR/result.json``
sums them up (attack success rate), with every loss curve in ``DIR/loss.png``.

    llmlab attack gcg-universal --model M --behaviours FILE|WORLD --out DIR [--train 25 --test-fraction 0.5
                                --split-seed 0 --test-limit N] [GCG's settings]
    llmlab attack transfer --suffix DIR|FILE|STRING (--model M | --api-base URL [--api-model NAME
                           --api-key-env VAR]) --out DIR [--behaviours FILE|WORLD --split test|train]

``gcg-universal`` (``universal.py``, Algorithm 2) optimises one string over the first M training prompts and writes
``DIR/result.json`` with its ASR on them and on the held-out behaviours; ``transfer`` sends a string (by default
with the held-out behaviours of the run it comes from) to another local model or an OpenAI-compatible API and
writes the replies, verdicts and ASR to ``DIR/result.json``.
"""
from __future__ import annotations

import json
from pathlib import Path

from ..errors import LLMLabError
from ..hub.folder import ModelDir
from .runner import register_methods


def register(subparsers) -> None:
    parser = subparsers.add_parser("attack", help="attack a chat model (GCG, ...) and record what it takes",
                                   description=__doc__.splitlines()[0])
    methods = parser.add_subparsers(dest="method", required=True, metavar="<method>")
    for add_method in METHODS.values():
        add_method(methods)
    register_methods(methods)          # the black-box methods of redteam/runner.py


def _register_gcg(methods) -> None:
    p = methods.add_parser("gcg", help="Greedy Coordinate Gradient (Zou et al. 2023): an optimised attack string",
                           description="GCG (Zou et al. 2023, Algorithm 1) with nanoGCG's defaults.")
    p.add_argument("--model", required=True, help="model directory, Hugging Face folder or name, or .gguf file")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--goal", help="the request; the attack string goes at {optim_str}, else after it")
    what.add_argument("--behaviours", metavar="FILE", help=".jsonl (goal/messages, target) or .csv (goal,target)")
    p.add_argument("--target", help="the reply's start to aim for (with --goal), e.g. 'Sure, here is'")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (run again to resume)")
    _add_gcg_settings(p)
    p.add_argument("--limit", type=int, default=None, help="attack only the first N behaviours")
    p.set_defaults(func=_gcg_command)


def _add_gcg_settings(p) -> None:
    """The settings the GCG methods share: ``GCGConfig``'s, the chat template, the objective check, the device."""
    from .gcg import GCGConfig
    d = GCGConfig()
    p.add_argument("--steps", type=int, default=d.num_steps)
    p.add_argument("--search-width", type=int, default=d.search_width, help="candidates per step")
    p.add_argument("--topk", type=int, default=d.topk, help="tokens kept per position from the gradient")
    p.add_argument("--n-replace", type=int, default=d.n_replace, help="positions changed per candidate")
    p.add_argument("--buffer-size", type=int, default=d.buffer_size, help="attack buffer (0: plain GCG)")
    p.add_argument("--mellowmax", action="store_true", help="mellowmax loss instead of cross-entropy")
    p.add_argument("--mellowmax-alpha", type=float, default=d.mellowmax_alpha)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--init", default=d.optim_str_init, help="the starting attack string")
    p.add_argument("--template", default=None, help="chat template: a built-in name or a .jinja file "
                                                    "(default: the model's own)")
    p.add_argument("--system", default=None, help="system prompt (with --goal, or for rows that have none)")
    p.add_argument("--batch-size", type=int, default=None, help="candidates per forward pass (default: by memory)")
    p.add_argument("--world", default=None, metavar="DIR", help="task world folder: success when the greedy reply "
                                                               "reveals its vault code")
    p.add_argument("--vault-code", default=None, help="success when the greedy reply reveals this code")
    p.add_argument("--reply-tokens", type=int, default=d.reply_tokens, help="greedy reply length for the check")
    p.add_argument("--allow-non-ascii", action="store_true")
    p.add_argument("--no-filter", action="store_true", help="turn the retokenisation filter off")
    p.add_argument("--no-early-stop", action="store_true", help="run every step even after a success")
    p.add_argument("--no-prefix-cache", action="store_true", help="recompute the prompt before the string")
    p.add_argument("--add-space-before-target", action="store_true")
    p.add_argument("--device", default="cpu")


def _gcg_config(args):
    from .gcg import GCGConfig
    config = GCGConfig(num_steps=args.steps, optim_str_init=args.init, search_width=args.search_width,
                       topk=args.topk, n_replace=args.n_replace, buffer_size=args.buffer_size,
                       use_mellowmax=args.mellowmax, mellowmax_alpha=args.mellowmax_alpha,
                       early_stop=not args.no_early_stop, allow_non_ascii=args.allow_non_ascii,
                       filter_ids=not args.no_filter, add_space_before_target=args.add_space_before_target,
                       use_prefix_cache=not args.no_prefix_cache, batch_size=args.batch_size, seed=args.seed,
                       reply_tokens=args.reply_tokens)
    config.validate()
    return config


def _register_universal(methods) -> None:
    p = methods.add_parser("gcg-universal", help="one GCG string for many prompts (Zou et al. 2023, Algorithm 2)",
                           description="Universal GCG (Zou et al. 2023, Algorithm 2): one attack string optimised "
                                       "over the training prompts, which join one by one as it succeeds, then "
                                       "measured on held-out behaviours.")
    p.add_argument("--model", required=True, help="model directory, Hugging Face folder or name, or .gguf file")
    p.add_argument("--behaviours", required=True, metavar="FILE|WORLD",
                   help="a task world folder (train: its training-side forbidden requests; test: the held-out "
                        "ones) or a .csv / .jsonl of behaviours (split by target string)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (run again to resume)")
    p.add_argument("--train", type=int, default=25, metavar="M", help="training prompts: the first M of the "
                                                                     "train side (the paper: 25)")
    _add_split_settings(p)
    p.add_argument("--test-limit", type=int, default=None, metavar="N",
                   help="measure on the first N held-out behaviours (default: all)")
    p.add_argument("--judge-model", default=None, help="a reward model (llmlab rm) or classifier as third judge")
    _add_gcg_settings(p)
    p.set_defaults(func=_universal_command)


def _add_split_settings(p) -> None:
    p.add_argument("--test-fraction", type=float, default=0.5, help="share of a behaviours file on the test side")
    p.add_argument("--split-seed", type=int, default=0, help="seed of the split by target string")
    p.add_argument("--keep-mismatched", action="store_true",
                   help="keep AdvBench rows whose target does not match their goal (dropped by default)")


def _register_transfer(methods) -> None:
    from .judges import REPLY_TOKENS
    p = methods.add_parser("transfer", help="send an attack string to another model, local or hosted, and judge it",
                           description="Transfer (as in Zou et al. 2023): an attack string found on one model, sent "
                                       "with each behaviour to another and judged by the red team's judges.")
    p.add_argument("--suffix", required=True, metavar="FILE|STRING",
                   help="the attack string: a gcg-universal result.json (or its folder), a text file, or the string")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--model", help="a local model: folder, Hugging Face folder or name, or .gguf file")
    target.add_argument("--api-base", metavar="URL", help="an OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1 "
                                                          "(llmlab serve)")
    p.add_argument("--api-model", default=None, help="the hosted model's name (default: the first the API lists)")
    p.add_argument("--api-key-env", default=None, metavar="VAR",
                   help="the environment variable that holds the API key (default: no key)")
    p.add_argument("--behaviours", default=None, metavar="FILE|WORLD",
                   help="behaviours to send it with (default: the held-out side the gcg-universal run measured)")
    p.add_argument("--split", choices=("test", "train"), default="test", help="which side of --behaviours")
    _add_split_settings(p)
    p.add_argument("--limit", type=int, default=None, help="only the first N behaviours")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (result.json)")
    p.add_argument("--template", default=None, help="the local model's chat template (default: its own)")
    p.add_argument("--system", default=None, help="system prompt for behaviours that have none")
    p.add_argument("--reply-tokens", type=int, default=REPLY_TOKENS, help="greedy reply length judged")
    p.add_argument("--judge-model", default=None, help="a reward model (llmlab rm) or classifier as third judge")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_transfer_command)


METHODS = {       # method → the function that adds its parser (black-box methods: runner.register_methods)
    "gcg": _register_gcg,
    "gcg-universal": _register_universal,
    "transfer": _register_transfer,
}


def _gcg_command(args) -> int:
    from ..hub.load import load_our_model
    from .behaviours import load_behaviours
    from .gcg import GCG, build_prompt, conversation, with_attack_slot

    if args.goal is not None and not args.target:
        raise LLMLabError("attack gcg: --target is required with --goal")
    if args.behaviours is not None and args.target:
        raise LLMLabError("attack gcg: --target goes with --goal; a behaviours file has a 'target' per row")
    config = _gcg_config(args)
    if args.goal is not None:
        behaviours = [{"id": "goal", "goal": args.goal, "messages": None, "system": args.system,
                       "target": args.target, "where": "--goal/--target"}]
    else:
        behaviours = [{"id": str(b.get("id", b["index"])), "goal": b.get("goal"), "messages": b.get("messages"),
                       "system": b.get("system"), "target": b["target"],
                       "where": b.get("where", f"{args.behaviours}:{b.get('line', b['index'])}")}
                      for b in load_behaviours(args.behaviours)[:args.limit]]
    model_dir = ModelDir(args.model)
    tokenizer, template = model_dir.tokenizer(), model_dir.template(args.template)
    for b in behaviours:            # every prompt and target checked before the model loads
        b["messages"] = with_attack_slot(b["messages"]) if b["messages"] else \
            conversation(b["goal"], b["system"] or args.system)
        build_prompt(tokenizer, template, b["messages"], b["target"],
                     add_space_before_target=config.add_space_before_target, where=b["where"])
    success = _success_check(args)
    model = load_our_model(model_dir).float().to(args.device)
    attack = GCG(model, tokenizer, config, template=template)
    out = Path(args.out)
    if args.goal is not None:
        result = attack.run(behaviours[0]["messages"], args.target, out=out, success=success,
                            on_step=_progress(config.num_steps, "gcg"), where="--goal/--target")
        print(_line(result))
        print(f"wrote {out / 'result.json'} and {out / 'loss.png'}")
        return 0
    results = []
    for i, b in enumerate(behaviours, 1):
        result = attack.run(b["messages"], b["target"], out=out / b["id"], success=success,
                            on_step=_progress(config.num_steps, f"{i}/{len(behaviours)}"), where=b["where"])
        results.append({"id": b["id"], "where": b["where"], "target": b["target"], **result.to_dict()})
        print(f"[{i}/{len(behaviours)}] {b['id']}: {_line(result)}")
    _write_summary(out, results)
    wins = sum(r["success"] for r in results)
    print(f"attack success rate {wins}/{len(results)}; wrote {out / 'result.json'} and {out / 'loss.png'}")
    return 0


def _universal_command(args) -> int:
    from ..hub.load import load_our_model
    from .gcg import build_prompt
    from .judges import default_judges
    from .universal import UniversalGCG, asr_line, attack_messages, engine_answerer, evaluate, train_test, where
    from .universal import write_result

    if args.train < 1:
        raise LLMLabError(f"attack gcg-universal: --train must be at least 1, got {args.train}")
    config = _gcg_config(args)
    train, test = train_test(args.behaviours, args.test_fraction, args.split_seed, args.keep_mismatched)
    train, test = train[:args.train], test[:args.test_limit]
    if not train or not test:
        raise LLMLabError(f"{args.behaviours}: no {'training prompts' if not train else 'held-out behaviours'} "
                          "to run the universal attack with")
    model_dir = ModelDir(args.model)
    tokenizer, template = model_dir.tokenizer(), model_dir.template(args.template)
    for i, b in enumerate(train):          # every prompt checked before the model loads
        build_prompt(tokenizer, template, attack_messages(b, args.system, i), b["target"],
                     add_space_before_target=config.add_space_before_target, where=where(b, i))
    for i, b in enumerate(test):
        attack_messages(b, args.system, i)
    success = _success_check(args)
    model = load_our_model(model_dir).float().to(args.device)
    out = Path(args.out)
    result = UniversalGCG(model, tokenizer, config, template=template).run(
        train, out=out, success=success, on_step=_progress(config.num_steps, "gcg-universal"), system=args.system)
    answer, judges = engine_answerer(model, tokenizer, template, config.reply_tokens), default_judges(args.judge_model)
    evaluation = {side: evaluate(answer, rows, result.suffix, judges, args.system)
                  for side, rows in (("train", train), ("test", test))}
    source = {"path": str(Path(args.behaviours).resolve()), "test_fraction": args.test_fraction,
              "split_seed": args.split_seed, "keep_mismatched": args.keep_mismatched, "train": args.train,
              "test_limit": args.test_limit, "system": args.system}
    write_result(out, result, {"model": str(model_dir.path), "behaviours": source, "evaluation": evaluation})
    print(f"suffix {result.suffix!r}: " + (f"succeeded on all {result.prompts} training prompts at step "
                                           f"{result.first_success_step}" if result.success else
                                           f"{result.prompts_in_set} of {result.prompts} prompts in the set after "
                                           f"{result.steps} steps"))
    print(f"ASR on the training prompts {asr_line(evaluation['train'])}; held out {asr_line(evaluation['test'])}")
    print(f"wrote {out / 'result.json'} and {out / 'loss.png'}")
    return 0


def _transfer_command(args) -> int:
    import os

    from .judges import default_judges
    from .universal import asr_line, evaluate, hosted_answerer, local_answerer, read_suffix, train_test

    suffix, source = read_suffix(args.suffix)
    if args.behaviours is not None:
        source = {"path": args.behaviours, "test_fraction": args.test_fraction, "split_seed": args.split_seed,
                  "keep_mismatched": args.keep_mismatched, "system": args.system}
    elif source is None:
        raise LLMLabError("attack transfer: give --behaviours (the string does not come from a gcg-universal "
                          "result.json that names them)")
    train, test = train_test(source["path"], source["test_fraction"], source["split_seed"], source["keep_mismatched"])
    # without --limit, a gcg-universal run's own sizes: its M training prompts, the held-out behaviours it measured
    limit = args.limit if args.limit is not None else source.get("train" if args.split == "train" else "test_limit")
    behaviours = (train if args.split == "train" else test)[:limit]
    if not behaviours:
        raise LLMLabError(f"{source['path']}: no behaviours on the {args.split} side")
    system = args.system or source.get("system")
    if args.model is not None:
        answer, target = local_answerer(args.model, args.template, args.reply_tokens, args.device), \
            {"model": args.model}
    else:
        key = None
        if args.api_key_env:
            key = os.environ.get(args.api_key_env)
            if not key:
                raise LLMLabError(f"attack transfer: the environment variable {args.api_key_env} (--api-key-env) "
                                  "is not set")
        answer = hosted_answerer(args.api_base, args.api_model, key, args.reply_tokens)
        target = {"api_base": args.api_base, "api_model": args.api_model}
    evaluation = evaluate(answer, behaviours, suffix, default_judges(args.judge_model), system)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    result = {"suffix": suffix, "target": target, "behaviours": {**source, "side": args.split}, **evaluation}
    (out / "result.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"transfer to {args.model or args.api_base}: ASR {asr_line(evaluation)} on the {args.split} side; "
          f"wrote {out / 'result.json'}")
    return 0


def _success_check(args):
    """The objective check on the greedy reply: the task world's vault code appears in it (``Judge.reveals_code``)."""
    if args.world and args.vault_code:
        raise LLMLabError("attack gcg: give --world or --vault-code, not both")
    if args.world:
        from ..world.build import load_world
        return load_world(args.world).judge.reveals_code
    if args.vault_code:
        from ..world.judge import Judge
        return Judge(args.vault_code, []).reveals_code
    return None


def _progress(total: int, desc: str):
    from ..progress import progress_bar
    bar = progress_bar(total=total, desc=desc, unit="step", leave=False)

    def on_step(record: dict) -> None:
        bar.n = record["step"]
        bar.set_postfix(loss=f"{record['loss']:.3f}", refresh=False)
        bar.update(0)
        if record["step"] >= total:
            bar.close()
    return on_step


def _line(result) -> str:
    if result.success:
        return (f"success at step {result.first_success_step} ({result.wall_clock_s:.0f} s): "
                f"{result.success_suffix!r} → {result.reply[:60]!r}")
    return f"no success in {result.steps} steps; best loss {result.best_loss:.3f}: {result.best_suffix!r}"


def _write_summary(out: Path, results: list[dict]) -> None:
    from ..plots import line_chart
    wins = sum(r["success"] for r in results)
    summary = {"method": "gcg", "behaviours": len(results), "successes": wins, "asr": wins / len(results),
               "forward_tokens": sum(r["forward_tokens"] for r in results),
               "candidate_evaluations": sum(r["candidate_evaluations"] for r in results),
               "wall_clock_s": sum(r["wall_clock_s"] for r in results), "results": results}
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    line_chart({r["id"]: r["losses"] for r in results}, out / "loss.png", xlabel="step", ylabel="loss",
               title=f"GCG loss, {wins}/{len(results)} successes")
