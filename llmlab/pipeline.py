"""``llmlab run``: the whole life cycle of a small language model on the built-in task world, with a report.

    world → pretrain (tokenizer + base model) → sft → rm → dpo, ppo (both from the SFT model) → eval
          → classify (the pre-trained model, before vs. after) → samples → report

Each stage calls the same function as its own CLI command, with the recipe from ``llmlab/configs/`` and the preset's
``--set`` overrides on top. A stage writes ``DIR/<stage>/stage.json`` holding a fingerprint of its configuration
and inputs; when it finished with the same fingerprint the stage is skipped, when it was interrupted it resumes
from its checkpoints (training is bitwise reproducible, so the numbers are those of an uninterrupted run), and when
its configuration changed it starts over. ``--force`` reruns the chosen stages from scratch.

The report (``DIR/report.md``, ``DIR/report.html``, ``DIR/summary.json``) has per stage what it did, its key
numbers and a figure. ``--stages`` runs some stages only (``--stages world pretrain``); the report then holds
those and any that finished in an earlier run, and names the ones that have not run yet.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import resource
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from .config import recipe_path
from .data.chat_data import load_prompts
from .errors import LLMLabError
from .files import write_text_atomic
from .infer.engine import SamplingParams
from .infer.replies import engine_for, generate_replies
from .hub.folder import ModelDir
from .hub.load import load_model
from .plots import bar_chart, read_metrics
from .report import Section, write_report
from .stages import classify, dpo, ppo, pretrain, reward, sft
from .stages.common import resolve_recipe
from .stages.evaluate import evaluate_models
from .world import build as world_build
from .world.records import FIRST_PART_ONLY

# Per preset: the world's size, and --set overrides of each stage's recipe; ``seconds`` is the expected wall-clock
# time of each stage on a 2-core laptop, used only for the time-left estimate.
PRESETS = {
    "test": {
        "world": "test",
        "pretrain": ["model.n_layer=2", "model.d_model=64", "model.max_seq_len=256", "data.max_length=128",
                     "tokenizer.vocab_size=400", "train.max_steps=30", "train.eval_every=0",
                     "train.checkpoint_every=15", "train.warmup_steps=5", "data.batch_size=8"],
        "sft": ["train.max_steps=20", "train.eval_every=0", "train.checkpoint_every=10", "train.warmup_steps=2",
                "eval.max_items=16", "data.batch_size=8"],
        "rm": ["train.max_steps=10", "train.eval_every=0", "train.checkpoint_every=5", "train.warmup_steps=2",
               "data.batch_size=8"],
        "dpo": ["train.max_steps=10", "train.eval_every=0", "train.checkpoint_every=5", "train.warmup_steps=2",
                "data.batch_size=8"],
        "ppo": ["train.max_steps=3", "train.checkpoint_every=2", "train.eval_every=0", "ppo.rollout_batch=8",
                "ppo.minibatch=4", "ppo.epochs=1", "ppo.max_new_tokens=16"],
        "classify": ["data.train_limit=64", "data.test_limit=32", "classify.epochs=1"],
        "eval_max_new_tokens": 16,
        "seconds": {"world": 1, "pretrain": 15, "sft": 15, "rm": 8, "dpo": 8, "ppo": 20, "eval": 20,
                    "classify": 8, "samples": 5},
    },
    "tiny": {
        "world": "tiny",
        "pretrain": [], "sft": [], "rm": [], "dpo": [], "ppo": [], "classify": [],
        "eval_max_new_tokens": 48,
        "seconds": {"world": 2, "pretrain": 420, "sft": 80, "rm": 100, "dpo": 70, "ppo": 180, "eval": 25,
                    "classify": 6, "samples": 2},
    },
    "small": {
        "world": "small",
        "pretrain": ["model.n_layer=6", "model.d_model=256", "model.n_head=8", "train.max_steps=2500",
                     "tokenizer.vocab_size=2048"],
        "sft": ["train.max_steps=600"], "rm": ["train.max_steps=750", "train.eval_every=250"],
        "dpo": ["train.max_steps=300"], "ppo": ["train.max_steps=150"], "classify": ["classify.epochs=3"],
        "eval_max_new_tokens": 48,
        "seconds": {"world": 3, "pretrain": 2200, "sft": 510, "rm": 450, "dpo": 200, "ppo": 350, "eval": 150,
                    "classify": 60, "samples": 5},
    },
}
STAGES = ("world", "pretrain", "sft", "rm", "dpo", "ppo", "eval", "classify", "samples")
RECIPES = {"pretrain": "world-pretrain", "sft": "sft-world", "rm": "rm-world", "dpo": "dpo-world",
           "ppo": "ppo-world", "classify": "classify-world"}     # llmlab/configs/<name>.yaml
SAMPLE_KINDS = ("fact", "arithmetic", "reverse", "sort", "count", "multi", "benign", "forbidden")


@dataclass
class Run:
    """What the stages share: the run folder, the preset, and each finished stage's result."""
    out: Path
    preset: str
    seed: int
    results: dict

    def dir(self, stage: str) -> Path:
        return self.out / stage

    @property
    def world_dir(self) -> Path:
        return self.dir("world")

    def model(self, stage: str) -> str:
        return str(self.dir(stage) / "model")

    def recipe(self, stage: str, extra: list[str] = ()) -> dict:
        return resolve_recipe({}, RECIPES[stage], [*PRESETS[self.preset][stage], f"train.seed={self.seed}", *extra])


