"""``llmlab experiment tokenizer``: characters or bytes, and how large a vocabulary.

    llmlab experiment tokenizer [--preset test|default|large] [--seeds K] [--data PATH] [--steps N]
                                [--set key=value ...] --out DIR

One corpus (default: the built-in task world's pre-training corpus, ``corpus: world``, of world preset ``world``;
``--data tinyshakespeare`` or any ``iter_documents`` source instead) is split once into training text and held-out
text: every ``1/heldout``-th document, or, for a corpus of fewer than 10 documents (Tiny Shakespeare is one), the
last ``heldout`` share of its text, cut at a line break. On the training text we train one character-level
tokenizer (its alphabet read from the whole corpus, so that no held-out character is unknown) and one byte-level
BPE per vocabulary size V of ``vocab_sizes`` (V counts the 256 bytes and 6 special tokens, so V = 262 is plain
bytes with no merges). Then the same GPT-2-style model body (``model``: layers, width, heads, context) is trained
with ``llmlab pretrain`` on each tokenizer's tokens, for the same number of steps on rows of the same number of
tokens: **equal compute means an equal number of training tokens** (``steps × batch_size × max_length``), so
the body's FLOPs are equal and only the embedding / LM head (tied, V × d) grows with V. A tokenizer that packs more
bytes into a token therefore sees more text in the same compute, and its context of ``max_length`` tokens spans
more bytes.

Measured per tokenizer: bytes per token on the held-out text (compression) = UTF-8 bytes / text tokens; the share
of the model's parameters in the token embedding (which is also the LM head); FLOPs per training token; and, per
seed, the held-out **bits per byte**, the one loss that compares models with different tokenizers:

    bits per byte = Σ_t −ln p(x_t | x_<t)  /  (ln 2 · B)

the sum over every text token of the held-out stream (each document framed as the training shards frame it,
``[BOS] text [EOS]``; the special tokens are context, not scored), in windows of ``max_length`` tokens that overlap
by one token so that every token is predicted once, and B the UTF-8 bytes of that text. A model that predicts
each byte uniformly scores 8 bits per byte.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from ..config import from_dict
from ..data.shards import read_index
from ..data.sources import iter_documents
from ..errors import LLMLabError
from ..hub.load import load_our_model
from ..plots import read_metrics, save, series
from ..report import Section
from ..stages import pretrain
from ..stages.common import deep_merge
from ..tokenizer import BYTE_ALPHABET_SIZE, SPECIAL_TOKENS, load_tokenizer, save_tokenizer, train_bpe, train_char
from .common import Context, Result, rank_0_first, show, spread
from .warmup import place_shards

WORLD = "world"                 # corpus: the built-in task world's pre-training corpus (world preset: ``world``)
VAL_FRACTION = 0.02             # pretrain's own val split of the training text (its curve only; not the held-out text)
BYTES_ONLY = BYTE_ALPHABET_SIZE + len(SPECIAL_TOKENS)      # 262: a byte-level BPE with no merges
CLAIM = ("Claim tested (the textbook trade-off of tokenization): a byte-level BPE with a larger vocabulary packs more "
         "bytes of text into each token than characters or bytes do, at the price of a larger share of the "
         "parameters in the embedding and LM head; and at equal compute (the same model body trained on the same "
         "number of tokens) it reaches a lower held-out loss per byte than a character-level model, until the "
         "vocabulary grows so large that its rarer tokens are seen too seldom to learn.")
OPEN = ("model", "data", "train")       # pretrain recipe sections, the same for every tokenizer
_MODEL = {"preset": "gpt2", "n_layer": 2, "n_head": 4, "d_model": 64, "max_seq_len": 64, "dropout": 0.0}
_TRAIN = {"lr": 3e-3, "betas": [0.9, 0.99], "eval_batches": 4, "log_every": 10, "progress": False}
PRESETS = {
    "test": {"seeds": 1, "corpus": WORLD, "world": "test", "vocab_sizes": [BYTES_ONLY, 320], "steps": 4,
             "heldout": 0.1, "eval_bytes": 2000,
             "model": {**_MODEL, "n_layer": 1, "n_head": 2, "d_model": 16, "max_seq_len": 16},
             "data": {"max_length": 16, "batch_size": 4}, "train": {**_TRAIN, "log_every": 1}},
    "default": {"seeds": 3, "corpus": WORLD, "world": "tiny", "vocab_sizes": [BYTES_ONLY, 512, 1024, 2048, 4096, 8192],
                "steps": 200, "heldout": 0.1, "eval_bytes": 40000, "model": dict(_MODEL),
                "data": {"max_length": 64, "batch_size": 16}, "train": dict(_TRAIN)},
    "large": {"seeds": 3, "corpus": WORLD, "world": "small",
              "vocab_sizes": [BYTES_ONLY, 512, 1024, 2048, 4096, 8192, 16384], "steps": 3000, "heldout": 0.1,
              "eval_bytes": 500000, "model": {**_MODEL, "n_layer": 6, "n_head": 8, "d_model": 384, "max_seq_len": 256},
              "data": {"max_length": 256, "batch_size": 32}, "train": {**_TRAIN, "lr": 1e-3, "log_every": 50}},
}


def arms(s: dict) -> list[tuple[str, int | None]]:
    """(name, BPE vocabulary size or None for characters) of every tokenizer."""
    return [("char", None)] + [(f"bpe-{v}", int(v)) for v in s["vocab_sizes"]]


def check(s: dict) -> None:
    if int(s["steps"]) < 1:
        raise LLMLabError(f"tokenizer: steps = {s['steps']}; must be at least 1")
    sizes = s["vocab_sizes"]
    if not isinstance(sizes, list) or not sizes or not all(isinstance(v, int) and v >= BYTES_ONLY for v in sizes):
        raise LLMLabError(f"tokenizer: vocab_sizes = {sizes!r}; give a list of BPE vocabulary sizes, each ≥ "
                          f"{BYTES_ONLY} (256 bytes + {len(SPECIAL_TOKENS)} special tokens)")
    if len(set(sizes)) != len(sizes):
        raise LLMLabError(f"tokenizer: vocab_sizes = {sizes!r} lists a size twice")
    if not 0.0 < float(s["heldout"]) < 0.5:
        raise LLMLabError(f"tokenizer: heldout = {s['heldout']}; the held-out share must be in (0, 0.5)")


# --- the corpus, split once ------------------------------------------------------------------------------------

def corpus_documents(s: dict) -> list[str]:
    """The documents of the corpus: the task world's pre-training texts, or those of ``corpus`` (a path/name)."""
    if s["corpus"] == WORLD:
        from ..world.build import build_world, preset
        return list(build_world(preset(str(s["world"]))).pretrain_texts)
    return list(iter_documents(str(s["corpus"])))


