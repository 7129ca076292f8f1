"""``llmlab classify``: fine-tune pretrained encoders and decoders as sequence classifiers; accuracy before and after.

For each ``--model``:
1. load it with a fresh classification head: our ``Encoder``/``Decoder`` when ``hub/mapping.py`` maps the
   architecture (BERT, GPT-2, Llama, Qwen3, and our own runs), else ``transformers``'
   ``AutoModelForSequenceClassification`` (Gemma, ...; a ``.gguf`` file is converted once, see ``hub/gguf.py``);
2. measure test accuracy with the untrained head ("before") and, for decoders, zero-shot accuracy by prompting:
   the prediction is argmax over classes c of the next-token logit of " <name of c>" after the prompt;
3. train (``full``, ``lora`` or ``probe`` = frozen backbone) with the shared loop on length-bucketed batches,
   loss = cross-entropy(logits, label);
4. evaluate again ("after") and save a Hugging Face folder that ``AutoModelForSequenceClassification`` loads.
Then ``report.md`` (one row per model) and ``accuracy.png`` (grouped bars) go into ``--out``.

Pooling: an encoder classifies tanh(W_p h_[CLS]) (BERT's pooler); a decoder classifies h at the last real token,
i_b = max{t : mask_bt = 1}, which is right for left and right padding alike.
"""
from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ..config import from_dict
from ..chat import load_template, render
from ..data.batching import pad, truncate
from ..data.classification import ClassificationData, Example, balanced_subset, load_classification
from ..data.shards import BatchSampler
from ..device import pick_device
from ..encoding import encode_rendered, special_affixes
from ..errors import LLMLabError
from ..hub.folder import ModelDir, model_name
from ..hub.load import load_model, load_our_model
from ..hub.mapping import config_from_hf
from ..hub.save import save_model
from ..lora import DEFAULT_TARGETS, LoRAConfig, apply_lora, import_peft, merge_lora
from ..model.config import context_length
from ..model.heads import SequenceClassifier, last_token_states
from ..progress import progress_bar
from ..tokenizer import ensure_pad_token
from ..train import dist
from ..train.loop import train
from .common import add_config_args, deep_merge, resolve_max_length, resolve_recipe, start_run, train_config

METHODS = ("full", "lora", "probe")
TRUNCATIONS = ("head", "head+tail")
HEAD_NAMES = ("classifier", "score")      # the classification head's module name in ours and in transformers
ENCODER_TYPES = ("bert", "roberta", "distilbert", "albert", "electra", "deberta", "deberta-v2", "xlm-roberta",
                 "mpnet", "modernbert")   # transformers model types that are encoders, not decoders

DEFAULTS = {
    "model": {"backend": "auto"},
    "data": {"test": None, "text_field": "text", "label_field": "label", "label_names": None, "max_length": None,
             "truncation": "head", "train_limit": None, "test_limit": None, "subset_seed": 0, "test_subset_seed": None,
             "clean_html": True},
    "classify": {"method": "full", "batch_size": 16, "eval_batch_size": 32, "epochs": 1.0, "zero_shot": True,
                 "prompt": "Review: {text}\nSentiment ({choices}):", "chat": False, "measure_before": True,
                 "save_model": True},
    "lora": {"r": 8, "alpha": 16.0, "dropout": 0.05, "targets": None},
    "train": {"max_steps": None, "warmup_steps": None, "lr": 5e-5, "weight_decay": 0.01, "betas": [0.9, 0.999],
              "min_lr_ratio": 0.0, "checkpoint_every": 0, "log_every": 10},
}


@dataclass
class DataSection:
    test: str | None = None
    text_field: str = "text"
    label_field: str = "label"
    label_names: list | None = None
    max_length: int | None = None     # None: the model's context
    truncation: str = "head"
    train_limit: int | None = None
    test_limit: int | None = None
    subset_seed: int = 0
    test_subset_seed: int | None = None     # None: subset_seed (a fixed test subset while the train one varies)
    clean_html: bool = True

    def __post_init__(self):
        if self.truncation not in TRUNCATIONS:
            raise LLMLabError(f"data.truncation = {self.truncation!r}; choose one of {', '.join(TRUNCATIONS)}")
        if self.max_length is not None and self.max_length < 8:
            raise LLMLabError(f"data.max_length must be ≥ 8, got {self.max_length}")


