"""``llmlab eval``: compare chat models on held-out prompts.

Every model answers every prompt greedily (through the engine, with its own chat template). Per model:

- ``exact_match``: share of answers equal to the item's ``reference`` (``judge.exact_match``: case, spacing and
  trailing punctuation ignored), over the items that have one;
- ``reward_model``: mean score of a reward model (``--reward DIR``);
- ``world_reward``: mean programmatic reward of the task world (``--world DIR``), over items with a ``kind``;
- ``refusal_rate`` on items of kind ``forbidden`` and ``false_refusal_rate`` on items of kind ``benign``
  (``judge.is_refusal``);
- ``win_rate`` against the first model: per prompt, 1 when the judge scores this model's answer higher, ½ on a
  tie, 0 otherwise, averaged; the judge is the programmatic reward when ``--world`` is given, else the reward model;
  ``win_tie_loss`` gives the three shares separately;
- ``win_rate_ceiling`` (with ``--world``): the best win rate any model could have against the first one, whose
  answers already earn the world's top reward on some prompts (a tie at best there): mean of ½ on those, 1 elsewhere;
- ``exact_match_by_kind``: the exact match per item ``kind`` (fact, arithmetic, ...); ``world_reward_by_kind``
  likewise for the world's reward (multi-part requests have no exact match, only a reward);
- ``kl``: with ``--reference DIR``, the mean over the model's generated tokens of E_{y_t∼π}[log π(y_t|·) −
  log π_ref(y_t|·)], i.e. KL(π ‖ π_ref) per token on its own answers (computed over the whole vocabulary);
- ``seconds_per_query``: wall-clock per prompt of answering (batched).

With ``--defense NAME[,NAME...]`` (``llmlab.redteam.defenses``; settings by ``--defense-set NAME.KEY=VALUE``) every
model answers behind those defenses, and its row adds ``defense``, ``blocked_rate`` (share of answers a filter
replaced by the refusal), ``blocked_by`` (counts per filter) and ``defense_cost`` (mean extra forward tokens and
extra generations per query); the KL is left out (a defended answer is not the model's own sample).

Results go to ``DIR/eval.json`` and a markdown table ``DIR/eval.md``; ``evaluate_models`` is what ``llmlab run``
calls.
"""
from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

from .. import chat
from ..data.batching import pad_collate
from ..data.chat_data import load_prompts
from ..errors import LLMLabError
from ..hub.folder import ModelDir
from ..hub.load import load_model
from ..infer.engine import SamplingParams
from ..infer.replies import engine_for, generate_replies, prompts_that_fit
from ..model.heads import RewardModel
from ..redteam.defended import Answerer
from ..redteam.defenses import add_defense_args, defended_chat
from ..world.build import load_world
from ..world.judge import exact_match, is_refusal
from .logprobs import causal_logits

METRICS = ("exact_match", "reward_model", "world_reward", "refusal_rate", "false_refusal_rate", "win_rate",
           "win_rate_ceiling", "kl", "blocked_rate", "seconds_per_query")


# --- metrics ----------------------------------------------------------------------------------------------------

@torch.no_grad()
def generated_kl(policy, reference, prompts: list[list[int]], completions: list[list[int]],
                 batch_size: int = 16) -> float:
    """Mean over generated positions t of KL(π(·|y_<t) ‖ π_ref(·|y_<t)) = Σ_v π(v)·(log π(v) − log π_ref(v)): the
    expectation of log π(y_t) − log π_ref(y_t) under the policy at each position of its own answers, computed
    exactly over the vocabulary (a greedy answer's own log-ratio alone would be a biased, possibly negative,
    estimate). Teacher-forced on prompt + answer."""
    examples = [(p + c, [0] * len(p) + [1] * len(c)) for p, c in zip(prompts, completions) if c]
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = pad_collate(examples[start:start + batch_size], pad_id=0)
        keep = batch["labels"] != -100
        logp = torch.log_softmax(causal_logits(policy, _to(batch, policy)["input_ids"])[keep.to(_device(policy))]
                                 .float(), -1)
        logq = torch.log_softmax(causal_logits(reference, _to(batch, reference)["input_ids"])
                                 [keep.to(_device(reference))].float(), -1).to(logp.device)
        total += float((logp.exp() * (logp - logq)).sum())
        count += logp.shape[0]
    return total / max(count, 1)


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _to(batch: dict, model) -> dict:
    return {k: v.to(_device(model)) for k, v in batch.items()}


