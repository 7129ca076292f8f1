"""GCG, Greedy Coordinate Gradient (Zou et al. 2023, "Universal and Transferable Adversarial Attacks on Aligned
Language Models", Algorithm 1), with nanoGCG's defaults and features, on llmlab's own ``Decoder``.

The attack looks for an *attack string* x = x_1 … x_n of n tokens, put where ``{optim_str}`` stands in the
conversation (by default after the request), that makes the model begin its reply with a target y = y_1 … y_m
("Sure, here is ..."). The model reads

    [ before | x_1 … x_n | after | y_1 … y_m ]

(before: the rendered chat template up to ``{optim_str}``; after: the rest of the prompt, up to and including the
assistant's turn header), and the loss is the negative log-likelihood of the target,

    L(x) = −(1/m) Σ_i log p(y_i | before, x, after, y_<i)          (or mellowmax of the −logits, an option)

Algorithm 1 repeats T times (``num_steps``):

    1. gradient:  for every position i, G_i = ∇_{e_{x_i}} L(x) ∈ ℝ^V, the gradient with respect to the one-hot
                  vector of the token at i                                                    (``Objective.gradient``)
    2. top-k:     X_i = the k tokens with the most negative G_i: where a swap should lower L most (``topk``)
    3. sample B candidates (``search_width``): each copies x and puts, at ``n_replace`` random positions i, a
                  random token of X_i                                                         (``sample_candidates``)
    4. evaluate:  L(x̃_b) for every candidate: forward passes only                             (``Objective.losses``)
    5. replace:   x ← the candidate with the lowest loss

nanoGCG's additions, kept here with its defaults: non-ASCII and special tokens never enter X_i (``banned_tokens``);
candidates whose text does not encode back to the same tokens are dropped, since the string a user pastes is
what the model will read (``retokenisation_filter``); an attack buffer keeps the best ``buffer_size`` strings and
every step starts from the best (``AttackBuffer``; 0: plain GCG); early stop when the greedy reply is the target.
Here the attack also stops on *objective success*: a check on the greedy reply (e.g. the task world's vault code
appears in it, ``Judge.reveals_code``).

Exact speed-ups, each tested to give the losses of the plain computation (tests/test_gcg.py):

    (a) prefix cache: ``before`` is the same for every candidate, so its keys and values are computed once
        (``prefill``) and copied into the first rows of each candidate batch's KVCache; the model writes only
        after them, so the prefix is never changed;
    (b) only the m target positions need next-token logits: the LM head (V × d: 262k rows for Gemma 3) runs on m
        positions per candidate, not on the whole sequence, and a block of its rows at a time, each block reduced
        to what the loss needs before the next (``head_losses``);
    (c) the token gradient through the embeddings: e_{x_i} enters the model as Eᵀe_{x_i} (row x_i of the
        embedding matrix E, then times the model's embedding scale, √d for Gemma, inside the decoder), so
        G_i = E · ∂L/∂(Eᵀe_{x_i}): one backward pass to the n embedding rows and an (n × d)·(d × V) product;
    (d) candidates are evaluated in chunks of ``batch_size`` rows (memory); the losses do not depend on it;
    (e) a candidate that first differs from the current string at position j shares the tokens before j with it:
        their keys and values are computed once per step and copied, and each chunk of candidates (sorted by j)
        runs only from its smallest j on (with 4 chunks, about a third of the string's tokens are skipped).

Every step's state (suffix, buffer, losses, random generator) is written atomically to ``out/state.json``; running
again with the same ``out`` resumes and follows the same trajectory.
"""
from __future__ import annotations

import base64
import copy
import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .. import chat
from ..encoding import encode_rendered
from ..errors import LLMLabError
from ..files import write_text_atomic
from ..model.attention import KVCache
from ..model.config import context_length
from .behaviours import OPTIM_STR

# nanoGCG's characters for the random strings that fill an attack buffer at the start
INIT_CHARS = [".", ",", "!", "?", ";", ":", "(", ")", "[", "]", "{", "}", "@", "#", "$", "%", "&", "*",
              "w", "x", "y", "z"]
LOGITS_BUDGET = 512 * 2 ** 20      # batch_size None: as many candidates a chunk as 512 MB of float32 target logits
                                   # would hold (sized when the loss held them whole; head_losses holds one block)
SHARE_CHUNKS = 4                   # (e) candidates sorted by first changed position run in at least this many chunks
VOCAB_BLOCK = 4096                 # LM-head rows per product in ``head_losses``: a block's logits stay in the cache


