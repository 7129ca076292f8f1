"""``llmlab experiment encoder-vs-decoder``: why a masked-LM encoder is not a text generator.

    llmlab experiment encoder-vs-decoder [--preset test|default|large] [--seeds K] [--data PATH] [--steps N]
                                         [--set key=value ...] --out DIR

Trains two networks of the same size on the same corpus for the same number of steps with ``llmlab pretrain``:
a GPT-2-style decoder (next-token loss) and a BERT-style encoder (masked-LM loss); both use LayerNorm, learned
positions and GELU, so the objective and the attention mask are the only differences. The corpus defaults to
the built-in Tiny Shakespeare (``tinyshakespeare``, downloaded once into ``$LLMLAB_CACHE/data/``); the tokenizer is
character-level and shared. Then, on a fixed set of held-out positions t of the val split:

    decoder:  p(x_t | x_<t) from one causal pass over the window
    encoder:  p(x_t | x_<t) read at the mask of the input  x_<t ++ [<|mask|>]   (left context only)
    perplexity = exp(−(1/N) Σ_t log p(x_t | x_<t))

and each model continues the same prompt: the decoder with the KV-cache engine, the encoder by appending one
``<|mask|>``, filling it, and repeating (a full forward pass per token). ``DIR/report.md`` holds the numbers (mean ±
std over the seeds), the samples (first seed) and the explanation; ``DIR/perplexity.png`` the bar chart;
``DIR/seed-N/decoder`` and ``DIR/seed-N/encoder`` the runs (a rerun with the same ``--out`` resumes them, so only
the evaluation is repeated). ``--set`` keys: ``steps``, ``corpus``, ``windows``, and any key of the two pretrain
recipes' ``model``, ``data``, ``train`` and ``loss`` sections (applied to both sides alike).
"""
from __future__ import annotations

import math
import time
from pathlib import Path

import torch

from ..data.shards import TokenShards
from ..errors import LLMLabError
from ..hub.load import load_our_model
from ..infer.engine import Engine, SamplingParams, next_tokens
from ..plots import read_metrics, save
from ..report import Section
from ..tokenizer import load_tokenizer
from ..stages import pretrain
from ..stages.common import deep_merge
from .common import Context, Result, show, spread

DEFAULT_CORPUS = "tinyshakespeare"      # a built-in corpus of data/sources.py
SIZE = {"n_layer": 4, "n_head": 4, "d_model": 128, "max_seq_len": 128, "dropout": 0.0}
PROMPT_TOKENS = 16
SAMPLE_TEMPERATURE = 0.8
CLAIM = ("Claim tested: a BERT-style masked-LM encoder is not a text generator. Trained on the same text for as "
         "many steps as a decoder of the same size, it predicts the next token from its left context worse (higher "
         "perplexity) and generates each token at a higher cost, because it was trained to fill masks with both "
         "sides visible and has no causal structure to cache.")
OPEN = ("model", "data", "train", "loss")   # pretrain recipe sections, applied to both sides (pretrain checks them)
_TRAIN = {"lr": 1e-3, "eval_every": 0, "eval_batches": 10, "log_every": 50, "betas": [0.9, 0.99]}
PRESETS = {
    "test": {"seeds": 1, "corpus": DEFAULT_CORPUS, "steps": 20, "windows": 4,
             "model": {**SIZE, "n_layer": 1, "n_head": 2, "d_model": 32, "max_seq_len": 32},
             "data": {"max_length": 32, "batch_size": 4}, "train": {**_TRAIN, "eval_batches": 2, "progress": False}},
    "default": {"seeds": 3, "corpus": DEFAULT_CORPUS, "steps": 500, "windows": 16, "model": dict(SIZE),
                "data": {"max_length": SIZE["max_seq_len"], "batch_size": 12}, "train": dict(_TRAIN)},
    "large": {"seeds": 3, "corpus": DEFAULT_CORPUS, "steps": 5000, "windows": 64,
              "model": {**SIZE, "n_layer": 8, "n_head": 8, "d_model": 512, "max_seq_len": 256},
              "data": {"max_length": 256, "batch_size": 32}, "train": dict(_TRAIN)},
}