@dataclass
class ClassifySection:
    method: str = "full"
    batch_size: int = 16
    eval_batch_size: int = 32
    epochs: float = 1.0
    zero_shot: bool = True
    prompt: str = "Review: {text}\nSentiment ({choices}):"
    chat: bool = False              # zero-shot: the prompt as a user turn in the model's chat template
    measure_before: bool = True     # accuracy with the untrained head (one pass over the test set)
    save_model: bool = True         # write the fine-tuned classifier (false: measure only, e.g. in an experiment)

    def __post_init__(self):
        if self.method not in METHODS:
            raise LLMLabError(f"classify.method = {self.method!r}; choose one of {', '.join(METHODS)}")
        if "{text}" not in self.prompt:
            raise LLMLabError("classify.prompt must contain {text} (and may contain {choices})")
        if self.batch_size < 1 or self.epochs <= 0:
            raise LLMLabError("classify.batch_size must be ≥ 1 and classify.epochs > 0")


@dataclass
class LoraSection:
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    targets: list | None = None     # None: llmlab's defaults for our models, peft's for transformers models


# ----------------------------------------------------------------------------------------------- tokens

def encode_examples(tokenizer, examples: list[Example], max_length: int, how: str = "head") -> list[dict]:
    """``{"ids", "label"}`` rows: specials + the text truncated so that the whole fits ``max_length``."""
    prefix, suffix = special_affixes(tokenizer)
    room = max_length - len(prefix) - len(suffix)
    bodies = tokenizer([e.text for e in examples], add_special_tokens=False, verbose=False)["input_ids"]
    return [{"ids": prefix + truncate(b, room, how) + suffix, "label": e.label} for b, e in zip(bodies, examples)]


def collate(rows: list[dict], pad_id: int, padding_side: str = "right") -> dict:
    """Pad a list of rows to the longest: ``input_ids`` and ``attention_mask`` (B, T), ``labels`` (B,)."""
    ids, mask = pad([r["ids"] for r in rows], pad_id, padding_side)
    return {"input_ids": ids, "attention_mask": mask, "labels": torch.tensor([r["label"] for r in rows])}


def length_buckets(rows: list[dict], batch_size: int) -> list[list[dict]]:
    """Rows sorted by length (ties by position) and cut into batches of ``batch_size``: padding inside a batch
    is then at most the length step between neighbours. The sampler shuffles the order of these buckets."""
    order = sorted(range(len(rows)), key=lambda i: (len(rows[i]["ids"]), i))
    return [[rows[i] for i in order[s:s + batch_size]] for s in range(0, len(order), batch_size)]


class BucketCollate:
    """``collate`` for a ``BatchSampler`` over buckets: each sampled row is a whole bucket (batch_size=1)."""

    def __init__(self, pad_id: int):
        self.pad_id = pad_id

    def __call__(self, buckets: list[list[dict]]) -> dict:
        return collate([row for bucket in buckets for row in bucket], self.pad_id)


# ----------------------------------------------------------------------------------------------- models

@dataclass
class Loaded:
    classifier: SequenceClassifier
    tokenizer: object
    model_dir: ModelDir
    backend: str                 # ours | transformers
    is_decoder: bool


def _head_only(model: nn.Module) -> None:
    """Freeze everything but the classification head (a top-level ``classifier`` or ``score`` module)."""
    for name, p in model.named_parameters():
        p.requires_grad_(name.split(".")[0] in HEAD_NAMES)


def _lora_ours(model: nn.Module, cfg: LoraSection) -> None:
    apply_lora(model, LoRAConfig(r=cfg.r, alpha=cfg.alpha, dropout=cfg.dropout,
                                 targets=list(cfg.targets or DEFAULT_TARGETS)))
    for name, p in model.named_parameters():
        if name.split(".")[0] in HEAD_NAMES:
            p.requires_grad_(True)


def _lora_transformers(model: nn.Module, cfg: LoraSection) -> nn.Module:
    peft = import_peft()
    kwargs = dict(task_type=peft.TaskType.SEQ_CLS, r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout)
    try:
        return peft.get_peft_model(model, peft.LoraConfig(target_modules=cfg.targets, **kwargs))
    except ValueError:          # peft knows no default target modules for this architecture
        return peft.get_peft_model(model, peft.LoraConfig(target_modules="all-linear", **kwargs))


