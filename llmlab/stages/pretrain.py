"""``llmlab pretrain``: text → tokenizer → token shards → a language model, written as a Hugging Face directory.

    llmlab pretrain --config shakespeare-char --out runs/sc
    llmlab pretrain --config NAME|PATH [--set key=value ...] --out DIR [--model DIR] [--resume]

(The shakespeare recipes read the built-in corpus ``data.path: tinyshakespeare``, downloaded once into
``$LLMLAB_CACHE/data/``; see ``data/sources.py``.)

The recipe has four sections: ``model:`` (a ``preset:`` name plus ``ModelConfig`` overrides; ``vocab_size`` and
the special-token ids come from the tokenizer, ``max_seq_len`` defaults to ``data.max_length``), ``data:``
(``DataConfig``), ``tokenizer:`` (``kind: char | bpe | path``) and ``train:`` (``TrainConfig``); ``loss:``
optionally sets ``chunk_size`` and ``mlm_probability``. The run directory ends up holding

    DIR/tokenizer/   the tokenizer (trained, or copied from tokenizer.path / --model)
    DIR/data/        token shards (reused when they exist for the same tokenizer and data)
    DIR/checkpoints/ resumable training state;  DIR/model/  the final model (Hugging Face layout)
    DIR/metrics.jsonl  DIR/loss.png  DIR/run.yaml

(A model with no Hugging Face equivalent, e.g. ``--set model.norm_position=post`` for a decoder, trains and
checkpoints as any other, but gets no ``DIR/model``: its weights stay in ``DIR/checkpoints``.)

The objective follows the architecture. A decoder learns the next token over packed rows (``x = row[:-1]``,
``y = row[1:]``):  L = −(1/N) Σ_t log p(y_t | x_≤t), through ``losses.chunked_lm_loss``: ``loss.chunk_size``
(512) tokens at a time through the LM head, each chunk's gradient computed at once, so the B·T·V logits never
exist whole (``loss.chunk_size=0``: ``losses.lm_loss`` on the full logits). An encoder
(``--set model.preset=bert``) learns masked tokens: 15% of the non-special positions are chosen, 80% of them
become ``<|mask|>``, 10% a random token, 10% stay (``losses.mlm_mask``), and  L = −(1/|M|) Σ_{t∈M} log p(x_t | x̃)
over the chosen set M; the model directory then loads as ``BertForMaskedLM``. Validation reports the loss and its
perplexity exp(L) over ``train.eval_batches`` fixed batches of the val split (for the encoder, with a fixed
masking seed, so the curve is comparable).

Distributed: the same command under ``torchrun`` trains with DDP (``--set train.parallel=fsdp`` for FSDP). Rank 0
trains the tokenizer and builds the shards while the other ranks wait at a barrier; each rank then draws its share
of every global batch. One machine, two processes:

    torchrun --standalone --nproc_per_node 2 -m llmlab.cli pretrain --config shakespeare-char --out runs/sc-ddp

Several machines (run on each node with its ``--node_rank``; ``DIR`` must be on a filesystem every node sees,
because only global rank 0 writes the tokenizer, the shards, the checkpoints and the model):

    torchrun --nnodes 2 --node_rank 0 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:29500 \\
        -m llmlab.cli pretrain --config NAME --set data.path=... --out /shared/runs/NAME
"""
from __future__ import annotations

import json
import math
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from ..chat import DEFAULT_TEMPLATE, TEMPLATES
from ..config import from_dict, whole_number
from ..data.shards import (INDEX_FILE, BatchSampler, PackedSequences, TokenShards, build_shards,
                           read_index, stack_pairs, tokenizer_fingerprint)
from ..data.sources import iter_documents, iter_documents_many
from ..errors import LLMLabError
from ..hub.folder import ModelDir
from ..hub.load import load_our_model
from ..hub.mapping import hf_layout_problem
from ..hub.save import save_model
from ..losses import chunked_lm_loss, lm_loss, mlm_mask
from ..model.config import ModelConfig, preset
from ..model.decoder import build_model
from ..tokenizer import load_tokenizer, save_tokenizer, special_ids, train_bpe, train_char
from ..train import dist
from ..train.checkpoint import list_checkpoints
from ..train.loop import train
from .common import add_config_args, deep_merge, resolve_max_length, resolve_recipe, start_run, train_config

TOKENIZER_KINDS = ("char", "bpe", "path")
SOURCE_FILE = "source.json"      # beside the shards' index.json: which data they were built from

