"""The SFT part of ``llmlab experiment max-length`` (``--set sft_data=PATH``): what each max_length cuts from a
conversation data set, and what that cut does to a model fine-tuned with it.

The conversations are the file's preference pairs as prompt + chosen reply, rendered with the ``llmlab`` chat
template and tokenized by a byte-level BPE of ``sft_vocab`` tokens trained on their text (``DIR/sft_tokenizer``).

Counted (``cuts``), for each max_length M of ``sft_lengths``: the share of conversations longer than M, the share of
answer tokens (the assistant tokens SFT learns) past M, and the share of conversations left with no answer token.

Trained (``effect``), for each max_length M of ``sft_train_lengths`` (C = the largest): ``sft_heldout``
conversations are set aside once (a fixed shuffle, the same for every seed and arm) and used in no training. One
base decoder (the experiment's ``model`` section, learned positions, a context of C) is pre-trained once by
``llmlab pretrain`` on the text of the other conversations in rows of C tokens (``DIR/sft-base``, with the first
seed), so every position up to C is trained before SFT. For each seed it is fine-tuned by ``llmlab sft`` once per M
(``seed-N/sft-M<M>``): the same ``sft_steps``, batch size, learning rate and seed (the data order) in every arm, so
every arm takes as many steps on as many conversations; the stage cuts a conversation longer than M at its end and
drops one with no answer token left. The spread over seeds is the spread over SFT data orders. Every fine-tuned model then reads
the same held-out conversations, cut at C only, and the loss −log p of each answer token is grouped by the token's
position t in its conversation: all of them; t < min M (trained in every arm); t ≥ M (never trained in arm M),
beside the loss of the arm trained at C on those same tokens.
"""
from __future__ import annotations

import json
import math
import random
from pathlib import Path

import torch

from ..chat import DEFAULT_TEMPLATE, TEMPLATES, encode_chat
from ..data.batching import pad_collate, pad_id_of, truncate_example
from ..data.chat_data import load_pairs
from ..errors import LLMLabError
from ..files import write_text_atomic
from ..hub.folder import ModelDir
from ..hub.load import load_our_model
from ..plots import curve_grid
from ..report import Section
from ..stages import pretrain, sft
from ..stages.common import deep_merge
from ..stages.logprobs import token_logps
from ..tokenizer import load_tokenizer, save_tokenizer, train_bpe
from .common import Context, rank_0_first, show, spread

BASE = "sft-base"                 # DIR/sft-base: the pre-trained base; DIR/seed-N/sft-M<M>: each fine-tuned arm
FIGURE = "sft_loss_by_position.png"


def train_lengths(s: dict) -> list[int]:
    return sorted(int(n) for n in s["sft_train_lengths"])


def arm(length: int) -> str:
    return f"sft-M{length}"


def check(s: dict) -> None:
    """Refuse SFT settings the run cannot use, naming the field."""
    lengths = [int(n) for n in s["sft_lengths"]]
    if not lengths or min(lengths) < 2:
        raise LLMLabError(f"max-length: sft_lengths must list max_lengths ≥ 2, got {s['sft_lengths']}")
    trained = train_lengths(s)
    if not trained:
        return
    if len(set(trained)) != len(trained) or len(trained) < 2 or not set(trained) <= set(lengths):
        raise LLMLabError(f"max-length: sft_train_lengths must be at least two distinct max_lengths of sft_lengths "
                          f"({s['sft_lengths']}), or [] to only count the cuts; got {s['sft_train_lengths']}")
    for key in ("sft_heldout", "sft_pretrain_steps", "sft_steps", "sft_batch_size"):
        if isinstance(s[key], bool) or not isinstance(s[key], int) or s[key] < 1:
            raise LLMLabError(f"max-length: {key} must be a whole number ≥ 1, got {s[key]!r}")
    if not isinstance(s["sft_lr"], (int, float)) or not s["sft_lr"] > 0:
        raise LLMLabError(f"max-length: sft_lr must be a positive number, got {s['sft_lr']!r}")


# --- the conversations ------------------------------------------------------------------------------------------

def conversations_of(s: dict) -> list[list[dict]]:
    """Each pair's prompt followed by its chosen reply."""
    return [p["prompt"] + [{"role": "assistant", "content": p["chosen"]}] for p in load_pairs(s["sft_data"])]


def tokenizer_for(s: dict, out: Path, conversations: list[list[dict]]):
    """The byte-level BPE trained once on the conversations' text (``out/sft_tokenizer``)."""
    folder = out / "sft_tokenizer"
    if not (folder / "tokenizer.json").is_file():
        save_tokenizer(train_bpe((m["content"] for c in conversations for m in c), int(s["sft_vocab"])), folder)
    return load_tokenizer(folder)