@dataclass
class GCGConfig:
    """nanoGCG's settings and defaults (but ``early_stop``, on here, and ``seed``, 0 instead of unseeded)."""
    num_steps: int = 250
    optim_str_init: str = " ".join(["x"] * 20)   # 20 tokens for most tokenizers: "x", " x", " x", ...
    search_width: int = 512           # B: candidates per step
    topk: int = 256                   # k: tokens kept per position
    n_replace: int = 1                # positions changed per candidate
    buffer_size: int = 0              # 0: keep only the current string (Algorithm 1)
    use_mellowmax: bool = False
    mellowmax_alpha: float = 1.0
    early_stop: bool = True           # stop at the first success (exact target, or the objective check)
    allow_non_ascii: bool = False
    filter_ids: bool = True           # the retokenisation filter
    add_space_before_target: bool = False
    use_prefix_cache: bool = True
    batch_size: int | None = None     # candidates per forward pass; None: ``Objective.chunk_size``
    seed: int = 0
    reply_tokens: int = 32            # length of the greedy reply that the objective check reads

    def validate(self) -> None:
        for name in ("num_steps", "search_width", "topk", "n_replace", "reply_tokens"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise LLMLabError(f"GCG setting {name} must be a positive integer, got {value!r}")
        if not isinstance(self.buffer_size, int) or self.buffer_size < 0:
            raise LLMLabError(f"GCG setting buffer_size must be 0 or more, got {self.buffer_size!r}")
        if self.batch_size is not None and (not isinstance(self.batch_size, int) or self.batch_size < 1):
            raise LLMLabError(f"GCG setting batch_size must be a positive integer or None, got {self.batch_size!r}")
        if not self.mellowmax_alpha > 0:
            raise LLMLabError(f"GCG setting mellowmax_alpha must be positive, got {self.mellowmax_alpha!r}")
        if not isinstance(self.optim_str_init, str) or not self.optim_str_init.strip():
            raise LLMLabError("GCG setting optim_str_init must be a non-empty string")


# ------------------------------------------------------------------------------------------------- the prompt

@dataclass
class Prompt:
    """The token ids around the attack string: the model reads before + suffix + after, and should reply target."""
    before: list[int]
    after: list[int]
    target: list[int]
    text: str                         # the rendered prompt, with {optim_str} where the suffix goes
    # The spaces that end the text before the slot ("… vault code? {optim_str}"). A BPE tokenizer joins a space to
    # the word after it (" x"), so they are tokenised with the attack string: the ids optimised are those of
    # lead + string, and the model reads exactly the tokens of the text a user sends.
    lead: str = ""

    def ids(self, suffix: list[int]) -> list[int]:
        return self.before + list(suffix) + self.after

    def string_ids(self, tokenizer, string: str) -> list[int]:
        """The ids of an attack string in its slot (with the lead)."""
        return tokenizer.encode(self.lead + string, add_special_tokens=False)

    def string(self, tokenizer, ids) -> str:
        """The attack string that ``ids`` spell, as it goes in the slot (without the lead)."""
        text = decode(tokenizer, ids)
        return text[len(self.lead):] if text.startswith(self.lead) else text

    def sends(self, tokenizer, ids: list[int], text: str) -> bool:
        """Whether the rendered prompt with the candidate ``ids`` (decoded: ``text``, lead + string) in its slot
        encodes to ``before + ids + after``: the model is given, joins included, the tokens it was optimised on."""
        before, after = self.text.split(OPTIM_STR)
        before = before[:len(before) - len(self.lead)]
        return text.startswith(self.lead) and encode_rendered(tokenizer, before + text + after) == self.ids(ids)


def with_attack_slot(messages: list[dict], where: str = "GCG") -> list[dict]:
    """``messages`` as given when one of them holds ``{optim_str}``; else a copy whose last user turn ends with
    " {optim_str}" (the paper's suffix), e.g. for the task world's forbidden requests."""
    if any(OPTIM_STR in str(m.get("content", "")) for m in messages):
        return messages
    out = [dict(m) for m in messages]
    last = max((i for i, m in enumerate(out) if m.get("role") == "user"), default=None)
    if last is None:
        raise LLMLabError(f"{where}: the conversation has no user turn to put the attack string in")
    out[last]["content"] = f"{out[last]['content']} {OPTIM_STR}"
    return out


def fill(messages: list[dict], suffix: str) -> list[dict]:
    """``messages`` (holding ``{optim_str}``) with the attack string in its place."""
    return [{**m, "content": m["content"].replace(OPTIM_STR, suffix)} for m in messages]


def conversation(goal: str, system: str | None = None) -> list[dict]:
    """The messages for one request: the attack string goes where ``goal`` says ``{optim_str}``, else after the
    goal and a space (the paper's suffix; nanoGCG appends it without the space)."""
    content = goal if OPTIM_STR in goal else f"{goal} {OPTIM_STR}"
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": content}]


def build_prompt(tokenizer, template: str, messages: list[dict], target: str, *,
                 add_space_before_target: bool = False, where: str = "GCG") -> Prompt:
    """Render ``messages`` with the target's chat ``template`` (a built-in name or Jinja text) and split the prompt at
    ``{optim_str}``. Errors name ``where``: no or several ``{optim_str}``, a template that drops it, an empty target
    or one whose tokens do not decode back to it (the loss would teach a different string)."""
    chat.validate_messages(messages, where)
    count = sum(m["content"].count(OPTIM_STR) for m in messages)
    if count != 1:
        raise LLMLabError(f"{where}: the messages must hold {OPTIM_STR} exactly once (where the attack string "
                          f"goes), found it {count} times")
    text = chat.render(messages, chat.TEMPLATES.get(template, template), bos_token=tokenizer.bos_token or "",
                       eos_token=tokenizer.eos_token or "", add_generation_prompt=True)
    if text.count(OPTIM_STR) != 1:
        raise LLMLabError(f"{where}: the chat template renders {OPTIM_STR} {text.count(OPTIM_STR)} times, not "
                          "once: it drops or repeats the message that holds it; use another --template")
    before, after = text.split(OPTIM_STR)
    lead = before[len(before.rstrip(" ")):]
    target = " " + target if add_space_before_target else target
    if not target.strip():
        raise LLMLabError(f"{where}: field 'target' is empty")
    target_ids = tokenizer.encode(target, add_special_tokens=False)
    if decode(tokenizer, target_ids) != target:
        raise LLMLabError(f"{where}: field 'target' {target!r} does not survive the tokenizer: its tokens decode to "
                          f"{decode(tokenizer, target_ids)!r}; write it as the tokenizer would")
    return Prompt(encode_rendered(tokenizer, before[:len(before) - len(lead)]), encode_rendered(tokenizer, after),
                  target_ids, text, lead)


def decode(tokenizer, ids) -> str:
    return tokenizer.decode(list(ids), clean_up_tokenization_spaces=False)


def banned_tokens(tokenizer, vocab_size: int, allow_non_ascii: bool = False) -> torch.Tensor:
    """Token ids that never enter the attack string: special and added-special tokens, embedding rows with no
    token, and (unless ``allow_non_ascii``) every token whose text is not printable ASCII (nanoGCG's rule)."""
    n = min(vocab_size, len(tokenizer))
    banned = set(range(n, vocab_size)) | set(tokenizer.all_special_ids)
    banned |= {i for i, t in getattr(tokenizer, "added_tokens_decoder", {}).items() if t.special}
    if not allow_non_ascii:
        texts = tokenizer.batch_decode([[i] for i in range(n)], clean_up_tokenization_spaces=False)
        banned |= {i for i, s in enumerate(texts) if not (s.isascii() and s.isprintable())}
    return torch.tensor(sorted(i for i in banned if 0 <= i < vocab_size), dtype=torch.long)


# ------------------------------------------------------------------------------------------------- the loss

def mellowmax(t: torch.Tensor, alpha: float = 1.0, dim: int = -1) -> torch.Tensor:
    """mm_α(t) = (1/α) · log((1/n) Σ_i exp(α·t_i)): a smooth maximum, between the mean (α → 0) and the max
    (α → ∞)."""
    return (torch.logsumexp(alpha * t, dim=dim) - math.log(t.shape[dim])) / alpha


def target_loss(logits: torch.Tensor, target: torch.Tensor, mellowmax_alpha: float | None = None) -> torch.Tensor:
    """L for each row, from the logits z (B, m, V) at the m positions that predict y_1 … y_m: the mean
    cross-entropy −(1/m) Σ_i log softmax(z_i)[y_i] = (1/m) Σ_i (logsumexp(z_i) − z_i[y_i]) (one pass over each row
    of V logits, no log-softmax tensor); with ``mellowmax_alpha`` α, mm_α over i of −z_i[y_i] (it raises the weakest
    target logit rather than the average probability)."""
    logits = logits.float()
    chosen = logits.gather(-1, target.expand(logits.shape[0], -1)[..., None]).squeeze(-1)     # z_i[y_i]: (B, m)
    if mellowmax_alpha is None:
        return (torch.logsumexp(logits, dim=-1) - chosen).mean(-1)
    return mellowmax(-chosen, mellowmax_alpha)


@torch.no_grad()
def head_losses(model, hidden: torch.Tensor, target: torch.Tensor, mellowmax_alpha: float | None = None,
                block: int = VOCAB_BLOCK) -> tuple[torch.Tensor, torch.Tensor]:
    """``target_loss`` of the logits z = model.logits(h) at the m target positions of each row of ``hidden``
    (B, m, d), and whether each row's greedy choices are the target tokens, without ever holding the (B, m, V)
    logits. The LM head runs ``block`` vocabulary rows at a time, and each block k leaves per position only its
    maximum μ_k, its argmax and s_k = Σ_{v ∈ k} exp(z_v − μ_k), so that

        logsumexp(z) = μ + log Σ_k s_k · exp(μ_k − μ),    μ = max_k μ_k,

    and the target logit z_i[y_i] is one dot product. A block's logits stay in the CPU's cache instead of crossing
    memory four times (product, maximum, exponentials, argmax): at Gemma 3's 262k vocabulary the whole loss costs
    less than the plain product alone (README, GCG speed)."""
    weight, cap = model.lm_head.weight, model.config.logit_softcap
    b, m, d = hidden.shape
    h = hidden.reshape(b * m, d)
    columns = h.T.contiguous()          # z as W_k hᵀ (block × positions): 10–15% faster here than h W_kᵀ
    maxima, sums, argmaxes = [], [], []
    for start in range(0, weight.shape[0], block):
        z = (weight[start:start + block] @ columns).float()
        if cap is not None:
            z = cap * torch.tanh(z / cap)
        top, where = z.max(0)
        sums.append(z.sub_(top).exp_().sum(0))
        maxima.append(top)
        argmaxes.append(where + start)
    maxima, sums, argmaxes = torch.stack(maxima, 1), torch.stack(sums, 1), torch.stack(argmaxes, 1)
    top, best_block = maxima.max(1)                             # the first block holding the maximum: argmax's tie rule
    greedy = argmaxes.gather(1, best_block[:, None]).reshape(b, m)
    chosen = (hidden * weight[target]).sum(-1).float()         # z_i[y_i]: (B, m)
    if cap is not None:
        chosen = cap * torch.tanh(chosen / cap)
    if mellowmax_alpha is not None:
        losses = mellowmax(-chosen, mellowmax_alpha)
    else:
        lse = top + torch.log((sums * torch.exp(maxima - top[:, None])).sum(1))
        losses = (lse.reshape(b, m) - chosen).mean(-1)
    return losses, (greedy == target).all(-1)


@torch.no_grad()
def prefill(model, ids: torch.Tensor) -> KVCache:
    """(a) The keys and values of the prompt before the attack string, computed once (batch 1)."""
    cache = model.new_cache(1, max(1, len(ids)))
    if len(ids):
        model.hidden_states(ids[None], cache=cache)
    return cache


class Objective:
    """L(x) for one prompt and target: the losses of candidate strings and the token gradient, with the exact
    speed-ups (a)–(d). Counts the tokens it runs through the model and the candidates it evaluates."""

    def __init__(self, model, prompt: Prompt, config: GCGConfig):
        self.model, self.config = model, config
        device = model.embed.weight.device
        self.before, self.after, self.target = (torch.tensor(x, dtype=torch.long, device=device)
                                                for x in (prompt.before, prompt.after, prompt.target))
        self.alpha = config.mellowmax_alpha if config.use_mellowmax else None
        self.prefix = prefill(model, self.before) if config.use_prefix_cache and len(prompt.before) else None
        self.work: KVCache | None = None        # the candidate batches' cache, prefix rows filled once
        self.forward_tokens = 0
        self.candidate_evaluations = 0

    def tail(self, suffixes: torch.Tensor) -> torch.Tensor:
        """(B, n + a + m) ids after the prefix: each suffix, then after, then the target."""
        b = suffixes.shape[0]
        return torch.cat([suffixes, self.after.expand(b, -1), self.target.expand(b, -1)], dim=1)

    def prefix_cache(self, batch: int, length: int, fresh: bool = False) -> KVCache:
        """(a) A cache of ``batch`` rows whose first P positions hold the prefix's keys and values, rewound to P: the
        model writes the rest. The candidates' cache is allocated once and reused (its first P positions are never
        written again); ``fresh`` makes a new one (the gradient pass, whose writes carry autograd history)."""
        p = self.prefix.length
        if fresh or self.work is None or self.work.k[0].shape[0] < batch or self.work.max_len < length:
            cache = self.model.new_cache(batch, length)
            for layer in range(len(cache.k)):
                cache.k[layer][:, :, :p] = self.prefix.k[layer][:, :, :p]
                cache.v[layer][:, :, :p] = self.prefix.v[layer][:, :, :p]
            if fresh:
                cache.length = p
                return cache
            self.work = cache
        cache = copy.copy(self.work)                      # a view of the first ``batch`` rows: no copy
        cache.k = [t[:batch] for t in self.work.k]
        cache.v = [t[:batch] for t in self.work.v]
        cache.length = p
        return cache

    def target_hidden(self, tail: torch.Tensor | None = None, embeds: torch.Tensor | None = None,
                      shared: KVCache | None = None, skip: int = 0) -> torch.Tensor:
        """Final hidden states (B, m, d) at the positions that predict the target (where the LM head runs: (b)), for
        the ids ``tail`` (or the embeddings
        ``embeds``, before the embedding scale) that follow the prefix. (e) When the first ``skip`` tokens of every
        row are those of the string whose cache is ``shared``, their keys and values are copied from it and only
        ``tail[:, skip:]`` runs."""
        x = tail if embeds is None else embeds
        b, t = x.shape[:2]
        cache = None
        if self.prefix is not None:
            cache = self.prefix_cache(b, self.prefix.length + t, fresh=embeds is not None)
            if skip:
                p = self.prefix.length
                for layer in range(len(cache.k)):
                    cache.k[layer][:, :, p:p + skip] = shared.k[layer][:, :, p:p + skip]
                    cache.v[layer][:, :, p:p + skip] = shared.v[layer][:, :, p:p + skip]
                cache.length, tail = p + skip, tail[:, skip:]
        elif len(self.before):            # no prefix cache: the whole sequence, every time
            if embeds is None:
                tail = torch.cat([self.before.expand(b, -1), tail], dim=1)
            else:
                embeds = torch.cat([self.model.embed.weight.detach()[self.before].expand(b, -1, -1), embeds], dim=1)
        hidden = self.model.hidden_states(tail, embeds=embeds, cache=cache)
        self.forward_tokens += b * hidden.shape[1]
        return hidden[:, -len(self.target) - 1:-1]

    def release(self) -> None:
        """Free the candidates' cache (the next ``losses`` allocates it again), for a caller that holds many
        objectives and evaluates them one after another."""
        self.work = None

    def chunk_size(self, n: int) -> int:
        if self.config.batch_size is not None:
            return min(n, self.config.batch_size)
        per_candidate = 4 * len(self.target) * self.model.config.vocab_size
        return max(1, min(n, LOGITS_BUDGET // per_candidate))

    @torch.no_grad()
    def losses(self, suffixes: torch.Tensor, current: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(losses (N,), exact (N,)) of N candidate suffixes (N, n), in chunks (d); ``exact``: the greedy reply
        starts with the target (every target position's argmax is its token).

        (e) With ``current``, the string the candidates were made from, and the prefix cache: a candidate that
        first differs from it at position j shares its first j tokens, whose keys and values are computed once
        (``string_cache``). The candidates are sorted by j and cut into at least ``SHARE_CHUNKS`` chunks, each run
        from its smallest j."""
        n, order = suffixes.shape[1], torch.arange(len(suffixes))
        first, chunk, shared = torch.zeros(len(suffixes), dtype=torch.long), self.chunk_size(len(suffixes)), None
        if current is not None and self.prefix is not None:
            differs = (suffixes != current).cpu()
            first = torch.where(differs.any(1), differs.long().argmax(1), n).clamp(max=n - 1)   # j; ≥ 1 token runs
            order = first.argsort(stable=True)
            chunk = min(chunk, -(-len(suffixes) // SHARE_CHUNKS))
            shared = self.string_cache(current)
        losses, exact = [], []
        for start in range(0, len(suffixes), chunk):
            rows = order[start:start + chunk]
            hidden = self.target_hidden(self.tail(suffixes[rows.to(suffixes.device)]), shared=shared,
                                        skip=int(first[rows].min()))
            chunk_losses, chunk_exact = head_losses(self.model, hidden, self.target, self.alpha)
            losses.append(chunk_losses)
            exact.append(chunk_exact)
        self.candidate_evaluations += len(suffixes)
        back = order.argsort().to(suffixes.device)                      # undo the sort
        return torch.cat(losses)[back], torch.cat(exact)[back]

    def string_cache(self, suffix: torch.Tensor) -> KVCache:
        """(e) The keys and values of the prefix and then ``suffix`` (batch 1)."""
        cache = self.prefix_cache(1, self.prefix.length + len(suffix), fresh=True)
        self.model.hidden_states(suffix[None], cache=cache)
        self.forward_tokens += len(suffix)
        return cache

    def gradient(self, suffix: torch.Tensor) -> torch.Tensor:
        """(c) G (n, V): row i is ∂L/∂e_{x_i}, the gradient with respect to the one-hot vector of the i-th token.

        The model's input at i is Eᵀe_{x_i} = E[x_i] (scaled inside the decoder), so by the chain rule
        G_i = E · ∂L/∂E[x_i]: autograd to the n embedding rows, then one product with E."""
        weight = self.model.embed.weight.detach()
        rows = weight[suffix].clone().requires_grad_(True)               # (n, d): E[x_i]
        embeds = torch.cat([rows, weight[self.after], weight[self.target]])[None]
        with torch.enable_grad():
            loss = target_loss(self.model.logits(self.target_hidden(embeds=embeds)), self.target, self.alpha)[0]
            (grad,) = torch.autograd.grad(loss, [rows])
        return grad @ weight.T


# ------------------------------------------------------------------------------------------------- one step

def sample_candidates(suffix: torch.Tensor, grad: torch.Tensor, search_width: int, topk: int, n_replace: int,
                      banned: torch.Tensor | None, generator: torch.Generator) -> torch.Tensor:
    """Steps 2–3: (search_width, n) candidates, each ``suffix`` with ``n_replace`` random positions i set to a
    random one of the ``topk`` tokens of most negative G_i (random numbers drawn as nanoGCG draws them)."""
    n = len(suffix)
    grad = grad.clone()
    if banned is not None and len(banned):
        grad[:, banned.to(grad.device)] = float("inf")
    top = (-grad).topk(topk, dim=1).indices                                          # (n, k): X_i
    # drawn on the CPU generator whatever the device, so that a seed gives the same candidates everywhere
    positions = torch.argsort(torch.rand((search_width, n), generator=generator))[..., :n_replace].to(grad.device)
    choice = torch.randint(0, topk, (search_width, n_replace, 1), generator=generator).to(grad.device)
    tokens = torch.gather(top[positions], 2, choice).squeeze(2)                      # (B, n_replace)
    return suffix.repeat(search_width, 1).scatter_(1, positions, tokens)


def retokenisation_filter(candidates: torch.Tensor, tokenizer, prompts: tuple[Prompt, ...] = ()) -> torch.Tensor:
    """The candidates whose text encodes back to the same tokens, alone and inside each of ``prompts`` (where it
    will be sent: a space or word before the slot may merge with its first token), so that the string a user
    pastes is what the model was optimised on."""
    rows = candidates.tolist()
    texts = tokenizer.batch_decode(rows, clean_up_tokenization_spaces=False)
    encoded = tokenizer(texts, add_special_tokens=False)["input_ids"]
    keep = [i for i, (ids, again) in enumerate(zip(rows, encoded)) if ids == again]
    for prompt in prompts:
        keep = [i for i in keep if prompt.sends(tokenizer, rows[i], texts[i])]
    if not keep:
        raise LLMLabError("GCG: no candidate's text encodes back to its tokens; start from another "
                          "--init string (optim_str_init) or turn the retokenisation filter off")
    return candidates[keep]


class AttackBuffer:
    """The best ``size`` strings so far as (loss, ids), best first; size 0 holds only the latest (plain GCG)."""

    def __init__(self, size: int, entries: list | None = None):
        self.size, self.entries = size, [(float(loss), list(ids)) for loss, ids in entries or []]

    def add(self, loss: float, ids: list[int]) -> None:
        if self.size == 0:
            self.entries = [(loss, ids)]
            return
        if len(self.entries) < self.size:
            self.entries.append((loss, ids))
        else:
            self.entries[-1] = (loss, ids)
        self.entries.sort(key=lambda e: e[0])

    def best(self) -> tuple[float, list[int]]:
        return self.entries[0]

    def worst_loss(self) -> float:
        return self.entries[-1][0]


# ------------------------------------------------------------------------------------------------- the attack

@dataclass
class GCGResult:
    best_loss: float
    best_suffix: str                  # the string of lowest loss seen
    losses: list[float]               # per step, the loss of the step's chosen candidate
    suffixes: list[str]
    success: bool                     # exact target match or the objective check, at some step
    steps: int                        # steps run
    first_success_step: int | None    # 1-based
    success_suffix: str | None
    reply: str                        # the greedy reply to the final string (the successful one, else the best)
    forward_tokens: int               # tokens run through the model (the cached prefix counted once)
    candidate_evaluations: int
    wall_clock_s: float               # seconds of the steps (loading and set-up not counted), resumes included

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class GCG:
    """GCG against one model (our ``Decoder``) and its tokenizer, with the target's chat ``template`` (a built-in
    name or Jinja text; default: the tokenizer's own, else llmlab's)."""

    def __init__(self, model, tokenizer, config: GCGConfig | None = None, *, template: str | None = None):
        self.model, self.tokenizer, self.config = model.eval(), tokenizer, config or GCGConfig()
        self.config.validate()
        self.template = template or getattr(tokenizer, "chat_template", None) or chat.TEMPLATES[chat.DEFAULT_TEMPLATE]
        self.banned = banned_tokens(tokenizer, model.config.vocab_size, self.config.allow_non_ascii)
        self._engine = None

    def reply(self, prompt: Prompt, suffix: list[int], objective: Objective | None = None) -> str:
        """The model's greedy reply (``reply_tokens`` at most) to the prompt with ``suffix``."""
        from ..infer.engine import Engine, SamplingParams
        if self._engine is None:
            self._engine = Engine(self.model, self.tokenizer)
        params = chat.reply_params(SamplingParams(max_new_tokens=self.config.reply_tokens, temperature=0.0),
                                   self.template, self.tokenizer.eos_token)
        done = self._engine.generate([prompt.ids(suffix)], params)[0]
        if objective is not None:
            objective.forward_tokens += done.prompt_tokens + len(done.token_ids)
        return done.text

    def prompt(self, messages: str | list[dict], target: str, where: str = "GCG") -> Prompt:
        """The prompt around the attack string (``messages``, or a goal given as text), checked to leave room in the
        model's context for the initial string and the target."""
        messages = conversation(messages) if isinstance(messages, str) else messages
        prompt = build_prompt(self.tokenizer, self.template, messages, target,
                              add_space_before_target=self.config.add_space_before_target, where=where)
        length = len(prompt.ids(prompt.string_ids(self.tokenizer, self.config.optim_str_init))) + len(prompt.target)
        if length > context_length(self.model.config):
            raise LLMLabError(f"{where}: the prompt, attack string and target take {length} tokens, more than the "
                              f"model's context of {context_length(self.model.config)}")
        return prompt

    def run(self, messages: str | list[dict], target: str, *, out: str | Path | None = None,
            success: Callable[[str], bool] | None = None, on_step: Callable[[dict], None] | None = None,
            where: str = "GCG", penalty: Callable[[list[str]], torch.Tensor] | None = None,
            defended_success: Callable[[str], bool] | None = None) -> GCGResult:
        """Attack: find a string for ``{optim_str}`` in ``messages`` (or after a goal given as text) that makes the
        greedy reply start with ``target``, or pass ``success`` (a check of the greedy reply, run every step).
        With ``out``, every step is saved there and a second run resumes; ``on_step`` sees each step's record.

        Adaptive attacks on a defended model: ``penalty`` maps candidate attack strings to a tensor (N,) added to
        their losses when the step picks one (e.g. λ·max(0, s − τ), a perplexity filter's score s above its
        threshold τ), so the chosen string is the lowest of L(x) + penalty(x); ``defended_success`` checks a string
        against the defended model (e.g. the defense answers and the secret is in the answer) and replaces
        ``success`` as the step's objective check."""
        cfg, tokenizer = self.config, self.tokenizer
        prompt = self.prompt(messages, target, where)
        objective = Objective(self.model, prompt, cfg)
        generator = torch.Generator().manual_seed(cfg.seed)
        run_key = {"config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "num_steps"},
                   "prompt": [prompt.before, prompt.after, prompt.target]}
        state = _load_state(Path(out), run_key) if out is not None else None
        if state is None:
            buffer = self.init_buffer(objective, prompt, generator, penalty)
            state = {"key": run_key, "step": 0, "history": [], "seconds": 0.0, "stopped": False}
            if out is not None:
                _write_metrics(Path(out), [])
        else:
            buffer = AttackBuffer(cfg.buffer_size, state["buffer"])
            generator.set_state(torch.frombuffer(bytearray(base64.b64decode(state["rng"])), dtype=torch.uint8))
            objective.forward_tokens, objective.candidate_evaluations = state["forward_tokens"], state["evaluations"]
            _write_metrics(Path(out), state["history"])
        start, seconds = time.perf_counter(), state["seconds"]
        for step in range(state["step"], cfg.num_steps):
            if state["stopped"]:
                break
            suffix = torch.tensor(buffer.best()[1], dtype=torch.long, device=self.model.embed.weight.device)
            grad = objective.gradient(suffix)                                             # 1
            with torch.no_grad():
                candidates = sample_candidates(suffix, grad, cfg.search_width, cfg.topk, cfg.n_replace,  # 2, 3
                                               self.banned, generator)
                if cfg.filter_ids:
                    candidates = retokenisation_filter(candidates, tokenizer, (prompt,))
                losses, exact = objective.losses(candidates, current=suffix)              # 4
                if penalty is not None:
                    losses = losses + penalty([prompt.string(tokenizer, c) for c in candidates.tolist()]).to(losses)
            # 5: the lowest loss; a candidate whose greedy reply is already the target wins over lower-loss others
            pool = exact.nonzero().squeeze(1) if bool(exact.any()) else torch.arange(len(losses))
            best = int(pool[losses[pool].argmin()])
            loss, ids = float(losses[best]), candidates[best].tolist()
            if buffer.size == 0 or loss < buffer.worst_loss():
                buffer.add(loss, ids)
            if defended_success is not None:
                reply, objective_hit = None, bool(defended_success(prompt.string(tokenizer, ids)))
            else:
                reply = self.reply(prompt, ids, objective) if success is not None else None
                objective_hit = bool(success(reply)) if success is not None else None
            hit = bool(exact[best]) or bool(objective_hit)
            record = {"step": step + 1, "loss": loss, "best_loss": buffer.best()[0],
                      "suffix": prompt.string(tokenizer, ids),
                      "ids": ids, "candidates": len(candidates), "exact_match": bool(exact[best]),
                      "objective": objective_hit, "success": hit, "reply": reply,
                      "seconds": seconds + time.perf_counter() - start}
            state["history"].append(record)
            state.update(step=step + 1, stopped=hit and cfg.early_stop, seconds=record["seconds"],
                         buffer=buffer.entries, forward_tokens=objective.forward_tokens,
                         evaluations=objective.candidate_evaluations,
                         rng=rng_state(generator))
            record_step(out, state, record, on_step)
        result = self._result(prompt, objective, state, buffer)
        if out is not None:
            _write_result(Path(out), result)
        return result

    def init_buffer(self, objective: Objective, prompt: Prompt, generator: torch.Generator,
                    penalty: Callable[[list[str]], torch.Tensor] | None = None) -> AttackBuffer:
        """The buffer at the start: ``optim_str_init`` in ``prompt``'s slot, and (buffer_size > 1) random strings
        of ``INIT_CHARS`` tokens of the same length, each with its loss (as nanoGCG fills it)."""
        cfg, tokenizer = self.config, self.tokenizer
        init = prompt.string_ids(tokenizer, cfg.optim_str_init)
        if cfg.n_replace > len(init):
            raise LLMLabError(f"GCG setting n_replace ({cfg.n_replace}) exceeds the attack string's "
                              f"{len(init)} tokens")
        allowed = self.model.config.vocab_size - len(self.banned)
        if cfg.topk > allowed:
            raise LLMLabError(f"GCG setting topk ({cfg.topk}) exceeds the {allowed} tokens allowed in the attack "
                              "string")
        rows = torch.tensor([init], dtype=torch.long)
        if cfg.buffer_size > 1:
            chars = torch.tensor([t for ids in tokenizer(INIT_CHARS, add_special_tokens=False)["input_ids"]
                                  for t in ids])
            picks = torch.randint(0, len(chars), (cfg.buffer_size - 1, len(init)), generator=generator)
            random_rows = chars[picks]
            if cfg.filter_ids:          # only strings that can be sent as text (their first token may lack the lead)
                texts = tokenizer.batch_decode(random_rows.tolist(), clean_up_tokenization_spaces=False)
                random_rows = random_rows[[prompt.sends(tokenizer, r, t) for r, t in zip(random_rows.tolist(), texts)]]
            rows = torch.cat([rows, random_rows])
        losses, _ = objective.losses(rows.to(self.model.embed.weight.device))
        if penalty is not None:
            losses = losses + penalty([prompt.string(tokenizer, r) for r in rows.tolist()]).to(losses)
        buffer = AttackBuffer(cfg.buffer_size)
        for loss, ids in zip(losses.tolist(), rows.tolist()):
            buffer.add(loss, ids)
        return buffer

    def _result(self, prompt: Prompt, objective: Objective, state: dict, buffer: AttackBuffer) -> GCGResult:
        history = state["history"]
        if history:
            best = min(history, key=lambda r: r["loss"])
            best_loss, best_suffix = best["loss"], best["suffix"]
        else:
            best_loss, best_ids = buffer.best()
            best_suffix = prompt.string(self.tokenizer, best_ids)
        first = next((r for r in history if r["success"]), None)
        final = first["ids"] if first else prompt.string_ids(self.tokenizer, best_suffix)
        return GCGResult(best_loss=best_loss, best_suffix=best_suffix, losses=[r["loss"] for r in history],
                         suffixes=[r["suffix"] for r in history], success=first is not None, steps=len(history),
                         first_success_step=first["step"] if first else None,
                         success_suffix=first["suffix"] if first else None,
                         reply=self.reply(prompt, final), forward_tokens=objective.forward_tokens,
                         candidate_evaluations=objective.candidate_evaluations, wall_clock_s=state["seconds"])


# ------------------------------------------------------------------------------------------------- the out folder

def _load_state(out: Path, key: dict) -> dict | None:
    path = out / "state.json"
    if not path.is_file():
        return None
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LLMLabError(f"{path}: not valid JSON ({e.msg}); delete it to start the attack again") from None
    if state.get("key") != json.loads(json.dumps(key)):
        raise LLMLabError(f"{out} holds a GCG run with other settings or another prompt/target; use another --out "
                          "(only the number of steps may change when resuming)")
    return state


def rng_state(generator: torch.Generator) -> str:
    """The random generator's state as text for ``state.json`` (``set_state`` of its base64 bytes restores it)."""
    return base64.b64encode(generator.get_state().numpy().tobytes()).decode()


def record_step(out: str | Path | None, state: dict, record: dict, on_step: Callable[[dict], None] | None) -> None:
    """After a step: the state written atomically and the step's record appended to ``metrics.jsonl`` (with
    ``out``), and the record shown to ``on_step``."""
    if out is not None:
        _save_state(Path(out), state)
        with open(Path(out) / "metrics.jsonl", "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
    if on_step is not None:
        on_step(record)


def _save_state(out: Path, state: dict) -> None:
    """Atomically: a half-written state.json never replaces a whole one."""
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "state.json", json.dumps(state))


def _write_metrics(out: Path, history: list[dict]) -> None:
    """metrics.jsonl again from the saved state (a killed run may have logged a step its state does not hold)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in history), encoding="utf-8")


def _write_result(out: Path, result: GCGResult) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result.to_dict(), indent=2) + "\n", encoding="utf-8")
    if result.steps:
        from ..plots import plot_metrics
        plot_metrics(out / "metrics.jsonl", out / "loss.png", keys=("loss", "best_loss"), title="GCG loss")