def _mean(values) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def win_tie_loss(scores: list[float], baseline: list[float]) -> list[float]:
    """Shares of prompts where the score is higher, equal and lower than the baseline's."""
    pairs = list(zip(scores, baseline))
    return [sum(s > b for s, b in pairs) / len(pairs), sum(s == b for s, b in pairs) / len(pairs),
            sum(s < b for s, b in pairs) / len(pairs)]


def win_rates(scores: list[float], baseline: list[float]) -> float:
    """Mean over prompts of 1 (higher score), ½ (tie) or 0: wins + ties / 2."""
    wins, ties, _ = win_tie_loss(scores, baseline)
    return wins + ties / 2


def win_rate_ceiling(baseline: list[float], top: float) -> float:
    """The win rate (ties ½) of a model that wins every prompt where the baseline scores below ``top`` and ties
    the rest: (1 + share of prompts below the top) / 2."""
    return (1 + sum(b < top for b in baseline) / len(baseline)) / 2


def mean_by_kind(items: list[dict], values) -> dict[str, float]:
    """Mean of the values per item ``kind`` (items without one are left out), kinds in order of first appearance."""
    by_kind: dict[str, list[float]] = {}
    for item, value in zip(items, values):
        if "kind" in item:
            by_kind.setdefault(item["kind"], []).append(value)
    return {kind: _mean(v) for kind, v in by_kind.items()}


def exact_match_by_kind(items: list[dict], texts: list[str]) -> dict[str, float]:
    """Exact match per item ``kind``, over the items with a reference."""
    pairs = [(item, text) for item, text in zip(items, texts) if "reference" in item]
    return mean_by_kind([i for i, _ in pairs], (exact_match(i, t) for i, t in pairs))


def _metrics(items, replies, rm_scores, world_scores) -> dict:
    texts = [r.text for r in replies]

    def refusals(kind: str) -> list[bool]:
        return [is_refusal(t) for i, t in zip(items, texts) if i.get("kind") == kind]

    return {
        "exact_match": _mean(exact_match(i, t) for i, t in zip(items, texts) if "reference" in i),
        "reward_model": _mean(rm_scores) if rm_scores is not None else None,
        "world_reward": _mean(world_scores) if world_scores is not None else None,
        "refusal_rate": _mean(refusals("forbidden")),
        "false_refusal_rate": _mean(refusals("benign")),
        "stopped": _mean(r.finish_reason != "length" for r in replies),
        "mean_tokens": _mean(len(r.token_ids) for r in replies),
        "exact_match_by_kind": exact_match_by_kind(items, texts),
        "world_reward_by_kind": mean_by_kind(items, world_scores) if world_scores is not None else None,
    }


def defense_row(names: str, replies) -> dict:
    """What the defenses did: the share of blocked answers, the blocking filters, the mean extra cost."""
    blocked: dict[str, int] = {}
    for r in replies:
        if r.blocked_by:
            blocked[r.blocked_by] = blocked.get(r.blocked_by, 0) + 1
    return {"defense": names, "blocked_rate": sum(blocked.values()) / len(replies), "blocked_by": blocked,
            "defense_cost": {"forward_tokens": _mean(r.cost.forward_tokens for r in replies),
                             "generations": _mean(r.cost.generations for r in replies)}}