def load_classifier(path: str, num_labels: int, method: str = "full", backend: str = "auto",
                    lora: LoraSection | None = None) -> Loaded:
    """The model at ``path`` with a fresh ``num_labels``-way head, its tokenizer (given a pad token), ready
    for ``method``."""
    model_dir = ModelDir(path)
    folder = model_dir.path
    tokenizer = ensure_pad_token(model_dir.tokenizer())
    tokenizer.padding_side = "right"
    if backend not in ("auto", "ours", "transformers"):
        raise LLMLabError(f"model.backend = {backend!r}; choose auto, ours or transformers")
    hf_config = model_dir.config
    ours = backend == "ours" or (backend == "auto" and _maps_to_ours(hf_config))
    if ours:
        model = load_our_model(model_dir, num_labels=num_labels, pad_token_id=tokenizer.pad_token_id)
        if tokenizer.pad_token_id >= model.config.vocab_size:
            raise LLMLabError(f"{folder}: the tokenizer's pad token id {tokenizer.pad_token_id} is outside the "
                              f"model's vocabulary ({model.config.vocab_size})")
        kind, is_decoder = model.config.arch, model.config.arch == "decoder"
    else:
        model = _load_transformers(folder, num_labels, tokenizer)
        kind, is_decoder = "transformers", hf_config.model_type not in ENCODER_TYPES
    lora = lora or LoraSection()
    if method == "probe":
        _head_only(model)
    elif method == "lora":
        if ours:
            _lora_ours(model, lora)
        else:
            model = _lora_transformers(model, lora)
    return Loaded(SequenceClassifier(model, kind), tokenizer, model_dir, "ours" if ours else "transformers",
                  is_decoder)


def _maps_to_ours(hf_config) -> bool:
    try:
        config_from_hf(hf_config)
        return True
    except LLMLabError:
        return False


