"""``llmlab rm``: a reward model trained on preference pairs with the Bradley–Terry loss.

The reward model is our decoder with a scalar head on the final hidden state of the last real token of
``prompt + reply + end-of-turn`` (the conversation rendered with the model's chat template):

    r(x, y) = w · h_last(x, y)  [+ λ · (1/|y|) Σ_{t ∈ y} log π(y_t | x, y_<t)],
    L = −mean log σ(r(x, y_chosen) − r(x, y_rejected) − m)

The head ``w`` starts at zero. With λ = ``rm.likelihood_weight`` = 0 (the default, as TRL's RewardTrainer) every
reward starts at 0 and the first loss is exactly log 2. With λ > 0 the reward also reads the mean log-likelihood
the network's own language-model head gives the reply's tokens (and its end-of-turn token), so training starts
from what the language model already knows: a small model that answers most of its facts right scores
correct against wrong facts by likelihood at 0.97, while a head-only reward trained on a few thousand pairs
stays near chance on facts it saw no pair about (the task world: 0.45). Chosen and rejected replies go through
the network in one forward pass (2B sequences, right-padded). Held-out pairs give the pairwise accuracy, the share
of pairs where r(chosen) > r(rejected).

The head is the decoder's ``score`` layer with ``num_labels = 1``, so the saved directory is a
``LlamaForSequenceClassification`` / ``GPT2ForSequenceClassification`` / ``Qwen3ForSequenceClassification`` folder
that ``transformers.AutoModelForSequenceClassification`` loads and scores identically when λ = 0 (it reads the last
token that is not the pad token, the same one as ours as long as pad is not the end-of-turn token). λ is stored in
``reward_config.json``; with λ > 0 the folder also keeps the language-model head, and the reward is that score plus
λ times the reply's mean log-probability under ``transformers.AutoModelForCausalLM`` loaded from the same folder.
"""
from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch
from torch import nn

from ..chat import encode_chat, last_turn_mask, reply_closing
from ..data.chat_data import iter_jsonl, load_pairs
from ..data.shards import BatchSampler, check_context
from ..errors import LLMLabError
from ..hub.folder import ModelDir
from ..hub.load import load_our_model, read_weights
from ..hub.save import save_model
from ..losses import bradley_terry_loss
from ..train import dist
from ..train.loop import train
from .common import deep_merge, disable_dropout, start_run, train_config
from .sft import add_stage_args, stage_recipe

DEFAULTS = {
    "data": {"eval_path": None, "eval_fraction": 0.1, "max_length": None},   # None: the model's context
    "rm": {"batch_size": 8, "margin": 0.0, "likelihood_weight": 0.0},
    "template": None,     # a built-in chat template name or a .jinja file; None: the model folder's own
    "train": {"max_steps": 300, "lr": 1e-5, "warmup_steps": 10, "weight_decay": 0.0, "log_every": 10,
              "eval_every": 100, "checkpoint_every": 100},
}
SCORE_WEIGHT = "score.weight"
REWARD_CONFIG = "reward_config.json"


# ------------------------------------------------------------------------------------------ encoding and batches