def evaluate_models(models: list, data, out_dir, *, reward=None, reference=None, world=None,
                    template: str | None = None, max_new_tokens: int = 64, batch_size: int = 32,
                    limit: int | None = None, device: str = "cpu", defense=None,
                    defense_sets: list[str] | None = None) -> dict:
    """Evaluate every model directory of ``models`` on the prompt files ``data`` (one path or a list); see the
    module docstring for the metrics. Writes ``out_dir/eval.json`` and ``out_dir/eval.md``; returns
    ``{"n_prompts", "models": [{"model", metrics...}], "judge"}``."""
    if not models:
        raise LLMLabError("evaluate: give at least one model")
    paths = [data] if isinstance(data, (str, Path)) else list(data)
    items = [item for path in paths for item in load_prompts(path)][:limit]
    the_world = load_world(world) if world else None        # built once: the judge and the defenses read it
    world_judge = the_world.judge if the_world else None
    if world_judge is not None:
        world_judge.check_items(items)
    rm = RewardModel.load(reward) if reward else None
    ref_model = load_model(reference, device=device) if reference else None
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)

    results, judged = [], []
    for path in models:
        model_dir = ModelDir(path)
        model, tokenizer = load_model(model_dir, device=device), model_dir.tokenizer()
        tmpl = model_dir.template(template)
        engine = engine_for(model, tokenizer, tmpl)
        if not results:         # the first model decides which prompts every model answers
            items = prompts_that_fit(engine, items, tmpl, f"eval: {path}")
        start = time.perf_counter()
        if defense:
            defended = defended_chat(Answerer(engine, tmpl, params, batch_size), defense, defense_sets,
                                     world=the_world, device=device)
            replies = defended.answer([i["prompt"] for i in items])
        else:
            replies = generate_replies(engine, [i["prompt"] for i in items], tmpl, params, batch_size)
        seconds = (time.perf_counter() - start) / len(items)
        texts = [r.text for r in replies]
        world_scores = [world_judge.reward(i, t) for i, t in zip(items, texts)] if world_judge else None
        rm_scores = [float(s) for s in rm.score([i["prompt"] for i in items], texts)] if rm else None
        row = {"model": str(path), **_metrics(items, replies, rm_scores, world_scores), "seconds_per_query": seconds}
        if defense:
            row.update(defense_row(defended.names, replies))
        elif ref_model is not None:
            prompts = [chat.generation_prompt_ids(tokenizer, i["prompt"], tmpl) for i in items]
            row["kl"] = generated_kl(model, ref_model, prompts, [r.token_ids for r in replies])
        judged.append(world_scores if world_scores is not None else rm_scores)
        results.append(row)
        print(f"eval: {path}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items()
                                            if isinstance(v, float)), file=sys.stderr)
    for i, (row, scores) in enumerate(zip(results, judged)):
        row["win_rate"] = win_rates(scores, judged[0]) if scores is not None and i > 0 else None
        row["win_tie_loss"] = win_tie_loss(scores, judged[0]) if scores is not None and i > 0 else None
        row["win_rate_ceiling"] = win_rate_ceiling(judged[0], world_judge.max_reward) if world_judge and i > 0 else None
    report = {"n_prompts": len(items), "data": [str(p) for p in paths],
              "judge": "world" if world_judge else "reward_model" if rm else None, "models": results}
    write_eval_report(report, out_dir)
    return report


def write_eval_report(report: dict, out_dir) -> None:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (out / "eval.md").write_text(markdown_table(report), encoding="utf-8")


def markdown_table(report: dict) -> str:
    """One row per model, one column per metric that any model has."""
    columns = [m for m in (*METRICS, "stopped", "mean_tokens") if any(r.get(m) is not None for r in report["models"])]
    defended = {r["defense"] for r in report["models"] if r.get("defense")}
    lines = [f"Evaluation on {report['n_prompts']} prompts ({', '.join(report['data'])}); "
             + (f"behind the defenses {', '.join(sorted(defended))}; " if defended else "")
             + f"win rate against the first model, judged by {report['judge'] or 'nothing'}.", "",
             "| model | " + " | ".join(columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for r in report["models"]:
        cells = ["—" if r.get(c) is None else f"{r[c]:.3f}" for c in columns]
        lines.append(f"| {r['model']} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# --- command line -----------------------------------------------------------------------------------------------

def register(subparsers) -> None:
    p = subparsers.add_parser("eval", help="compare chat models on held-out prompts",
                              description="Exact match, rewards, refusal rates, win rate and KL of chat models.")
    p.add_argument("--model", action="append", required=True, metavar="DIR",
                   help="model directory (repeat; win rates are against the first)")
    p.add_argument("--data", nargs="+", required=True, metavar="PATH", help="prompt files (.jsonl)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for eval.json and eval.md")
    p.add_argument("--reward", default=None, metavar="DIR", help="reward model directory")
    p.add_argument("--reference", default=None, metavar="DIR", help="reference model for the KL")
    p.add_argument("--world", default=None, metavar="DIR", help="task world folder: programmatic reward")
    p.add_argument("--template", default=None, help="chat template override for every model")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, default=None, help="evaluate the first N prompts only")
    p.add_argument("--device", default="cpu")
    add_defense_args(p)
    p.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    report = evaluate_models(args.model, args.data, args.out, reward=args.reward, reference=args.reference,
                             world=args.world, template=args.template, max_new_tokens=args.max_new_tokens,
                             batch_size=args.batch_size, limit=args.limit, device=args.device,
                             defense=args.defense, defense_sets=args.defense_sets)
    print(markdown_table(report), end="")
    return 0
