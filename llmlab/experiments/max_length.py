"""``llmlab experiment max-length``: what the sequence length does to pre-training.

    llmlab experiment max-length [--preset test|default|large] [--seeds K] [--data PATH] [--set key=value ...] --out DIR

The same GPT-2-style network pre-trained on rows of each length L in ``lengths`` for the same number of tokens
(``tokens`` = steps · batch · L, so a longer row means fewer steps), once with learned absolute positions and once
with rotary ones (RoPE), every model built with a context of ``eval_length`` positions so that it can be read past
the length it was trained at. Measured:

- training throughput (tokens/s, from the run's ``metrics.jsonl``);
- one training step at each L on its own: its time, the time of the attention core alone
  (softmax(QKᵀ/√d)V, forward and backward, for every layer: the part whose cost grows as L²) and its share of the
  step, and the activation memory the step keeps for the backward pass (the bytes of every tensor autograd saves,
  parameters left out), which is what grows with L;
- the validation loss at each position 0 … eval_length − 1 of held-out windows: positions before the shortest L
  (every model was trained there) and positions at or past the model's own L (where a learned position embedding
  was never trained and rotary angles were never seen).

With ``--set sft_data=PATH`` (a JSONL file of preference pairs, e.g. HH-RLHF's
``../shared/data/hh-rlhf/harmless-base/test.jsonl.gz``) it also counts, for SFT on each pair's prompt + chosen
reply rendered with the ``llmlab`` chat template and a byte-level BPE tokenizer of ``sft_vocab`` tokens trained on
those conversations, the share of examples longer than each max_length in ``sft_lengths`` and the share of answer
tokens (the tokens SFT learns) that a cut at that length throws away; and it measures what the cut does to a
model: one base pre-trained on the conversations' text, fine-tuned per seed by ``llmlab sft`` at each max_length
of ``sft_train_lengths`` for the same steps, every model read on the same held-out answer tokens, by position
(``max_length_sft.py``; ``--set sft_train_lengths=[]`` only counts).
"""
from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
import yaml

from ..data.shards import TokenShards
from ..errors import LLMLabError
from ..losses import lm_loss
from ..model.config import preset
from ..model.decoder import build_model
from ..plots import bar_chart, curve_grid, read_metrics
from ..report import Section
from ..stages import pretrain
from ..stages.common import deep_merge
from ..tokenizer import load_tokenizer
from ..train.checkpoint import load_latest
from . import max_length_sft
from .common import Context, Result, show, spread

CLAIM = ("Claims tested: (1) a longer training row costs more per token, because attention's cost grows as T² in "
         "the row length T; (2) the activation memory of a training step grows with T; (3) a model does not work "
         "past the length it was trained at, whether its positions are learned embeddings (the rows past T were "
         "never trained) or rotary angles (RoPE does not extrapolate by itself).")
OPEN = ("model", "data", "train")

_MODEL = {"preset": "gpt2", "n_layer": 4, "n_head": 4, "d_model": 64, "dropout": 0.0}
_TRAIN = {"lr": 3e-3, "warmup_steps": 20, "eval_batches": 4, "grad_clip": 1.0}
PRESETS = {
    "test": {"seeds": 1, "corpus": "tinyshakespeare", "lengths": [16, 32], "eval_length": 64, "tokens": 2048,
             "positions": ["learned", "rope"], "batch_size": 4, "eval_windows": 4, "profile_repeats": 2,
             "model": {**_MODEL, "n_layer": 1, "n_head": 2, "d_model": 16},
             "sft_data": None, "sft_lengths": [32, 64, 128], "sft_vocab": 300, "sft_train_lengths": [64, 128],
             "sft_heldout": 2, "sft_pretrain_steps": 4, "sft_steps": 4, "sft_batch_size": 2, "sft_lr": 1e-3,
             "data": {}, "train": {**_TRAIN, "warmup_steps": 2, "eval_batches": 1, "progress": False}},
    "default": {"seeds": 3, "corpus": "tinyshakespeare", "lengths": [64, 128, 256, 512], "eval_length": 1024,
                "tokens": 400_000, "positions": ["learned", "rope"], "batch_size": 8, "eval_windows": 16,
                "profile_repeats": 5, "sft_data": None, "sft_lengths": [128, 256, 512, 1024, 2048],
                "sft_vocab": 4096, "sft_train_lengths": [128, 256, 512], "sft_heldout": 200,
                "sft_pretrain_steps": 200, "sft_steps": 100, "sft_batch_size": 8, "sft_lr": 1e-3,
                "model": dict(_MODEL), "data": {}, "train": dict(_TRAIN)},
    "large": {"seeds": 3, "corpus": "tinyshakespeare", "lengths": [128, 256, 512, 1024, 2048], "eval_length": 4096,
              "tokens": 20_000_000, "positions": ["learned", "rope"], "batch_size": 16, "eval_windows": 64,
              "profile_repeats": 10, "sft_data": None, "sft_lengths": [128, 256, 512, 1024, 2048, 4096],
              "sft_vocab": 8192, "sft_train_lengths": [128, 256, 512, 1024], "sft_heldout": 500,
              "sft_pretrain_steps": 3000, "sft_steps": 2000, "sft_batch_size": 16, "sft_lr": 3e-4, "model": {**_MODEL, "n_layer": 8, "n_head": 8, "d_model": 512},
              "data": {}, "train": dict(_TRAIN)},
}


