"""The generation engine: prefill + decode with a KV cache, beside the model rather than inside it.

    prefill:  run the (left-padded) prompts once, filling the cache, and take the last position's logits;
    decode:   feed one new token per sequence, attending to the cache, until every sequence has stopped.

Each step turns logits into the next token with, in this order: repetition penalty (a logit ℓ of a token seen
before becomes ℓ/p if ℓ > 0 else ℓ·p), temperature (ℓ/T; T = 0 means greedy argmax), top-k (keep the k largest),
top-p (keep the smallest set whose probabilities sum to ≥ p), then one draw from the softmax. A sequence stops at an
end-of-sequence token, a stop string, or ``max_new_tokens``.

The engine drives our ``Decoder`` and any ``transformers`` causal LM through two small adapters with the same
two methods.
"""
from __future__ import annotations

import copy
import inspect
from dataclasses import dataclass, field
from typing import Iterator

import torch

from ..data.batching import pad
from ..encoding import encode_text
from ..errors import LLMLabError
from ..hub.folder import ModelDir
from ..model.config import context_length
from .quant import MODES as QUANT_MODES
from .quant import quantize as quantize_weights
from .speculative import speculative_greedy

SPECULATIVE_TOKENS = 16     # longest draft of speculative greedy decoding (bench/generate.py: against 0)


