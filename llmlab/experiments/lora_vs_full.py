"""``llmlab experiment lora-vs-full``: LoRA at ranks 4 … 64 against full fine-tuning, for SFT on the task world.

    llmlab experiment lora-vs-full [--preset test|default|large] [--seeds K] [--set key=value ...] --out DIR

One base model, pre-trained once on the task world's corpus by ``llmlab pretrain`` (``DIR/base``; or any model
folder given with ``--set base=DIR``), is fine-tuned by ``llmlab sft`` on the world's conversations once per arm
and seed: full fine-tuning (every weight trains; arm ``full``) and LoRA at each rank r of ``ranks`` (arm ``r<r>``:
the ``targets`` linears of every block get y = W x + (α/r)·B A x with W frozen; ``llmlab/lora.py``). Every arm
trains for the same ``steps`` on the same batches (the seed fixes the data order), at its own learning rate:
``lr_full`` for full fine-tuning, ``lr_lora`` for every LoRA rank (LoRA needs a larger one: B starts at 0 and only
the rank-r product moves the weights). α is held fixed over the ranks (Hu et al.), so the scale α/r falls as r grows.

Measured per run (``DIR/seed-N/<arm>/``, its ``result.json`` written when it finished, so a rerun skips it):
the held-out exact match (SFT's own greedy evaluation on the world's ``sft_eval``), the final held-out loss, the
median seconds per optimizer step, and the Adam state it held (the bytes of ``exp_avg`` and ``exp_avg_sq`` in its
last checkpoint). Counted exactly per arm: trainable parameters (LoRA: r·(d_in + d_out) per adapted linear, the
A and B matrices; full: all of them) and the training state in float32, 4 bytes a number:

    weights 4·N_all + gradients 4·N_trainable + Adam 2·4·N_trainable

(activations are left out: they depend on the batch and are about the same in both arms; a peak-memory reading of
one process running many arms one after another would not isolate an arm, so none is reported).
"""
from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

import torch

from ..errors import LLMLabError
from ..files import write_text_atomic
from ..hub.folder import ModelDir
from ..lora import DEFAULT_TARGETS, LoRAConfig, LoRALinear
from ..plots import curve_grid, read_metrics, save, series
from ..report import Section
from ..stages import pretrain, sft
from ..stages.common import load_trainable, resolve_recipe
from ..train.checkpoint import list_checkpoints
from ..world import build as world_build
from .common import Context, Result, base_model_recipe, rank_0_first, show, spread

CLAIM = ("Claim tested (Hu et al. 2021, 'LoRA: Low-Rank Adaptation of Large Language Models'): fine-tuning only a "
         "low-rank update B·A of the weight matrices, at a modest rank, nearly matches full fine-tuning in quality, "
         "while it trains a small fraction of the parameters and keeps optimizer state for that fraction only. The "
         "run below measures both sides for supervised fine-tuning of a small pre-trained model on the task world.")
OPEN = ()
FULL = "full"
LOSS_MARGIN = 0.05            # nats: a held-out loss this much above full fine-tuning's is reported as worse
RESULT = "result.json"        # in each arm's run folder, once it finished and was measured

_PRETRAIN = {"steps": 600, "n_layer": 4, "n_head": 4, "d_model": 128, "max_seq_len": 192, "vocab_size": 1024,
             "batch_size": 16, "lr": 2e-3, "warmup_steps": 30}
_COMMON = {"world": "tiny", "world_seed": 0, "base": None, "ranks": [4, 8, 16, 32, 64], "alpha": 16.0,
           "targets": list(DEFAULT_TARGETS), "lr_full": 3e-4, "lr_lora": 3e-3, "steps": 100, "batch_size": 8,
           "warmup_steps": 10, "eval_items": 100, "max_new_tokens": 48, "tolerance": 0.05, "modest_rank": 16}
