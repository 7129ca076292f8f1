"""``llmlab experiment warmup``: why warm up the learning rate.

    llmlab experiment warmup [--preset test|default|large] [--seeds K] [--data PATH] [--set key=value ...] --out DIR

The same GPT-2-style network (LayerNorm, learned positions, GELU) on the same characters of the same corpus
(default: the built-in Tiny Shakespeare), trained with AdamW at each learning rate η of ``lrs`` for ``steps``
updates, once with no warm-up and once with a linear warm-up over the first ``warmup`` updates
(η_t = η·(t+1)/W, ``train/schedule.py``), then constant: the first W updates are the only difference. Each pair
runs for a pre-norm Transformer (x + Attn(LN(x)), GPT-2) and a post-norm one (LN(x + Attn(x)), the original
Transformer and BERT). Gradient clipping is off by default (``--set train.grad_clip=1``), since clipping is the
other remedy for the early large updates that warm-up tames.

Measured per run (``DIR/seed-N/ARM/metrics.jsonl``, every step): the training loss, the gradient norm ‖g‖ before any
clipping, the size of AdamW's update ‖Δθ‖/‖θ‖ (``train.trace_updates``) and the final validation loss. A run
*diverged* when a step's loss or gradient was not finite (the loop skips that step: ``train.on_nan=skip``), or when
its loss at the end (the mean over the last tenth of the steps) or its final validation loss is at or above the loss
of its first step. A run that did not diverge *did not learn* when its final validation loss stays within 0.05 nats of
the unigram loss (predicting each character by its frequency alone): the other way a too-large first step fails.
"""
from __future__ import annotations

import math
import os
import shutil
import statistics
from pathlib import Path

import numpy as np

from ..config import from_dict
from ..data.shards import TokenShards
from ..data.sources import iter_documents
from ..errors import LLMLabError
from ..plots import bar_chart, curve_grid, read_metrics, series
from ..report import Section
from ..stages import pretrain
from ..stages.common import deep_merge
from ..tokenizer import save_tokenizer, train_char
from .common import Context, Result, rank_0_first, show, spread

CLAIM = ("Claim tested: a post-norm Transformer trained with Adam and no learning-rate warm-up diverges at learning "
         "rates where the same model with warm-up trains, while a pre-norm Transformer needs warm-up much less "
         "(Xiong et al. 2020, 'On Layer Normalization in the Transformer Architecture'; Liu et al. 2020). The run "
         "below confirms or refutes it for a small character-level model.")
OPEN = ("model", "data", "train")          # recipe sections of every run (llmlab pretrain checks their keys)

_MODEL = {"preset": "gpt2", "n_layer": 6, "n_head": 4, "d_model": 64, "max_seq_len": 64, "dropout": 0.0}
_TRAIN = {"schedule": "constant", "grad_clip": 0.0, "betas": [0.9, 0.98], "weight_decay": 0.0, "eval_batches": 8}
PRESETS = {
    "test": {"seeds": 1, "corpus": "tinyshakespeare", "steps": 12, "warmup": 4, "lrs": [1e-3, 3e-3, 1e-2],
             "norms": ["pre", "post"], "trace": 12,
             "model": {**_MODEL, "n_layer": 2, "n_head": 2, "d_model": 32, "max_seq_len": 32},
             "data": {"max_length": 32, "batch_size": 4}, "train": {**_TRAIN, "eval_batches": 2, "progress": False}},
    "default": {"seeds": 3, "corpus": "tinyshakespeare", "steps": 200, "warmup": 40, "lrs": [1e-3, 3e-3, 1e-2],
                "norms": ["pre", "post"], "trace": 100, "model": dict(_MODEL),
                "data": {"max_length": 64, "batch_size": 16}, "train": dict(_TRAIN)},
    "large": {"seeds": 3, "corpus": "tinyshakespeare", "steps": 2000, "warmup": 200, "lrs": [3e-4, 1e-3, 3e-3],
              "norms": ["pre", "post"], "trace": 400,
              "model": {**_MODEL, "n_layer": 12, "n_head": 8, "d_model": 512, "max_seq_len": 256},
              "data": {"max_length": 256, "batch_size": 32}, "train": dict(_TRAIN)},
}


def arms(s: dict) -> list[tuple[str, str, float, int]]:
    """(name, norm, lr, warm-up steps) of every run of one seed."""
    return [(f"{norm}-lr{lr:g}-warm{w}", norm, float(lr), w)
            for norm in s["norms"] for lr in s["lrs"] for w in (0, s["warmup"])]