def encode_reply(tokenizer, template: str, prompt: list[dict], reply: str) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt`` + the assistant ``reply`` + its end-of-turn token, nothing after, and the mask of
    the reply's tokens (1 on the reply and its end-of-turn token).

    The conversation is rendered and tokenized as a whole (``encode_chat``), then cut after the last assistant
    token, so that the score is read at the end-of-turn token whatever the template writes after it. An empty
    reply (a policy may stop at once) is the generation prompt followed by what closes any final reply
    (``chat.reply_closing``: the end-of-turn string, or GLM-4's EOS).
    """
    if not reply.strip():
        ids, _ = encode_chat(tokenizer, prompt, template, add_generation_prompt=True, require_assistant=False)
        eot = tokenizer.encode(reply_closing(template, tokenizer.eos_token or ""), add_special_tokens=False)
        return ids + eot, [0] * len(ids) + [1] * len(eot)
    ids, mask = encode_chat(tokenizer, prompt + [{"role": "assistant", "content": reply}], template)
    end = max(i for i, m in enumerate(mask) if m) + 1
    return ids[:end], last_turn_mask(mask)[:end]


def right_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (len(rows), longest row): each row left-aligned, then ``pad_id``."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, :len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, :len(row)] = 1
    return ids, mask


def reply_batch(replies: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    """``encode_reply`` outputs as one right-padded batch: input_ids, attention_mask, reply_mask."""
    ids, attention = right_pad([r[0] for r in replies], pad_id)
    reply_mask, _ = right_pad([r[1] for r in replies], 0)
    return {"input_ids": ids, "attention_mask": attention, "reply_mask": reply_mask}


def pair_collate(pad_id: int):
    """Collate for encoded pairs: the chosen sequences, then the rejected ones, in one right-padded batch."""
    def collate(pairs: list[dict]) -> dict:
        batch = reply_batch([p["chosen"] for p in pairs] + [p["rejected"] for p in pairs], pad_id)
        return {**batch, "margin": torch.tensor([p["margin"] for p in pairs], dtype=torch.float32)}
    return collate


def encode_pairs(pairs: list[dict], tokenizer, template: str, max_length: int, margin: float,
                 where: str) -> list[dict]:
    """Encode each pair; pairs with a side longer than ``max_length`` tokens are dropped (with a warning).

    A pair's own ``margin`` field (a number) overrides the recipe's ``rm.margin``.
    """
    out = []
    for pair in pairs:
        chosen = encode_reply(tokenizer, template, pair["prompt"], pair["chosen"])
        rejected = encode_reply(tokenizer, template, pair["prompt"], pair["rejected"])
        if max(len(chosen[0]), len(rejected[0])) <= max_length:
            out.append({"chosen": chosen, "rejected": rejected, "margin": float(pair.get("margin", margin))})
    if not out:
        raise LLMLabError(f"{where}: every pair is longer than data.max_length={max_length} tokens")
    if len(out) < len(pairs):
        print(f"llmlab rm: {where}: skipped {len(pairs) - len(out)} of {len(pairs)} pairs longer than "
              f"data.max_length={max_length} tokens", file=sys.stderr)
    return out


def load_pair_records(path) -> list[dict]:
    """``chat_data.load_pairs``, plus a per-pair ``margin`` when every line of the file gives a number there."""
    pairs = load_pairs(path)
    margins = [(where, record.get("margin")) for where, record in iter_jsonl(path)]
    if all(m is None for _, m in margins):
        return pairs
    for where, m in margins:
        if not isinstance(m, (int, float)) or isinstance(m, bool):
            raise LLMLabError(f"{where}: field 'margin' must be a number on every pair (or on none), got {m!r}")
    if len(margins) != len(pairs):
        raise LLMLabError(f"{path}: per-pair margins need every line to be a usable pair")
    return [dict(p, margin=m) for p, (_, m) in zip(pairs, margins)]


# ------------------------------------------------------------------------------------------------ the model

def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the rightmost real token of each row (works for left and right padding)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(-1)


def check_likelihood_weight(value, where: str) -> float:
    """``value`` as a float when it is a finite number ≥ 0, else an error naming ``where``."""
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not 0 <= value < float("inf"):
        raise LLMLabError(f"{where} must be a number ≥ 0, got {value!r}")
    return float(value)


class RewardModel(nn.Module):
    """Our decoder (``backbone``) and a scalar ``value_head`` (the decoder's ``score`` layer, d → 1) read on the
    last real token, plus ``likelihood_weight`` λ times the reply's mean log-likelihood under the decoder's own
    language-model head. ``tokenizer`` and ``chat_template`` are kept for ``score``."""

    def __init__(self, backbone: nn.Module, tokenizer=None, chat_template: str | None = None,
                 likelihood_weight: float = 0.0):
        super().__init__()
        if getattr(backbone, "score", None) is None or backbone.config.num_labels != 1:
            raise LLMLabError("RewardModel needs a decoder built with num_labels=1 (a one-output score head)")
        self.backbone = backbone
        self.tokenizer, self.chat_template = tokenizer, chat_template
        self.likelihood_weight = check_likelihood_weight(likelihood_weight, "RewardModel: likelihood_weight")

    @property
    def value_head(self) -> nn.Linear:
        return self.backbone.score

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                reply_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Rewards (B,) in float32; ``reply_mask`` (1 on the reply's tokens) is needed when λ > 0."""
        hidden = self.backbone.hidden_states(input_ids, attention_mask=attention_mask)
        last = hidden[torch.arange(hidden.shape[0], device=hidden.device), last_token_index(attention_mask)]
        reward = self.value_head(last).squeeze(-1).float()
        if not self.likelihood_weight:
            return reward
        if reply_mask is None:
            raise LLMLabError("RewardModel with likelihood_weight > 0 needs the reply_mask of its inputs")
        return reward + self.likelihood_weight * self.mean_reply_logprob(hidden, input_ids, reply_mask)

    def mean_reply_logprob(self, hidden: torch.Tensor, input_ids: torch.Tensor,
                           reply_mask: torch.Tensor) -> torch.Tensor:
        """(1/|y|) Σ_{t ∈ y} log π(y_t | x, y_<t) per row, from the final hidden states: the language-model head
        runs only on the positions that predict a reply token (position t − 1 predicts token t)."""
        predicts = reply_mask[:, 1:].bool()
        logits = self.backbone.logits(hidden[:, :-1][predicts]).float()
        logp = torch.log_softmax(logits, dim=-1).gather(1, input_ids[:, 1:][predicts][:, None]).squeeze(1)
        rows = torch.arange(len(input_ids), device=input_ids.device)[:, None].expand_as(predicts)[predicts]
        total = torch.zeros(len(input_ids), device=logp.device).index_add_(0, rows, logp)
        return total / predicts.sum(1).clamp_min(1)

    def save(self, folder) -> Path:
        """The Hugging Face folder (with the language-model head when λ > 0) and ``reward_config.json``."""
        config = json.dumps({"likelihood_weight": self.likelihood_weight}, indent=2) + "\n"
        return save_model(self.backbone, folder, self.tokenizer, chat_template=self.chat_template,
                              keep_lm_head=self.likelihood_weight > 0, extra_files={REWARD_CONFIG: config})

    @classmethod
    def from_language_model(cls, path, chat_template: str | None = None,
                            likelihood_weight: float = 0.0) -> "RewardModel":
        """A reward model to train, from a language model (a zero-initialised head) or a reward-model folder
        (its head kept)."""
        model = ModelDir.of(path)
        backbone = load_our_model(model, num_labels=1)
        if backbone.config.arch != "decoder":
            raise LLMLabError(f"{model.path} is an encoder; a reward model needs a decoder (causal LM)")
        if SCORE_WEIGHT not in stored_weight_names(model.path):
            nn.init.zeros_(backbone.score.weight)
        return cls(backbone, _tokenizer(model), model.template(chat_template), likelihood_weight)

    @classmethod
    def load(cls, path, device="cpu") -> "RewardModel":
        """A trained reward model: a folder (or the run directory of ``llmlab rm`` holding it in ``model/``) whose
        config is a one-label ``*ForSequenceClassification`` and whose weights hold the ``score`` head."""
        folder = Path(path)
        if not folder.is_dir():
            raise LLMLabError(f"reward model directory not found: {folder}")
        if not (folder / "config.json").is_file() and (folder / "model" / "config.json").is_file():
            folder = folder / "model"          # the run directory of `llmlab rm`
        model = ModelDir(folder)
        config = model.raw_config
        archs = config.get("architectures") or []
        # transformers writes id2label unless it has its default of two labels
        labels = len(config["id2label"]) if config.get("id2label") else config.get("num_labels", 2)
        stored = stored_weight_names(folder)
        if not any(a.endswith("ForSequenceClassification") for a in archs) or SCORE_WEIGHT not in stored:
            raise LLMLabError(f"{folder} has no reward head (config architectures {archs}, no '{SCORE_WEIGHT}' "
                              "weight): it is not a reward model; train one with `llmlab rm`")
        if labels != 1:
            raise LLMLabError(f"{folder}/config.json: a reward model has one output, this one has num_labels={labels}")
        weight = 0.0
        if (folder / REWARD_CONFIG).is_file():
            try:
                weight = json.loads((folder / REWARD_CONFIG).read_text(encoding="utf-8")).get("likelihood_weight", 0.0)
            except (ValueError, AttributeError) as e:
                raise LLMLabError(f"{folder / REWARD_CONFIG}: not a JSON object ({e})") from None
            weight = check_likelihood_weight(weight, f"{folder / REWARD_CONFIG}: likelihood_weight")
        backbone = load_our_model(model)
        if weight and not backbone.config.tie_embeddings and "lm_head.weight" not in stored:
            raise LLMLabError(f"{folder}: {REWARD_CONFIG} sets likelihood_weight={weight} but the folder has no "
                              "language-model head (lm_head.weight) to compute the likelihood with")
        return cls(backbone, _tokenizer(model), model.template(), weight).to(device).eval()

    @torch.no_grad()
    def score(self, prompts: list[list[dict]], responses: list[str], batch_size: int = 16) -> list[float]:
        """The reward of each (prompt messages, assistant reply) pair. A pair longer than the model's context is
        scored on its first ``max_seq_len`` tokens (the prompt and the start of the reply)."""
        if self.tokenizer is None or self.chat_template is None:
            raise LLMLabError("RewardModel.score needs the tokenizer and chat template (use RewardModel.load)")
        if len(prompts) != len(responses):
            raise LLMLabError(f"score: {len(prompts)} prompts but {len(responses)} responses")
        device = next(self.parameters()).device
        context = self.backbone.config.max_seq_len
        rows = [tuple(part[:context] for part in encode_reply(self.tokenizer, self.chat_template, p, r))
                for p, r in zip(prompts, responses)]
        scores = []
        for i in range(0, len(rows), batch_size):
            batch = reply_batch(rows[i:i + batch_size], self.tokenizer.pad_token_id)
            scores += self(**{k: v.to(device) for k, v in batch.items()}).tolist()
        return scores


def stored_weight_names(folder: Path) -> set[str]:
    """The tensor names a model folder stores (read from the safetensors headers, not the data)."""
    from safetensors import safe_open
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return set(json.loads(index.read_text())["weight_map"])
    if (folder / "model.safetensors").is_file():
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            return set(f.keys())
    return set(read_weights(folder))


def _tokenizer(model: ModelDir):
    tokenizer = model.tokenizer()
    if tokenizer.pad_token_id is None:
        raise LLMLabError(f"{model.path}: the tokenizer has no pad token (see llmlab.tokenizer.ensure_pad_token)")
    return tokenizer


# ------------------------------------------------------------------------------------------------ training

def pair_loss(model, batch: dict) -> tuple[torch.Tensor, int, dict]:
    """Bradley–Terry loss of one batch (chosen rows first, then rejected), with accuracy and reward stats."""
    rewards = model(batch["input_ids"], batch["attention_mask"], batch["reply_mask"])
    chosen, rejected = rewards.chunk(2)
    loss = bradley_terry_loss(chosen, rejected, batch["margin"])
    with torch.no_grad():
        metrics = {"accuracy": (chosen > rejected).float().mean().item(), "reward_chosen": chosen.mean().item(),
                   "reward_rejected": rejected.mean().item(), "reward_margin": (chosen - rejected).mean().item()}
    return loss, int(batch["attention_mask"].sum()), metrics


def pairwise_eval(model: RewardModel, pairs: list[dict], pad_id: int, batch_size: int) -> dict:
    """Loss and pairwise accuracy over every held-out pair."""
    device = next(model.parameters()).device
    collate = pair_collate(pad_id)
    losses, correct = [], 0
    for i in range(0, len(pairs), batch_size):
        chunk = pairs[i:i + batch_size]
        batch = {k: v.to(device) for k, v in collate(chunk).items()}
        loss, _, metrics = pair_loss(model, batch)
        losses.append(loss.item() * len(chunk))
        correct += metrics["accuracy"] * len(chunk)
    return {"val_loss": sum(losses) / len(pairs), "val_accuracy": correct / len(pairs)}


def split_pairs(pairs: list[dict], recipe: dict, seed: int) -> tuple[list[dict], list[dict]]:
    """(train, eval): eval from ``data.eval_path``, else a deterministic ``data.eval_fraction`` of the pairs."""
    data = recipe["data"]
    if data.get("eval_path"):
        return pairs, load_pair_records(data["eval_path"])
    fraction = float(data.get("eval_fraction") or 0.0)
    if not 0 <= fraction < 1:
        raise LLMLabError(f"data.eval_fraction={fraction}: must be in [0, 1)")
    n_eval = round(len(pairs) * fraction)
    if fraction and n_eval == 0:
        n_eval = 1
    if n_eval >= len(pairs):
        raise LLMLabError(f"data.eval_fraction={fraction} leaves no training pairs ({len(pairs)} pairs); lower it "
                          "or give data.eval_path")
    order = list(range(len(pairs)))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [p for i, p in enumerate(pairs) if i not in held], [pairs[i] for i in sorted(held)]


def run_rm(model_dir, data_path, out_dir, recipe: dict | None = None, *, resume: bool = False) -> dict:
    """Train a reward model from ``model_dir`` (a language-model folder) on the pairs in ``data_path``.

    ``recipe`` (sections ``data``, ``rm``, ``train``, key ``template``) is laid over ``DEFAULTS``. Writes the
    reward model to ``out_dir/model`` beside the run files; returns the training summary, whose
    ``eval["val_accuracy"]`` is the held-out pairwise accuracy.
    """
    recipe = deep_merge(DEFAULTS, recipe or {})
    cfg = train_config(recipe)
    rm_cfg = recipe["rm"]
    rm = RewardModel.from_language_model(model_dir, recipe.get("template"),
                                         check_likelihood_weight(rm_cfg.get("likelihood_weight", 0.0),
                                                                 "rm.likelihood_weight"))
    disable_dropout(rm)
    tokenizer, template = rm.tokenizer, rm.chat_template
    context = rm.backbone.config.max_seq_len
    max_length = int(recipe["data"].get("max_length") or context)
    check_context(max_length, context)
    margin = float(rm_cfg.get("margin") or 0.0)
    train_pairs, eval_pairs = split_pairs(load_pair_records(data_path), recipe, cfg.seed)
    train_rows = encode_pairs(train_pairs, tokenizer, template, max_length, margin, str(data_path))
    eval_where = recipe["data"].get("eval_path") or f"{data_path} (the data.eval_fraction held out)"
    eval_rows = encode_pairs(eval_pairs, tokenizer, template, max_length, margin, str(eval_where)) if eval_pairs else []
    out = start_run(out_dir, recipe)
    rank, world, _, _ = dist.init_distributed(cfg.device)
    batch_size = int(rm_cfg["batch_size"])
    sampler = BatchSampler(train_rows, batch_size, seed=cfg.seed, rank=rank, world_size=world,
                           collate=pair_collate(tokenizer.pad_token_id))

    def eval_fn(m):
        return pairwise_eval(m, eval_rows, tokenizer.pad_token_id, batch_size) if eval_rows else {}

    def save_fn(m, run_dir):
        m.save(Path(run_dir) / "model")

    return train(rm, pair_loss, sampler, cfg, out, eval_fn=eval_fn, save_fn=save_fn, resume=resume,
                 flops_per_token=rm.backbone.flops_per_token(max_length))


# ------------------------------------------------------------------------------------------------ CLI

def register(subparsers) -> None:
    p = subparsers.add_parser("rm", help="train a reward model on preference pairs (Bradley–Terry)",
                              description="Train a scalar reward head (and the network under it) on chosen/rejected "
                                          "pairs; --data is a .jsonl of prompt/chosen/rejected or HH-RLHF pairs.")
    add_stage_args(p)
    p.set_defaults(func=_command)


def _command(args) -> int:
    summary = run_rm(args.model, args.data, args.out, stage_recipe(args, DEFAULTS), resume=args.resume)
    accuracy = summary["eval"].get("val_accuracy")
    shown = f", held-out pairwise accuracy {accuracy:.3f}" if accuracy is not None else ""
    print(f"rm: {summary['steps']} steps, final loss {summary['final_loss']:.4f}{shown}; "
          f"reward model in {Path(args.out) / 'model'}")
    return 0