# ----------------------------------------------------------------------------------------------- the stages

def stage_world(run: Run) -> dict:
    world = world_build.build_world(world_build.preset(PRESETS[run.preset]["world"], seed=run.seed))
    world.write(run.world_dir)
    return {"pretrain_documents": len(world.pretrain_texts), "sft_train": len(world.sft_train),
            "sft_eval": len(world.sft_eval), "pairs_train": len(world.pairs_train),
            "multi_eval": len(world.multi_eval), "rl_train": len(world.rl_prompts_train),
            "classify_train": len(world.classify_train)}


def stage_pretrain(run: Run) -> dict:
    summary = pretrain.run(None, run.world_dir / "corpus.jsonl", run.dir("pretrain"), run.recipe("pretrain"),
                           resume=True)
    return _training_numbers(run.dir("pretrain"), summary, ("val_loss", "val_ppl"))


def stage_sft(run: Run) -> dict:
    recipe = run.recipe("sft", [f"data.eval_path={run.world_dir / 'sft_eval.jsonl'}"])
    summary = sft.run(run.model("pretrain"), str(run.world_dir / "sft_train.jsonl"), str(run.dir("sft")), recipe,
                      resume=True)
    return {**_training_numbers(run.dir("sft"), summary, ("val_loss",)), "exact_match": summary.get("exact_match")}


def stage_rm(run: Run) -> dict:
    recipe = run.recipe("rm", [f"data.eval_path={run.world_dir / 'pairs_eval.jsonl'}"])
    summary = reward.run(run.model("sft"), str(run.world_dir / "pairs_train.jsonl"), str(run.dir("rm")), recipe,
                     resume=True)
    return _training_numbers(run.dir("rm"), summary, ("val_accuracy", "val_loss"))


def stage_dpo(run: Run) -> dict:
    recipe = run.recipe("dpo", [f"data.eval_path={run.world_dir / 'pairs_eval.jsonl'}"])
    summary = dpo.run(run.model("sft"), str(run.world_dir / "pairs_train.jsonl"), str(run.dir("dpo")), recipe,
                      resume=True)
    return _training_numbers(run.dir("dpo"), summary, ("val_reward_accuracy", "val_reward_margin", "val_loss"))


def stage_ppo(run: Run) -> dict:
    recipe = run.recipe("ppo", [f"reward.world={run.world_dir}", f"data.eval_path={run.world_dir / 'rl_eval.jsonl'}"])
    summary = ppo.run(run.model("sft"), str(run.world_dir / "rl_train.jsonl"), str(run.dir("ppo")), recipe,
                      reward="world", resume=True)
    last = summary.get("last") or {}
    return {"steps": summary.get("steps"), "seconds_training": summary.get("seconds"),
            "final_score": last.get("score"), "final_reward": last.get("reward"), "final_kl": last.get("kl"),
            **{f"eval_{k}": v for k, v in (summary.get("eval") or {}).items() if isinstance(v, (int, float))}}


EVAL_MODELS = ("sft", "pretrain", "dpo", "ppo")     # the first is the baseline of the win rates
MODEL_NAMES = {"pretrain": "base", "sft": "SFT", "dpo": "DPO", "ppo": "PPO"}