DEFAULTS = {
    "model": {"preset": "llama"},
    "data": {"path": None, "text_field": "text", "max_length": None, "bos_aligned": False, "val_fraction": 0.1,
             "batch_size": 16},
    "tokenizer": {"kind": "bpe", "vocab_size": 4096, "path": None},
    "loss": {"chunk_size": 512, "mlm_probability": 0.15},
    "train": {"max_steps": 1000, "lr": 1e-3, "warmup_steps": 100, "eval_every": 250, "eval_batches": 20,
              "log_every": 50, "checkpoint_every": 500},
}


# --- the recipe sections ---------------------------------------------------------------------------------------

@dataclass
class DataConfig:
    """The ``data:`` section. ``path``: one or several files/folders (``iter_documents`` formats)."""
    path: str | list | None = None
    text_field: str = "text"
    max_length: int | None = None     # None: the model's context (a new model's: model.max_seq_len, else 256)
    bos_aligned: bool = False
    val_fraction: float = 0.1
    batch_size: int = 16

    def __post_init__(self):
        if (self.max_length is not None and self.max_length < 1) or self.batch_size < 1:
            raise LLMLabError(f"data.max_length ({self.max_length}) and data.batch_size ({self.batch_size}) must be ≥ 1")
        if not 0.0 < self.val_fraction < 1.0:
            raise LLMLabError(f"data.val_fraction = {self.val_fraction}: must be in (0, 1) (validation needs data)")

    def paths(self) -> list[str]:
        if not self.path:
            raise LLMLabError("data.path is not set: give the corpus with --set data.path=FILE_OR_FOLDER "
                              "(or a list: --set 'data.path=[a.txt, b.jsonl]')")
        paths = self.path if isinstance(self.path, list) else [self.path]
        return [str(p) for p in paths]


@dataclass
class TokenizerConfig:
    """The ``tokenizer:`` section: train a ``char`` or ``bpe`` tokenizer on the corpus, or load ``path``."""
    kind: str = "bpe"
    vocab_size: int = 4096
    path: str | None = None

    def __post_init__(self):
        if self.kind not in TOKENIZER_KINDS:
            raise LLMLabError(f"tokenizer.kind = {self.kind!r}; choose one of {', '.join(TOKENIZER_KINDS)}")
        if (self.kind == "path") != bool(self.path):
            raise LLMLabError("tokenizer.kind=path needs tokenizer.path=DIR, and tokenizer.path is only read with "
                              f"tokenizer.kind=path (got kind={self.kind!r}, path={self.path!r})")


@dataclass
class LossConfig:
    """The ``loss:`` section. ``chunk_size > 0``: the decoder's loss through ``chunked_lm_loss`` (0: ``lm_loss``)."""
    chunk_size: int = 512
    mlm_probability: float = 0.15

    def __post_init__(self):
        if self.chunk_size < 0 or not 0.0 < self.mlm_probability < 1.0:
            raise LLMLabError(f"loss.chunk_size must be ≥ 0 and loss.mlm_probability in (0, 1); got "
                              f"{self.chunk_size} and {self.mlm_probability}")


# --- objectives ------------------------------------------------------------------------------------------------
# The loss is computed inside forward(), so DDP and FSDP see one module whose output is the loss, and the chunked
# loss can read the hidden states and the lm_head weight of the model it wraps.

class CausalLM(nn.Module):
    """Next-token objective around a ``Decoder``: ``forward(x, y)`` → mean cross-entropy over y ≠ -100."""

    def __init__(self, lm: nn.Module, chunk_size: int = 512):
        super().__init__()
        self.lm, self.chunk_size = lm, chunk_size

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.chunk_size:
            return chunked_lm_loss(self.lm.hidden_states(x), self.lm.lm_head.weight, y, self.chunk_size,
                                   softcap=self.lm.config.logit_softcap)
        return lm_loss(self.lm(x), y)