def check(s: dict) -> None:
    if int(s["steps"]) < 2 or not 0 < int(s["warmup"]) < int(s["steps"]):
        raise LLMLabError(f"warmup: need steps ≥ 2 and 0 < warmup < steps, got steps={s['steps']}, "
                          f"warmup={s['warmup']}")
    if not s["lrs"] or not all(isinstance(lr, (int, float)) and lr > 0 for lr in s["lrs"]):
        raise LLMLabError(f"warmup: lrs must be a list of positive learning rates, got {s['lrs']!r}")
    if not s["norms"] or not set(s["norms"]) <= {"pre", "post"}:
        raise LLMLabError(f"warmup: norms must list pre and/or post, got {s['norms']!r}")


def recipe(s: dict, corpus: str, tokenizer: Path, norm: str, lr: float, warmup: int, seed: int) -> dict:
    steps = int(s["steps"])
    return deep_merge(pretrain.DEFAULTS, {
        "model": {**s["model"], "norm_position": norm},
        "data": {**s["data"], "path": corpus},
        "tokenizer": {"kind": "path", "path": str(tokenizer)},
        "train": {**s["train"], "max_steps": steps, "lr": lr, "warmup_steps": warmup, "seed": seed,
                  "log_every": 1, "trace_updates": int(s["trace"]), "on_nan": "skip",
                  "eval_every": max(1, steps // 4), "checkpoint_every": max(1, steps // 2)},
    })


def shared_tokenizer(out: Path, corpus: str) -> Path:
    """One character tokenizer for every run, trained on the corpus once (``out/tokenizer``)."""
    folder = out / "tokenizer"
    if not (folder / "tokenizer.json").is_file():
        save_tokenizer(train_char(iter_documents(corpus)), folder)
    return folder


def shared_shards(out: Path, s: dict, corpus: str, tokenizer: Path) -> Path:
    """The corpus tokenized once (``out/data``, by pretrain's own ``prepare_shards``), so that each run finds its
    shards already built (hard links, or copies across filesystems) instead of tokenizing the corpus again."""
    from ..tokenizer import load_tokenizer
    data = from_dict(pretrain.DataConfig, {**s["data"], "path": corpus}, "data")
    return pretrain.prepare_shards(data, load_tokenizer(tokenizer), out)


def place_shards(shards: Path, run: Path) -> None:
    """Hard links are safe: ``build_shards`` never writes into an existing folder (it builds beside it, renames)."""
    if (run / "data").exists():
        return
    run.mkdir(parents=True, exist_ok=True)

    def link(src, dst):
        try:
            os.link(src, dst)
        except OSError:
            shutil.copy2(src, dst)
    shutil.copytree(shards, run / "data", copy_function=link)


def unigram_loss(shards: Path) -> float:
    """Cross-entropy (nats per character) of the val split under the train split's character frequencies: the
    loss of a model that has learned nothing but how often each character occurs."""
    train, val = (np.asarray(TokenShards(shards, split).tokens(0, len(TokenShards(shards, split))))
                  for split in ("train", "val"))
    size = int(max(train.max(), val.max())) + 1
    p = (np.bincount(train, minlength=size) + 1.0) / (len(train) + size)        # add-one: no zero for unseen ones
    return float(-np.log(p[val]).mean())


# --- what one run measured -------------------------------------------------------------------------------------

STUCK_MARGIN = 0.05     # nats: a run whose val loss ends less than this below the unigram loss "did not learn"


def measure(run: Path, steps: int, trace: int, unigram: float) -> dict:
    records = read_metrics(run / "metrics.jsonl")
    skipped = sum(1 for r in records if r.get("skipped"))
    _, loss = series(records, "loss")
    first = loss[0] if loss else math.nan
    tail = loss[-max(1, steps // 10):]
    end = statistics.fmean(tail) if tail else math.nan
    vals = [r["val_loss"] for r in records if "val_loss" in r]
    val = float(vals[-1]) if vals and vals[-1] is not None else math.nan
    early = [r for r in records if r.get("step", 0) <= trace]
    grad = [r["grad_norm"] for r in early if isinstance(r.get("grad_norm"), (int, float))]
    ratio = [r["update_ratio"] for r in early if isinstance(r.get("update_ratio"), (int, float))]
    diverged = bool(skipped) or not (math.isfinite(val) and val < first and end < first)
    stuck = not diverged and not val < unigram - STUCK_MARGIN
    return {"first_loss": first, "end_loss": end, "val_loss": val, "skipped_steps": skipped, "diverged": diverged,
            "stuck": stuck, "max_grad_norm": max(grad) if grad else math.nan,
            "max_update_ratio": max(ratio) if ratio else math.nan}


def traces(run: Path, key: str, last: int | None = None) -> tuple[list, list]:
    steps, values = series(read_metrics(run / "metrics.jsonl"), key)
    if last is None:
        return steps, values
    keep = [i for i, st in enumerate(steps) if st <= last]
    return [steps[i] for i in keep], [values[i] for i in keep]


# --- the experiment --------------------------------------------------------------------------------------------

def run(ctx: Context) -> Result:
    s = ctx.settings
    check(s)
    corpus, steps, warm, trace = str(s["corpus"]), int(s["steps"]), int(s["warmup"]), int(s["trace"])
    tokenizer = rank_0_first(shared_tokenizer, ctx.out, corpus)
    shards = rank_0_first(shared_shards, ctx.out, s, corpus, tokenizer)
    for seed in ctx.seeds:                       # seed by seed: an interrupted run has whole seeds to show
        for name, norm, lr, w in arms(s):
            run_dir = ctx.run_dir(name, seed)
            rank_0_first(place_shards, shards, run_dir)
            pretrain.run(None, None, run_dir, recipe(s, corpus, tokenizer, norm, lr, w, seed),
                         resume=(run_dir / "checkpoints").is_dir())
    unigram = unigram_loss(shards)

    per_arm = {}
    for name, norm, lr, w in arms(s):
        runs = [measure(ctx.run_dir(name, seed), steps, trace, unigram) for seed in ctx.seeds]
        per_arm[name] = {"norm": norm, "lr": lr, "warmup": w, "runs": len(runs),
                         "diverged": sum(r["diverged"] for r in runs), "stuck": sum(r["stuck"] for r in runs),
                         **{key: spread([r[key] for r in runs]) for key in
                            ("val_loss", "end_loss", "first_loss", "max_grad_norm", "max_update_ratio")},
                         "skipped_steps": sum(r["skipped_steps"] for r in runs)}
    figures = draw(ctx, s, per_arm)
    verdict, verdict_numbers = judge(s, per_arm, unigram)
    return Result(
        title="Why warm up: warm-up 0 vs N steps, pre-norm vs post-norm",
        setup=(f"Corpus `{corpus}`, one character tokenizer for every run; a GPT-2-style model (settings below), "
               f"pre- or post-norm; {steps} AdamW updates at a constant learning rate η ∈ {s['lrs']} after either "
               f"no warm-up or a linear warm-up over {warm} updates; gradient clipping "
               f"{'off' if not s['train'].get('grad_clip') else s['train']['grad_clip']}; betas "
               f"{s['train'].get('betas')}. Each of the {len(arms(s))} runs per seed is `llmlab pretrain` in "
               f"`seed-N/<norm>-lr<η>-warm<W>/`.\n\n"
               "A run *diverged* when a step's loss or gradient was not finite, or when its training loss at the end "
               "(mean of the last tenth of the steps) or its final validation loss is at or above its loss at step 1. "
               f"A run that did not diverge *did not learn* when its final validation loss is less than "
               f"{STUCK_MARGIN} below the unigram loss {unigram:.3f} (the loss of predicting each character by its "
               "frequency alone). Otherwise it *trained*."),
        sections=[Section("Result", text=verdict, table=result_table(s, per_arm), figures=figures[:2]),
                  Section("The first steps", text=FIRST_STEPS.format(trace=trace, warm=warm),
                          table=trace_table(s, per_arm), figures=figures[2:]),
                  Section("What the numbers mean", text=MEANING.format(warm=warm))],
        summary={"arms": per_arm, "unigram_loss": unigram, **verdict_numbers},
        headline=verdict.split("\n")[0],
        figures=figures)


def result_table(s: dict, per_arm: dict) -> list[list[str]]:
    warm = s["warmup"]
    rows = [["norm", "η", "val loss, no warm-up", f"val loss, warm-up {warm}",
             "diverged / did not learn, no warm-up", f"diverged / did not learn, warm-up {warm}"]]
    for norm in s["norms"]:
        for lr in s["lrs"]:
            cold, hot = per_arm[f"{norm}-lr{lr:g}-warm0"], per_arm[f"{norm}-lr{lr:g}-warm{warm}"]
            rows.append([norm, f"{lr:g}", show(cold["val_loss"]), show(hot["val_loss"]),
                         f"{cold['diverged']}/{cold['runs']}, {cold['stuck']}/{cold['runs']}",
                         f"{hot['diverged']}/{hot['runs']}, {hot['stuck']}/{hot['runs']}"])
    return rows


def trace_table(s: dict, per_arm: dict) -> list[list[str]]:
    rows = [["run", "loss at step 1", "max ‖g‖ (first steps)", "max ‖Δθ‖/‖θ‖ (first steps)", "skipped steps"]]
    for name, a in per_arm.items():
        rows.append([name, show(a["first_loss"]), show(a["max_grad_norm"], 3), show(a["max_update_ratio"], 3),
                     str(a["skipped_steps"])])
    return rows


def _lrs(values: list[float]) -> str:
    return ", ".join(f"{lr:g}" for lr in values)


def judge(s: dict, per_arm: dict, unigram: float) -> tuple[str, dict]:
    """The verdict. Strict form of the claim: at some η post-norm without warm-up diverged (in most seeds) while
    post-norm with warm-up trained (in every seed). Weaker form: without warm-up it diverged or did not learn."""
    warm = s["warmup"]

    def arm(norm, lr, w):
        return per_arm[f"{norm}-lr{lr:g}-warm{w}"]

    def most(a, key):
        return 2 * a[key] > a["runs"]

    def failed(a):
        return 2 * (a["diverged"] + a["stuck"]) > a["runs"]

    def trained(a):
        return a["diverged"] == 0 and a["stuck"] == 0

    post, pre = "post" in s["norms"], "pre" in s["norms"]
    strict = [lr for lr in s["lrs"] if post and most(arm("post", lr, 0), "diverged") and trained(arm("post", lr, warm))]
    weak = [lr for lr in s["lrs"] if post and failed(arm("post", lr, 0)) and trained(arm("post", lr, warm))]
    post_fail_both = [lr for lr in s["lrs"] if post and failed(arm("post", lr, 0)) and failed(arm("post", lr, warm))]
    if not post:
        head, confirmed = "Not tested: the run has no post-norm model (norms lacks post).", None
    elif strict:
        head, confirmed = (f"Confirmed: post-norm without warm-up diverged at η = {_lrs(strict)}, where post-norm with "
                           f"a {warm}-step warm-up trained."), "confirmed"
    elif weak:
        head, confirmed = (f"Confirmed in a weaker form: post-norm without warm-up did not diverge, but did not learn "
                           f"(or diverged) at η = {_lrs(weak)}, where post-norm with a {warm}-step warm-up trained."), \
            "weaker"
    else:
        head, confirmed = ("Refuted at these settings: at no learning rate did post-norm fail without warm-up and "
                           f"train with a {warm}-step warm-up."), "refuted"
    lines = [head]
    if post_fail_both:
        lines.append(f"Post-norm failed with and without warm-up at η = {_lrs(post_fail_both)}: there the learning "
                     "rate is too high for it whatever the first steps.")
    if pre:
        pre_cold = [lr for lr in s["lrs"] if arm("pre", lr, 0)["diverged"] + arm("pre", lr, 0)["stuck"]]
        counts = ", ".join(f"{arm('pre', lr, 0)['diverged'] + arm('pre', lr, 0)['stuck']}/{arm('pre', lr, 0)['runs']} "
                           f"seeds at η = {lr:g}" for lr in pre_cold)
        rescued = all(trained(arm("pre", lr, warm)) for lr in pre_cold)
        lines.append(f"Pre-norm without warm-up diverged or did not learn in {counts}"
                     + ("; with warm-up every seed trained there." if rescued else ".") if pre_cold
                     else "Pre-norm without warm-up trained at every learning rate tried, in every seed.")
    lines.append(f"Largest gradient norm over the first {s['trace']} steps, no warm-up → warm-up (mean over seeds): "
                 + "; ".join(f"{norm} η={lr:g}: {arm(norm, lr, 0)['max_grad_norm']['mean']:.3g} → "
                             f"{arm(norm, lr, warm)['max_grad_norm']['mean']:.3g}"
                             for norm in s["norms"] for lr in s["lrs"]) + ".")
    gaps = {f"{norm}-lr{lr:g}": arm(norm, lr, 0)["val_loss"]["mean"] - arm(norm, lr, warm)["val_loss"]["mean"]
            for norm in s["norms"] for lr in s["lrs"]}
    lines.append("Validation loss without warm-up minus with warm-up (mean over seeds; positive: warm-up helped): "
                 + "; ".join(f"{k} {v:+.3f}" for k, v in gaps.items()) + f". The unigram loss is {unigram:.3f}.")
    return "\n\n".join(lines), {"verdict": confirmed, "confirmed": confirmed in ("confirmed", "weaker"),
                                "post_norm_diverges_without_warmup_at": strict,
                                "post_norm_fails_only_without_warmup_at": weak,
                                "post_norm_fails_either_way_at": post_fail_both, "val_loss_gap": gaps}


def draw(ctx: Context, s: dict, per_arm: dict) -> list[str]:
    warm, trace = s["warmup"], int(s["trace"])
    labels = {0: "no warm-up", warm: f"warm-up {warm}"}

    def panels(key: str, last: int | None) -> list:
        out = []
        for norm in s["norms"]:
            for lr in s["lrs"]:
                lines = {labels[w]: [traces(ctx.run_dir(f"{norm}-lr{lr:g}-warm{w}", seed), key, last)
                                     for seed in ctx.seeds] for w in (0, warm)}
                out.append((f"{norm}-norm, η = {lr:g}", lines))
        return out

    first = statistics.fmean(a["first_loss"]["mean"] for a in per_arm.values())
    names = ["loss_curves.png", "val_loss.png", "grad_norm.png", "update_ratio.png"]
    curve_grid(panels("loss", None), ctx.out / names[0], cols=len(s["lrs"]), ylabel="training loss",
               title="training loss (each seed one line; the y-axis stops at 1.5× the first loss)",
               ylim=(0, 1.5 * first))
    bar_chart([f"{norm} η={lr:g}" for norm in s["norms"] for lr in s["lrs"]],
              {labels[w]: [per_arm[f"{norm}-lr{lr:g}-warm{w}"]["val_loss"]["mean"] for norm in s["norms"]
                           for lr in s["lrs"]] for w in (0, warm)},
              ctx.out / names[1], title="final validation loss (mean over seeds; lower is better)",
              ylabel="validation loss")
    curve_grid(panels("grad_norm", trace), ctx.out / names[2], cols=len(s["lrs"]), ylabel="‖g‖ (before clipping)",
               title=f"gradient norm over the first {trace} steps", logy=True)
    curve_grid(panels("update_ratio", trace), ctx.out / names[3], cols=len(s["lrs"]), ylabel="‖Δθ‖ / ‖θ‖",
               title=f"size of AdamW's update over the first {trace} steps", logy=True)
    return names


FIRST_STEPS = """\
The gradient norm ‖g‖ (before any clipping) and the relative size of each update ‖Δθ‖/‖θ‖ over the first {trace} \
steps, every step logged. With warm-up the update starts about W = {warm} times smaller and grows as η_t does; \
without it, Adam's first updates are already full-size: Adam divides by the root of its second-moment estimate, \
so each coordinate moves by about η no matter how small or large its gradient is, before those estimates have \
seen more than a few gradients."""

MEANING = """\
Adam divides each coordinate's gradient by a running estimate of its magnitude, so its first updates move every \
weight by about η whatever the size of the gradient, on gradients computed from random weights (the update-size \
trace is at its largest at step 1 without warm-up). Warm-up ({warm} steps here) scales those first steps down, by \
up to {warm}×, while the moment estimates settle and the network leaves its random start.

A post-norm block normalises the residual sum after every sub-layer, so there is no identity path from the input \
to the output, and at initialisation the gradients of the layers near the output are larger than those near the \
input (Xiong et al. 2020): a large step changes the function a lot. Failure has two faces: the loss rises above its \
start or becomes NaN (divergence), or the network settles where every position predicts the same character \
frequencies (the unigram loss) and stays there for the rest of the run. Pre-norm keeps an identity path from the \
embeddings to the final norm, and tolerates larger first steps.

Reading the table: a count of k/n means k of the n seeds diverged (or did not learn) by the definitions in the \
setup. Where both arms trained, the val-loss gap says whether warm-up still helped within the same number of \
steps; it spends its first steps at a lower rate, so in a short run it can cost as much as it gains. Where post-norm \
fails with and without warm-up, the learning rate is too high for it whatever the start: warm-up moves the edge \
of stability, it does not remove it. The numbers hold for this small model, this corpus and this many steps; the \
textbook result comes from deeper and wider models trained for much longer (Xiong et al.: 6-layer, d = 512 \
Transformers for translation), whose output-side gradients grow with depth."""