def run_recipe(preset: str, s: dict, tokenizer: dict, seed: int) -> dict:
    """The ``llmlab pretrain`` recipe of one side (``preset``: gpt2 or bert); the settings apply to both alike."""
    steps = int(s["steps"])
    recipe = deep_merge(pretrain.DEFAULTS, {
        "model": {**s["model"], "preset": preset},
        "data": {**s["data"], "path": str(s["corpus"])},
        "tokenizer": tokenizer,
        "train": {"warmup_steps": min(100, steps // 10), "checkpoint_every": steps, **s["train"],
                  "max_steps": steps, "seed": seed},
    })
    if "loss" in s:                              # a loss: section, when --set gives one
        recipe["loss"] = {**recipe["loss"], **s["loss"]}
    return recipe


# --- left-to-right perplexity ----------------------------------------------------------------------------------

def heldout_windows(shards: Path, length: int, count: int) -> torch.Tensor:
    """``count`` windows of ``length`` tokens spread evenly over the val split, as a (count, length) tensor."""
    val = TokenShards(shards, "val")
    if len(val) < length:
        raise LLMLabError(f"{shards}: the val split has {len(val)} tokens, fewer than one window of {length}; "
                          f"use a larger corpus or a smaller data.max_length")
    count = min(count, len(val) // length)
    starts = [i * (len(val) - length) // max(count - 1, 1) for i in range(count)]
    return torch.stack([torch.from_numpy(val.tokens(s, length).astype("int64")) for s in starts])


@torch.no_grad()
def decoder_nll(decoder, windows: torch.Tensor) -> torch.Tensor:
    """−log p(w_t | w_<t) for t = 1 … L−1 of every window, (W, L−1), from one causal pass each."""
    logits = decoder(windows[:, :-1]).float()
    return -logits.log_softmax(-1).gather(-1, windows[:, 1:, None]).squeeze(-1)


@torch.no_grad()
def encoder_nll(encoder, windows: torch.Tensor, mask_id: int) -> torch.Tensor:
    """−log p(w_t | w_<t) for t = 1 … L−1, (W, L−1), the encoder reading left context only: row t of a window's
    batch is ``w_<t ++ [mask]`` (the rest padding, which no token attends to) and the prediction is read at t."""
    n, length = windows.shape
    t = torch.arange(1, length)
    keep = torch.arange(length)[None, :] < t[:, None]                   # (L−1, L): positions before t
    out = []
    for w in windows:
        rows = torch.where(keep, w[None, :], torch.zeros_like(w)[None, :])
        rows[torch.arange(length - 1), t] = mask_id
        attention = (torch.arange(length)[None, :] <= t[:, None]).long()
        logits = encoder(rows, attention_mask=attention).float()[torch.arange(length - 1), t]
        out.append(-logits.log_softmax(-1).gather(-1, w[1:, None]).squeeze(-1))
    return torch.stack(out)


def perplexity(nll: torch.Tensor) -> float:
    return math.exp(float(nll.mean()))


# --- generation ------------------------------------------------------------------------------------------------

def decoder_sample(decoder, tokenizer, prompt: list[int], params: SamplingParams) -> tuple[str, float]:
    """The engine's continuation (prefill + KV-cache decode) and the seconds per generated token."""
    start = time.perf_counter()
    completion = Engine(decoder, tokenizer).generate([prompt], params)[0]
    return completion.text, (time.perf_counter() - start) / max(len(completion.token_ids), 1)


@torch.no_grad()
def encoder_sample(encoder, tokenizer, prompt: list[int], params: SamplingParams) -> tuple[str, float]:
    """Left-to-right generation with a masked LM: append ``<|mask|>``, fill it from the encoder's prediction there,
    repeat. There is no cache: every token costs a full forward pass over the whole context."""
    context = encoder.config.max_seq_len
    generator = torch.Generator().manual_seed(params.seed or 0)
    ids, new = list(prompt), []
    start = time.perf_counter()
    for _ in range(min(params.max_new_tokens, context - len(prompt))):
        window = ids[-(context - 1):] + [tokenizer.mask_token_id]
        logits = encoder(torch.tensor([window]))[:, -1]
        token = int(next_tokens(logits, params, None, generator)[0])
        if token == tokenizer.eos_token_id:
            break
        ids.append(token)
        new.append(token)
    seconds = (time.perf_counter() - start) / max(len(new), 1)
    return tokenizer.decode(new, skip_special_tokens=True), seconds


# --- the report ------------------------------------------------------------------------------------------------

def bar_chart(values: dict[str, float], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3.5), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    bars = ax.bar(list(values), list(values.values()), color=["tab:blue", "tab:orange"])
    ax.bar_label(bars, fmt="%.2f")
    ax.set_yscale("log")
    ax.set_ylabel("held-out perplexity (log scale)")
    ax.set_title("next-token perplexity, left context only")
    fig.tight_layout()
    save(fig, path)


def last_value(run: Path, key: str) -> float | None:
    values = [r[key] for r in read_metrics(run / "metrics.jsonl") if isinstance(r.get(key), (int, float))]
    return values[-1] if values else None


EXPLANATION = """\
## Why

Measured here: the encoder's left-to-right perplexity is {ratio:.2f}× the decoder's, and each token it generates
costs {cost:.1f}× the decoder's time.

The decoder was trained on exactly the question asked here: at every position, predict the next token from the
tokens before it (a causal mask hides the future). The encoder was trained on a different question: predict about
15% of the tokens, each hidden behind `<|mask|>` (or swapped or left as is), from context on *both* sides, with
the other 85% of the row visible. Asked to predict a token from its left context alone, with a single mask at the
end of a short input and nothing to its right, it sees an input unlike any it was trained on: its perplexity is
higher even though it has as many weights and saw the same text for as many steps.

Generation shows the same gap, and a cost: the decoder's engine runs the prompt once and then one token per step
against its KV cache (the keys and values of earlier positions never change, because no position looks ahead).
The encoder has no causal structure, so appending a token changes the representation of every earlier position:
nothing can be cached, and each new token needs a full forward pass over the whole context, an O(T) factor more
work per token.
"""


def one_seed(ctx: Context, seed: int) -> tuple[dict, dict, str]:
    """Train both sides of one seed (resuming finished runs), evaluate them; the rows, the samples, the prompt."""
    s = ctx.settings
    decoder_dir, encoder_dir = ctx.run_dir("decoder", seed), ctx.run_dir("encoder", seed)
    char = {"kind": "char", "path": None}
    pretrain.run(None, None, decoder_dir, run_recipe("gpt2", s, char, seed),
                 resume=(decoder_dir / "checkpoints").is_dir())
    shared = {"kind": "path", "path": str(decoder_dir / "tokenizer")}
    pretrain.run(None, None, encoder_dir, run_recipe("bert", s, shared, seed),
                 resume=(encoder_dir / "checkpoints").is_dir())

    tokenizer = load_tokenizer(decoder_dir / "tokenizer")
    decoder = load_our_model(decoder_dir / "model").eval()
    encoder = load_our_model(encoder_dir / "model").eval()
    length = min(decoder.config.max_seq_len, encoder.config.max_seq_len)
    held = heldout_windows(decoder_dir / "data", length, int(s["windows"]))
    nll = {"decoder": decoder_nll(decoder, held), "encoder": encoder_nll(encoder, held, tokenizer.mask_token_id)}

    prompt = held[0, :min(PROMPT_TOKENS, length // 4)].tolist()
    params = SamplingParams(max_new_tokens=length, temperature=SAMPLE_TEMPERATURE, seed=0)
    generated = {"decoder": decoder_sample(decoder, tokenizer, prompt, params),
                 "encoder": encoder_sample(encoder, tokenizer, prompt, params)}
    rows = {name: {"params": sum(p.numel() for p in model.parameters()), "ppl": perplexity(nll[name]),
                   "val_loss": last_value(ctx.run_dir(name, seed), "val_loss"),
                   "ms_per_token": generated[name][1] * 1000, "positions": held[:, 1:].numel()}
            for name, model in (("decoder", decoder), ("encoder", encoder))}
    return rows, {name: g[0] for name, g in generated.items()}, tokenizer.decode(prompt, skip_special_tokens=True)


def run(ctx: Context) -> Result:
    s = ctx.settings
    if int(s["steps"]) < 1:
        raise LLMLabError(f"--steps {s['steps']}: must be at least 1")
    per_seed = [one_seed(ctx, seed) for seed in ctx.seeds]
    samples, prompt = per_seed[0][1], per_seed[0][2]
    nan = float("nan")
    rows = {name: {"params": per_seed[0][0][name]["params"],
                   **{key: spread([r[0][name][key] if r[0][name][key] is not None else nan for r in per_seed])
                      for key in ("ppl", "val_loss", "ms_per_token")}}
            for name in ("decoder", "encoder")}
    bar_chart({name: r["ppl"]["mean"] for name, r in rows.items()}, ctx.out / "perplexity.png")
    ratio = rows["encoder"]["ppl"]["mean"] / rows["decoder"]["ppl"]["mean"]
    cost = rows["encoder"]["ms_per_token"]["mean"] / max(rows["decoder"]["ms_per_token"]["mean"], 1e-9)
    positions = per_seed[0][0]["decoder"]["positions"]
    table = [["model", "parameters", "own val loss (training objective)",
              "next-token perplexity, left context only", "ms per generated token"]]
    for name, r in rows.items():
        table.append([name, f"{r['params']:,}", show(r["val_loss"]), show(r["ppl"]), show(r["ms_per_token"], 3)])
    result = Section("Result", text=f"Perplexity over {positions} held-out positions of the val split (the same "
                                    "positions for both models).", table=table, figures=["perplexity.png"])
    sample_section = Section(f"Samples (temperature {SAMPLE_TEMPERATURE}, same seed, first training seed)",
                             text="Prompt: " + prompt, samples=[(name, prompt + text) for name, text in samples.items()])
    why = Section("What the numbers mean", text=EXPLANATION.format(ratio=ratio, cost=cost).split("\n", 2)[2])
    return Result(
        title="Encoder vs decoder: the same network size, two objectives",
        setup=(f"Corpus `{s['corpus']}`; {s['steps']} training steps each (`llmlab pretrain`, in `seed-N/decoder` "
               "and `seed-N/encoder`); a character tokenizer shared by both; GPT-2-style decoder vs BERT-style "
               "encoder of the same size (LayerNorm, learned positions, GELU)."),
        sections=[result, sample_section, why],
        summary={"rows": rows, "perplexity_ratio": ratio, "cost_ratio": cost, "samples": samples, "prompt": prompt,
                 "decoder_ppl": rows["decoder"]["ppl"]["mean"], "encoder_ppl": rows["encoder"]["ppl"]["mean"]},
        headline=f"decoder perplexity {show(rows['decoder']['ppl'])}, encoder (left to right) "
                 f"{show(rows['encoder']['ppl'])}",
        figures=["perplexity.png"])
