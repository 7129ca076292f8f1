"""``llmlab experiment alignment``: base vs SFT vs DPO vs PPO on the same prompts, and DPO vs PPO over seeds.

    llmlab experiment alignment [--preset test|default|large] [--seeds K] [--set key=value ...] --out DIR

Shared, trained once (or read from an ``llmlab run`` folder given by ``--set run=DIR``): the task world
(``DIR/world``), a base model (``llmlab pretrain``, ``DIR/base``), the SFT model (``llmlab sft``, ``DIR/sft``) and
the reward model (``llmlab rm`` on the world's preference pairs, ``DIR/rm``). Per seed, from the same SFT model:

- DPO (``llmlab dpo`` on the same preference pairs the reward model learned from), ``DIR/seed-N/dpo``;
- PPO (``llmlab ppo``) against the *reward model* (``ppo_reward: rm``, classic RLHF; ``world`` optimises the world's
  programmatic reward instead), ``DIR/seed-N/ppo``.

Each of the two runs in a child process, so its peak resident memory is its own (``VmHWM``, the high-water mark
of the resident set, read in the child after the imports and again at the end; ``peak_rss_mib``). The seed sets DPO's data order and PPO's
sampling. Then ``llmlab.stages.evaluate`` answers the first ``eval_items`` held-out prompts of ``rl_eval.jsonl``
greedily with SFT, DPO and PPO (``DIR/seed-N/eval``; base and SFT once in ``DIR/eval``) and measures per model:

- win rate against SFT, judged by the world's true reward: per prompt 1 if the model's reward is higher, ½ on a tie,
  0 if lower, averaged: W = (wins + ties/2) / n;
- KL per token against SFT on the model's own answers, exact over the vocabulary:
  KL = mean over answer positions t of Σ_v π(v|y_<t) · (log π(v|y_<t) − log π_SFT(v|y_<t));
- the reward model's mean score and the world's mean reward on the same answers. Over-optimisation (Gao et al.
  2023) is the reward model's score rising while the true reward does not: Δ_RM = RM(model) − RM(SFT) against
  Δ_world = world(model) − world(SFT). PPO's own rollouts are scored by both at every step (``trace.jsonl``), so the
  two curves over training are drawn too.

Costs per method: the training loop's wall-clock seconds (resume-aware), the child's peak RSS (including Python and
torch, whose share is the RSS after the imports, also given), and the models held during training, by parameters
counted exactly: DPO holds the policy, and in this implementation not a reference model but its cached
log-probabilities (2 numbers per pair, ``ref_logps.safetensors``); PPO holds the policy, a value head Linear(d, 1)
on it, a frozen copy of the SFT model as reference, and the reward model.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

from ..errors import LLMLabError
from ..files import write_text_atomic
from ..report import Section
from ..world import build as world_build
from .common import Context, Result, peak_rss_mib, run_child, spread

CLAIM = ("Claims tested (Rafailov et al. 2023, 'Direct Preference Optimization'; Ouyang et al. 2022; Gao et al. "
         "2023, 'Scaling Laws for Reward Model Overoptimization'): DPO reaches what RLHF with PPO reaches from the "
         "same SFT model and preferences, at a fraction of the cost (no sampling during training, fewer models in "
         "memory, less time), and with less variance across seeds; PPO against a learned reward model raises the "
         "reward model's score faster than the true reward (over-optimisation), held back by the KL penalty.")
OPEN = ()
CHILD_PROCESSES = True        # each arm trains in its own process (its peak memory is its own)
METHODS = ("dpo", "ppo")
NAMES = {"base": "base", "sft": "SFT", "dpo": "DPO", "ppo": "PPO"}
RESULT = "result.json"        # in each method's run folder once trained, measured and evaluated
CHILD = "child.json"          # written by the child process when training finished
TRACE = "trace.jsonl"         # PPO: one line per rollout, {"rm": score, "world": reward}

_PRETRAIN = {"steps": 500, "n_layer": 4, "n_head": 4, "d_model": 128, "max_seq_len": 192, "vocab_size": 1024,
             "batch_size": 16, "lr": 2e-3, "warmup_steps": 30}
_COMMON = {"world": "tiny", "world_seed": 0, "run": None, "sft_steps": 150, "rm_steps": 150, "dpo_steps": 60,
           "ppo_steps": 25, "ppo_reward": "rm", "rollout_batch": 16, "ppo_max_new_tokens": 32, "eval_items": 100,
           "max_new_tokens": 32, "samples": 5}
PRESETS = {
    "test": {**_COMMON, "seeds": 1, "world": "test", "sft_steps": 4, "rm_steps": 3, "dpo_steps": 3, "ppo_steps": 2,
             "rollout_batch": 4, "ppo_max_new_tokens": 8, "eval_items": 8, "max_new_tokens": 8, "samples": 3,
             "pretrain": {**_PRETRAIN, "steps": 4, "n_layer": 1, "n_head": 2, "d_model": 32, "max_seq_len": 192,
                          "vocab_size": 300, "batch_size": 4, "warmup_steps": 1}},
    "default": {**_COMMON, "seeds": 3, "pretrain": dict(_PRETRAIN)},
    "large": {**_COMMON, "seeds": 5, "world": "small", "sft_steps": 600, "rm_steps": 750, "dpo_steps": 300,
              "ppo_steps": 150, "rollout_batch": 32, "eval_items": 200,
              "pretrain": {**_PRETRAIN, "steps": 2500, "n_layer": 6, "n_head": 8, "d_model": 256,
                           "vocab_size": 2048}},
}


def check_settings(s: dict) -> None:
    """Refuse settings the run cannot use, naming the field."""
    def whole(key, value, least=1):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise LLMLabError(f"alignment: {key} must be a whole number ≥ {least}, got {value!r}")
    for key in ("sft_steps", "rm_steps", "dpo_steps", "ppo_steps", "rollout_batch", "ppo_max_new_tokens",
                "eval_items", "max_new_tokens", "samples"):
        whole(key, s[key])
    if s["ppo_reward"] not in ("rm", "world"):
        raise LLMLabError(f"alignment: ppo_reward must be rm (the reward model) or world (the true reward), got "
                          f"{s['ppo_reward']!r}")
    if s["world"] not in world_build.PRESETS:
        raise LLMLabError(f"alignment: world must be one of {', '.join(world_build.PRESETS)}, got {s['world']!r}")
    if s["run"] is not None:
        folder = Path(str(s["run"]))
        missing = [p for p in ("world/world.json", "pretrain/model/config.json", "sft/model/config.json",
                               "rm/model/config.json") if not (folder / p).is_file()]
        if missing:
            raise LLMLabError(f"alignment: run = {s['run']!r} is not a finished `llmlab run` folder (missing "
                              f"{', '.join(missing)}); run `llmlab run --stages world pretrain sft rm` first")
    p = s["pretrain"]
    for key in ("steps", "n_layer", "n_head", "d_model", "max_seq_len", "vocab_size", "batch_size"):
        whole(f"pretrain.{key}", p[key])
    whole("pretrain.warmup_steps", p["warmup_steps"], 0)
    if isinstance(p["lr"], bool) or not isinstance(p["lr"], (int, float)) or not p["lr"] > 0:
        raise LLMLabError(f"alignment: pretrain.lr must be a positive number, got {p['lr']!r}")


# --- the shared models -----------------------------------------------------------------------------------------

def _schedule(steps: int, warmup: int) -> list[str]:
    return [f"train.max_steps={steps}", f"train.warmup_steps={min(warmup, steps)}",
            f"train.checkpoint_every={max(1, steps // 2)}", "train.keep_checkpoints=1", "train.progress=false"]


def recipes(s: dict, world: Path, seed: int = 0) -> dict:
    """Each stage's recipe: the world recipe of ``llmlab run`` with this experiment's step counts."""
    from ..stages.common import resolve_recipe
    p = s["pretrain"]
    return {
        "pretrain": resolve_recipe({}, "world-pretrain", [
            f"model.n_layer={p['n_layer']}", f"model.n_head={p['n_head']}", f"model.d_model={p['d_model']}",
            f"model.max_seq_len={p['max_seq_len']}", f"data.max_length={p['max_seq_len']}",
            f"data.batch_size={p['batch_size']}", f"tokenizer.vocab_size={p['vocab_size']}", f"train.lr={p['lr']}",
            *_schedule(int(p["steps"]), int(p["warmup_steps"])), f"train.eval_every={p['steps']}",
            "train.eval_batches=4", f"train.log_every={max(1, p['steps'] // 50)}", "train.seed=0"]),
        "sft": resolve_recipe({}, "sft-world", [
            f"data.eval_path={world / 'sft_eval.jsonl'}", *_schedule(int(s["sft_steps"]), 20), "train.eval_every=0",
            "train.seed=0", f"eval.max_items={min(50, s['eval_items'])}", f"eval.max_new_tokens={s['max_new_tokens']}"]),
        "rm": resolve_recipe({}, "rm-world", [
            f"data.eval_path={world / 'pairs_eval.jsonl'}", *_schedule(int(s["rm_steps"]), 20),
            "train.eval_every=0", "train.seed=0"]),
        "dpo": resolve_recipe({}, "dpo-world", [
            f"data.eval_path={world / 'pairs_eval.jsonl'}", *_schedule(int(s["dpo_steps"]), 20),
            "train.eval_every=0", "train.log_every=1", f"train.seed={seed}"]),
        "ppo": resolve_recipe({}, "ppo-world", [
            f"reward.world={world}", f"ppo.rollout_batch={s['rollout_batch']}", f"ppo.minibatch={s['rollout_batch']}",
            f"ppo.max_new_tokens={s['ppo_max_new_tokens']}", *_schedule(int(s["ppo_steps"]), 0),
            "train.eval_every=0", "train.log_every=1", f"train.seed={seed}"]),
    }


def prepare_shared(ctx: Context) -> dict[str, Path]:
    """The world, base, SFT and reward model: from ``--set run=DIR``, or trained once here (each resumed from its
    checkpoints when interrupted, skipped when its model exists)."""
    s = ctx.settings
    if s["run"] is not None:
        run = Path(str(s["run"]))
        return {"world": run / "world", "base": run / "pretrain" / "model", "sft": run / "sft" / "model",
                "rm": run / "rm" / "model"}
    from ..stages import pretrain, reward, sft
    world = ctx.out / "world"
    if not (world / "world.json").is_file():
        world_build.build_world(world_build.preset(str(s["world"]), seed=int(s["world_seed"]))).write(world)
    r = recipes(s, world)
    steps = [("base", lambda d: pretrain.run(None, world / "corpus.jsonl", d, r["pretrain"], resume=_resume(d))),
             ("sft", lambda d: sft.run(str(ctx.out / "base" / "model"), str(world / "sft_train.jsonl"), str(d),
                                       r["sft"], resume=_resume(d))),
             ("rm", lambda d: reward.run(str(ctx.out / "sft" / "model"), str(world / "pairs_train.jsonl"), str(d),
                                         r["rm"], resume=_resume(d)))]
    for name, train in steps:
        if not (ctx.out / name / "model" / "config.json").is_file():
            train(ctx.out / name)
    return {"world": world, **{name: ctx.out / name / "model" for name, _ in steps}}


def _resume(run_dir: Path) -> bool:
    return (run_dir / "checkpoints").is_dir()


# --- one method, one seed, in a child process ------------------------------------------------------------------

class TracedReward:
    """PPO's reward as a function ``f(item, text)``: the reward model's score (or the world's reward), while both are
    appended to ``trace.jsonl``, one line per rollout in order; ``rollout_batch`` lines make one PPO step."""

    def __init__(self, rm_dir, world_dir, run_dir: Path, use: str, keep_lines: int):
        from ..model.heads import RewardModel
        from ..world.build import load_world
        self.rm, self.judge, self.use = RewardModel.load(rm_dir), load_world(world_dir).judge, use
        self.path = run_dir / TRACE
        lines = self.path.read_text(encoding="utf-8").splitlines()[:keep_lines] if self.path.is_file() else []
        write_text_atomic(self.path, "".join(line + "\n" for line in lines))   # drop steps the resume redoes

    def __call__(self, item: dict, text: str) -> float:
        scores = {"rm": float(self.rm.score([item["prompt"]], [text])[0]), "world": float(self.judge.reward(item, text))}
        with self.path.open("a", encoding="utf-8") as f:
            f.write(json.dumps(scores) + "\n")
        return scores[self.use]


def child_main(spec_path: str) -> None:
    """Train one method for one seed (the spec written by ``train_method``) and write ``child.json``."""
    import time

    import torch
    from ..stages import dpo, ppo
    from ..train.checkpoint import list_checkpoints
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads()))
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    out, rss_start, start = Path(spec["out"]), peak_rss_mib(), time.perf_counter()
    resume = _resume(out)
    if spec["method"] == "dpo":
        summary = dpo.run(spec["sft"], spec["data"], str(out), spec["recipe"], resume=resume)
    else:
        done = list_checkpoints(out)[-1][0] if resume and list_checkpoints(out) else 0
        reward = TracedReward(spec["rm"], spec["world"], out, spec["ppo_reward"], done * spec["rollout_batch"])
        summary = ppo.run(spec["sft"], spec["data"], str(out), spec["recipe"], reward=reward, resume=resume)
    write_text_atomic(out / CHILD, json.dumps({
        "train_seconds": float(summary["seconds"]), "process_seconds": time.perf_counter() - start,
        "rss_after_imports_mib": rss_start, "peak_rss_mib": peak_rss_mib(), "resumed": resume,
        "steps": summary["steps"]}, indent=2) + "\n")


def train_method(ctx: Context, shared: dict, method: str, seed: int) -> dict:
    """Run (or resume) one method's training in a child process; returns its ``child.json``."""
    out = ctx.run_dir(method, seed)
    if (out / CHILD).is_file():
        return json.loads((out / CHILD).read_text(encoding="utf-8"))
    s, world = ctx.settings, shared["world"]
    data = world / ("pairs_train.jsonl" if method == "dpo" else "rl_train.jsonl")
    spec = {"method": method, "sft": str(shared["sft"]), "rm": str(shared["rm"]), "world": str(world),
            "data": str(data), "out": str(out), "recipe": recipes(s, world, seed)[method],
            "ppo_reward": s["ppo_reward"], "rollout_batch": int(s["rollout_batch"])}
    out.mkdir(parents=True, exist_ok=True)
    return run_child(__name__, spec, out.parent / f"{method}-spec.json", out / CHILD,
                     f"alignment: {method} for seed {seed}")


# --- measuring -------------------------------------------------------------------------------------------------

def models_held(shared: dict, s: dict) -> dict:
    """Parameters of every model each method holds while it trains, counted from the saved models."""
    from ..hub.load import load_our_model
    from ..model.heads import RewardModel
    policy = load_our_model(shared["sft"])
    n_policy = sum(p.numel() for p in policy.parameters())
    value = policy.config.d_model + 1                         # Linear(d, 1): weight and bias
    n_rm = sum(p.numel() for p in RewardModel.load(shared["rm"]).parameters()) if s["ppo_reward"] == "rm" else 0
    pairs = sum(1 for _ in (shared["world"] / "pairs_train.jsonl").open(encoding="utf-8"))
    return {"dpo": {"models": {"policy": n_policy}, "total": n_policy, "trainable": n_policy,
                    "cached_reference_numbers": 2 * pairs},
            "ppo": {"models": {"policy": n_policy, "value head": value, "reference": n_policy,
                               **({"reward model": n_rm} if n_rm else {})},
                    "total": 2 * n_policy + value + n_rm, "trainable": n_policy + value}}


def evaluate(models: list[Path], shared: dict, s: dict, out: Path) -> list[dict]:
    """``llmlab eval`` rows of ``models`` (the first, SFT, is the baseline), cached in ``out/eval.json``."""
    if not (out / "eval.json").is_file():
        from ..stages.evaluate import evaluate_models
        evaluate_models([str(m) for m in models], [str(shared["world"] / "rl_eval.jsonl")], out,
                        reward=str(shared["rm"]), reference=str(shared["sft"]), world=str(shared["world"]),
                        max_new_tokens=int(s["max_new_tokens"]), limit=int(s["eval_items"]))
    return json.loads((out / "eval.json").read_text(encoding="utf-8"))["models"]


EVAL_KEYS = ("win_rate", "kl", "reward_model", "world_reward", "exact_match", "refusal_rate")


def measure_seed(ctx: Context, shared: dict, seed: int) -> dict:
    """Train DPO and PPO for one seed and evaluate them; each method's ``result.json`` caches the lot."""
    results = {}
    for method in METHODS:
        done = ctx.run_dir(method, seed) / RESULT
        if done.is_file():
            results[method] = json.loads(done.read_text(encoding="utf-8"))
    if len(results) == len(METHODS):
        return results
    costs = {method: train_method(ctx, shared, method, seed) for method in METHODS}
    rows = evaluate([shared["sft"], *(ctx.run_dir(m, seed) / "model" for m in METHODS)], shared, ctx.settings,
                    ctx.out / f"seed-{seed}" / "eval")
    for method, row in zip(METHODS, rows[1:]):
        result = {**{k: row.get(k) for k in EVAL_KEYS}, **costs[method]}
        if method == "ppo":
            result["trace"] = trace_per_step(ctx.run_dir(method, seed) / TRACE, int(ctx.settings["rollout_batch"]))
        write_text_atomic(ctx.run_dir(method, seed) / RESULT, json.dumps(result, indent=2) + "\n")
        results[method] = result
    return results


def trace_per_step(path: Path, batch: int) -> dict:
    """Mean reward-model score and world reward of PPO's rollouts at each step."""
    lines = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    steps = [lines[i:i + batch] for i in range(0, len(lines) - batch + 1, batch)]
    return {key: [sum(r[key] for r in step) / len(step) for step in steps] for key in ("rm", "world")}


def side_by_side(shared: dict, s: dict, models: dict[str, Path], out: Path) -> dict:
    """Greedy answers of every model to the first ``samples`` held-out prompts, one of each kind first, with the
    reward model's score and the world's reward; cached in ``out``."""
    if out.is_file():
        return json.loads(out.read_text(encoding="utf-8"))
    from ..data.chat_data import load_prompts
    from ..hub.folder import ModelDir
    from ..hub.load import load_model
    from ..infer.engine import SamplingParams
    from ..infer.replies import engine_for, generate_replies
    from ..model.heads import RewardModel
    from ..world.build import load_world
    items = load_prompts(shared["world"] / "rl_eval.jsonl")[:int(s["eval_items"])]
    kinds, chosen = set(), []
    for item in items:                      # one per kind, then the rest in order
        if item.get("kind") not in kinds:
            kinds.add(item.get("kind"))
            chosen.append(item)
    chosen = (chosen + [i for i in items if i not in chosen])[:int(s["samples"])]
    rm, judge = RewardModel.load(shared["rm"]), load_world(shared["world"]).judge
    samples = {"prompts": [i["prompt"][-1]["content"] for i in chosen],
               "references": [i.get("reference") for i in chosen], "kinds": [i.get("kind") for i in chosen]}
    for name, path in models.items():
        model = ModelDir(str(path))
        template = model.template()
        replies = generate_replies(engine_for(load_model(model), model.tokenizer(), template),
                                   [i["prompt"] for i in chosen], template,
                                   SamplingParams(max_new_tokens=int(s["max_new_tokens"]), temperature=0.0))
        texts = [r.text for r in replies]
        samples[name] = {"texts": texts, "rm": [float(x) for x in rm.score([i["prompt"] for i in chosen], texts)],
                         "world": [float(judge.reward(i, t)) for i, t in zip(chosen, texts)]}
    write_text_atomic(out, json.dumps(samples, indent=2) + "\n")
    return samples


# --- the experiment --------------------------------------------------------------------------------------------

def run(ctx: Context) -> Result:
    s = ctx.settings
    shared = prepare_shared(ctx)
    per_seed = {seed: measure_seed(ctx, shared, seed) for seed in ctx.seeds}     # seed by seed
    sft_row, base_row = evaluate([shared["sft"], shared["base"]], shared, s, ctx.out / "eval")
    held = models_held(shared, s)
    per_method = {}
    for method in METHODS:
        runs = [per_seed[seed][method] for seed in ctx.seeds]
        per_method[method] = {
            **{k: spread([_num(r[k]) for r in runs]) for k in (*EVAL_KEYS, "train_seconds", "process_seconds",
                                                                 "peak_rss_mib", "rss_after_imports_mib")},
            "held": held[method]}
    fixed = {"base": {k: _num(base_row.get(k)) for k in EVAL_KEYS}, "sft": {k: _num(sft_row.get(k)) for k in EVAL_KEYS}}
    fixed["sft"]["win_rate"], fixed["sft"]["kl"] = 0.5, 0.0
    traces = {seed: per_seed[seed]["ppo"].get("trace") or {"rm": [], "world": []} for seed in ctx.seeds}
    samples = side_by_side(shared, s, {"base": shared["base"], "sft": shared["sft"],
                                       **{m: ctx.run_dir(m, ctx.seeds[0]) / "model" for m in METHODS}},
                           ctx.out / "samples.json")
    from . import alignment_report as report
    figures = report.draw(ctx.out, per_seed, per_method, fixed, traces, ctx.seeds)
    verdict, numbers = report.judge(s, per_method, fixed, traces,
                                    int(recipes(s, shared["world"])["dpo"]["data"]["batch_size"]))
    return Result(
        title="Base vs SFT vs DPO vs PPO, and DPO vs PPO over seeds (task world)",
        setup=report.setup_text(s, recipes(s, shared["world"]), held),
        sections=[Section("Result", text=verdict, table=report.result_table(per_method, fixed),
                          figures=figures[:1]),
                  Section("Over-optimisation", text=report.OVEROPT, figures=figures[1:2],
                          table=report.seed_table(per_seed, ctx.seeds)),
                  Section("Costs", text=report.COSTS, table=report.cost_table(per_method), figures=figures[2:3]),
                  Section("Side by side", text=report.SAMPLES.format(seed=ctx.seeds[0]),
                          table=report.samples_table(samples), samples=report.samples_list(samples)),
                  Section("What the numbers mean", text=report.MEANING)],
        summary={"methods": per_method, "base": fixed["base"], "sft": fixed["sft"],
                 "per_seed": {str(k): v for k, v in per_seed.items()}, "samples": samples, **numbers},
        headline=verdict.split("\n")[0],
        figures=figures)


def _num(v) -> float:
    return float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else math.nan