def split_heldout(docs: list[str], share: float) -> tuple[list[str], list[str]]:
    """(training documents, held-out documents): every round(1/share)-th document held out; with fewer than 10
    documents, the last ``share`` of the text, cut at the line break before that point (if there is one)."""
    if len(docs) >= 10:
        k = max(2, round(1 / share))
        return [d for i, d in enumerate(docs) if i % k != k - 1], [d for i, d in enumerate(docs) if i % k == k - 1]
    total = sum(len(d) for d in docs)
    last = docs[-1]
    cut = max(1, len(last) - int(total * share))
    newline = last.rfind("\n", 0, cut)
    cut = newline + 1 if newline > 0 else cut
    if cut >= len(last) or not last[cut:].strip():
        raise LLMLabError(f"the corpus is too small to hold out {share:.0%} of its text")
    return docs[:-1] + [last[:cut]], [last[cut:]]


def take_bytes(docs: list[str], limit: int) -> list[str]:
    """The first documents up to ``limit`` UTF-8 bytes in all, the last one cut at a character boundary."""
    out, used = [], 0
    for doc in docs:
        room = limit - used
        if room <= 0:
            break
        data = doc.encode("utf-8")
        if len(data) > room:
            doc = data[:room].decode("utf-8", errors="ignore")
        if doc.strip():
            out.append(doc)
        used += len(doc.encode("utf-8"))
    return out