def arms(s: dict) -> list[tuple[str, str, int]]:
    return [(f"{pos}-L{length}", pos, int(length)) for pos in s["positions"] for length in s["lengths"]]


def check(s: dict) -> None:
    lengths = [int(n) for n in s["lengths"]]
    if not lengths or min(lengths) < 2 or max(lengths) > int(s["eval_length"]):
        raise LLMLabError(f"max-length: lengths must be ≥ 2 and at most eval_length ({s['eval_length']}); "
                          f"got {s['lengths']}")
    if not set(s["positions"]) <= {"learned", "rope"} or not s["positions"]:
        raise LLMLabError(f"max-length: positions must list learned and/or rope, got {s['positions']!r}")
    if int(s["tokens"]) < int(s["batch_size"]) * max(lengths):
        raise LLMLabError(f"max-length: tokens ({s['tokens']}) must cover at least one batch of the longest rows "
                          f"({s['batch_size']} × {max(lengths)})")
    if s.get("sft_data"):
        max_length_sft.check(s)


def steps_for(s: dict, length: int) -> int:
    """Equal tokens seen: steps · batch · L = tokens."""
    return max(1, int(s["tokens"]) // (int(s["batch_size"]) * length))


def recipe(s: dict, corpus: str, tokenizer: dict, pos: str, length: int, seed: int) -> dict:
    steps = steps_for(s, length)
    return deep_merge(pretrain.DEFAULTS, {
        "model": {**s["model"], "pos": pos, "max_seq_len": int(s["eval_length"])},
        "data": {**s["data"], "path": corpus, "max_length": length, "batch_size": int(s["batch_size"])},
        "tokenizer": tokenizer,
        "train": {"warmup_steps": min(100, steps // 10), **s["train"], "max_steps": steps, "seed": seed,
                  "log_every": max(1, steps // 10), "eval_every": 0, "checkpoint_every": steps},
    })


def load_trained(run: Path) -> torch.nn.Module:
    """The run's final weights (its last checkpoint) in a model built from its ``run.yaml``: works for every
    architecture, also those that have no Hugging Face model directory (GPT-2 with rotary positions)."""
    recipe = yaml.safe_load((run / "run.yaml").read_text(encoding="utf-8"))
    cfg = pretrain.model_config(recipe["model"], load_tokenizer(run / "tokenizer"), recipe["data"]["max_length"])
    model = build_model(cfg)
    model.load_state_dict({k.removeprefix("lm."): v for k, v in load_latest(run).model.items()})
    return model.eval()


@torch.no_grad()
def position_losses(model, shards: Path, length: int, count: int) -> torch.Tensor:
    """Mean −log p(x_t | x_<t) at each position t = 0 … length − 1 over ``count`` val windows of length + 1 tokens."""
    val = TokenShards(shards, "val")
    if len(val) < length + 1:
        raise LLMLabError(f"{shards}: the val split has {len(val)} tokens, fewer than one window of {length + 1}; "
                          "use a larger corpus or a smaller eval_length")
    count = max(1, min(count, len(val) // (length + 1)))
    starts = [i * (len(val) - length - 1) // max(count - 1, 1) for i in range(count)]
    windows = torch.stack([torch.from_numpy(val.tokens(st, length + 1).astype("int64")) for st in starts])
    logits = model(windows[:, :-1]).float()
    return F.cross_entropy(logits.transpose(1, 2), windows[:, 1:], reduction="none").mean(0)


def _timed(fn, repeats: int) -> float:
    fn()                                                     # warm-up call: allocations, kernel choice
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def step_profile(s: dict, vocab: int, length: int) -> dict:
    """One training step (forward + backward) at rows of ``length``: its time, the attention core's time and share,
    and the activation bytes autograd keeps for the backward pass."""
    torch.manual_seed(0)
    cfg = preset(s["model"]["preset"], **{k: v for k, v in s["model"].items() if k != "preset"},
                 vocab_size=vocab, max_seq_len=length, pos="learned")
    model = build_model(cfg)
    b = int(s["batch_size"])
    x = torch.randint(0, vocab, (b, length))
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in params:
            saved[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        lm_loss(model(x[:, :-1]), x[:, 1:]).backward()
    model.zero_grad(set_to_none=True)

    def step():
        lm_loss(model(x[:, :-1]), x[:, 1:]).backward()
        model.zero_grad(set_to_none=True)

    shape = (b, cfg.n_head, length - 1, cfg.head_dim)
    q, k, v = (torch.randn(shape, requires_grad=True) for _ in range(3))

    def attention():
        F.scaled_dot_product_attention(q, k, v, is_causal=True).sum().backward()

    repeats = int(s["profile_repeats"])
    t_step = _timed(step, repeats)
    t_attn = _timed(attention, repeats) * cfg.n_layer
    return {"step_seconds": t_step, "attention_seconds": t_attn, "attention_share": t_attn / t_step,
            "activation_mib": sum(saved.values()) / 2**20}


def throughput(run: Path) -> float:
    values = [r["tokens_per_s"] for r in read_metrics(run / "metrics.jsonl")[1:] if "tokens_per_s" in r]
    return statistics.median(values) if values else math.nan


# --- the experiment --------------------------------------------------------------------------------------------

def run(ctx: Context) -> Result:
    s = ctx.settings
    check(s)
    corpus, eval_length = str(s["corpus"]), int(s["eval_length"])
    shortest = min(int(n) for n in s["lengths"])
    for seed in ctx.seeds:
        first = None
        for name, pos, length in arms(s):
            run_dir = ctx.run_dir(name, seed)
            tokenizer = {"kind": "char"} if first is None else {"kind": "path", "path": str(first / "tokenizer")}
            pretrain.run(None, None, run_dir, recipe(s, corpus, tokenizer, pos, length, seed),
                         resume=(run_dir / "checkpoints").is_dir())
            first = first or run_dir

    per_arm, curves = {}, {}
    for name, pos, length in arms(s):
        losses, rates = [], []
        for seed in ctx.seeds:
            run_dir = ctx.run_dir(name, seed)
            losses.append(position_losses(load_trained(run_dir), run_dir / "data", eval_length,
                                          int(s["eval_windows"])))
            rates.append(throughput(run_dir))
        curves[name] = losses
        short = [float(c[:shortest].mean()) for c in losses]
        own = [float(c[:length].mean()) for c in losses]
        past = [float(c[length:].mean()) for c in losses] if length < eval_length else None
        per_arm[name] = {"pos": pos, "length": length, "steps": steps_for(s, length),
                         "tokens_per_s": spread(rates), "loss_short": spread(short), "loss_own": spread(own),
                         "loss_past": spread(past) if past else None}
    vocab = len(load_tokenizer(ctx.run_dir(arms(s)[0][0], ctx.seeds[0]) / "tokenizer"))
    profile = {int(length): step_profile(s, vocab, int(length)) for length in s["lengths"]}
    figures = draw(ctx, s, per_arm, curves, profile)
    cuts, effect, sft_figures = max_length_sft.run(ctx) if s.get("sft_data") else (None, None, [])
    return Result(
        title="What the sequence length does: cost, memory, and positions past the trained length",
        setup=(f"Corpus `{corpus}`, a character tokenizer; a GPT-2-style model (settings below) with a context of "
               f"{eval_length} positions, pre-trained on rows of L ∈ {s['lengths']} tokens for {s['tokens']:,} "
               f"tokens each (steps = tokens / (batch {s['batch_size']} · L)), with learned or rotary positions. "
               f"Each run is `llmlab pretrain` in `seed-N/<pos>-L<L>/`. Validation: {s['eval_windows']} windows of "
               f"{eval_length} tokens from the val split, the loss read at every position. The step profile builds "
               "one fresh model per L (learned positions) and times forward + backward on random tokens."),
        sections=[Section("Result", text=verdict(s, per_arm, profile)),
                  Section("Cost of a longer row", text=COST, table=cost_table(s, per_arm, profile),
                          figures=figures[:2]),
                  Section("Loss by position", text=POSITIONS.format(shortest=shortest, eval_length=eval_length),
                          table=loss_table(s, per_arm, shortest), figures=figures[2:]),
                  *([max_length_sft.cuts_section(s, cuts, effect)] if cuts else []),
                  *([max_length_sft.effect_section(s, effect)] if effect else []),
                  Section("What the numbers mean", text=MEANING)],
        summary={"arms": per_arm, "profile": profile, "sft": cuts, "sft_effect": effect, "position_loss": {k: [c.tolist() for c in v]
                                                                        for k, v in curves.items()}},
        headline=headline(s, per_arm, profile),
        figures=figures + sft_figures)


def cost_table(s: dict, per_arm: dict, profile: dict) -> list[list[str]]:
    rows = [["L", "steps", "tokens/s (learned)", "tokens/s (rope)", "step ms", "attention core ms",
             "attention share", "activation MiB"]]
    for length in s["lengths"]:
        p = profile[int(length)]
        rate = {pos: show(per_arm[f"{pos}-L{length}"]["tokens_per_s"], 3) if f"{pos}-L{length}" in per_arm
                else "–" for pos in ("learned", "rope")}
        rows.append([str(length), str(steps_for(s, int(length))), rate["learned"], rate["rope"],
                     f"{1000 * p['step_seconds']:.3g}", f"{1000 * p['attention_seconds']:.3g}",
                     f"{p['attention_share']:.1%}", f"{p['activation_mib']:.3g}"])
    return rows


def loss_table(s: dict, per_arm: dict, shortest: int) -> list[list[str]]:
    rows = [["positions", "trained at L", f"loss, positions < {shortest}", "loss, positions < L",
             "loss, positions ≥ L (past training)"]]
    for name, a in per_arm.items():
        rows.append([a["pos"], str(a["length"]), show(a["loss_short"]), show(a["loss_own"]),
                     show(a["loss_past"]) if a["loss_past"] else "–"])
    return rows


def verdict(s: dict, per_arm: dict, profile: dict) -> str:
    """The three claims against the numbers of this run."""
    lengths = [int(n) for n in s["lengths"]]
    lo, hi = lengths[0], lengths[-1]
    rates = {pos: (per_arm[f"{pos}-L{lo}"]["tokens_per_s"]["mean"], per_arm[f"{pos}-L{hi}"]["tokens_per_s"]["mean"])
             for pos in s["positions"]}
    slower = all(b < a for a, b in rates.values())
    share = [profile[n]["attention_share"] for n in lengths]
    memory = profile[hi]["activation_mib"] / profile[lo]["activation_mib"]
    lines = [(f"(1) {'Confirmed' if slower and share[-1] > share[0] else 'Not confirmed'}: tokens/s went from "
              + "; ".join(f"{a:,.0f} at L={lo} to {b:,.0f} at L={hi} ({pos})" for pos, (a, b) in rates.items())
              + f", and the attention core's share of a training step from {share[0]:.0%} to {share[-1]:.0%}."),
             (f"(2) {'Confirmed' if memory > 1 else 'Not confirmed'}: the activation memory of a step grew "
              f"{memory:.1f}× for {hi / lo:g}× the row length "
              f"({profile[lo]['activation_mib']:.3g} → {profile[hi]['activation_mib']:.3g} MiB).")]
    gaps = {name: a["loss_past"]["mean"] - a["loss_own"]["mean"] for name, a in per_arm.items() if a["loss_past"]}
    if gaps:
        worse = all(g > 0 for g in gaps.values())
        lines.append(f"(3) {'Confirmed' if worse else 'Not everywhere'}: loss past the trained length minus loss "
                     "within it (positive: worse past it): " + "; ".join(f"{k} {v:+.3f}" for k, v in gaps.items())
                     + ".")
    best = {pos: min((a["loss_short"]["mean"], a["length"]) for a in per_arm.values() if a["pos"] == pos)
            for pos in s["positions"]}
    lines.append("At equal tokens a shorter row means more optimizer steps (" + ", ".join(
        f"{steps_for(s, n)} at L={n}" for n in lengths) + "), so the runs also differ in steps: the lowest loss on "
        "the first positions came from " + "; ".join(f"L={n} ({pos}, {v:.3f})" for pos, (v, n) in best.items()) + ".")
    return "\n\n".join(lines)


def headline(s: dict, per_arm: dict, profile: dict) -> str:
    lo, hi = min(s["lengths"]), max(s["lengths"])
    return (f"attention share of a step {profile[int(lo)]['attention_share']:.0%} at L={lo} → "
            f"{profile[int(hi)]['attention_share']:.0%} at L={hi}; activation memory "
            f"{profile[int(lo)]['activation_mib']:.3g} → {profile[int(hi)]['activation_mib']:.3g} MiB")


def draw(ctx: Context, s: dict, per_arm: dict, curves: dict, profile: dict) -> list[str]:
    lengths = [int(n) for n in s["lengths"]]
    names = ["throughput.png", "step_profile.png", "loss_by_position.png"]
    bar_chart([str(n) for n in lengths],
              {pos: [per_arm[f"{pos}-L{n}"]["tokens_per_s"]["mean"] for n in lengths] for pos in s["positions"]},
              ctx.out / names[0], title="training throughput at equal tokens seen", ylabel="tokens/s")
    bar_chart([str(n) for n in lengths],
              {"attention share (%)": [100 * profile[n]["attention_share"] for n in lengths],
               "activation MiB": [profile[n]["activation_mib"] for n in lengths]},
              ctx.out / names[1], title="one training step by row length L", ylabel="% / MiB")
    bucket = max(1, int(s["eval_length"]) // 64)

    def smooth(c: torch.Tensor) -> tuple[list, list]:
        n = len(c) // bucket * bucket
        means = c[:n].view(-1, bucket).mean(1)
        return [i * bucket + bucket / 2 for i in range(len(means))], means.tolist()

    panels = [(f"{pos} positions", {f"trained at L={n}": [smooth(c) for c in curves[f"{pos}-L{n}"]]
                                    for n in lengths}) for pos in s["positions"]]
    top = max(float(c.max()) for v in curves.values() for c in v)
    curve_grid(panels, ctx.out / names[2], cols=len(panels), ylabel="val loss", xlabel="position",
               title="validation loss by position" + (f" (each point: the mean over {bucket} positions)"
                                                      if bucket > 1 else ""), ylim=(0, min(top, 8.0) * 1.05))
    return names


COST = """\
Throughput is read from each run's log; the step profile times one forward + backward pass at each L on its own \
(same batch of rows, so a longer row means more tokens per step). The attention core is the part that grows as L²: \
L² scores per head per row. At short rows the matrix multiplications of the projections and the MLP (linear in L) \
dominate, and the attention share grows with L. PyTorch's fused attention on CPU does not keep the L × L \
probabilities for the backward pass, so the activation memory grows about linearly with L here; an implementation \
that materialises them (attn_impl=math) would grow as L²."""

POSITIONS = """\
Every model saw the same number of tokens. Positions < {shortest} were trained in every run; positions ≥ L were \
never seen by the model trained at L (every model has a context of {eval_length}, so it can be read there). With \
learned positions, the embedding rows past L are still at their random initialisation; with rotary positions, \
the angles past L were never seen, and the attention patterns learnt at short range do not transfer."""

MEANING = """\
Attention compares every position with every earlier one: L² scores per head per row, against the projections and \
the MLP whose work is linear in L. At short rows those dominate and the cost per token barely moves; the attention \
share grows with L and with it the cost per token. The activation memory a step keeps grows with the tokens per \
step (batch × L); fused attention keeps no L × L matrix, so it grows linearly here.

Past its trained length a model meets inputs it never saw: position-embedding rows still at their random start \
(learned) or rotation angles it never saw at work (RoPE). How much the loss rises there, and for how many positions \
a rotary model still copes, is what the last column and the figure show. Training at the length a model is used \
at (or fine-tuning there, or rescaling RoPE) is the remedy; max_length at training time is the practical context \
limit. For SFT, the answer is the end of an example, so a max_length below the long tail cuts answers first: the \
SFT tables above show how much of HH-RLHF each choice throws away, and how a model fine-tuned with that cut reads \
the answer tokens past it."""