@dataclass
class SamplingParams:
    max_new_tokens: int = 128
    temperature: float = 1.0          # 0: greedy
    top_k: int = 0                    # 0: off
    top_p: float = 1.0                # 1: off
    repetition_penalty: float = 1.0   # 1: off
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    lstrip: bool = False              # drop whitespace at the start of the text (chat replies, see chat.py)

    def validate(self) -> None:
        if self.max_new_tokens < 0:
            raise LLMLabError(f"max_new_tokens must be ≥ 0, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise LLMLabError(f"temperature must be ≥ 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise LLMLabError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise LLMLabError(f"top_k must be ≥ 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise LLMLabError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


@dataclass
class Completion:
    text: str
    token_ids: list[int]
    prompt_tokens: int
    finish_reason: str                # "stop" (EOS or stop string) or "length"


# ----------------------------------------------------------------------------------------------- adapters

class GreedyHead:
    """Exact greedy choices reading a quarter of the LM head's bytes (batch-1 decoding is bound by the bytes it
    reads, and the head is most of them: 60% of Gemma 3 270M's).

    The logits ℓ = W h are first computed from an int8 copy of W, one scale per row, W_r = s_r q_r + E_r (s_r a
    bfloat16 number, q_r ∈ [−127, 127]^d, E_r the rounding error), by torch's int8 kernel with h rounded to
    bfloat16 (relative u = 2⁻⁸), float32 accumulation and a bfloat16 output. By Cauchy–Schwarz each approximate
    logit ℓ̃_r is within

        b_r = ‖h‖₂ (‖E_r‖₂ + (u + (d + 8)·2⁻²⁴) s_r ‖q_r‖₂) + 2u |ℓ̃_r|      (weights, h, accumulation, output)

    of the exact one. Only a row r with ℓ̃_r + b_r ≥ max_s (ℓ̃_s − b_s) can hold the maximum; those few candidates
    are recomputed in float32 and every other logit is −∞, so the argmax is float32's own (a hidden state with more
    than 1/64 of the rows as candidates, as after a random prompt, takes the whole float32 head). The int8 kernel costs
    about the same for one or two hidden states (four cost 1.6×), which speculative decoding's checking pass uses
    (``OurLM.greedy_after``). Argmax only: sampling or a repetition penalty needs every logit.
    """

    U = 2.0 ** -8        # bfloat16's unit roundoff
    CHUNK_ROWS = 4096    # rows quantised at a time: cache-sized pieces make it 3× faster than the whole matrix

    def __init__(self, weight: torch.Tensor):
        self.weight = weight
        rows, d = weight.shape
        self.qweight = torch.empty(rows, d, dtype=torch.int8, device=weight.device)
        self.scale = torch.empty(rows, dtype=torch.bfloat16, device=weight.device)
        self.row_bound = torch.empty(rows, device=weight.device)
        slack = self.U + (d + 8) * 2.0 ** -24
        for start in range(0, rows, self.CHUNK_ROWS):
            w = weight[start:start + self.CHUNK_ROWS].detach().float()
            scale = (w.abs().amax(1) / 127).clamp_min_(1e-30).to(torch.bfloat16)
            s = scale.float()[:, None]
            q = torch.div(w, s).round_().clamp_(-127, 127)
            self.qweight[start:start + len(w)] = q
            self.scale[start:start + len(w)] = scale
            q_norm = torch.linalg.vector_norm(q, dim=1) * s[:, 0]
            error_norm = torch.linalg.vector_norm(q.mul_(s).sub_(w), dim=1)    # ‖E_r‖₂: s q is exact in float32
            self.row_bound[start:start + len(w)] = error_norm * (1 + 1e-3) + slack * q_norm   # 1e-3: the norm's rounding

    def candidates(self, hidden: torch.Tensor) -> list[torch.Tensor]:
        """For each hidden state of ``hidden`` (M, d), the rows that may hold its largest logit."""
        approx = torch._weight_int8pack_mm(hidden.to(torch.bfloat16), self.qweight, self.scale).float()
        bound = hidden.float().norm(dim=1, keepdim=True) * self.row_bound + 2 * self.U * approx.abs()
        floor = (approx - bound).amax(1, keepdim=True)
        return [(row >= f).nonzero().squeeze(1) for row, f in zip(approx + bound, floor)]

    def exact(self, hidden: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """float32 logits of one hidden state (d,) at ``rows``."""
        if len(rows) > len(self.weight) // 64:      # gathering that many rows costs more than the whole product
            return (self.weight @ hidden)[rows]
        return self.weight[rows] @ hidden

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        """(1, V) logits of one hidden state (1, d): exact at the candidates, −∞ elsewhere."""
        rows = self.candidates(hidden)[0]
        logits = torch.full((1, self.weight.shape[0]), float("-inf"), dtype=hidden.dtype, device=hidden.device)
        logits[0, rows] = self.exact(hidden[0], rows)
        return logits

    def argmax(self, hidden: torch.Tensor) -> list[int]:
        """float32's greedy choice for each hidden state of ``hidden`` (M, d)."""
        return [int(rows[self.exact(h, rows).argmax()]) for h, rows in zip(hidden, self.candidates(hidden))]


class OurLM:
    """Adapter for llmlab's Decoder: preallocated KV cache, explicit padding mask.

    ``decode_model`` (default: the same model) may be a bfloat16 or int8 copy: prefill runs in the prefill model's
    precision, then the cache is cast to the decode model's. Greedy batch-1 steps of a float32 model go through a
    ``GreedyHead`` on the CPU.
    """

    def __init__(self, model, decode_model=None, decode_dtype=None):
        self.model, self.decode_model = model, decode_model or model
        self.decode_dtype = decode_dtype
        self.context = model.config.max_seq_len
        self.cache = None
        self.greedy_head = None

    def prefill(self, ids: torch.Tensor, mask: torch.Tensor, max_len: int) -> torch.Tensor:
        self.cache = self.model.new_cache(ids.shape[0], max_len)
        hidden = self.model.hidden_states(ids, attention_mask=None if bool(mask.all()) else mask, cache=self.cache)
        logits = self.model.logits(hidden[:, -1])           # only the last position's logits are needed
        if self.decode_dtype is not None:
            self.cache.to(self.decode_dtype)
        return logits

    def decode(self, tokens: torch.Tensor, mask: torch.Tensor | None, greedy: bool = False) -> torch.Tensor:
        """Next-token logits (B, V) after feeding ``tokens`` (B,); ``greedy``: only their argmax will be used.
        ``mask``: the padding mask so far, None when no row is padded."""
        model = self.decode_model
        hidden = model.hidden_states(tokens[:, None], attention_mask=None if mask is None or bool(mask.all()) else mask,
                                     cache=self.cache)[:, -1]
        head = self._greedy_head() if greedy and len(tokens) == 1 else None
        return model.logits(hidden) if head is None else head(hidden)

    def _greedy_head(self) -> GreedyHead | None:
        """The decode model's GreedyHead, built at first use; None for a head that is not float32 (a bfloat16 or
        quantised copy computes its own logits as cheaply) or not on the CPU (its int8 product is torch's CPU
        kernel; on a GPU the float32 head runs as before). A logit soft-cap is monotonic: it cannot move the argmax, so
        the head's raw logits serve."""
        weight = getattr(self.decode_model.lm_head, "weight", None)     # None: a quantised head
        if weight is None or weight.dtype != torch.float32 or weight.device.type != "cpu":
            return None
        if self.greedy_head is None:
            self.greedy_head = GreedyHead(weight)
        return self.greedy_head

    # batch-1 greedy steps for speculative decoding (``speculative.py``)

    def greedy_next(self, token: int) -> int:
        return int(self.decode(torch.tensor([token], device=self.cache.k[0].device), None, greedy=True).argmax(-1))

    def greedy_after(self, tokens: list[int]) -> list[int]:
        """The greedy next token g_i after each of ``tokens``, fed at once, up to the first g_i that differs from
        ``tokens[i + 1]`` (the draft is rejected there, and later choices would not be used).

        The choices are read in chunks of 2, 4, 8, … positions, stopping at the first chunk with a rejection: the
        head (a GreedyHead's int8 copy, or a quantised head) is read once per chunk, and reading it for two positions
        costs hardly more than for one, so a draft rejected early costs about a one-token step's head (README,
        "Speculative decoding")."""
        model = self.decode_model
        hidden = model.hidden_states(torch.tensor([tokens], device=self.cache.k[0].device), cache=self.cache)[0]
        head = self._greedy_head()
        greedy, size = [], 2
        while len(greedy) < len(tokens):
            chunk = hidden[len(greedy):len(greedy) + size]
            for choice in (head.argmax(chunk) if head else model.logits(chunk).argmax(-1).tolist()):
                greedy.append(choice)
                if len(greedy) == len(tokens) or choice != tokens[len(greedy)]:
                    return greedy
            size *= 2
        return greedy


class HFLM:
    """Adapter for a ``transformers`` causal LM: its own cache object, position ids from the padding mask."""

    def __init__(self, model, decode_model=None, decode_dtype=None):
        self.model, self.decode_model = model, decode_model or model
        self.decode_dtype = decode_dtype
        self.context = context_length(model.config)
        self.cache = None
        # transformers ≥ 5.2x names the cache argument ``cache``; earlier versions ``past_key_values``
        accepted = inspect.signature(model.forward).parameters
        self.cache_arg = "cache" if "cache" in accepted else "past_key_values"
        self.extra = {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}

    def _run(self, model, ids, mask):
        positions = (mask.long().cumsum(-1) - 1).clamp(min=0)[:, -ids.shape[1]:]
        out = model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                    **self.extra, **{self.cache_arg: self.cache})
        self.cache = out[self.cache_arg]
        return out.logits[:, -1]

    def prefill(self, ids, mask, max_len):
        from transformers import DynamicCache
        self.cache = DynamicCache(config=self.model.config)
        logits = self._run(self.model, ids, mask)
        if self.decode_dtype is not None:
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys.to(self.decode_dtype), layer.values.to(self.decode_dtype)
        return logits

    def decode(self, tokens, mask, greedy: bool = False):
        return self._run(self.decode_model, tokens[:, None], mask)


def adapter_for(model, decode_model=None, decode_dtype=None):
    from ..model.decoder import Decoder
    cls = OurLM if isinstance(model, Decoder) else HFLM
    return cls(model, decode_model, decode_dtype)


def make_decode_model(model, decode_dtype: torch.dtype | None, quantize: str | None):
    """A copy of ``model`` for the memory-bound decode phase: cast to ``decode_dtype`` and/or with int8 / int4
    weights (``quantize``: a mode of ``quant.MODES``); ``None`` when neither is asked for (decode then uses
    ``model`` itself)."""
    if decode_dtype is None and quantize is None:
        return None
    decode_model = copy.deepcopy(model)
    if decode_dtype is not None:
        decode_model.to(decode_dtype)
    if quantize is not None:
        quantize_weights(decode_model, quantize, act_dtype=decode_dtype or torch.bfloat16)
    return decode_model.eval()


# ----------------------------------------------------------------------------------------------- sampling

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty on tokens already present: ℓ → ℓ/p if ℓ > 0 else ℓ·p. ``seen`` is a (B, V) boolean."""
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def filter_top_k_top_p(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Set to -inf every logit outside the top k, then outside the nucleus of probability mass top_p."""
    if top_k and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # drop a token when the mass *before* it already reaches top_p (so the top token always stays)
        drop_sorted = probs.cumsum(-1) - probs >= top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def next_tokens(logits: torch.Tensor, params: SamplingParams, seen: torch.Tensor | None,
                generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from (B, V) logits."""
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.temperature == 0:
        return logits.argmax(-1)
    logits = filter_top_k_top_p(logits / params.temperature, params.top_k, params.top_p)
    return torch.multinomial(torch.softmax(logits, -1), 1, generator=generator).squeeze(-1)


# ----------------------------------------------------------------------------------------------- the engine

class TextStream:
    """Turns a growing list of token ids into text pieces.

    A piece is released only when its decoded text is complete: never in the middle of a multi-byte character
    (the decoder shows an unfinished byte sequence as U+FFFD) and never while the text's end could still be the
    start of a stop string.
    """

    def __init__(self, tokenizer, stop: list[str], lstrip: bool = False):
        self.tokenizer, self.stop, self.lstrip = tokenizer, stop, lstrip
        self.ids: list[int] = []
        self.sent = 0                  # characters of the text already released
        self.text = ""
        self.stopped = False

    def add(self, token_id: int) -> str:
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        if self.lstrip:
            self.text = self.text.lstrip()
        found = [at for s in self.stop if (at := self.text.find(s, max(0, self.sent - len(s)))) != -1]
        if found:                       # cut at the earliest stop string, whichever of them it is
            self.text, self.stopped = self.text[:min(found)], True
            return self.flush()
        if self.text.endswith("\ufffd"):
            return ""
        hold = max((k for s in self.stop for k in range(1, len(s)) if self.text.endswith(s[:k])), default=0)
        piece = self.text[self.sent:len(self.text) - hold]
        self.sent += len(piece)
        return piece

    def flush(self) -> str:
        piece = self.text[self.sent:]
        self.sent = len(self.text)
        return piece


class Engine:
    """Batched generation for one model and its tokenizer."""

    def __init__(self, model, tokenizer, *, eos_token_ids: list[int] | None = None,
                 decode_dtype: torch.dtype | None = None, quantize: str | None = None,
                 speculative_tokens: int = SPECULATIVE_TOKENS):
        """``decode_dtype`` / ``quantize`` (``"int8"``, ``"int4"``, ... see ``quant.MODES``): decode with a bfloat16
        and/or int8- or int4-weight copy of the model while prefill keeps the model's own precision (on CPUs without
        bf16 units large bf16 matmuls are slow, but batch-1 decoding is bound by weight bytes, where fewer bytes
        win). ``speculative_tokens``: greedy batch-1 decoding of llmlab's own models drafts up to this many tokens
        by prompt lookup and checks them in one pass (``speculative.py``: the same tokens, fewer passes); 0 turns
        it off."""
        if speculative_tokens < 0:
            raise LLMLabError(f"speculative_tokens must be ≥ 0, got {speculative_tokens}")
        self.speculative_tokens = speculative_tokens
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.lm = adapter_for(model, make_decode_model(model, decode_dtype, quantize), decode_dtype)
        self.device = next(model.parameters()).device
        self.eos_token_ids = set(eos_token_ids if eos_token_ids is not None else default_eos_ids(model, tokenizer))
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
            (min(self.eos_token_ids) if self.eos_token_ids else 0)

    @classmethod
    def from_path(cls, model, *, device="cpu", dtype=None, decode_dtype=None, quantize=None,
                  speculative_tokens=SPECULATIVE_TOKENS) -> "Engine":
        """An engine for a model folder, hub id or ``.gguf`` file (or its ``ModelDir``) and its tokenizer."""
        from ..hub.load import load_model
        model = ModelDir.of(model)
        return cls(load_model(model, device=device, dtype=dtype), model.tokenizer(), decode_dtype=decode_dtype,
                   quantize=quantize, speculative_tokens=speculative_tokens)

    @property
    def context(self) -> int:
        return self.lm.context

    def encode(self, prompt: str | list[int]) -> list[int]:
        """A raw-text prompt's ids as the tokenizer makes them by default (``encoding.encode_text``: its BOS
        included); a list of ids as is (a rendered chat prompt is encoded by ``chat.generation_prompt_ids``)."""
        if isinstance(prompt, str):
            return encode_text(self.tokenizer, prompt)
        return list(prompt)

    def check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise LLMLabError("empty prompt: give at least one token")
        if len(ids) >= self.context:
            raise LLMLabError(f"prompt of {len(ids)} tokens does not fit the model's context of {self.context} "
                              f"tokens (at least one must be left to generate)")

    @torch.inference_mode()
    def generate_ids(self, prompts: list[list[int]], params: SamplingParams) -> Iterator[list[int | None]]:
        """Yield, per decoding step, the new token of each row (None for rows that already stopped on EOS).

        Prompts are left-padded to a common length; generation stops when every row hit EOS or the token budget,
        which is capped so that prompt + output fits the context.
        """
        params.validate()
        for ids in prompts:
            self.check_prompt(ids)
        width = max(len(p) for p in prompts)
        budget = min(params.max_new_tokens, self.context - width)
        if budget <= 0:
            return
        ids, mask = (t.to(self.device) for t in pad(prompts, self.pad_id, side="left"))
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(params.seed)
        done = torch.zeros(len(prompts), dtype=torch.bool, device=self.device)
        logits = self.lm.prefill(ids, mask, width + budget)
        seen = None
        if params.repetition_penalty != 1.0:     # which tokens each row has seen, for the penalty
            seen = torch.zeros(logits.shape, dtype=torch.bool, device=self.device)
            rows = torch.arange(len(prompts), device=self.device)[:, None].expand_as(ids)
            real = mask.bool()          # padding positions write nothing (a prompt may contain pad_id itself)
            seen[rows[real], ids[real]] = True
        eos = torch.tensor(sorted(self.eos_token_ids), dtype=torch.long, device=self.device)
        greedy = params.temperature == 0 and seen is None
        if greedy and len(prompts) == 1 and self.speculative_tokens and isinstance(self.lm, OurLM):
            for token in speculative_greedy(self.lm, prompts[0], int(logits.argmax(-1)), budget, self.eos_token_ids,
                                            self.speculative_tokens):
                yield [token]
            return
        for step in range(budget):
            tokens = next_tokens(logits, params, seen, generator)
            tokens = torch.where(done, torch.full_like(tokens, self.pad_id), tokens)
            out = [None if d else t for t, d in zip(tokens.tolist(), done.tolist())]
            done = done | torch.isin(tokens, eos)
            yield out
            if bool(done.all()) or step == budget - 1:
                return
            if seen is not None:
                seen[torch.arange(len(prompts)), tokens] = True
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            logits = self.lm.decode(tokens, mask, greedy)

    def generate(self, prompts: list[str | list[int]], params: SamplingParams | None = None) -> list[Completion]:
        """Complete each prompt; returns texts (stop strings and EOS excluded), ids and why each stopped."""
        params = params or SamplingParams()
        encoded = [self.encode(p) for p in prompts]
        streams = [TextStream(self.tokenizer, params.stop, params.lstrip) for _ in encoded]
        reasons = ["length"] * len(encoded)
        for step in self.generate_ids(encoded, params):
            for row, token in enumerate(step):
                if token is None or streams[row].stopped:
                    continue
                if token in self.eos_token_ids:
                    reasons[row] = "stop"
                    streams[row].stopped = True
                    continue
                streams[row].add(token)
                if streams[row].stopped:
                    reasons[row] = "stop"
            if all(s.stopped for s in streams):
                break
        return [Completion(s.text, s.ids, len(e), r) for s, e, r in zip(streams, encoded, reasons)]

    def stream(self, prompt: str | list[int], params: SamplingParams | None = None) -> Iterator[str]:
        """Yield the completion of one prompt as text pieces, as soon as each is complete."""
        params = params or SamplingParams()
        stream = TextStream(self.tokenizer, params.stop, params.lstrip)
        for (token,) in self.generate_ids([self.encode(prompt)], params):
            if token is None or token in self.eos_token_ids:
                break
            piece = stream.add(token)
            if piece:
                yield piece
            if stream.stopped:
                return
        piece = stream.flush()
        if piece:
            yield piece


def default_eos_ids(model, tokenizer) -> list[int]:
    """End-of-sequence ids: the model's generation config (which may list several, e.g. end-of-turn) and the
    tokenizer's eos token."""
    ids = set()
    gen = getattr(model, "generation_config", None)
    eos = getattr(gen, "eos_token_id", None) if gen is not None else None
    if eos is None:
        eos = getattr(model.config, "eos_token_id", None)
    if isinstance(eos, int):
        ids.add(eos)
    elif eos:
        ids.update(eos)
    if tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    return sorted(ids)


def add_sampling_args(p) -> None:
    """Sampling flags shared by ``generate`` and ``chat``."""
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.8, help="0 means greedy")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--repetition-penalty", type=float, default=1.0)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="weights for prefill: float32 (default on CPU) or bfloat16")
    p.add_argument("--decode-dtype", default=None, help="decode with a copy in this dtype, e.g. bfloat16")
    p.add_argument("--quantize", default=None, choices=QUANT_MODES,
                   help="decode with int8 or int4 weights (the head too, unless the mode says otherwise)")
    p.add_argument("--speculative-tokens", type=int, default=SPECULATIVE_TOKENS,
                   help="greedy decoding drafts up to this many tokens by prompt lookup and checks them in one pass "
                        "(the same text, faster when it repeats itself or its prompt); 0: off")


def sampling_from_args(args) -> SamplingParams:
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                          top_p=args.top_p, repetition_penalty=args.repetition_penalty, stop=args.stop,
                          seed=args.seed)


def engine_from_args(model: ModelDir, args) -> Engine:
    """The engine for ``model`` (``--model``) with the precision flags of ``add_sampling_args``."""
    from ..device import parse_dtype
    return Engine.from_path(model, device=args.device, dtype=parse_dtype(args.dtype),
                            decode_dtype=parse_dtype(args.decode_dtype), quantize=args.quantize,
                            speculative_tokens=args.speculative_tokens)


def _generate_command(args) -> None:
    import sys

    engine = engine_from_args(ModelDir(args.model), args)
    for piece in engine.stream(args.prompt, sampling_from_args(args)):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def register(sub) -> None:
    p = sub.add_parser("generate", help="complete a prompt with a model directory, Hugging Face folder or GGUF file")
    p.add_argument("--model", required=True, help="model directory, Hugging Face folder or name, or .gguf file")
    p.add_argument("--prompt", required=True)
    add_sampling_args(p)
    p.set_defaults(func=_generate_command)