def eval_files(run: Run) -> list[str]:
    return [str(run.world_dir / f)
            for f in ("sft_eval.jsonl", "multi_eval.jsonl", "benign_eval.jsonl", "forbidden_eval.jsonl")]


def stage_eval(run: Run) -> dict:
    report = evaluate_models([run.model(s) for s in EVAL_MODELS], eval_files(run), run.dir("eval"),
                             reward=run.model("rm"), reference=run.model("sft"), world=str(run.world_dir),
                             max_new_tokens=PRESETS[run.preset]["eval_max_new_tokens"])
    return {MODEL_NAMES[s]: {k: v for k, v in row.items() if k != "model"}
            for s, row in zip(EVAL_MODELS, report["models"])}


def stage_classify(run: Run) -> dict:
    result = classify.run(run.model("pretrain"), str(run.world_dir), run.dir("classify"), run.recipe("classify"),
                          resume=True)
    row = result["results"][0]
    return {k: row.get(k) for k in ("before", "after", "zero_shot", "parameters", "method", "train_seconds")
            if k in row}


def stage_samples(run: Run) -> dict:
    """Each model's greedy answer to one held-out prompt of every kind."""
    items = [i for path in eval_files(run) for i in load_prompts(path)]
    chosen = [next(i for i in items if i.get("kind") == kind) for kind in SAMPLE_KINDS
              if any(i.get("kind") == kind for i in items)]
    samples = {"prompts": [i["prompt"][-1]["content"] for i in chosen],
               "references": [i.get("reference", i.get("answer")) for i in chosen]}
    for stage in ("pretrain", "sft", "dpo", "ppo"):
        model = ModelDir(run.model(stage))
        template = model.template()
        engine = engine_for(load_model(model), model.tokenizer(), template)
        replies = generate_replies(engine, [i["prompt"] for i in chosen], template,
                                   SamplingParams(max_new_tokens=PRESETS[run.preset]["eval_max_new_tokens"],
                                                  temperature=0.0))
        samples[MODEL_NAMES[stage]] = [r.text for r in replies]
    return samples


STAGE_FUNCTIONS: dict[str, Callable[[Run], dict]] = {
    "world": stage_world, "pretrain": stage_pretrain, "sft": stage_sft, "rm": stage_rm, "dpo": stage_dpo,
    "ppo": stage_ppo, "eval": stage_eval, "classify": stage_classify, "samples": stage_samples}
UPSTREAM = {"world": (), "pretrain": ("world",), "sft": ("pretrain",), "rm": ("sft",), "dpo": ("sft",),
            "ppo": ("sft",), "eval": ("sft", "pretrain", "dpo", "ppo", "rm"), "classify": ("pretrain",),
            "samples": ("pretrain", "sft", "dpo", "ppo")}


def _training_numbers(run_dir: Path, summary: dict, keys: tuple[str, ...]) -> dict:
    """The loop's summary plus the last logged value of each of ``keys``."""
    out = {"steps": summary.get("steps"), "final_loss": summary.get("final_loss"),
           "seconds_training": summary.get("seconds")}
    metrics = run_dir / "metrics.jsonl"
    records = read_metrics(metrics) if metrics.is_file() else []
    for key in keys:
        values = [r[key] for r in records if isinstance(r.get(key), (int, float))]
        out[key] = values[-1] if values else (summary.get("eval") or {}).get(key)
    return out


# ----------------------------------------------------------------------------------------------- orchestration

