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
    from .gcg import GCGConfig
    d = GCGConfig()
    p = methods.add_parser("gcg", help="Greedy Coordinate Gradient (Zou et al. 2023): an optimised attack string",
                           description="GCG (Zou et al. 2023, Algorithm 1) with nanoGCG's defaults.")
    p.add_argument("--model", required=True, help="model directory, Hugging Face folder or name, or .gguf file")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--goal", help="the request; the attack string goes at {optim_str}, else after it")
    what.add_argument("--behaviours", metavar="FILE", help=".jsonl (goal/messages, target) or .csv (goal,target)")
    p.add_argument("--target", help="the reply's start to aim for (with --goal), e.g. 'Sure, here is'")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (run again to resume)")
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
    p.add_argument("--limit", type=int, default=None, help="attack only the first N behaviours")
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_gcg_command)


METHODS = {       # method → the function that adds its parser (black-box methods: runner.register_methods)
    "gcg": _register_gcg,
}


def _gcg_command(args) -> int:
    from ..hub.load import load_our_model
    from .behaviours import load_behaviours
    from .gcg import GCG, GCGConfig, build_prompt, conversation, with_attack_slot

    if args.goal is not None and not args.target:
        raise LLMLabError("attack gcg: --target is required with --goal")
    if args.behaviours is not None and args.target:
        raise LLMLabError("attack gcg: --target goes with --goal; a behaviours file has a 'target' per row")
    config = GCGConfig(num_steps=args.steps, optim_str_init=args.init, search_width=args.search_width,
                       topk=args.topk, n_replace=args.n_replace, buffer_size=args.buffer_size,
                       use_mellowmax=args.mellowmax, mellowmax_alpha=args.mellowmax_alpha,
                       early_stop=not args.no_early_stop, allow_non_ascii=args.allow_non_ascii,
                       filter_ids=not args.no_filter, add_space_before_target=args.add_space_before_target,
                       use_prefix_cache=not args.no_prefix_cache, batch_size=args.batch_size, seed=args.seed,
                       reply_tokens=args.reply_tokens)
    config.validate()
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