PRESETS = {
    "test": {**_COMMON, "seeds": 1, "world": "test", "ranks": [2, 4], "steps": 4, "batch_size": 4,
             "warmup_steps": 1, "eval_items": 6, "max_new_tokens": 12,
             "pretrain": {**_PRETRAIN, "steps": 4, "n_layer": 1, "n_head": 2, "d_model": 32, "max_seq_len": 256,
                          "vocab_size": 300, "batch_size": 4, "warmup_steps": 1}},
    "default": {**_COMMON, "seeds": 3, "pretrain": dict(_PRETRAIN)},
    "large": {**_COMMON, "seeds": 3, "world": "small", "ranks": [4, 8, 16, 32, 64, 128], "steps": 600,
              "batch_size": 16, "warmup_steps": 30, "eval_items": 200,
              "pretrain": {**_PRETRAIN, "steps": 2500, "n_layer": 6, "n_head": 8, "d_model": 256,
                           "vocab_size": 2048}},
}


def check_settings(s: dict) -> None:
    """Refuse settings the run cannot use, naming the field."""
    def whole(key, value, least=1):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise LLMLabError(f"lora-vs-full: {key} must be a whole number ≥ {least}, got {value!r}")

    def positive(key, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
            raise LLMLabError(f"lora-vs-full: {key} must be a positive number, got {value!r}")
    for key in ("steps", "batch_size", "eval_items", "max_new_tokens", "modest_rank"):
        whole(key, s[key])
    whole("warmup_steps", s["warmup_steps"], 0)
    for key in ("lr_full", "lr_lora", "alpha"):
        positive(key, s[key])
    if not isinstance(s["tolerance"], (int, float)) or not 0 <= s["tolerance"] < 1:
        raise LLMLabError(f"lora-vs-full: tolerance must be in [0, 1), got {s['tolerance']!r}")
    ranks = s["ranks"]
    if not isinstance(ranks, list) or not ranks or len(set(map(str, ranks))) != len(ranks):
        raise LLMLabError(f"lora-vs-full: ranks must be a list of distinct LoRA ranks, e.g. [4, 8, 16], got {ranks!r}")
    for r in ranks:
        whole("ranks", r)
    targets = s["targets"]
    if isinstance(targets, str):
        targets = s["targets"] = [t.strip() for t in targets.split(",") if t.strip()]
    if not isinstance(targets, list) or not targets:
        raise LLMLabError(f"lora-vs-full: targets must name the linear layers to adapt, e.g. [qkv, o_proj], "
                          f"got {targets!r}")
    if s["world"] not in world_build.PRESETS:
        raise LLMLabError(f"lora-vs-full: world must be one of {', '.join(world_build.PRESETS)}, got {s['world']!r}")
    if s["base"] is not None and not (Path(str(s["base"])) / "config.json").is_file():
        raise LLMLabError(f"lora-vs-full: base = {s['base']!r} is not a model folder (no config.json in it); give "
                          "a model pre-trained on the same world, e.g. DIR/pretrain/model of `llmlab run`")
    p = s["pretrain"]
    for key in ("steps", "n_layer", "n_head", "d_model", "max_seq_len", "vocab_size", "batch_size"):
        whole(f"pretrain.{key}", p[key])
    whole("pretrain.warmup_steps", p["warmup_steps"], 0)
    positive("pretrain.lr", p["lr"])


def arms(s: dict) -> list[tuple[str, int]]:
    """(name, LoRA rank; 0 = full fine-tuning) of every run of one seed."""
    return [(FULL, 0)] + [(f"r{r}", int(r)) for r in s["ranks"]]


# --- the world and the base model ------------------------------------------------------------------------------

def prepare_world(out: Path, s: dict) -> Path:
    """The task world (``out/world``), written once."""
    folder = out / "world"
    if not (folder / "sft_eval.jsonl").is_file():
        world_build.build_world(world_build.preset(str(s["world"]), seed=int(s["world_seed"]))).write(folder)
    return folder


def pretrain_recipe(s: dict) -> dict:
    return base_model_recipe("world-pretrain", s["pretrain"], int(s["pretrain"]["max_seq_len"]), logs=50)


def prepare_base(out: Path, s: dict, world: Path) -> Path:
    """``--set base=DIR``, or a decoder pre-trained once on the world's corpus by ``llmlab pretrain``
    (``out/base``; resumed from its checkpoints when interrupted, skipped when its model exists)."""
    if s["base"] is not None:
        return Path(str(s["base"]))
    run_dir = out / "base"
    if not (run_dir / "model" / "config.json").is_file():
        pretrain.run(None, world / "corpus.jsonl", run_dir, pretrain_recipe(s),
                     resume=(run_dir / "checkpoints").is_dir())
    return run_dir / "model"


# --- what each arm trains and holds ----------------------------------------------------------------------------

def lora_config(s: dict, rank: int) -> LoRAConfig:
    return LoRAConfig(r=rank, alpha=float(s["alpha"]), targets=list(s["targets"]))


def adapter_formula(model: torch.nn.Module) -> int:
    """Σ over the adapted linears of r·(d_in + d_out): A is r × d_in, B is d_out × r."""
    return sum(m.lora_A.shape[0] * (m.base.in_features + m.base.out_features)
               for m in model.modules() if isinstance(m, LoRALinear))


def parameter_counts(base: Path, s: dict, rank: int) -> dict:
    """The arm's model as SFT builds it (``load_trainable``): all, trainable and (LoRA) adapted parameters, and
    the float training state in bytes: weights + gradients + Adam's two moments."""
    model, _ = load_trainable(ModelDir(base), lora_config(s, rank))
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    n_all, n_train = sum(p.numel() for p in params), sum(p.numel() for p in trainable)
    weights = sum(p.numel() * p.element_size() for p in params)
    grads = sum(p.numel() * p.element_size() for p in trainable)
    adapted = sum(1 for m in model.modules() if isinstance(m, LoRALinear))
    return {"all": n_all, "trainable": n_train, "adapted_linears": adapted,
            "formula": adapter_formula(model) if rank else n_train,
            "bytes": {"weights": weights, "gradients": grads, "adam": 2 * grads, "total": weights + 3 * grads}}


def sft_recipe(s: dict, world: Path, rank: int, seed: int) -> dict:
    steps = int(s["steps"])
    return resolve_recipe({}, "sft-world", [
        f"data.eval_path={world / 'sft_eval.jsonl'}", f"data.batch_size={s['batch_size']}",
        f"lora.r={rank}", f"lora.alpha={s['alpha']}", f"lora.targets={json.dumps(list(s['targets']))}",
        f"train.lr={s['lr_lora'] if rank else s['lr_full']}", f"train.max_steps={steps}",
        f"train.warmup_steps={min(int(s['warmup_steps']), steps)}", f"train.eval_every={max(1, steps // 5)}",
        f"train.checkpoint_every={max(1, steps // 2)}", "train.keep_checkpoints=1", "train.log_every=1",
        f"train.seed={seed}", "train.progress=false", f"eval.max_items={s['eval_items']}",
        f"eval.max_new_tokens={s['max_new_tokens']}"])


def adam_bytes(run_dir: Path) -> int:
    """Bytes of Adam's moment tensors (``exp_avg``, ``exp_avg_sq``) in the run's newest checkpoint: the optimizer
    state it actually held."""
    checkpoints = list_checkpoints(run_dir)
    if not checkpoints:
        return 0
    state = torch.load(checkpoints[-1][1] / "optimizer.pt", map_location="cpu", weights_only=True)["state"]
    return sum(t.numel() * t.element_size() for moments in state.values()
               for key, t in moments.items() if key in ("exp_avg", "exp_avg_sq"))


def seconds_per_step(records: list[dict]) -> float:
    """The median time between consecutive logged steps (logged every step; the median skips the steps that also
    evaluated or wrote a checkpoint)."""
    steps = [(r["step"], r["elapsed"]) for r in records if "elapsed" in r]
    gaps = [(t1 - t0) / (s1 - s0) for (s0, t0), (s1, t1) in zip(steps, steps[1:]) if s1 > s0]
    return statistics.median(gaps) if gaps else math.nan


def train_arm(ctx: Context, world: Path, base: Path, name: str, rank: int, seed: int) -> dict:
    """Fine-tune (or resume) one arm for one seed and measure it; a finished arm is read from ``result.json``."""
    run_dir = ctx.run_dir(name, seed)
    done = run_dir / RESULT
    if done.is_file():
        return json.loads(done.read_text(encoding="utf-8"))
    torch.manual_seed(seed)                      # the LoRA A matrices' initial draw
    summary = sft.run(str(base), str(world / "sft_train.jsonl"), str(run_dir),
                      sft_recipe(ctx.settings, world, rank, seed), resume=(run_dir / "checkpoints").is_dir())

    def measure() -> dict:      # rank 0 (which evaluated and wrote the metrics) measures; the others read it
        if done.is_file():
            return json.loads(done.read_text(encoding="utf-8"))
        records = read_metrics(run_dir / "metrics.jsonl")
        result = {"exact_match": float(summary.get("exact_match", math.nan)),
                  "val_loss": float(summary["val_loss"]) if summary.get("val_loss") is not None else math.nan,
                  "final_loss": series(records, "loss")[1][-1], "seconds_per_step": seconds_per_step(records),
                  "adam_bytes_measured": adam_bytes(run_dir)}
        write_text_atomic(done, json.dumps(result, indent=2) + "\n")
        return result
    return rank_0_first(measure)


# --- the experiment --------------------------------------------------------------------------------------------

def run(ctx: Context) -> Result:
    s = ctx.settings
    world = rank_0_first(prepare_world, ctx.out, s)
    base = prepare_base(ctx.out, s, world)
    results = {}
    for seed in ctx.seeds:                       # seed by seed: an interrupted run has whole seeds to show
        for name, rank in arms(s):
            results[name, seed] = train_arm(ctx, world, base, name, rank, seed)
    per_arm = {}
    for name, rank in arms(s):
        runs = [results[name, seed] for seed in ctx.seeds]
        per_arm[name] = {"rank": rank, "lr": float(s["lr_lora"] if rank else s["lr_full"]),
                         "params": parameter_counts(base, s, rank),
                         **{key: spread([r[key] for r in runs]) for key in
                            ("exact_match", "val_loss", "final_loss", "seconds_per_step", "adam_bytes_measured")}}
    figures = draw(ctx, s, per_arm)
    verdict, numbers = judge(s, per_arm)
    full = per_arm[FULL]["params"]
    return Result(
        title="LoRA at ranks {} vs full fine-tuning (SFT on the task world)".format(
            ", ".join(str(r) for r in s["ranks"])),
        setup=(f"Task world preset `{s['world']}` (seed {s['world_seed']}). Base model: "
               + (f"`{s['base']}` (given)" if s["base"] is not None else
                  f"a Llama-style decoder ({s['pretrain']['n_layer']} layers, width {s['pretrain']['d_model']}, "
                  f"BPE of {s['pretrain']['vocab_size']} tokens; {full['all']:,} parameters) pre-trained once by "
                  f"`llmlab pretrain` for {s['pretrain']['steps']} steps on the world's corpus (`base/`), shared by "
                  "every arm and seed")
               + f". Each arm is `llmlab sft` (recipe `sft-world`, packed rows) for {s['steps']} steps of "
               f"{s['batch_size']} rows with a {s['warmup_steps']}-step warm-up and a cosine schedule, in "
               "`seed-N/<arm>/`; the seed sets the data order and LoRA's initial A. Full fine-tuning at "
               f"η = {s['lr_full']:g} (the recipe's); LoRA at η = {s['lr_lora']:g} for every rank (chosen, not "
               f"swept: about 10× the full rate, as is usual for LoRA), α = {s['alpha']:g} at every rank (scale "
               f"α/r), on the linears {', '.join(s['targets'])} of every block. Exact match: greedy answers to the "
               f"first {s['eval_items']} questions of the world's held-out `sft_eval` (problems in no training "
               "set). Memory: the float32 training state counted exactly (weights + gradients + Adam's two "
               "moments); activations are not counted, and the Adam column is also read back from each run's "
               "checkpoint. Time: the median seconds per optimizer step, on a CPU shared with other work."),
        sections=[Section("Result", text=verdict, table=result_table(per_arm), figures=figures[:1]),
                  Section("Costs", text=COSTS, table=cost_table(per_arm), figures=figures[1:2]),
                  Section("Learning curves", text=CURVES, figures=figures[2:]),
                  Section("What the numbers mean", text=MEANING)],
        summary={"arms": per_arm, **numbers},
        headline=verdict.split("\n")[0],
        figures=figures)


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def result_table(per_arm: dict) -> list[list[str]]:
    full = per_arm[FULL]["params"]["trainable"]
    rows = [["arm", "η", "trainable parameters (share)", "exact match", "held-out loss", "final training loss"]]
    for name, a in per_arm.items():
        p = a["params"]
        rows.append([name, f"{a['lr']:g}", f"{p['trainable']:,} ({p['trainable'] / full:.1%})",
                     show(a["exact_match"], 3), show(a["val_loss"]), show(a["final_loss"])])
    return rows


def cost_table(per_arm: dict) -> list[list[str]]:
    rows = [["arm", "weights", "gradients", "Adam (counted)", "Adam (read from checkpoint)", "total state",
             "s / step"]]
    for name, a in per_arm.items():
        b = a["params"]["bytes"]
        rows.append([name, _mib(b["weights"]), _mib(b["gradients"]), _mib(b["adam"]),
                     _mib(a["adam_bytes_measured"]["mean"]), _mib(b["total"]), show(a["seconds_per_step"], 3)])
    return rows


def judge(s: dict, per_arm: dict) -> tuple[str, dict]:
    """The verdict. A rank *matches* full fine-tuning when its mean exact match is at least full's mean minus
    ``tolerance``. Confirmed: some rank ≤ ``modest_rank`` matches; partly: only larger ranks match; refuted:
    none does."""
    full = per_arm[FULL]
    f_em, tol, modest = full["exact_match"]["mean"], float(s["tolerance"]), int(s["modest_rank"])
    lora = [(name, a) for name, a in per_arm.items() if a["rank"]]
    matching = [(name, a) for name, a in lora if a["exact_match"]["mean"] >= f_em - tol]
    modest_match = [(name, a) for name, a in matching if a["rank"] <= modest]
    share = {name: a["params"]["trainable"] / full["params"]["trainable"] for name, a in lora}
    state = {name: a["params"]["bytes"]["total"] / full["params"]["bytes"]["total"] for name, a in lora}
    speed = {name: a["seconds_per_step"]["mean"] / full["seconds_per_step"]["mean"] for name, a in lora}
    best_name, best = max(lora, key=lambda na: na[1]["exact_match"]["mean"])
    if not f_em > tol:
        verdict = "inconclusive"
        head = (f"Not tested at these settings: full fine-tuning itself reached exact match "
                f"{show(full['exact_match'], 3)}, within {tol:g} of 0, so matching it says nothing; train longer or "
                f"start from a better base model (the best LoRA arm, {best_name}, reached "
                f"{show(best['exact_match'], 3)}).")
    elif modest_match:
        name, a = modest_match[0]
        verdict = "confirmed"
        head = (f"Confirmed: LoRA at rank {a['rank']} reached exact match {show(a['exact_match'], 3)} against "
                f"{show(full['exact_match'], 3)} for full fine-tuning (within {tol:g}), training "
                f"{share[name]:.1%} of the parameters, with Adam state {a['params']['bytes']['adam'] / 2**20:.2f} "
                f"MiB instead of {full['params']['bytes']['adam'] / 2**20:.2f} MiB.")
    elif matching:
        name, a = matching[0]
        verdict = "partly"
        head = (f"Partly confirmed: no rank ≤ {modest} came within {tol:g} of full fine-tuning's exact match "
                f"{show(full['exact_match'], 3)}; rank {a['rank']} did ({show(a['exact_match'], 3)}), training "
                f"{share[name]:.1%} of the parameters.")
    else:
        verdict = "refuted"
        head = (f"Refuted at these settings: no LoRA rank came within {tol:g} of full fine-tuning's exact match "
                f"{show(full['exact_match'], 3)}; the best, {best_name}, reached {show(best['exact_match'], 3)}.")
    lines = [head,
             "Exact match by rank (mean ± std over seeds): " + "; ".join(
                 f"r = {a['rank']}: {show(a['exact_match'], 3)}" for _, a in lora) + f"; full: "
             f"{show(full['exact_match'], 3)}. Held-out loss: " + "; ".join(
                 f"{name} {show(a['val_loss'])}" for name, a in per_arm.items()) + ".",
             "Trainable parameters as a share of full fine-tuning's: " + ", ".join(
                 f"r = {a['rank']}: {share[name]:.1%}" for name, a in lora) + "; the whole float32 training state "
             "(weights + gradients + Adam) as a share of full's: " + ", ".join(
                 f"r = {a['rank']}: {state[name]:.0%}" for name, a in lora) + " (the frozen weights stay in memory).",
             "Seconds per step relative to full fine-tuning: " + ", ".join(
                 f"r = {a['rank']}: {speed[name]:.2f}×" for name, a in lora) + " (LoRA still runs the whole "
             "forward and backward pass through the frozen weights; it saves only their weight gradients and "
             "their optimizer update)."]
    worse = [name for name, a in lora if a["val_loss"]["mean"] - full["val_loss"]["mean"] > LOSS_MARGIN]
    if worse and verdict in ("confirmed", "partly"):
        lines[0] += (f" Not so on the held-out loss: full fine-tuning reached {show(full['val_loss'])} nats per answer "
                     f"token, LoRA {min(per_arm[n]['val_loss']['mean'] for n in worse):.3f} at best "
                     f"({', '.join(worse)} more than {LOSS_MARGIN} nats worse): on the answers' tokens LoRA fits far "
                     "less, yet the greedy answers come out right as often.")
    above = [name for name, a in lora if a["exact_match"]["mean"] > f_em + tol]
    if above:
        lines.append(f"LoRA beat full fine-tuning by more than {tol:g} at {', '.join(above)}: at this data size "
                     "and step count the full model's many more free parameters are not an advantage.")
    agree = all(a["adam_bytes_measured"]["min"] == a["adam_bytes_measured"]["max"] == a["params"]["bytes"]["adam"]
                for a in per_arm.values())
    lines.append("The Adam state read back from every run's checkpoint " + (
        "equals the count (2 × 4 bytes per trainable parameter)." if agree else
        "differs from the count in some arm: see the cost table."))
    return "\n\n".join(lines), {"verdict": verdict, "confirmed": verdict == "confirmed", "adam_count_agrees": agree,
                                "worse_loss": worse,
                                "matching_ranks": [a["rank"] for _, a in matching],
                                "trainable_share": share, "state_share": state, "time_ratio": speed}


# --- figures ---------------------------------------------------------------------------------------------------

def _figure(size=(6.5, 4)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=size, dpi=110)
    FigureCanvasAgg(fig)
    return fig


def draw(ctx: Context, s: dict, per_arm: dict) -> list[str]:
    names = ["exact_match.png", "costs.png", "loss_curves.png"]
    full, lora = per_arm[FULL], {n: a for n, a in per_arm.items() if a["rank"]}

    fig = _figure()
    ax = fig.add_subplot()
    xs = [a["params"]["trainable"] for a in lora.values()]
    ax.errorbar(xs, [a["exact_match"]["mean"] for a in lora.values()],
                yerr=[a["exact_match"]["std"] for a in lora.values()], fmt="o-", capsize=3, label="LoRA")
    for x, a in zip(xs, lora.values()):
        ax.annotate(f"r={a['rank']}", (x, a["exact_match"]["mean"]), textcoords="offset points", xytext=(4, -12),
                    fontsize=8)
    m, sd = full["exact_match"]["mean"], full["exact_match"]["std"]
    ax.errorbar([full["params"]["trainable"]], [m], yerr=[sd], fmt="s", color="tab:red", capsize=3,
                label="full fine-tuning")
    ax.axhline(m, color="tab:red", linestyle="--", linewidth=0.8)
    ax.axhspan(m - float(s["tolerance"]), m + float(s["tolerance"]), color="tab:red", alpha=0.1,
               label=f"full ± {s['tolerance']:g}")
    ax.set_xscale("log")
    ax.set_xlabel("trainable parameters (log scale)")
    ax.set_ylabel("held-out exact match")
    ax.set_title("quality against trainable parameters (mean ± std over seeds)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, ctx.out / names[0])

    fig = _figure((10, 4))
    left, right = fig.subplots(1, 2)
    labels = list(per_arm)
    left.bar(labels, [a["seconds_per_step"]["mean"] for a in per_arm.values()],
             yerr=[a["seconds_per_step"]["std"] for a in per_arm.values()], capsize=3)
    left.set_ylabel("seconds per optimizer step (median)")
    left.set_title("time per step", fontsize=10)
    bottom = [0.0] * len(labels)
    for part in ("weights", "gradients", "adam"):
        values = [a["params"]["bytes"][part] / 2**20 for a in per_arm.values()]
        right.bar(labels, values, bottom=bottom, label={"adam": "Adam moments"}.get(part, part))
        bottom = [b + v for b, v in zip(bottom, values)]
    right.set_ylabel("MiB (float32, activations not counted)")
    right.set_title("training state", fontsize=10)
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save(fig, ctx.out / names[1])

    def lines(key):
        return {name: [series(read_metrics(ctx.run_dir(name, seed) / "metrics.jsonl"), key) for seed in ctx.seeds]
                for name in per_arm}
    curve_grid([("training loss", lines("loss")), ("held-out loss", lines("val_loss"))], ctx.out / names[2],
               cols=2, ylabel="loss (nats per answer token)", title="SFT loss, each seed one line")
    return names


COSTS = """\
Counted from the model each arm trains (`load_trainable`, as SFT builds it), float32: weights are every \
parameter, frozen or not; gradients and Adam's two moments exist for the trainable ones only. The column read \
back from each run's last checkpoint sums the `exp_avg` and `exp_avg_sq` tensors Adam actually held. Activations are not in the table: they depend on batch and length, not on the arm, except for LoRA's small r-wide \
intermediate. Time per step is the median over the steps of each run, mean ± std over seeds."""

CURVES = """\
Training loss at every step and the held-out loss (the world's `sft_eval` conversations) five times a run, both \
on the answer tokens only; one line per seed."""

MEANING = """\
LoRA replaces the update ΔW of a d_out × d_in matrix by B·A with A of r × d_in and B of d_out × r, so an adapted \
linear trains r·(d_in + d_out) numbers instead of d_in·d_out; the embeddings and norms stay frozen. Hu et al. \
found that the updates fine-tuning needs have low 'intrinsic rank', so a small r loses little. The \
share is small only when r is small against the width: in a model of width d, a d × d matrix adapted at rank r \
trains 2r/d of its weights, so at r = d/2 LoRA trains as many numbers as full fine-tuning of that matrix. In this \
small model the ranks tried run up to half the width, and the large ranks are not a fraction of anything.

Memory: the frozen weights are still held (and, on this CPU, run through in every forward and backward pass), so \
LoRA saves the gradients and the Adam moments of the frozen weights, 3 of the 4 floats per weight, not the weights \
themselves; at the scale of a 7B model in 16-bit weights, that is the difference between fitting on one GPU and \
not. Time: the backward pass still computes the gradient with respect to every activation; LoRA skips the weight \
gradients of the frozen matrices (about a third of a linear layer's training FLOPs) and their optimizer update, and \
adds two thin matrix products per adapted linear, so on a small model the saving per step is modest.

Quality: exact match and loss can disagree. Exact match asks whether the greedy answer is right; the loss scores \
every answer token's probability, so a model can put less mass on the reference yet still rank it first. Full \
fine-tuning also trains what LoRA keeps frozen, the token embeddings (tied to the LM head here) and the norms, among \
them the embeddings of the chat template's tokens, which the pre-training corpus never contains. The learning rate \
matters as much as the rank. LoRA's update starts at zero (B = 0) and moves through the \
product B·A, so it needs a larger η than full fine-tuning; with α fixed, the scale α/r shrinks as r grows, which \
slows the larger ranks down at one η (Kalajdzievski 2023, rsLoRA, scales by α/√r instead). The numbers hold for \
this model, this data and this many steps, with one η per method chosen rather than tuned."""
