"""Heads on a language model's final hidden states, and the models they make:

- ``SequenceClassifier``: logits (B, num_labels) from a pooled state (our encoder's [CLS], our decoder's last real
  token, or a ``transformers`` classifier's own pooling);
- ``RewardModel``: a scalar reward r(x, y) = w · h_last(x, y) [+ λ · mean log π(y | x)] (see ``llmlab rm``);
- ``PolicyWithValue``: PPO's policy and its value head V(s) = w · h_t + b on the same hidden states.

The last real token of a row is i_b = max{t : mask[b, t] = 1}, for left and right padding alike.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ..chat import encode_reply
from ..data.batching import pad
from ..errors import LLMLabError
from ..hub.folder import ModelDir
from ..hub.load import load_our_model, read_weights
from ..hub.save import save_model

SCORE_WEIGHT = "score.weight"
REWARD_CONFIG = "reward_config.json"


def last_token_states(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """h[b, i_b] with i_b = max{t : mask[b, t] = 1}, the last real token, for left or right padding; (B, d)."""
    t = torch.arange(hidden.shape[1], device=hidden.device)
    last = (t * attention_mask.to(t.dtype)).argmax(-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


class SequenceClassifier(nn.Module):
    """``forward(input_ids, attention_mask) -> logits (B, num_labels)`` around one of three backbones:
    our ``Encoder`` (pooled [CLS] → classifier), our ``Decoder`` (last real token → score), or a
    ``transformers`` ``*ForSequenceClassification`` model (its own pooling)."""

    def __init__(self, backbone: nn.Module, kind: str):
        super().__init__()
        self.backbone, self.kind = backbone, kind

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.kind == "encoder":
            return self.backbone.classify(input_ids, attention_mask=attention_mask)
        if self.kind == "decoder":
            hidden = self.backbone.hidden_states(input_ids, attention_mask=attention_mask)
            return self.backbone.score(last_token_states(hidden, attention_mask))
        return self.backbone(input_ids=input_ids, attention_mask=attention_mask).logits


def reply_batch(replies: list[tuple[list[int], list[int]]], pad_id: int) -> dict:
    """``encode_reply`` outputs as one right-padded batch: input_ids, attention_mask, reply_mask."""
    ids, attention = pad([r[0] for r in replies], pad_id)
    reply_mask, _ = pad([r[1] for r in replies], 0)
    return {"input_ids": ids, "attention_mask": attention, "reply_mask": reply_mask}


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
        last = last_token_states(hidden, attention_mask)
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


class PolicyWithValue(nn.Module):
    """The policy (our Decoder) and a value head, Linear(d, 1) starting at zero, on its final hidden states."""

    def __init__(self, policy: nn.Module):
        super().__init__()
        self.policy = policy
        self.value_head = nn.Linear(policy.config.d_model, 1)
        nn.init.zeros_(self.value_head.weight)
        nn.init.zeros_(self.value_head.bias)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                response_start: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, R, V) and values (B, R) at the positions that predict the response tokens
        ``input_ids[:, response_start:]``: position t − 1 predicts token t and holds the value of that state."""
        hidden = self.policy.hidden_states(input_ids, attention_mask=attention_mask)[:, response_start - 1:-1]
        return self.policy.logits(hidden), self.value_head(hidden).squeeze(-1).float()