def write_jsonl(path: Path, docs: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("".join(json.dumps({"text": d}, ensure_ascii=False) + "\n" for d in docs), encoding="utf-8")
    tmp.replace(path)


def prepare_corpus(out: Path, s: dict) -> tuple[Path, list[str], list[str]]:
    """``out/corpus/train.jsonl`` (written once) and the documents of all the corpus and of the evaluation text."""
    docs = corpus_documents(s)
    train, held = split_heldout(docs, float(s["heldout"]))
    path = out / "corpus" / "train.jsonl"
    if not path.is_file():
        write_jsonl(path, train)
        write_jsonl(out / "corpus" / "heldout.jsonl", held)
    return path, docs, take_bytes(held, int(s["eval_bytes"]))


def prepare_tokenizer(out: Path, name: str, vocab: int | None, train_file: Path, docs: list[str]) -> Path:
    """``out/tokenizers/NAME``: a character tokenizer over the whole corpus's alphabet, or a BPE of ``vocab``
    tokens trained on the training text; trained once, reused by every seed."""
    folder = out / "tokenizers" / name
    if not (folder / "tokenizer.json").is_file():
        if vocab is None:
            tokenizer = train_char(docs)
        else:
            tokenizer = train_bpe((json.loads(line)["text"] for line in train_file.open(encoding="utf-8")), vocab)
        save_tokenizer(tokenizer, folder)
    return folder


def distinct_vocabularies(tokenizers: dict[str, Path]) -> tuple[list[str], dict[str, str]]:
    """The tokenizers worth training a model on, and each of the others mapped to the smaller one it equals: a BPE
    stops merging when no pair of adjacent tokens inside a word occurs twice (its ``min_frequency``), so on a
    corpus with few distinct words every larger requested size gives the same vocabulary."""
    kept, saturated, seen = [], {}, {}
    for name, folder in tokenizers.items():
        vocab = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["model"]["vocab"]
        key = json.dumps(vocab, sort_keys=True)
        if key in seen:
            saturated[name] = seen[key]
        else:
            seen[key] = name
            kept.append(name)
    return kept, saturated


def recipe(s: dict, train_file: Path, tokenizer: Path, seed: int) -> dict:
    steps = int(s["steps"])
    return deep_merge(pretrain.DEFAULTS, {
        "model": dict(s["model"]),
        "data": {**s["data"], "path": str(train_file), "val_fraction": VAL_FRACTION},
        "tokenizer": {"kind": "path", "path": str(tokenizer)},
        "train": {"warmup_steps": max(1, steps // 10), "eval_every": steps, "checkpoint_every": steps,
                  **s["train"], "max_steps": steps, "seed": seed},
    })


def shared_shards(out: Path, name: str, s: dict, train_file: Path, tokenizer: Path) -> Path:
    """The training text tokenized once per tokenizer (``out/shards/NAME/data``, by pretrain's own
    ``prepare_shards``), then linked into each seed's run."""
    data = from_dict(pretrain.DataConfig, {**s["data"], "path": str(train_file), "val_fraction": VAL_FRACTION},
                     "data")
    return pretrain.prepare_shards(data, load_tokenizer(tokenizer), out / "shards" / name)


# --- the measures ----------------------------------------------------------------------------------------------

def bits_per_byte(nll_nats: float, n_bytes: int) -> float:
    """Σ −ln p in nats over a text → bits per byte of that text: nll / (ln 2 · bytes)."""
    return nll_nats / (math.log(2) * n_bytes)


def heldout_stream(tokenizer, docs: list[str]) -> tuple[list[int], list[bool]]:
    """The documents framed as the shards frame them, ``[BOS] ids [EOS]`` each, concatenated; and per token
    whether it is text (scored) rather than a special token (context only)."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids, text = [], []
    for doc in docs:
        body = tokenizer.encode(doc, add_special_tokens=False)
        framed = ([bos] if bos is not None else []) + body + ([eos] if eos is not None else [])
        ids += framed
        text += [False] * (bos is not None) + [True] * len(body) + [False] * (eos is not None)
    return ids, text


@torch.no_grad()
def stream_nll(model, ids: list[int], scored: list[bool], window: int, batch: int = 32) -> tuple[float, int]:
    """Σ −ln p(ids[t] | the window's tokens before t) in nats over the scored positions t ≥ 1, and their count.

    The stream is cut into windows of ``window + 1`` tokens that share their first token with the last of the
    one before (x = w[:-1], y = w[1:]), so every token after the first is predicted exactly once, from up to
    ``window`` tokens of context."""
    tokens = torch.tensor(ids, dtype=torch.long)
    keep = torch.tensor(scored, dtype=torch.bool)
    starts = list(range(0, len(ids) - 1, window))
    total, count = 0.0, 0
    for b in range(0, len(starts), batch):
        xs, ys = [], []
        for s in starts[b:b + batch]:
            x, y = tokens[s:s + window], tokens[s + 1:s + window + 1].clone()
            y[~keep[s + 1:s + window + 1]] = -100
            pad = window - len(y)
            xs.append(torch.cat([x[:len(y)], x.new_zeros(pad)]))
            ys.append(torch.cat([y, y.new_full((pad,), -100)]))
        x, y = torch.stack(xs), torch.stack(ys)
        logits = model(x).float()
        nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1),
                                                ignore_index=-100, reduction="sum")
        total += float(nll)
        count += int((y != -100).sum())
    return total, count


def parameter_counts(model) -> dict:
    """Total parameters (a tied matrix once), the token embedding's and the LM head's own (0 when tied)."""
    total = sum(p.numel() for p in model.parameters())
    embed = model.embed.weight.numel()
    head = 0 if model.config.tie_embeddings else model.lm_head.weight.numel()
    return {"total": total, "embedding": embed, "head": head, "share": (embed + head) / total}


def measure(run_dir: Path, tokenizer, eval_docs: list[str], n_bytes: int, window: int) -> dict:
    model = load_our_model(run_dir / "model").eval()
    ids, scored = heldout_stream(tokenizer, eval_docs)
    nll, count = stream_nll(model, ids, scored, window)
    records = read_metrics(run_dir / "metrics.jsonl")
    vals = [r["val_loss"] for r in records if isinstance(r.get("val_loss"), (int, float))]
    return {"bits_per_byte": bits_per_byte(nll, n_bytes), "nats_per_token": nll / count, "scored_tokens": count,
            "val_loss": vals[-1] if vals else math.nan, "params": parameter_counts(model),
            "flops_per_token": model.flops_per_token(window)}


# --- the experiment --------------------------------------------------------------------------------------------

def run(ctx: Context) -> Result:
    s = ctx.settings
    check(s)
    steps, window = int(s["steps"]), int(s["data"]["max_length"])
    train_file, docs, eval_docs = rank_0_first(prepare_corpus, ctx.out, s)
    n_bytes = sum(len(d.encode("utf-8")) for d in eval_docs)
    tokenizers = {name: rank_0_first(prepare_tokenizer, ctx.out, name, vocab, train_file, docs)
                  for name, vocab in arms(s)}
    kept, saturated = distinct_vocabularies(tokenizers)
    shards = {name: rank_0_first(shared_shards, ctx.out, name, s, train_file, tokenizers[name]) for name in kept}
    for seed in ctx.seeds:                     # seed by seed: an interrupted run has whole seeds to show
        for name in kept:
            run_dir = ctx.run_dir(name, seed)
            place_shards(shards[name], run_dir)
            pretrain.run(None, None, run_dir, recipe(s, train_file, tokenizers[name], seed),
                         resume=(run_dir / "checkpoints").is_dir())

    tokens_per_step = int(s["data"]["batch_size"]) * window
    per_arm = {}
    for name, vocab in arms(s):
        if name not in kept:
            continue
        tokenizer = load_tokenizer(tokenizers[name])
        runs = [measure(ctx.run_dir(name, seed), tokenizer, eval_docs, n_bytes, window) for seed in ctx.seeds]
        text_tokens = runs[0]["scored_tokens"]
        train_tokens = train_token_count(shards[name])
        per_arm[name] = {
            "vocab_size": len(tokenizer), "requested": vocab, "bytes_per_token": n_bytes / text_tokens,
            "params": runs[0]["params"], "flops_per_token": runs[0]["flops_per_token"],
            "train_tokens": train_tokens, "epochs": steps * tokens_per_step / max(train_tokens, 1),
            "bytes_seen": steps * tokens_per_step * n_bytes / text_tokens,
            "bits_per_byte": spread([r["bits_per_byte"] for r in runs]),
            "nats_per_token": spread([r["nats_per_token"] for r in runs]),
            "val_loss": spread([r["val_loss"] for r in runs])}
    figures = draw(ctx, s, per_arm)
    verdict, numbers = judge(per_arm)
    if saturated:
        verdict += "\n\n" + SATURATED.format(
            which=", ".join(f"{n} (as {same}: {per_arm[same]['vocab_size']:,} tokens)" for n, same in saturated.items()))
    return Result(
        title="Tokenizers: characters vs byte-level BPE at vocabulary sizes "
              f"{min(s['vocab_sizes'])}…{max(s['vocab_sizes'])}",
        setup=(f"Corpus `{s['corpus']}`" + (f" (task world preset `{s['world']}`)" if s["corpus"] == WORLD else "")
               + f"; {len(docs)} documents, one in {max(2, round(1 / float(s['heldout'])))} held out (or the last "
               f"{float(s['heldout']):.0%} of a corpus of fewer than 10 documents); bits per byte and bytes per token "
               f"are measured on the first {n_bytes:,} bytes of the held-out text. Tokenizers: characters "
               f"(`char`) and byte-level BPE (`bpe-V`, V counting the 256 bytes and 6 specials: bpe-{BYTES_ONLY} "
               "is plain bytes), trained on the training text only. One GPT-2-style model body for all (settings "
               f"below; tied embedding and LM head), trained by `llmlab pretrain` in `seed-N/<tokenizer>/` for "
               f"{steps} steps of {s['data']['batch_size']} rows × {window} tokens: **equal compute = "
               f"{steps * tokens_per_step:,} training tokens for every tokenizer**, so the body's FLOPs are equal, "
               "the embedding/LM head's grow with V, and a tokenizer with more bytes per token sees more text "
               "(the 'text seen' column) and a context of more bytes. Bits per byte = Σ −ln p(text tokens) / "
               "(ln 2 · bytes), every held-out text token predicted once from up to "
               f"{window} tokens of context."),
        sections=[Section("Result", text=verdict, table=result_table(per_arm), figures=figures[:3]),
                  Section("Training curves", text=CURVES, figures=figures[3:]),
                  Section("What the numbers mean", text=MEANING)],
        summary={"arms": per_arm, "saturated": saturated, "eval_bytes": n_bytes, "training_tokens": steps * tokens_per_step, **numbers},
        headline=verdict.split("\n")[0],
        figures=figures)


def train_token_count(shards: Path) -> int:
    """Tokens in the train split of a shard folder (specials included)."""
    return int(read_index(shards)["splits"]["train"]["num_tokens"])


def _bytes(n: float) -> str:
    return f"{n / 1e6:.2f} MB" if n >= 1e6 else f"{n / 1e3:.1f} kB" if n >= 1e3 else f"{n:.0f} B"


def _label(name: str, a: dict) -> str:
    return f"char ({a['vocab_size']})" if name == "char" else name


def result_table(per_arm: dict) -> list[list[str]]:
    rows = [["tokenizer", "vocabulary", "bytes / token", "embedding params (share)", "FLOPs / token",
             "text seen (epochs)", "held-out bits / byte", "nats / token"]]
    for name, a in per_arm.items():
        p = a["params"]
        rows.append([name, f"{a['vocab_size']:,}", f"{a['bytes_per_token']:.3f}",
                     f"{p['embedding'] + p['head']:,} of {p['total']:,} ({p['share']:.1%})",
                     f"{a['flops_per_token'] / 1e6:.2f} M", f"{_bytes(a['bytes_seen'])} ({a['epochs']:.2f})",
                     show(a["bits_per_byte"]), show(a["nats_per_token"])])
    return rows


def judge(per_arm: dict) -> tuple[str, dict]:
    """The verdict: which tokenizer reached the lowest held-out bits per byte, whether BPE beat characters by more
    than the spread over seeds, whether compression grew with V, and where bits per byte turned back up."""
    bpb = {name: a["bits_per_byte"]["mean"] for name, a in per_arm.items()}
    std = {name: a["bits_per_byte"]["std"] for name, a in per_arm.items()}
    best = min(bpb, key=bpb.get)
    bpe = [n for n in per_arm if n != "char"]
    merged = [n for n in bpe if per_arm[n]["vocab_size"] > BYTES_ONLY]
    compress = [per_arm[n]["bytes_per_token"] for n in bpe]
    monotone = all(b >= a for a, b in zip(compress, compress[1:]))
    margin = bpb["char"] - bpb[best]
    one_seed = per_arm["char"]["bits_per_byte"]["n"] == 1
    beyond = margin > std["char"] + std[best]
    if best in merged and beyond:
        how = "one seed: no spread to compare with" if one_seed else "beyond the spread over seeds"
        head, verdict = (f"Confirmed: {best} reached the lowest held-out bits per byte, {bpb[best]:.3f}, against "
                         f"{bpb['char']:.3f} for characters (a gap of {margin:.3f}, {how}) at the same compute."), \
            "confirmed"
    elif best in merged:
        head, verdict = (f"Not settled: {best} reached the lowest mean bits per byte, {bpb[best]:.3f}, but within "
                         f"the spread over seeds of characters' {bpb['char']:.3f}."), "within-noise"
    else:
        head, verdict = (f"Refuted at these settings: {best} (no merges) reached the lowest held-out bits per byte, "
                         f"{bpb[best]:.3f}; no BPE with merges did better at the same compute."), "refuted"
    lines = [head]
    first, last = bpe[0], bpe[-1]
    lines.append(f"Compression: {per_arm['char']['bytes_per_token']:.2f} bytes per token for characters, "
                 f"{per_arm[first]['bytes_per_token']:.2f} for {first} up to {per_arm[last]['bytes_per_token']:.2f} "
                 f"for {last}" + ("; it grew with every step in vocabulary size." if monotone else
                                  "; it did not grow at every step in vocabulary size."))
    lines.append(f"Embedding (= tied LM head) share of the parameters: {per_arm['char']['params']['share']:.1%} for "
                 f"characters, {per_arm[first]['params']['share']:.1%} for {first}, "
                 f"{per_arm[last]['params']['share']:.1%} for {last}.")
    if "bpe-262" in per_arm:
        lines.append(f"Plain bytes against characters, both about one byte per token on this text: bpe-262 "
                     f"{bpb['bpe-262']:.3f}, char {bpb['char']:.3f} bits per byte"
                     + (" (the bytes' unused embedding rows and larger softmax cost more than they give)."
                        if bpb["bpe-262"] > bpb["char"] + std["bpe-262"] + std["char"] else "."))
    pairs = list(zip(merged, merged[1:]))
    turn = next((b for a, b in pairs if bpb[b] - bpb[a] > std[a] + std[b]), None)
    flat = [(a, b) for a, b in pairs if abs(bpb[b] - bpb[a]) <= std[a] + std[b]]
    best_bpe = min(merged, key=bpb.get) if merged else None
    if turn is not None:
        lines.append(f"Bits per byte turned back up with a larger vocabulary, beyond the spread over seeds: the best "
                     f"BPE was {best_bpe} ({bpb[best_bpe]:.3f}); {turn} reached {bpb[turn]:.3f}, the largest, {last}, "
                     f"{bpb[last]:.3f}.")
    elif flat:
        lines.append("Bits per byte levelled off: " + "; ".join(f"{a} {bpb[a]:.3f} and {b} {bpb[b]:.3f}"
                                                                for a, b in flat)
                     + " differ by less than the spread over seeds (or there is one seed and they are equal).")
    elif len(merged) > 1:
        lines.append(f"Bits per byte fell with every larger vocabulary tried, down to {bpb[merged[-1]]:.3f} at "
                     f"{merged[-1]}.")
    if "flops_per_token" in per_arm[best] and best != "char":
        ratio = per_arm[best]["flops_per_token"] / per_arm["char"]["flops_per_token"]
        lines.append(f"Equal tokens are not equal FLOPs: with the LM head, a training token of {best} cost "
                     f"{ratio:.1f}× a character model's ({per_arm[best]['flops_per_token'] / 1e6:.2f} M vs "
                     f"{per_arm['char']['flops_per_token'] / 1e6:.2f} M FLOPs), because this body is small (d = "
                     "the model's width; the head costs 6·d·V per token in training). The body's compute is equal.")
    lines.append("Held-out bits per byte (mean over seeds): " + "; ".join(f"{n} {v:.3f}" for n, v in bpb.items())
                 + ".")
    return "\n\n".join(lines), {"verdict": verdict, "confirmed": verdict == "confirmed", "best": best,
                                "bits_per_byte": bpb, "compression_grows": monotone, "turns_up_at": turn}


# --- figures ---------------------------------------------------------------------------------------------------

def _figure(size=(6, 4)):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=size, dpi=110)
    FigureCanvasAgg(fig)
    return fig, fig.add_subplot()


def draw(ctx: Context, s: dict, per_arm: dict) -> list[str]:
    names = ["compression.png", "parameters.png", "bits_per_byte.png", "loss_per_byte.png"]
    bpe = [n for n in per_arm if n != "char"]
    xs = [per_arm[n]["vocab_size"] for n in bpe]
    char = per_arm["char"]

    fig, ax = _figure()
    ax.plot(xs, [per_arm[n]["bytes_per_token"] for n in bpe], "o-", label="byte-level BPE")
    ax.plot([char["vocab_size"]], [char["bytes_per_token"]], "s", color="tab:red", label="characters")
    ax.set_xscale("log", base=2)
    ax.set_xlabel("vocabulary size (log scale)")
    ax.set_ylabel("held-out bytes per token")
    ax.set_title("compression: bytes of text per token")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    save(fig, ctx.out / names[0])

    fig, ax = _figure((max(5.0, 0.9 * len(per_arm) + 2), 4))
    labels = [_label(n, a) for n, a in per_arm.items()]
    emb = [a["params"]["embedding"] + a["params"]["head"] for a in per_arm.values()]
    body = [a["params"]["total"] - e for a, e in zip(per_arm.values(), emb)]
    ax.bar(labels, body, label="model body (incl. positions, norms)")
    bars = ax.bar(labels, emb, bottom=body, label="token embedding = LM head (tied)")
    ax.bar_label(bars, labels=[f"{a['params']['share']:.0%}" for a in per_arm.values()], fontsize=8)
    ax.set_ylabel("parameters")
    ax.set_title("where the parameters are (label: embedding share)")
    ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, ctx.out / names[1])

    fig, ax = _figure()
    ax.errorbar(xs, [per_arm[n]["bits_per_byte"]["mean"] for n in bpe],
                yerr=[per_arm[n]["bits_per_byte"]["std"] for n in bpe], fmt="o-", capsize=3, label="byte-level BPE")
    m, sd = char["bits_per_byte"]["mean"], char["bits_per_byte"]["std"]
    ax.axhline(m, color="tab:red", linestyle="--", label=f"characters ({char['vocab_size']} tokens)")
    ax.axhspan(m - sd, m + sd, color="tab:red", alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("vocabulary size (log scale)")
    ax.set_ylabel("held-out bits per byte (lower is better)")
    ax.set_title(f"equal compute: {s['steps']} steps × {int(s['data']['batch_size']) * int(s['data']['max_length'])} "
                 "tokens", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, ctx.out / names[2])

    fig, ax = _figure((7, 4.5))
    colours = {}
    for name, a in per_arm.items():
        for seed in ctx.seeds:
            steps, loss = series(read_metrics(ctx.run_dir(name, seed) / "metrics.jsonl"), "loss")
            per_byte = [v / (math.log(2) * a["bytes_per_token"]) for v in loss]
            line, = ax.plot(steps, per_byte, color=colours.get(name), linewidth=1,
                            label=name if name not in colours else None)
            colours[name] = line.get_color()
    ax.set_xlabel("step (equal tokens per step for every tokenizer)")
    ax.set_ylabel("training loss per byte (bits)")
    ax.set_title("training loss ÷ (ln 2 · bytes per token), each seed one line", fontsize=10)
    ax.set_ylim(0, 8)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    save(fig, ctx.out / names[3])
    return names


SATURATED = """\
Not trained: {which}. BPE ran out of merges: it merges only inside a word (the byte-level pre-tokenizer splits \
the text at spaces and punctuation, and every digit is its own token) and only pairs seen at least twice, so a \
corpus with few distinct words allows no larger vocabulary. The task world's text is built from a small, fixed \
vocabulary; `--data tinyshakespeare` (or any larger corpus of natural text) reaches the larger sizes."""

CURVES = """\
Each run's training loss (nats per token) divided by ln 2 and by its tokenizer's bytes per token (measured on the \
held-out text), so that all tokenizers share one axis: bits per byte, against steps of equal compute. The \
conversion uses the held-out compression, so it is approximate for the training rows; the held-out bits per byte \
in the table are exact."""

MEANING = """\
*Compression.* A byte-level BPE starts from the 256 bytes and merges the most frequent adjacent pair, again and \
again: each merge makes one frequent string a single token. More merges (a larger V) cover longer strings, so \
the bytes per token grow, quickly at first and then slowly, as the merges left to make are rarer strings. \
Characters and plain bytes give about one byte per token on ASCII text (more than one per character for other \
scripts with characters, exactly one with bytes).

*Parameters.* The token embedding has V × d weights (here it is also the LM head, tied); the body does not depend \
on V. With a small body, a vocabulary of a few thousand tokens puts most of the parameters into the embedding: \
they are cheap in FLOPs (an embedding lookup is free; the LM head costs 2·d·V per token), but each row is trained \
only by the tokens that use it.

*Bits per byte at equal compute.* With the same number of training tokens, a tokenizer with b bytes per token \
shows the model b times more text and gives its context of T tokens b·T bytes; each prediction, though, is a \
choice among V tokens instead of a few dozen characters, and a rare token's embedding row gets few updates. \
Whether the first effect wins depends on how long the model trains: with enough tokens every row is learned and \
larger vocabularies win (the textbook result, for models trained on billions of tokens); with few steps, a large \
vocabulary's rows stay close to their random start and bits per byte turns back up. Bits per byte, unlike loss \
per token, can be compared across tokenizers: a model that predicts with loss L nats per token on text of b bytes \
per token scores L / (b · ln 2) bits per byte.

The numbers hold for this corpus, this small model and this many steps; the task world's text is synthetic and \
repetitive, so BPE compresses it more than it would compress natural text."""