def _load_transformers(folder: Path, num_labels: int, tokenizer) -> nn.Module:
    from transformers import AutoModelForSequenceClassification
    try:
        model = AutoModelForSequenceClassification.from_pretrained(folder, num_labels=num_labels,
                                                                   dtype=torch.float32)
    except Exception as e:     # transformers raises many types for an unsupported or broken folder
        raise LLMLabError(f"{folder}: transformers cannot load it as a sequence classifier "
                          f"({type(e).__name__}: {e})") from None
    if len(tokenizer) > model.get_input_embeddings().num_embeddings:
        model.resize_token_embeddings(len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    return model


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_classifier(loaded: Loaded, model: SequenceClassifier, out_dir: Path, label_names: list[str]) -> None:
    """A Hugging Face folder (``*ForSequenceClassification`` config, weights, tokenizer) with the label names as
    ``id2label``/``label2id``; LoRA adapters are merged first."""
    backbone = model.backbone
    id2label = {i: name for i, name in enumerate(label_names)}
    if loaded.backend == "ours":
        save_model(merge_lora(backbone), out_dir, tokenizer=loaded.tokenizer)
        config_path = out_dir / "config.json"
        config = json.loads(config_path.read_text())
        config.update(id2label={str(i): n for i, n in id2label.items()}, label2id={n: i for i, n in id2label.items()})
        config_path.write_text(json.dumps(config, indent=2) + "\n")
        return
    if hasattr(backbone, "merge_and_unload"):
        backbone = backbone.merge_and_unload()
    backbone.config.id2label, backbone.config.label2id = id2label, {n: i for i, n in id2label.items()}
    backbone.save_pretrained(out_dir)
    loaded.tokenizer.save_pretrained(out_dir)


# ----------------------------------------------------------------------------------------------- evaluation

@torch.no_grad()
def accuracy(model: nn.Module, rows: list[dict], pad_id: int, batch_size: int, device) -> float:
    """Share of ``rows`` whose argmax logit is the label (batches sorted by length; eval mode)."""
    was_training = model.training
    model.eval()
    correct = 0
    for bucket in progress_bar(length_buckets(rows, batch_size), desc="accuracy", unit="batch", leave=False,
                               disable=not dist.is_main()):
        batch = collate(bucket, pad_id)
        logits = model(batch["input_ids"].to(device), batch["attention_mask"].to(device))
        correct += int((logits.argmax(-1).cpu() == batch["labels"]).sum())
    model.train(was_training)
    return correct / len(rows)


def verbalizer_ids(tokenizer, label_names: list[str], chat: bool = False) -> list[list[int]] | None:
    """For each class, the first token ids that name it next: of " <name>" after a raw prompt; after a chat
    template's generation prompt, where the reply starts a line, of "<name>" and "<Name>" (a chat model answers
    either). None when two classes share one."""
    variants = [[name, name.capitalize()] if chat else [" " + name] for name in label_names]
    ids = [sorted({tokenizer(v, add_special_tokens=False)["input_ids"][0] for v in names}) for names in variants]
    flat = [i for group in ids for i in group]
    return ids if len(set(flat)) == len(flat) else None


def prompt_rows(tokenizer, examples: list[Example], template: str, label_names: list[str],
                max_length: int, chat_template: str | None = None) -> list[dict]:
    """``template`` with ``{text}`` = each review (truncated so the prompt fits ``max_length``) as id rows; with
    ``chat_template``, the filled prompt is one user turn of that template followed by its generation prompt."""
    filled = template.replace("{choices}", " or ".join(label_names))
    if chat_template is None:
        before, after = filled.split("{text}", 1)
        prefix, _ = special_affixes(tokenizer)
        head = prefix + tokenizer(before, add_special_tokens=False)["input_ids"]
    else:
        marker = "\x00text\x00"      # the review's place in the rendered conversation
        rendered = render([{"role": "user", "content": filled.replace("{text}", marker, 1)}], chat_template,
                          bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or "",
                          add_generation_prompt=True)
        before, after = rendered.split(marker, 1)
        head = encode_rendered(tokenizer, before)
    tail = tokenizer(after, add_special_tokens=False)["input_ids"]
    bodies = tokenizer([e.text for e in examples], add_special_tokens=False, verbose=False)["input_ids"]
    room = max_length - len(head) - len(tail)
    if room < 1:
        raise LLMLabError(f"classify.prompt takes {len(head) + len(tail)} tokens of this model's tokenizer"
                          f"{' in its chat template' if chat_template else ''}, leaving no room for the text in "
                          f"data.max_length = {max_length}: raise data.max_length or shorten the prompt")
    return [{"ids": head + truncate(b, room) + tail, "label": e.label} for b, e in zip(bodies, examples)]


@torch.no_grad()
def zero_shot_accuracy(lm: nn.Module, tokenizer, examples: list[Example], label_names: list[str], template: str,
                       max_length: int, batch_size: int, device, chat_template: str | None = None) -> float | None:
    """Accuracy of predicting argmax_c log Σ_{v ∈ V_c} p(next token = v) after the prompt, V_c the first tokens
    that name class c (``verbalizer_ids``), with ``lm`` our Decoder or a transformers causal LM; None when two
    classes share a first token."""
    targets = verbalizer_ids(tokenizer, label_names, chat=chat_template is not None)
    if targets is None:
        return None
    pad_id = tokenizer.pad_token_id
    rows = prompt_rows(tokenizer, examples, template, label_names, max_length, chat_template)
    correct = 0
    for bucket in progress_bar(length_buckets(rows, batch_size), desc="zero-shot", unit="batch", leave=False,
                               disable=not dist.is_main()):
        batch = collate(bucket, pad_id)
        ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
        if hasattr(lm, "hidden_states"):
            hidden, head = lm.hidden_states(ids, attention_mask=mask), lm.logits
        else:
            hidden = lm.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state
            head = lm.get_output_embeddings()
        logp = torch.log_softmax(head(last_token_states(hidden, mask)).float(), dim=-1)
        scores = torch.stack([logp[:, ids].logsumexp(-1) for ids in targets], dim=-1)
        correct += int((scores.argmax(-1).cpu() == batch["labels"]).sum())
    return correct / len(rows)


# ----------------------------------------------------------------------------------------------- one model

def model_slug(path: str, taken: set[str]) -> str:
    """A short, unique folder name for a model (``model_name``, made safe for a path)."""
    base = re.sub(r"[^\w.-]+", "-", model_name(path) or "model").strip("-") or "model"
    slug, i = base, 2
    while slug in taken:
        slug, i = f"{base}-{i}", i + 1
    taken.add(slug)
    return slug


def _training_recipe(recipe: dict, n_buckets: int) -> dict:
    """Fill ``train.max_steps`` from ``classify.epochs`` (one step = one bucket per rank) and
    ``train.warmup_steps`` as 10 % of the steps, unless the recipe sets them."""
    section = dict(recipe["train"])
    steps_per_epoch = max(1, n_buckets // dist.world_size())
    if section.get("max_steps") is None:
        section["max_steps"] = max(1, math.ceil(float(recipe["classify"]["epochs"]) * steps_per_epoch))
    if section.get("warmup_steps") is None:
        section["warmup_steps"] = int(0.1 * int(section["max_steps"]))
    return {**recipe, "train": section}


def classify_one(model_path: str, data: ClassificationData, recipe: dict, out_dir: Path, resume: bool = False) -> dict:
    """Before / zero-shot / after accuracy and training time of one model; the classifier is saved in
    ``out_dir``, whose name is the model's name in the report (``run`` names it with ``model_slug``)."""
    d = from_dict(DataSection, recipe["data"], "data")
    c = from_dict(ClassifySection, recipe["classify"], "classify")
    lora = from_dict(LoraSection, recipe["lora"], "lora")
    torch.manual_seed(int(recipe["train"].get("seed", 1337)))      # the fresh head's initialisation
    loaded = load_classifier(model_path, data.num_labels, c.method, recipe["model"].get("backend", "auto"), lora)
    tok, model = loaded.tokenizer, loaded.classifier
    pad_id = tok.pad_token_id
    max_length = resolve_max_length(d.max_length, context_length(model.backbone.config))
    train_rows = encode_examples(tok, data.train, max_length, d.truncation)
    test_rows = encode_examples(tok, data.test, max_length, d.truncation)
    buckets = length_buckets(train_rows, c.batch_size)
    recipe = _training_recipe(recipe, len(buckets))
    cfg = train_config(recipe)
    start_run(out_dir, recipe)
    device = pick_device(cfg.device)
    model.to(device)
    before = accuracy(model, test_rows, pad_id, c.eval_batch_size, device) if c.measure_before else None
    zero_shot = None
    if loaded.is_decoder and c.zero_shot and not all(n.isdigit() for n in data.label_names):
        lm = load_model(loaded.model_dir, device=device)
        chat_template = load_template(loaded.model_dir.path) if c.chat else None
        zero_shot = zero_shot_accuracy(lm, ensure_pad_token(loaded.model_dir.tokenizer()), data.test, data.label_names,
                                       c.prompt, max_length, c.eval_batch_size, device, chat_template)
        del lm
    print(f"llmlab classify: {model_path}: "
          + ", ".join(f"{k} {v:.4f}" for k, v in (("before", before), ("zero-shot", zero_shot)) if v is not None),
          file=sys.stderr)

    sampler = BatchSampler(buckets, 1, seed=cfg.seed, shuffle=True, rank=dist.rank(),
                           world_size=dist.world_size(), collate=BucketCollate(pad_id))
    seen = {"examples": 0}

    def loss_fn(m, batch):
        logits = m(batch["input_ids"], batch["attention_mask"])
        loss = F.cross_entropy(logits.float(), batch["labels"])
        seen["examples"] += len(batch["labels"])
        correct = (logits.argmax(-1) == batch["labels"]).float().mean()
        return loss, int(batch["attention_mask"].sum()), {"train_accuracy": float(correct)}

    def eval_fn(m):
        return {"accuracy": accuracy(m, test_rows, pad_id, c.eval_batch_size, next(m.parameters()).device)}

    def save_fn(m, where):
        save_classifier(loaded, m, Path(where), data.label_names)

    # periodic evaluation only when asked for (train.eval_every): otherwise the final accuracy is measured after
    # training, so that the training time and examples/s count training alone
    periodic = eval_fn if cfg.eval_every > 0 else None
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)   # save_fn merges LoRA in place
    summary = train(model, loss_fn, sampler, cfg, out_dir, eval_fn=periodic, save_fn=save_fn if c.save_model else None,
                    resume=resume)
    after = summary["eval"].get("accuracy") if periodic else eval_fn(model)["accuracy"]
    result = {"model": model_path, "name": out_dir.name, "out": str(out_dir), "backend": loaded.backend,
              "parameters": count_parameters(model), "method": c.method,
              "trainable_parameters": trainable, "before": before, "zero_shot": zero_shot,
              "after": after, "train_seconds": summary["seconds"],
              "steps": summary["steps"], "train_examples": len(train_rows), "test_examples": len(test_rows),
              "examples_per_s": seen["examples"] / max(summary["seconds"], 1e-9)}
    (out_dir / "result.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


# ----------------------------------------------------------------------------------------------- report

def write_classify_report(results: list[dict], out_dir: Path, data: ClassificationData) -> None:
    """``report.md`` (one row per model) and ``accuracy.png`` (before / zero-shot / after bars per model)."""
    def pct(x):
        return "–" if x is None else f"{100 * x:.1f}%"

    lines = ["# Classification", "",
             f"train: {data.sources.get('train')} ({len(data.train)} examples), test: {data.sources.get('test')} "
             f"({len(data.test)} examples), classes: {', '.join(data.label_names)}", "",
             "| model | parameters | method | before | zero-shot | after | training time |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r['name']} | {r['parameters'] / 1e6:.1f}M | {r['method']} | {pct(r.get('before'))} "
                     f"| {pct(r['zero_shot'])} | {pct(r['after'])} | {r['train_seconds']:.0f} s |")
    (out_dir / "report.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    _plot(results, out_dir / "accuracy.png")


def _plot(results: list[dict], path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    series = [("before", "before (new head)"), ("zero_shot", "zero-shot prompt"), ("after", "after fine-tuning")]
    series = [(k, label) for k, label in series if any(r[k] is not None for r in results)]
    fig = Figure(figsize=(max(4.0, 1.6 * len(results) + 2), 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(series)
    for j, (key, label) in enumerate(series):
        xs = [i + (j - (len(series) - 1) / 2) * width for i in range(len(results))]
        ax.bar(xs, [100 * (r[key] or 0) for r in results], width, label=label)
    ax.set_xticks(range(len(results)), [r["name"] for r in results], fontsize=8)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


# ----------------------------------------------------------------------------------------------- entry points

def subsets(full: ClassificationData, d: DataSection) -> ClassificationData:
    """The balanced training and test subsets the recipe asks for: ``data.subset_seed`` draws the training one,
    ``data.test_subset_seed`` (default: the same seed) the test one."""
    test_seed = d.subset_seed if d.test_subset_seed is None else d.test_subset_seed
    return ClassificationData(balanced_subset(full.train, d.train_limit, d.subset_seed),
                              balanced_subset(full.test, d.test_limit, test_seed), full.label_names, full.sources)


def run(models, data_path, out_dir, recipe: dict | None = None, *, resume: bool = False) -> dict:
    """Fine-tune and evaluate each model of ``models`` (one or a list: folders, hub ids or .gguf files) on
    ``data_path``; ``recipe`` is laid over ``DEFAULTS``. Returns ``{"results": [per-model dicts], "report", "figure"}``.
    Each model's run (and its saved classifier) is ``out_dir/<model name>``."""
    models = [models] if isinstance(models, (str, Path)) else list(models)
    if not models:
        raise LLMLabError("classify: name at least one --model")
    recipe = deep_merge(DEFAULTS, recipe or {})
    d = from_dict(DataSection, recipe["data"], "data")
    full = load_classification(data_path, text_field=d.text_field, label_field=d.label_field,
                               label_names=d.label_names, test=d.test, clean=d.clean_html)
    subset = subsets(full, d)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    taken: set[str] = set()
    results = [classify_one(m, subset, recipe, out / model_slug(m, taken), resume) for m in models]
    if dist.rank() == 0:
        write_classify_report(results, out, subset)
    return {"results": results, "report": str(out / "report.md"), "figure": str(out / "accuracy.png")}


def register(subparsers) -> None:
    p = subparsers.add_parser("classify", help="fine-tune pretrained models as text classifiers (before/after)")
    p.add_argument("--model", action="append", required=True, help="model folder, hub name or .gguf (repeatable)")
    p.add_argument("--data", required=True, help="aclImdb folder, folder with train/test files, file, or dataset name")
    p.add_argument("--out", required=True, help="output folder (one run per model, report.md, accuracy.png)")
    p.add_argument("--method", choices=METHODS, default=None, help="full fine-tuning, LoRA, or a linear probe")
    p.add_argument("--train-limit", type=int, default=None, help="class-balanced subset of N training examples")
    p.add_argument("--test-limit", type=int, default=None, help="class-balanced subset of N test examples")
    p.add_argument("--resume", action="store_true", help="continue each model's run from its newest checkpoint")
    add_config_args(p)
    p.set_defaults(func=_command)


def _command(args) -> int:
    extra = [f"classify.method={args.method}"] if args.method else []
    extra += [f"data.train_limit={args.train_limit}"] if args.train_limit is not None else []
    extra += [f"data.test_limit={args.test_limit}"] if args.test_limit is not None else []
    recipe = resolve_recipe(DEFAULTS, args.config, args.sets + extra)
    summary = run(args.model, args.data, args.out, recipe, resume=args.resume)
    print((Path(summary["report"])).read_text(encoding="utf-8"))
    return 0
