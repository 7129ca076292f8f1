"""``llmlab pairs``: preference pairs from a model's own samples, for DPO and reward models.

For each prompt the model samples K answers (temperature > 0). A judge scores them and the pair is the best answer
(chosen) against the worst (rejected); a prompt whose best and worst scores tie, or whose best and worst answers
are the same text, gives no pair. The judge (``--reward``) is one of:

- ``world``: the task world's programmatic reward (``--world DIR``; prompts need the fields ``Judge.check_item``
  names: ``kind`` and ``reference``, or ``person`` and ``attributes`` for a multi-part request);
- a reward-model directory (``llmlab.model.heads.RewardModel``, trained by ``llmlab rm``);
- a ``.jsonl`` file of human rankings, one line per prompt: ``{"prompt", "responses": [...], "ranking": [indices,
  best first]}`` or ``{"prompt", "responses", "scores": [...]}``. The answers then come from the file (people
  ranked them), so no model is needed and nothing is sampled.

Output lines: ``{"prompt": [messages], "chosen", "rejected", "chosen_score", "rejected_score"}``.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from .. import chat
from ..data.chat_data import iter_jsonl, load_prompts
from ..errors import LLMLabError
from ..hub.folder import ModelDir
from ..hub.load import load_model
from ..infer.engine import SamplingParams
from ..infer.replies import engine_for, generate_replies, prompts_that_fit
from ..model.heads import RewardModel
from ..world.build import load_world


def best_and_worst(prompt: list[dict], responses: list[str], scores: list[float]) -> dict | None:
    """The pair (highest score, lowest score) among the non-empty answers (a sampled answer may be empty, and pair
    files need text on both sides); None on a tie or when both answers are the same text."""
    candidates = [i for i, r in enumerate(responses) if r.strip()]
    if not candidates:
        return None
    best = max(candidates, key=lambda i: scores[i])
    worst = min(candidates, key=lambda i: scores[i])
    if scores[best] == scores[worst] or responses[best].strip() == responses[worst].strip():
        return None
    return {"prompt": prompt, "chosen": responses[best], "rejected": responses[worst],
            "chosen_score": float(scores[best]), "rejected_score": float(scores[worst])}


def sample_responses(model_dir: str, items: list[dict], k: int, params: SamplingParams, template: str | None,
                     batch_size: int = 32) -> tuple[list[dict], list[list[str]]]:
    """(the items whose prompt fits the model's context, K sampled answers for each)."""
    if params.temperature <= 0:
        raise LLMLabError("pairs: sampling needs --temperature > 0, else the K answers are identical")
    model_dir = ModelDir(model_dir)
    model, tokenizer = load_model(model_dir), model_dir.tokenizer()
    tmpl = model_dir.template(template)
    engine = engine_for(model, tokenizer, tmpl)
    items = prompts_that_fit(engine, items, tmpl, "pairs")
    prompts = [item["prompt"] for item in items for _ in range(k)]
    texts = [c.text for c in generate_replies(engine, prompts, tmpl, params, batch_size)]
    return items, [texts[i * k:(i + 1) * k] for i in range(len(items))]


def score(judge: str, items: list[dict], responses: list[list[str]], world_dir: str | None) -> list[list[float]]:
    """Scores of each item's answers by the programmatic reward (``judge == "world"``) or a reward model."""
    if judge == "world":
        if not world_dir:
            raise LLMLabError("--reward world needs --world DIR (the folder `llmlab world` wrote)")
        world_judge = load_world(world_dir).judge
        world_judge.check_items(items)
        return [[world_judge.reward(item, r) for r in rs] for item, rs in zip(items, responses)]
    rm = RewardModel.load(judge)
    k = len(responses[0])
    flat = rm.score([item["prompt"] for item in items for _ in range(k)], [r for rs in responses for r in rs])
    flat = [float(s) for s in flat]
    return [flat[i * k:(i + 1) * k] for i in range(len(items))]


def ranked_pairs(path: str) -> tuple[list[dict], int]:
    """Pairs from a human-rankings file (see the module docstring) and the number of lines that gave none."""
    pairs, skipped = [], 0
    for where, record in iter_jsonl(path):
        prompt = record.get("prompt")
        prompt = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
        chat.validate_messages(prompt, where, "prompt")
        responses = record.get("responses")
        if not isinstance(responses, list) or len(responses) < 2 or not all(isinstance(r, str) for r in responses):
            raise LLMLabError(f"{where}: field 'responses' must be a list of at least two strings")
        pair = best_and_worst(prompt, responses, _ranking_scores(record, len(responses), where))
        if pair is None:
            skipped += 1
        else:
            pairs.append(pair)
    return pairs, skipped


def _ranking_scores(record: dict, n: int, where: str) -> list[float]:
    """``scores`` as given, or ``ranking`` (indices best first) turned into scores n, n−1, …"""
    if "scores" in record:
        scores = record["scores"]
        if not isinstance(scores, list) or len(scores) != n or not all(isinstance(s, (int, float)) for s in scores):
            raise LLMLabError(f"{where}: field 'scores' must be a list of {n} numbers (one per response)")
        return [float(s) for s in scores]
    ranking = record.get("ranking")
    if not isinstance(ranking, list) or sorted(ranking) != list(range(n)):
        raise LLMLabError(f"{where}: give 'ranking' (a permutation of 0..{n - 1}, best first) or 'scores'")
    scores = [0.0] * n
    for place, index in enumerate(ranking):
        scores[index] = float(n - place)
    return scores


def make_pairs(model_dir: str | None, prompts_path: str | None, out_file: str, *, k: int = 4, judge: str = "world",
               world_dir: str | None = None, params: SamplingParams | None = None, template: str | None = None,
               batch_size: int = 32, limit: int | None = None) -> dict:
    """Write preference pairs to ``out_file`` (JSONL); returns ``{"prompts", "pairs", "skipped"}``."""
    if judge.endswith((".jsonl", ".jsonl.gz")):
        pairs, skipped = ranked_pairs(judge)
        n_prompts = len(pairs) + skipped
    else:
        if model_dir is None or prompts_path is None:
            raise LLMLabError("pairs: --model and --prompts are needed to sample answers (a rankings file needs "
                              "neither)")
        if k < 2:
            raise LLMLabError(f"--k {k}: need at least two samples per prompt")
        items = load_prompts(prompts_path)[:limit]
        params = params or SamplingParams(max_new_tokens=64, temperature=1.0)
        items, responses = sample_responses(model_dir, items, k, params, template, batch_size)
        scores = score(judge, items, responses, world_dir)
        found = [best_and_worst(item["prompt"], rs, ss) for item, rs, ss in zip(items, responses, scores)]
        pairs = [p for p in found if p is not None]
        n_prompts, skipped = len(items), len(items) - len(pairs)
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", encoding="utf-8") as f:
        for pair in pairs:
            f.write(json.dumps(pair, ensure_ascii=False) + "\n")
    print(f"pairs: {len(pairs)} pairs from {n_prompts} prompts ({skipped} ties skipped) → {out}", file=sys.stderr)
    return {"prompts": n_prompts, "pairs": len(pairs), "skipped": skipped}


def register(subparsers) -> None:
    p = subparsers.add_parser("pairs", help="preference pairs from a model's samples, scored by a judge")
    p.add_argument("--model", default=None, metavar="DIR", help="the model that samples the answers")
    p.add_argument("--prompts", default=None, metavar="PATH", help="prompt file (.jsonl: 'prompt' or 'messages')")
    p.add_argument("--out", required=True, metavar="FILE", help="output .jsonl of pairs")
    p.add_argument("--k", type=int, default=4, help="samples per prompt (default 4)")
    p.add_argument("--reward", default="world", help="world | reward-model DIR | rankings .jsonl")
    p.add_argument("--world", default=None, metavar="DIR", help="task world folder (for --reward world)")
    p.add_argument("--template", default=None, help="chat template override")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--limit", type=int, default=None, help="use the first N prompts only")
    p.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    params = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                            seed=args.seed)
    make_pairs(args.model, args.prompts, args.out, k=args.k, judge=args.reward, world_dir=args.world, params=params,
               template=args.template, batch_size=args.batch_size, limit=args.limit)
    return 0