def fingerprint(run: Run, stage: str, upstream: dict[str, str]) -> str:
    """A hash of what determines the stage's output: preset, seed, the recipe file it reads (for the world stage,
    the source of the ``llmlab.world`` package and its configuration), its inputs (the fingerprints of the stages
    it reads from). Changing ``rm-world.yaml`` reruns the reward model and what reads it, not the pre-training."""
    settings = {k: v for k, v in PRESETS[run.preset].items() if k != "seconds"}    # estimates change nothing
    recipe = recipe_path(RECIPES[stage]) if stage in RECIPES else None
    if stage == "world":
        sources = sorted(Path(world_build.__file__).parent.glob("*.py"))
        world_config = dataclasses.asdict(world_build.preset(settings["world"], seed=run.seed))
        recipe_text = "".join(p.read_text(encoding="utf-8") for p in sources) + json.dumps(world_config)
    else:
        recipe_text = recipe.read_text(encoding="utf-8") if recipe else None
    parts = {"stage": stage, "preset": settings, "seed": run.seed,
             "upstream": {u: upstream[u] for u in UPSTREAM[stage]}, "recipe": recipe_text}
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _read_state(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_state(path: Path, state: dict) -> None:
    write_text_atomic(path, json.dumps(state, indent=2, default=str))


def run_stage(run: Run, stage: str, prints: str, upstream: dict[str, str], force: bool) -> tuple[dict, float, bool]:
    """Run one stage unless it already finished with the same fingerprint; returns (result, seconds, skipped)."""
    folder = run.dir(stage)
    state_file = folder / "stage.json"
    fp = upstream[stage] = fingerprint(run, stage, upstream)
    state = _read_state(state_file)
    if state and not force and state.get("fingerprint") == fp and state.get("done"):
        print(f"{prints} {stage}: done before with the same configuration; skipped", file=sys.stderr)
        return state["result"], state["seconds"], True
    fresh = force or (state or {}).get("fingerprint") != fp
    if folder.exists() and fresh:
        shutil.rmtree(folder)                       # changed configuration or --force: start over
    folder.mkdir(parents=True, exist_ok=True)
    resuming = state is not None and not fresh      # an attempt with this configuration was interrupted
    previous = state["seconds"] if resuming else 0.0
    _write_state(state_file, {"fingerprint": fp, "done": False, "seconds": previous})
    print(f"{prints} {stage}: {'resuming' if resuming else 'running'}", file=sys.stderr)
    start = time.perf_counter()
    result = STAGE_FUNCTIONS[stage](run)
    seconds = previous + time.perf_counter() - start
    _write_state(state_file, {"fingerprint": fp, "done": True, "seconds": seconds, "result": result})
    return result, seconds, False


def run_pipeline(out_dir: str | Path = "runs/llmlab", preset: str = "tiny", stages: list[str] | None = None,
                 force: bool = False, seed: int = 0) -> dict:
    """Run the stages (all by default) and write the report; returns the summary."""
    if preset not in PRESETS:
        raise LLMLabError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    chosen = list(stages or STAGES)
    unknown = [s for s in chosen if s not in STAGES]
    if unknown:
        raise LLMLabError(f"unknown stage(s) {', '.join(unknown)}; the stages are {', '.join(STAGES)}")
    run = Run(Path(out_dir), preset, seed, {})
    earlier = {}                    # the stages not chosen that finished in an earlier run
    for stage in (s for s in STAGES if s not in chosen):
        state = _read_state(run.dir(stage) / "stage.json")
        if state and state.get("done"):
            earlier[stage] = state
    for stage in chosen:
        missing = [u for u in STAGES if u in UPSTREAM[stage] and u not in chosen and u not in earlier]
        if missing:
            one = len(missing) == 1
            raise LLMLabError(f"stage {stage!r} reads the output of {', '.join(missing)}, which "
                              f"{'has' if one else 'have'} not run in {run.out}; include {'it' if one else 'them'} "
                              f"in --stages")
    run.out.mkdir(parents=True, exist_ok=True)
    expected = PRESETS[preset]["seconds"]
    upstream: dict[str, str] = {}
    seconds: dict[str, float] = {}
    started, spent_expected = time.perf_counter(), 0.0
    for i, stage in enumerate(STAGES):
        if stage not in chosen:     # finished earlier: its results join the report; never run: left out
            if stage in earlier:
                state = earlier[stage]
                upstream[stage], run.results[stage], seconds[stage] = (state["fingerprint"], state["result"],
                                                                       state["seconds"])
            continue
        elapsed = time.perf_counter() - started
        left = sum(expected[s] for s in STAGES[i:] if s in chosen)
        pace = elapsed / spent_expected if spent_expected and elapsed > 5 else 1.0
        prints = f"[{i + 1}/{len(STAGES)} | {elapsed:5.0f}s elapsed, ~{left * pace:4.0f}s left]"
        run.results[stage], seconds[stage], skipped = run_stage(run, stage, prints, upstream, force)
        spent_expected += 0 if skipped else expected[stage]
    summary = {**run.results, "seconds": seconds, "total_seconds": sum(seconds.values()), "preset": preset,
               "seed": seed, "peak_memory_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}
    summary.pop("samples", None)
    paths = write_pipeline_report(run, summary)
    print(f"report: {paths['md']} (also {paths['html'].name}, {paths['summary'].name})", file=sys.stderr)
    return summary


# ----------------------------------------------------------------------------------------------- the report

def _figure(run: Run, stage: str, name: str) -> list[str]:
    return [f"{stage}/{name}"] if (run.dir(stage) / name).is_file() else []


def _ceiling_note(ev: dict) -> str:
    """A sentence on the best win rate against SFT that any model could reach, when the evaluation gives it."""
    ceiling = next((ev[m]["win_rate_ceiling"] for m in ("DPO", "PPO") if (ev.get(m) or {}).get("win_rate_ceiling")),
                   None)
    if ceiling is None:
        return ""
    return (f" SFT's answers already earn the world's top reward on {2 - 2 * ceiling:.0%} of the prompts, where "
            f"another model can at best tie, so no model can win more than {ceiling:.3f} against it.")


def _by_kind_table(ev: dict, models: list[str], key: str) -> list[list[str]]:
    """A table of one per-kind metric (``exact_match_by_kind`` ...): a row per model, a column per kind."""
    by_kind = {m: ev[m].get(key) or {} for m in models}
    kinds = list(dict.fromkeys(k for m in models for k in by_kind[m]))
    return [["model", *kinds]] + [[m, *[_num(by_kind[m].get(k)) for k in kinds]] for m in models]


TRAINING_SECTIONS = {   # stage → (report title, what it did, its figure)
    "pretrain": ("Pre-training", "A byte-level BPE tokenizer and a Llama-style decoder trained on the world's "
                 "corpus (next-token prediction on BOS-aligned packed rows).", "loss.png"),
    "sft": ("Supervised fine-tuning", "The base model fine-tuned on chat conversations, loss on the assistant's "
            "tokens and end-of-turn token only; exact match on held-out questions (greedy).", "loss.png"),
    "rm": ("Reward model", "The SFT model with a scalar head on the last token, plus (as the rm-world recipe sets "
           "rm.likelihood_weight) the reply's mean log-likelihood under the model's own language-model head, "
           "trained with the Bradley–Terry loss −log σ(r_chosen − r_rejected); pairwise accuracy on held-out pairs.",
           "loss.png"),
    "dpo": ("DPO", "Direct preference optimisation from the SFT model (β = 0.1, reference log-probabilities "
            "computed once and cached, plus the chosen answers' NLL as in RPO).", "loss.png"),
    "ppo": ("PPO", "RLHF with PPO from the SFT model against the world's programmatic reward, with a per-token KL "
            "penalty to the SFT model, a value head and GAE.", "reward.png"),
    "classify": ("Classification", "The pre-trained model with a new classification head on its last token, "
                 "fine-tuned to tell forbidden requests from allowed ones; accuracy on held-out requests before "
                 "and after.", "accuracy.png"),
}


def write_pipeline_report(run: Run, summary: dict) -> dict:
    """The report of the stages that have results (this run's and finished earlier ones); a stage that has not
    run yet has no section, and the introduction says how to run the rest."""
    r, s = run.results, summary["seconds"]
    sections = []
    if "world" in r:
        sections.append(Section(
            "The task world", f"A synthetic world generated from seed {run.seed} (preset "
            f"`{PRESETS[run.preset]['world']}`): people with homes, jobs, pets and stories; arithmetic; "
            "string tasks; multi-part requests about people; and a vault whose code the assistant must "
            "never reveal. Every kind is demonstrated perfectly for SFT except the multi-part requests, which "
            f"most annotators answered only in part ({FIRST_PART_ONLY:.0%} gave only the first part): "
            "the preference pairs and the reward prefer complete answers. Train and evaluation questions never "
            "overlap.", numbers=r["world"]))
    for stage in STAGES[1:-1]:         # between the world and the samples: training stages and the evaluation
        if stage not in r:
            continue
        if stage == "eval":
            sections += _evaluation_sections(run, r["eval"])
            continue
        title, text, figure = TRAINING_SECTIONS[stage]
        sections.append(Section(title, text, numbers={**r[stage], "seconds": s[stage]},
                                figures=_figure(run, stage, figure)))
    if "samples" in r:
        sections.append(_samples_section(r["samples"]))
    sections.append(Section("Time", "Wall-clock seconds per stage.",
                            numbers={**{k: round(v, 1) for k, v in s.items()},
                                     "total": round(summary["total_seconds"], 1),
                                     "peak memory (MB)": round(summary["peak_memory_mb"])}))
    minutes = f"in {summary['total_seconds'] / 60:.1f} minutes"
    ran = [stage for stage in STAGES if stage in r]
    missing = [stage for stage in STAGES if stage not in r]
    if not missing:
        intro = (f"`llmlab run --preset {run.preset}`: every stage of a language model's life on the built-in task "
                 f"world, {minutes}.")
    else:
        seed = f" --seed {run.seed}" if run.seed else ""
        intro = (f"`llmlab run --preset {run.preset}`: the stages {', '.join(ran)} of a language model's life on "
                 f"the built-in task world, {minutes}. Not run yet: {', '.join(missing)} "
                 f"(`llmlab run --preset {run.preset}{seed} --out {run.out}` runs them and skips what finished).")
    return write_report(run.out, "llmlab run", intro, sections, summary)


def _evaluation_sections(run: Run, ev: dict) -> list[Section]:
    models = [m for m in ("base", "SFT", "DPO", "PPO") if m in ev]
    metrics = ("exact_match", "world_reward", "reward_model", "refusal_rate", "false_refusal_rate")
    bar_chart(list(metrics), {m: [ev[m].get(k) or 0.0 for k in metrics] for m in models},
              run.out / "eval.png", title="held-out evaluation", ylabel="rate / mean score")
    eval_table = [["model", *metrics, "win_rate vs SFT", "win/tie/loss vs SFT", "KL vs SFT"]] + [
        [m, *[_num(ev[m].get(k)) for k in metrics], _num(ev[m].get("win_rate")),
         "/".join(f"{x:.2f}" for x in ev[m].get("win_tie_loss") or []) or "—", _num(ev[m].get("kl"))]
        for m in models]
    kind_table, reward_table = (_by_kind_table(ev, models, key)
                                for key in ("exact_match_by_kind", "world_reward_by_kind"))
    return [
        Section("Evaluation", "Every model answers every held-out prompt greedily. Exact match on the held-out "
                "questions, the world's programmatic reward, the reward model's score, the refusal rate on "
                "forbidden requests and the false-refusal rate on benign ones; win rate (ties count ½) and KL "
                "against SFT." + _ceiling_note(ev), table=eval_table, figures=["eval.png"]),
        Section("Exact match by kind", "The exact match above, per kind of held-out question (for forbidden "
                "requests the reference is the refusal).", table=kind_table),
        Section("World reward by kind", "The world's mean reward per kind of held-out prompt (1 is the top). A "
                "multi-part request earns 1/k per right part of its k, less 1/(2k) per wrong one: this is where "
                "preferences teach what the demonstrations did not.", table=reward_table),
    ]


def _samples_section(samples: dict) -> Section:
    models = [m for m in ("base", "SFT", "DPO", "PPO") if m in samples]
    pairs = []
    for i, prompt in enumerate(samples.get("prompts", [])):
        pairs.append((f"prompt {i + 1}", f"{prompt}\n(reference: {samples['references'][i]})"))
        pairs += [(m, samples[m][i].replace("\n", " ⏎ ").strip() or "(nothing)") for m in models]
    return Section("Samples", "Greedy answers of each model to the same held-out prompts.", samples=pairs)


def _num(v):
    return f"{v:.3f}" if isinstance(v, float) else ("—" if v is None else str(v))


def register(subparsers) -> None:
    p = subparsers.add_parser("run", help="the whole life cycle on the built-in task world, with a report")
    p.add_argument("--preset", default="tiny", choices=list(PRESETS))
    p.add_argument("--out", default="runs/llmlab")
    p.add_argument("--stages", nargs="+", default=None, metavar="STAGE",
                   help=f"run only these stages (what they read must have run); the report shows every stage "
                        f"that has run: {' '.join(STAGES)}")
    p.add_argument("--force", action="store_true", help="rerun the chosen stages from scratch")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=lambda a: run_pipeline(a.out, a.preset, a.stages, a.force, a.seed) and 0)