class MaskedLM(nn.Module):
    """Masked-LM objective around an ``Encoder``: ``forward(x, y)`` masks x (``losses.mlm_mask``) and returns the
    cross-entropy on the chosen positions. Only the real tokens of a row are attended to and maskable: a packed
    row of n real tokens has n − 1 counted targets, so its padding starts at ``(y ≠ -100).sum() + 1``."""

    def __init__(self, lm: nn.Module, tokenizer, probability: float = 0.15):
        super().__init__()
        ids = special_ids(tokenizer)
        if ids["mask"] is None:
            raise LLMLabError("the encoder's masked-LM objective needs a tokenizer with a mask token (<|mask|>); "
                              "use tokenizer.kind=char or bpe, or a tokenizer that has one")
        self.lm, self.probability = lm, probability
        # the [CLS] pooler has no loss in masked-LM pre-training (BERT trained it with next-sentence prediction):
        # frozen at its initialisation, so that DDP does not wait for a gradient that never comes
        for p in lm.pooler.parameters():
            p.requires_grad_(False)
        self.mask_id = ids["mask"]
        self.special = sorted({i for i in ids.values() if i is not None})

    def forward(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        n_real = ((y != -100).sum(1, keepdim=True) + 1).clamp(max=x.shape[1])
        real = torch.arange(x.shape[1], device=x.device)[None, :] < n_real
        inputs, labels = mlm_mask(x, mask_token_id=self.mask_id, vocab_size=self.lm.config.vocab_size,
                                  special_ids=self.special, prob=self.probability, generator=generator)
        labels = labels.masked_fill(~real, -100)
        return lm_loss(self.lm(inputs, attention_mask=real.long()), labels)


def objective_for(model: nn.Module, tokenizer, loss: LossConfig) -> nn.Module:
    if model.config.arch == "encoder":
        return MaskedLM(model, tokenizer, loss.mlm_probability)
    return CausalLM(model, loss.chunk_size)


def loss_fn(objective: nn.Module, batch) -> tuple[torch.Tensor, int, dict]:
    """The loop's loss function: every input position is a processed token (for throughput)."""
    x, y = batch
    return objective(x, y), x.numel(), {}


def evaluation_rows(rows: PackedSequences, n: int) -> list[int]:
    """``n`` row indices spread evenly over the val split (all of them when it has fewer): a fixed set, so every
    evaluation of a run scores the same tokens."""
    if n >= len(rows):
        return list(range(len(rows)))
    return [int(i * len(rows) / n) for i in range(n)]


def validation_fn(rows: PackedSequences, batches: int, batch_size: int) -> Callable[[nn.Module], dict]:
    """``eval_fn`` for the loop: val loss = token-weighted mean loss over ``batches`` fixed batches, and
    val_ppl = exp(val loss). The encoder's masks are drawn from a generator seeded afresh at every call."""
    chosen = evaluation_rows(rows, batches * batch_size)

    def evaluate(objective: nn.Module) -> dict:
        device = next(objective.parameters()).device
        generator = torch.Generator(device=device).manual_seed(0)
        total, weight = 0.0, 0
        for start in range(0, len(chosen), batch_size):
            x, y = (t.to(device) for t in stack_pairs([rows[i] for i in chosen[start:start + batch_size]]))
            extra = {"generator": generator} if isinstance(objective, MaskedLM) else {}
            n = int((y != -100).sum())
            total += float(objective(x, y, **extra)) * n
            weight += n
        val_loss = total / max(weight, 1)
        return {"val_loss": val_loss, "val_ppl": math.exp(min(val_loss, 50.0))}

    return evaluate


# --- tokenizer, shards, model ----------------------------------------------------------------------------------

def check_sources(data: DataConfig) -> None:
    """Fail early, before any training, on a missing path or a source without a single document."""
    for source in data.paths():
        next(iter_documents(source, text_field=data.text_field))


def documents(data: DataConfig):
    return iter_documents_many(data.paths(), text_field=data.text_field)


def prepare_tokenizer(cfg: TokenizerConfig, data: DataConfig, out: Path, *, reuse: bool,
                      model_dir: ModelDir | None):
    """The run's tokenizer, saved to ``out/tokenizer``: the ``--model``'s, ``tokenizer.path``'s, the one already
    there (``reuse``, i.e. ``--resume``), or a new one trained on the corpus."""
    folder = out / "tokenizer"
    if reuse and (folder / "tokenizer.json").is_file():
        return load_tokenizer(folder)
    if model_dir:
        tokenizer = model_dir.tokenizer()
    elif cfg.kind == "path":
        tokenizer = load_tokenizer(cfg.path)
    elif cfg.kind == "char":
        tokenizer = train_char(documents(data))
    else:
        tokenizer = train_bpe(documents(data), cfg.vocab_size)
    if folder.exists():
        shutil.rmtree(folder)
    save_tokenizer(tokenizer, folder)
    return load_tokenizer(folder)


def _source_record(data: DataConfig) -> dict:
    paths = [str(Path(p).resolve()) if Path(p).exists() else p for p in data.paths()]
    return {"paths": paths, "text_field": data.text_field, "val_fraction": data.val_fraction}


def prepare_shards(data: DataConfig, tokenizer, out: Path) -> Path:
    """Token shards in ``out/data``; kept when they were built with the same tokenizer from the same sources."""
    folder = out / "data"
    source = _source_record(data)
    if (folder / INDEX_FILE).is_file() and (folder / SOURCE_FILE).is_file():
        same_tokenizer = read_index(folder)["tokenizer_hash"] == tokenizer_fingerprint(tokenizer)
        if same_tokenizer and json.loads((folder / SOURCE_FILE).read_text(encoding="utf-8")) == source:
            return folder
    build_shards(documents(data), tokenizer, folder, val_fraction=data.val_fraction)
    (folder / SOURCE_FILE).write_text(json.dumps(source, indent=2) + "\n", encoding="utf-8")
    return folder


def model_config(section: dict, tokenizer, max_length: int) -> ModelConfig:
    """``preset(section.preset, **overrides)`` with the vocabulary and special ids of ``tokenizer``."""
    section = dict(section or {})
    name = section.pop("preset", "llama")
    section.setdefault("max_seq_len", max_length)
    ids = special_ids(tokenizer)
    section.setdefault("bos_token_id", ids["bos"])
    section.setdefault("eos_token_id", ids["eos"])
    section.setdefault("pad_token_id", ids["pad"])
    vocab = section.setdefault("vocab_size", len(tokenizer))
    if vocab < len(tokenizer):
        raise LLMLabError(f"model.vocab_size = {vocab} is smaller than the tokenizer's {len(tokenizer)} tokens")
    return preset(name, **section)


def row_length(max_length: int | None, given: nn.Module | None, section: dict) -> int:
    """``data.max_length`` by the one rule (``resolve_max_length``) against the context of the model given, or of
    the new model when ``model.max_seq_len`` sets it; a new model without one takes its context from the rows."""
    if given is not None:
        return resolve_max_length(max_length, given.config.max_seq_len)
    if section.get("max_seq_len") is not None:
        return resolve_max_length(max_length, whole_number(section["max_seq_len"], "model.max_seq_len"))
    return max_length or ModelConfig.max_seq_len


def writes_model_dir(section: dict) -> bool:
    """Whether a new model of the recipe's ``model:`` section ends in ``out/model``: every architecture with a
    Hugging Face equivalent does; one without (a post-norm decoder) keeps its weights in the checkpoints only."""
    section = dict(section or {})
    try:
        cfg = preset(section.pop("preset", None) or "llama", **section)
    except (LLMLabError, TypeError, ValueError):
        return True                      # the model section's own error is raised where the model is built
    return hf_layout_problem(cfg) is None


def finished(out: Path, steps: int, model_dir: bool = True) -> bool:
    """A completed run: a checkpoint at ``steps`` or later and (``model_dir``) the final model directory."""
    ckpts = list_checkpoints(out)
    return bool(ckpts) and ckpts[-1][0] >= steps and (not model_dir or (out / "model" / "config.json").is_file())


def save_final(objective: nn.Module, out: Path, tokenizer) -> None:
    """The Hugging Face directory ``out/model``: weights, tokenizer, and (decoders) the ``llmlab`` chat template.
    A model with no Hugging Face equivalent is not written (its weights are in ``out/checkpoints``)."""
    problem = hf_layout_problem(objective.lm.config)
    if problem:
        print(f"pretrain: no model directory written ({problem}); the weights are in {out / 'checkpoints'}",
              file=sys.stderr)
        return
    template = TEMPLATES[DEFAULT_TEMPLATE] if isinstance(objective, CausalLM) else None
    save_model(objective.lm, out / "model", tokenizer=tokenizer, chat_template=template)


# --- the stage -------------------------------------------------------------------------------------------------

def run(model_dir, data_path, out_dir, recipe: dict | None = None, *, resume: bool = False,
        on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Pre-train a new model (``model_dir`` None; its ``model:`` section) or continue ``model_dir`` (a folder, hub id
    or .gguf) on ``data_path`` (one or several corpora; None: the recipe's ``data.path``); ``recipe`` is laid over
    ``DEFAULTS``. Returns the loop's summary (plus ``model_dir``, where the model was written)."""
    recipe = deep_merge(DEFAULTS, recipe or {})
    if data_path is not None:
        paths = [str(p) for p in data_path] if isinstance(data_path, (list, tuple)) else str(data_path)
        recipe = {**recipe, "data": {**recipe["data"], "path": paths}}
    data = from_dict(DataConfig, recipe.get("data"), "data")
    tok_cfg = from_dict(TokenizerConfig, recipe.get("tokenizer"), "tokenizer")
    loss_cfg = from_dict(LossConfig, recipe.get("loss"), "loss")
    cfg = train_config(recipe, compile_ok=True)
    out = Path(out_dir)
    rank, world, _, _ = dist.init_distributed(cfg.device)
    if resume and finished(out, cfg.max_steps, model_dir is not None or writes_model_dir(recipe.get("model"))):
        if rank == 0:
            print(f"pretrain: {out} already finished {cfg.max_steps} steps; nothing to do", file=sys.stderr)
        return {"steps": cfg.max_steps, "skipped": True, "model_dir": str(out / "model")}
    base = ModelDir(model_dir) if model_dir else None
    given = load_our_model(base) if base else None
    section = recipe.get("model") or {}
    data.max_length = row_length(data.max_length, given, section)
    check_sources(data)
    if rank == 0:
        start_run(out, {**recipe, **({"from_model": str(model_dir)} if model_dir else {})})
        tokenizer = prepare_tokenizer(tok_cfg, data, out, reuse=resume, model_dir=base)
        prepare_shards(data, tokenizer, out)
    dist.barrier()
    tokenizer = load_tokenizer(out / "tokenizer")

    torch.manual_seed(cfg.seed)                         # the same initial weights on every rank and every rerun
    model = given or build_model(model_config(section, tokenizer, data.max_length))
    if len(tokenizer) > model.config.vocab_size:
        raise LLMLabError(f"the tokenizer has {len(tokenizer)} tokens but the model only {model.config.vocab_size}")
    objective = objective_for(model, tokenizer, loss_cfg)

    shards = out / "data"
    train_rows = PackedSequences(TokenShards(shards, "train"), data.max_length, data.bos_aligned)
    val_rows = PackedSequences(TokenShards(shards, "val"), data.max_length, data.bos_aligned)
    sampler = BatchSampler(train_rows, data.batch_size, seed=cfg.seed, rank=rank, world_size=world)
    flops = model.flops_per_token(data.max_length) if hasattr(model, "flops_per_token") else None
    summary = train(objective, loss_fn, sampler, cfg, out, resume=resume, flops_per_token=flops, on_step=on_step,
                    eval_fn=validation_fn(val_rows, cfg.eval_batches, data.batch_size),
                    save_fn=lambda final, run_dir: save_final(final, run_dir, tokenizer))
    return {**summary, "model_dir": str(out / "model")}


def register(subparsers) -> None:

    p = subparsers.add_parser("pretrain", help="pre-train a language model (decoder) or a masked-LM encoder on text",
                              description="Train or load a tokenizer, build token shards and pre-train a model; "
                                          "the corpus comes from the recipe or --set data.path=PATH.")
    add_config_args(p)
    p.add_argument("--out", required=True, metavar="DIR", help="the run directory")
    p.add_argument("--data", nargs="+", default=None, metavar="PATH",
                   help="corpus files, folders or built-in names (sets data.path; default: the recipe's)")
    p.add_argument("--model", default=None, metavar="DIR",
                   help="continue pre-training this model (its tokenizer and config; the model: section is ignored)")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --out")
    p.set_defaults(func=_run_cli)


def _run_cli(args) -> int:
    recipe = resolve_recipe(DEFAULTS, args.config, args.sets)
    try:
        summary = run(args.model, args.data, args.out, recipe, resume=args.resume)
        main = dist.is_main()
    finally:
        dist.cleanup()
    if main and not summary.get("skipped"):
        val = summary.get("val_loss")
        shown = f", val loss {val:.4f}" if val is not None else ""
        print(f"pretrain: {summary['steps']} steps, {summary['tokens']:,} tokens in {summary['seconds']:.1f} s "
              f"({summary['tokens'] / max(summary['seconds'], 1e-9):,.0f} tokens/s), final loss "
              f"{summary['final_loss']:.4f}{shown}; model in {summary['model_dir']}")
    return 0