def cuts(s: dict, conversations: list[list[dict]], tokenizer) -> dict:
    """For each max_length M of ``sft_lengths``: the share of conversations longer than M, the share of answer
    tokens past M (cut away, so never learned), and the share of conversations whose answer is cut entirely."""
    template = TEMPLATES[DEFAULT_TEMPLATE]
    masks = [encode_chat(tokenizer, c, template)[1] for c in conversations]
    answers = sum(sum(m) for m in masks)
    lengths = sorted(len(m) for m in masks)
    table = {}
    for limit in (int(n) for n in s["sft_lengths"]):
        table[limit] = {"examples_cut": sum(len(m) > limit for m in masks) / len(masks),
                        "answer_tokens_cut": sum(sum(m[limit:]) for m in masks) / max(answers, 1),
                        "answers_lost": sum(sum(m[:limit]) == 0 for m in masks) / len(masks)}
    return {"conversations": len(masks), "tokens_median": lengths[len(lengths) // 2],
            "tokens_p90": lengths[int(0.9 * (len(lengths) - 1))], "tokens_max": lengths[-1], "cuts": table}


def split(s: dict, out: Path, conversations: list[list[dict]]) -> dict[str, Path]:
    """``sft_heldout`` conversations set aside by a fixed shuffle (seed 0); the rest are the training set. Written
    once to ``out/sft_data/``: ``train.jsonl`` and ``heldout.jsonl`` (OpenAI messages) and ``pretrain.jsonl`` (the
    text of each training conversation, its messages' contents one paragraph each, for the base)."""
    folder = out / "sft_data"
    paths = {name: folder / f"{name}.jsonl" for name in ("train", "heldout", "pretrain")}
    if all(p.is_file() for p in paths.values()):
        return paths
    n_held = int(s["sft_heldout"])
    if n_held >= len(conversations):
        raise LLMLabError(f"max-length: sft_heldout = {n_held} leaves no training conversation of the "
                          f"{len(conversations)} in {s['sft_data']}; lower it")
    order = list(range(len(conversations)))
    random.Random(0).shuffle(order)
    held, train = sorted(order[:n_held]), sorted(order[n_held:])
    folder.mkdir(parents=True, exist_ok=True)

    def lines(records):
        return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    write_text_atomic(paths["train"], lines({"messages": conversations[i]} for i in train))
    write_text_atomic(paths["pretrain"], lines({"text": "\n\n".join(m["content"] for m in conversations[i])}
                                               for i in train))
    write_text_atomic(paths["heldout"], lines({"messages": conversations[i]} for i in held))   # last: the marker
    return paths


def read_messages(path: Path) -> list[list[dict]]:
    return [json.loads(line)["messages"] for line in path.read_text(encoding="utf-8").splitlines()]


# --- training ---------------------------------------------------------------------------------------------------

def base_recipe(s: dict, tokenizer_dir: Path, seed: int) -> dict:
    """``llmlab pretrain``: the experiment's model with learned positions and a context of C, rows of C tokens."""
    steps, context = int(s["sft_pretrain_steps"]), train_lengths(s)[-1]
    return deep_merge(pretrain.DEFAULTS, {
        "model": {**s["model"], "pos": "learned", "max_seq_len": context},
        "data": {**s["data"], "max_length": context, "batch_size": int(s["sft_batch_size"])},
        "tokenizer": {"kind": "path", "path": str(tokenizer_dir)},
        "train": {"warmup_steps": min(100, steps // 10), **s["train"], "max_steps": steps, "seed": seed,
                  "log_every": max(1, steps // 10), "eval_every": 0, "eval_batches": 1, "checkpoint_every": steps},
    })


def sft_recipe(s: dict, heldout: Path, length: int, seed: int) -> dict:
    """``llmlab sft`` at max_length ``length``; the same steps, batch, learning rate and seed in every arm."""
    steps = int(s["sft_steps"])
    return {"data": {"max_length": length, "batch_size": int(s["sft_batch_size"]), "eval_path": str(heldout)},
            "train": {**s["train"], "lr": float(s["sft_lr"]), "warmup_steps": min(20, steps // 10),
                      "max_steps": steps, "seed": seed, "log_every": max(1, steps // 10), "eval_every": 0,
                      "eval_batches": 1, "checkpoint_every": steps, "keep_checkpoints": 1}}


def train_all(ctx: Context, paths: dict[str, Path]) -> None:
    """The base, then every seed's fine-tuned arms, each in its own run folder: resumed from its checkpoints when
    interrupted, skipped when finished."""
    s = ctx.settings
    base = ctx.out / BASE
    pretrain.run(None, paths["pretrain"], base, base_recipe(s, ctx.out / "sft_tokenizer", ctx.seeds[0]),
                 resume=(base / "checkpoints").is_dir())
    for seed in ctx.seeds:
        for length in train_lengths(s):
            run_dir = ctx.run_dir(arm(length), seed)
            if not (run_dir / "model" / "config.json").is_file():
                sft.run(base / "model", paths["train"], run_dir, sft_recipe(s, paths["heldout"], length, seed),
                        resume=(run_dir / "checkpoints").is_dir())


# --- measuring --------------------------------------------------------------------------------------------------

@torch.no_grad()
def answer_losses(model_dir: Path, conversations: list[list[dict]], context: int,
                  batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """(position, −log p) of every answer token of the conversations, each cut at ``context`` tokens: the position
    is the token's index in its conversation, the loss that of predicting it from the tokens before."""
    folder = ModelDir(model_dir)
    tokenizer, template = folder.tokenizer(), folder.template()
    model = load_our_model(folder).eval()
    examples = [truncate_example(encode_chat(tokenizer, c, template), context) for c in conversations]
    examples = [e for e in examples if e is not None]
    positions, losses = [], []
    for start in range(0, len(examples), batch_size):
        logps, keep = token_logps(model, pad_collate(examples[start:start + batch_size], pad_id_of(tokenizer)))
        positions.append(keep.nonzero(as_tuple=True)[1] + 1)      # labels[j] is token j + 1
        losses.append(-logps.float())
    return torch.cat(positions), torch.cat(losses)


def training_counts(train: list[list[dict]], tokenizer, length: int) -> dict:
    """What the SFT stage keeps of the training conversations at max_length ``length``."""
    template = TEMPLATES[DEFAULT_TEMPLATE]
    full = sum(sum(encode_chat(tokenizer, c, template)[1][1:]) for c in train)
    examples, counts = sft.encode_conversations(train, tokenizer, template, length)
    kept = sum(sum(mask[1:]) for _, mask in examples)
    return {"truncated": counts["truncated"] / len(train), "dropped": counts["dropped"] / len(train),
            "answer_tokens_kept": kept / max(full, 1)}


def _mean(losses: torch.Tensor, where: torch.Tensor) -> float:
    return float(losses[where].mean()) if bool(where.any()) else math.nan


def measure(ctx: Context, paths: dict[str, Path], tokenizer) -> dict:
    """Every fine-tuned model on the same held-out answer tokens: the losses the report shows, per arm and seed."""
    s = ctx.settings
    lengths = train_lengths(s)
    shortest, context = lengths[0], lengths[-1]
    held, train = read_messages(paths["heldout"]), read_messages(paths["train"])
    reads = {n: [answer_losses(ctx.run_dir(arm(n), seed) / "model", held, context) for seed in ctx.seeds]
             for n in lengths}
    positions = reads[context][0][0]
    if not all(torch.equal(p, positions) for runs in reads.values() for p, _ in runs):
        raise LLMLabError("max-length: the fine-tuned models read different held-out tokens (their tokenizers "
                          "differ); remove the sft-* run folders and rerun")
    if not len(positions):
        raise LLMLabError(f"max-length: the {len(held)} held-out conversations have no answer token within "
                          f"{context} tokens; raise sft_heldout or the sft_train_lengths")
    width = max(1, context // 8)
    bucket = torch.div(positions, width, rounding_mode="floor")
    present = sorted({int(b) for b in bucket})
    reference = [loss for _, loss in reads[context]]
    first = positions < shortest
    arms = {}
    for n in lengths:
        losses = [loss for _, loss in reads[n]]
        past, before = positions >= n, (positions >= n // 2) & (positions < n)
        arms[n] = {
            **training_counts(train, tokenizer, n),
            "loss_all": spread([float(v.mean()) for v in losses]),
            "loss_short": spread([_mean(v, first) for v in losses]),
            "gap_short": spread([_mean(v, first) - _mean(r, first) for v, r in zip(losses, reference)]),
            "loss_past": spread([_mean(v, past) for v in losses]) if past.any() else None,
            "loss_past_reference": spread([_mean(r, past) for r in reference]) if past.any() else None,
            "gap_past": (spread([_mean(v, past) - _mean(r, past) for v, r in zip(losses, reference)])
                         if past.any() else None),
            "gap_before": (spread([_mean(v, before) - _mean(r, before) for v, r in zip(losses, reference)])
                           if past.any() else None),
            "by_bucket": [[_mean(v, bucket == b) for b in present] for v in losses]}
    return {"context": context, "shortest": shortest, "heldout": len(held), "train": len(train),
            "answer_tokens": len(positions), "answer_tokens_short": int(first.sum()),
            "answer_tokens_past": {n: int((positions >= n).sum()) for n in lengths},
            "bucket": width, "bucket_starts": [b * width for b in present], "arms": arms}


def run(ctx: Context) -> tuple[dict, dict | None, list[str]]:
    """(cuts, effect or None when ``sft_train_lengths`` is empty, figures)."""
    s = ctx.settings
    conversations = conversations_of(s)
    tokenizer = rank_0_first(tokenizer_for, s, ctx.out, conversations)
    counted = cuts(s, conversations, tokenizer)
    if not train_lengths(s):
        return counted, None, []
    paths = rank_0_first(split, s, ctx.out, conversations)
    train_all(ctx, paths)
    effect = measure(ctx, paths, tokenizer)
    draw(ctx, effect)
    return counted, effect, [FIGURE]


# --- the report -------------------------------------------------------------------------------------------------

def cuts_section(s: dict, counted: dict, effect: dict | None) -> Section:
    rows = [["max_length", "examples cut", "answer tokens cut", "examples with no answer token left"]]
    for limit, c in counted["cuts"].items():
        rows.append([str(limit), f"{c['examples_cut']:.1%}", f"{c['answer_tokens_cut']:.1%}",
                     f"{c['answers_lost']:.1%}"])
    effect_text = (f"What a cut does to a model fine-tuned with it is measured in the next section: {headline(effect)}"
                   if effect else "(sft_train_lengths is empty: the effect of a cut on a trained model is not "
                                  "measured.)")
    return Section("SFT: what a max_length cuts", table=rows, text=(
        f"`{s['sft_data']}`: {counted['conversations']} conversations (prompt + chosen reply) in the `llmlab` chat "
        f"template, tokenized by a {s['sft_vocab']}-token byte-level BPE trained on them; median "
        f"{counted['tokens_median']} tokens, 90th percentile {counted['tokens_p90']}, longest "
        f"{counted['tokens_max']}. Truncation keeps the first max_length tokens: the answer comes last, so it is what "
        f"a cut removes first, and an example cut before its answer teaches nothing at all. {effect_text}"))


def effect_section(s: dict, effect: dict) -> Section:
    lo, top = effect["shortest"], effect["context"]
    rows = [["max_length M", "train conversations cut (dropped)", "train answer tokens kept", "loss, all answer tokens",
             f"loss, positions < {lo}", "loss, positions ≥ M (never trained at M)", f"same tokens, M = {top} model",
             "difference", "difference, positions M/2 … M − 1"]]
    for n, a in effect["arms"].items():
        rows.append([str(n), f"{a['truncated']:.1%} ({a['dropped']:.1%})", f"{a['answer_tokens_kept']:.1%}",
                     show(a["loss_all"]), show(a["loss_short"]),
                     *([show(a["loss_past"]), show(a["loss_past_reference"]), _signed(a["gap_past"]),
                        _signed(a["gap_before"])] if a["gap_past"] else ["–"] * 4)])
    return Section("SFT: what a max_length does to the fine-tuned model", table=rows, figures=[FIGURE], text=(
        f"{effect['train']} training conversations, {effect['heldout']} held out. One base, pre-trained once on the "
        f"training conversations' text (`llmlab pretrain`, {s['sft_pretrain_steps']} steps of {s['sft_batch_size']} "
        f"rows of {top} tokens, learned positions, context {top}; `sft-base/`), is fine-tuned by each seed once per "
        f"max_length M (`llmlab sft`, {s['sft_steps']} steps of {s['sft_batch_size']} conversations, lr "
        f"{s['sft_lr']}, loss on answer tokens only; `seed-N/sft-M<M>/`): the seeds differ in the SFT data order. Every model then reads "
        f"the same held-out conversations cut at {top} tokens only: {effect['answer_tokens']} answer tokens, "
        f"{effect['answer_tokens_short']} of them at positions < {lo}, "
        + ", ".join(f"{effect['answer_tokens_past'][n]} at ≥ {n}" for n in list(effect["arms"])[:-1])
        + f". Loss: mean −log p in nats per answer token; difference: the M model's loss minus the M = {top} "
        "model's on the same tokens (positive: worse).\n\n" + verdict(effect)))


def _signed(x: dict) -> str:
    if x["n"] == 1 or not math.isfinite(x["mean"]):
        return " / ".join(f"{v:+.3f}" for v in x["values"])
    return f"{x['mean']:+.3f} ± {x['std']:.2g}"


def _direction(gap: dict) -> str:
    """``worse`` when every seed's difference is positive, ``better`` when every one is negative, else ``mixed``."""
    if all(v > 0 for v in gap["values"]):
        return "worse"
    if all(v < 0 for v in gap["values"]):
        return "better"
    return "mixed"


def headline(effect: dict) -> str:
    short = {n: a for n, a in effect["arms"].items() if a["gap_past"]}
    worse = [n for n, a in short.items() if _direction(a["gap_past"]) == "worse"]
    word = "confirmed" if len(worse) == len(short) else "refuted" if not worse else "partly confirmed"
    return (f"'a model SFT-trained with a short max_length is worse on long answers' is {word}: on held-out answer "
            "tokens past M, loss minus the M = " + f"{effect['context']} model's: "
            + "; ".join(f"M={n} {_signed(a['gap_past'])}" for n, a in short.items()) + " nats.")


def verdict(effect: dict) -> str:
    """The claim 'a model SFT-trained with a short max_length is worse on long answers' against the numbers."""
    top, lo = effect["context"], effect["shortest"]
    short = {n: a for n, a in effect["arms"].items() if a["gap_past"]}
    seeds = next(iter(short.values()))["gap_past"]["n"]
    counts = {n: sum(v > 0 for v in a["gap_past"]["values"]) for n, a in short.items()}
    worse = [n for n, a in short.items() if _direction(a["gap_past"]) == "worse"]
    word = ("Confirmed" if len(worse) == len(short) else "Refuted" if not worse else "Partly confirmed")
    lines = [f"{word}: on the held-out answer tokens a model fine-tuned at max_length M never trained on (positions "
             f"≥ M), its loss minus that of the model fine-tuned at {top} on the same tokens was "
             + "; ".join(f"{_signed(a['gap_past'])} nats at M = {n} (higher in {counts[n]} of {seeds} seeds)"
                         for n, a in short.items()) + "."]
    lines.append(f"On the first {lo} positions, which every arm trained on, the same difference was "
                 + "; ".join(f"{_signed(a['gap_short'])} at M = {n}" for n, a in short.items()) + ". "
                 + _where(short))
    lines.append("Every arm took the same steps on the same number of conversations, but a cut arm learns from fewer "
                 "answer tokens (" + ", ".join(f"{a['answer_tokens_kept']:.0%} kept at M = {n}"
                                                for n, a in effect["arms"].items())
                 + "); the base model was pre-trained at the full context, so every position's embedding was "
                   "trained before SFT." + (" One seed: no spread; the default preset runs three." if seeds == 1
                                            else ""))
    return "\n\n".join(lines)


def _where(short: dict) -> str:
    """Whether the extra loss of the cut arms starts at M: the difference past M against the one just before M
    (positions M/2 … M − 1, which the arm trained on), seed by seed."""
    jumps = {n: [p - b for p, b in zip(a["gap_past"]["values"], a["gap_before"]["values"])]
             for n, a in short.items()}
    text = ("Just before M (positions M/2 … M − 1, which the arm trained on) the difference was "
            + "; ".join(f"{_signed(a['gap_before'])} at M = {n}" for n, a in short.items()) + ": ")
    if all(all(j > 0 for j in v) for v in jumps.values()):
        return text + ("smaller than past M in every seed, so the loss rises where the cut removed the positions, "
                       "on top of what fewer answer tokens cost everywhere.")
    return text + ("not smaller than past M in every seed, so the loss does not rise at M: the extra loss is "
                   "spread over the answer, as from learning on fewer answer tokens, rather than set by the "
                   "positions the cut removed.")


def draw(ctx: Context, effect: dict) -> None:
    width = effect["bucket"]
    xs = [b + width / 2 for b in effect["bucket_starts"]]
    top = effect["context"]
    reference = effect["arms"][top]["by_bucket"]
    absolute = {f"M={n}": [(xs, v) for v in a["by_bucket"]] for n, a in effect["arms"].items()}
    relative = {f"M={n}": [(xs, [x - r for x, r in zip(v, ref)]) for v, ref in zip(a["by_bucket"], reference)]
                for n, a in effect["arms"].items()}
    curve_grid([("answer-token loss", absolute), (f"minus the M={top} model's (same tokens)", relative)],
               ctx.out / FIGURE, cols=2, ylabel="held-out loss (nats)",
               xlabel=f"token position (buckets of {width})",
               title="SFT at max_length M: held-out answer-token loss by position (one line per seed)")
