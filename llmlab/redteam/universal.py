"""Universal GCG (Zou et al. 2023, Algorithm 2, "Universal Prompt Optimization"): one attack string for many
prompts, then how often it works on prompts it never saw and on other models (transfer).

Given m training prompts x⁽¹⁾ … x⁽ᵐ⁾, each with its own target y⁽ʲ⁾ and GCG's loss L_j (the target's mean negative
log-likelihood after prompt j with the string p in its ``{optim_str}`` slot: ``gcg.Objective``), Algorithm 2
optimises one string p of n tokens:

    m_c := 1                                                        start with prompt 1 alone
    repeat T times (``num_steps``):
        1. gradient:   G = Σ_{j ≤ m_c} G⁽ʲ⁾ / ‖G⁽ʲ⁾_i‖,  G⁽ʲ⁾ = ∇_{e_p} L_j (n × V)         (``PromptSet.gradient``)
        2. top-k:      X_i = the k tokens of most negative G_i                              (``gcg.sample_candidates``)
        3. B candidates, each p with a random position i set to a random token of X_i
        4. evaluate:   L(p̃) = Σ_{j ≤ m_c} L_j(x⁽ʲ⁾ ∥ p̃)                                    (``PromptSet.losses``)
        5. replace:    p := the candidate of lowest L
        6. progress:   if p succeeds on x⁽¹⁾ … x⁽ᵐᶜ⁾ and m_c < m: m_c := m_c + 1   (one prompt joins per step)

The gradient is normalised per prompt: each row i (one position of p) of a prompt's token gradient is divided by
its L2 norm over the vocabulary before the prompts are summed. Algorithm 2 writes a plain sum; the authors' code
(llm-attacks) normalises, so that a prompt whose loss is still high, with large gradients, does not choose every
position's top-k alone. A positive factor per row does not change that row's top-k, so with m = 1 this is
Algorithm 1 step by step. The candidates' loss (step 4) is the plain sum over the prompts in the set.

A prompt *succeeds* when the greedy reply starts with its target (every target position's argmax is its token),
or when the objective check on its greedy reply says so (e.g. the task world's vault code in it). The attack stops
(``early_stop``) once one string succeeds on all m prompts. Everything else is GCG's: its settings (``GCGConfig``),
banned tokens, retokenisation filter, attack buffer (whose losses are recomputed on the new set when a prompt
joins), and a resumable ``out/state.json``.

Evaluation (``evaluate``): the string, put in each behaviour's slot, is sent to a model (``engine_answerer`` for a
local one, ``hosted_answerer`` for an OpenAI-compatible API) and the greedy replies are read by the red team's
judges (``judges.py``); ASR = k/n per judge with its Wilson 95% interval. On the training prompts it measures the fit,
on held-out behaviours (``train_test``: the other side of the split by target string, or a task world's held-out
forbidden requests) universality, on another model transfer.
"""
from __future__ import annotations

import base64
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from ..errors import LLMLabError
from ..files import write_text_atomic
from ..infer import client
from .behaviours import load_behaviours, load_world_behaviours, select
from .defended import Answerer
from .gcg import (GCG, AttackBuffer, GCGConfig, Objective, Prompt, _load_state, _write_metrics, conversation,
                  fill, record_step, retokenisation_filter, rng_state, sample_candidates, with_attack_slot)
from .judges import REPLY_TOKENS, greedy_reply_params, judge_all, success_rate

Answer = Callable[[list[list[dict]]], list[str | None]]     # conversations → replies (None: too long to send)


# ------------------------------------------------------------------------------------------------- the prompts

def where(behaviour: dict, i: int) -> str:
    """Where a behaviour came from, for error messages (its file and line when it knows them)."""
    return behaviour.get("where") or f"prompt {i + 1}"


def attack_messages(behaviour: dict, system: str | None = None, i: int = 0) -> list[dict]:
    """A behaviour's conversation with the attack slot: its ``messages`` (the string after the last user turn when
    they hold no ``{optim_str}``), else its ``goal`` followed by the string (``system``: for a goal without one)."""
    if behaviour.get("messages"):
        return with_attack_slot(behaviour["messages"], where(behaviour, i))
    return conversation(behaviour["goal"], behaviour.get("system") or system)


def train_test(path, test_fraction: float = 0.5, seed: int = 0, keep_mismatched: bool = False
               ) -> tuple[list[dict], list[dict]]:
    """Training prompts and held-out behaviours. A task world folder: the forbidden requests of its training side
    (which the model learned to refuse) and its held-out ones; they all share one target, the vault code. A
    behaviours file (.csv, .jsonl): the two sides of the split by target string (``behaviours.split_by_target``),
    without AdvBench's rows whose target is not about their goal unless ``keep_mismatched``."""
    path = Path(path)
    if path.is_dir():
        return load_world_behaviours(path, "pairs_train"), load_world_behaviours(path)
    records = [{**b, "where": b.get("where") or f"{path}:{b.get('line', b['index'])}"} for b in load_behaviours(path)]
    try:
        return select(records, "train", test_fraction, seed, keep_mismatched)
    except LLMLabError as e:
        raise LLMLabError(f"{path}: {e}") from None


# ------------------------------------------------------------------------------------------------- the objective

class PromptSet:
    """The m prompts' objectives (``gcg.Objective``: prefix cache, target-only logits, chunked candidates), of
    which the first ``active`` (m_c) are in the set."""

    def __init__(self, objectives: list[Objective]):
        self.objectives, self.active = objectives, 1

    @property
    def current(self) -> list[Objective]:
        return self.objectives[:self.active]

    def per_prompt(self, suffixes: torch.Tensor, current: torch.Tensor | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor]:
        """(L (m_c, N), exact (m_c, N)): ``Objective.losses`` of the N candidate strings for each prompt in the
        set."""
        losses, exact = [], []
        for objective in self.current:
            loss, hit = objective.losses(suffixes, current=current)
            losses.append(loss)
            exact.append(hit)
            if len(self.objectives) > 1:
                objective.release()      # one candidates' cache at a time: m of them would take m times the memory
        return torch.stack(losses), torch.stack(exact)

    def losses(self, suffixes: torch.Tensor, current: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(Σ_{j ≤ m_c} L_j (N,), exact on every prompt in the set (N,)): ``Objective.losses``'s shape, so that
        ``GCG.init_buffer`` fills the attack buffer from a ``PromptSet``."""
        losses, exact = self.per_prompt(suffixes, current)
        return losses.sum(0), exact.all(0)

    def gradient(self, suffix: torch.Tensor) -> torch.Tensor:
        """G = Σ_{j ≤ m_c} G⁽ʲ⁾ / ‖G⁽ʲ⁾_i‖ (n, V): each prompt's token gradient, every row scaled to unit norm."""
        total = None
        for objective in self.current:
            grad = objective.gradient(suffix)
            # a row of zeros (a position the loss does not depend on) stays zero instead of becoming NaN
            grad = grad / grad.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(grad.dtype).tiny)
            total = grad if total is None else total + grad
        return total

    def counts(self) -> list[list[int]]:
        """Per prompt, [tokens run through the model, candidates evaluated]."""
        return [[o.forward_tokens, o.candidate_evaluations] for o in self.objectives]

    def set_counts(self, counts: list[list[int]]) -> None:
        for objective, (tokens, evaluations) in zip(self.objectives, counts, strict=True):
            objective.forward_tokens, objective.candidate_evaluations = tokens, evaluations


# ------------------------------------------------------------------------------------------------- the attack

@dataclass
class UniversalResult:
    suffix: str                       # the first string that succeeded on all m prompts, else the last (Algorithm 2's p)
    prompts: int                      # m
    prompts_in_set: int               # m_c at the end
    success: bool                     # some step's string succeeded on all m prompts
    first_success_step: int | None    # 1-based
    added_after: list[int]            # the steps after which prompts 2, 3, … joined the set
    losses: list[float]               # per step, Σ_j L_j of the chosen string over the prompts then in the set
    prompts_per_step: list[int]       # per step, m_c
    suffixes: list[str]
    steps: int
    forward_tokens: int               # tokens run through the model, every prompt's
    candidate_evaluations: int        # (prompt, candidate) pairs evaluated
    wall_clock_s: float

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class UniversalGCG:
    """Algorithm 2 against one model (our ``Decoder``): a ``GCG`` inside gives the settings, the prompt checks, the
    candidates, the buffer's start and the greedy replies."""

    def __init__(self, model, tokenizer, config: GCGConfig | None = None, *, template: str | None = None):
        self.gcg = GCG(model, tokenizer, config, template=template)
        self.model, self.tokenizer, self.config = self.gcg.model, tokenizer, self.gcg.config

    def run(self, behaviours: list[dict], *, out: str | Path | None = None,
            success: Callable[[str], bool] | None = None, on_step: Callable[[dict], None] | None = None,
            system: str | None = None) -> UniversalResult:
        """Find one string for the slot of every behaviour (records with ``target`` and ``messages`` or ``goal``;
        prompt 1 first, as they join the set). ``success`` checks each greedy reply (the objective check); with
        ``out`` every step is saved there and a second run resumes; ``on_step`` sees each step's record."""
        if not behaviours:
            raise LLMLabError("universal GCG: no training prompts")
        cfg = self.config
        prompts = [self.gcg.prompt(attack_messages(b, system, i), b["target"], where(b, i))
                   for i, b in enumerate(behaviours)]
        if len({p.lead for p in prompts}) > 1:
            raise LLMLabError("universal GCG: the training prompts put different spaces before {optim_str}, so one "
                              "string cannot be tokenised the same way in all of them")
        prompt_set = PromptSet([Objective(self.model, p, cfg) for p in prompts])
        generator = torch.Generator().manual_seed(cfg.seed)
        run_key = {"config": {k: v for k, v in dataclasses.asdict(cfg).items() if k != "num_steps"},
                   "prompts": [[p.before, p.after, p.target] for p in prompts]}
        state = _load_state(Path(out), run_key) if out is not None else None
        if state is None:
            buffer = self.gcg.init_buffer(prompt_set, prompts[0], generator)
            state = {"key": run_key, "step": 0, "active": 1, "history": [], "seconds": 0.0, "stopped": False}
            if out is not None:
                _write_metrics(Path(out), [])
        else:
            buffer = AttackBuffer(cfg.buffer_size, state["buffer"])
            prompt_set.active = state["active"]
            prompt_set.set_counts(state["counts"])
            generator.set_state(torch.frombuffer(bytearray(base64.b64decode(state["rng"])), dtype=torch.uint8))
            _write_metrics(Path(out), state["history"])
        start, seconds = time.perf_counter(), state["seconds"]
        for step in range(state["step"], cfg.num_steps):
            if state["stopped"]:
                break
            record = self.step(prompt_set, prompts, buffer, generator, success)
            done = all(record["success"])
            if done and prompt_set.active < len(prompts):                                  # 6
                prompt_set.active += 1
                buffer = self.rescored(buffer, prompt_set)
            record.update(step=step + 1, added=done and record["prompts"] < len(prompts),
                          all_succeeded=done and record["prompts"] == len(prompts),
                          seconds=seconds + time.perf_counter() - start)
            state["history"].append(record)
            state.update(step=step + 1, active=prompt_set.active, stopped=record["all_succeeded"] and cfg.early_stop,
                         seconds=record["seconds"], buffer=buffer.entries, counts=prompt_set.counts(),
                         rng=rng_state(generator))
            record_step(out, state, record, on_step)
        result = self._result(prompt_set, prompts[0], state, buffer)
        if out is not None:
            write_result(Path(out), result)
        return result

    def step(self, prompt_set: PromptSet, prompts: list, buffer: AttackBuffer, generator: torch.Generator,
             success: Callable[[str], bool] | None) -> dict:
        """Steps 1–5 on the prompts in the set, and which of them the chosen string succeeds on."""
        cfg, tokenizer = self.config, self.tokenizer
        suffix = torch.tensor(buffer.best()[1], dtype=torch.long, device=self.model.embed.weight.device)
        grad = prompt_set.gradient(suffix)                                                  # 1
        with torch.no_grad():
            candidates = sample_candidates(suffix, grad, cfg.search_width, cfg.topk, cfg.n_replace,  # 2, 3
                                           self.gcg.banned, generator)
            if cfg.filter_ids:
                candidates = retokenisation_filter(candidates, tokenizer, tuple(prompts))
            per_prompt, exact = prompt_set.per_prompt(candidates, current=suffix)          # 4
        losses, exact_all = per_prompt.sum(0), exact.all(0)
        # 5: the lowest summed loss; a candidate whose greedy replies already start with every target wins
        pool = exact_all.nonzero().squeeze(1) if bool(exact_all.any()) else torch.arange(len(losses))
        best = int(pool[losses[pool].argmin()])
        loss, ids = float(losses[best]), candidates[best].tolist()
        if buffer.size == 0 or loss < buffer.worst_loss():
            buffer.add(loss, ids)
        hits = exact[:, best].tolist()
        replies = objective = None
        if success is not None:
            replies = [self.gcg.reply(p, ids, o) for p, o in zip(prompts, prompt_set.current)]
            objective = [bool(success(r)) for r in replies]
        succeeded = [hit or bool(objective and objective[j]) for j, hit in enumerate(hits)]
        return {"loss": loss, "prompts": prompt_set.active, "suffix": prompts[0].string(tokenizer, ids), "ids": ids,
                "candidates": len(candidates), "exact": hits, "objective": objective, "success": succeeded,
                "replies": replies}

    def rescored(self, buffer: AttackBuffer, prompt_set: PromptSet) -> AttackBuffer:
        """The buffer with its losses over the new set (a stale loss would compare a sum over fewer prompts); the
        one-string buffer of plain GCG (size 0) is always replaced and needs none."""
        if buffer.size == 0:
            return buffer
        rows = [ids for _, ids in buffer.entries]
        losses, _ = prompt_set.losses(torch.tensor(rows, device=self.model.embed.weight.device))
        rescored = AttackBuffer(buffer.size)
        for loss, ids in zip(losses.tolist(), rows):
            rescored.add(loss, ids)
        return rescored

    def _result(self, prompt_set: PromptSet, prompt: Prompt, state: dict, buffer: AttackBuffer) -> UniversalResult:
        history = state["history"]
        first = next((r for r in history if r["all_succeeded"]), None)
        counts = prompt_set.counts()
        return UniversalResult(
            suffix=first["suffix"] if first else prompt.string(self.tokenizer, buffer.best()[1]),
            prompts=len(prompt_set.objectives), prompts_in_set=prompt_set.active, success=first is not None,
            first_success_step=first["step"] if first else None,
            added_after=[r["step"] for r in history if r["added"]], losses=[r["loss"] for r in history],
            prompts_per_step=[r["prompts"] for r in history], suffixes=[r["suffix"] for r in history],
            steps=len(history), forward_tokens=sum(c[0] for c in counts),
            candidate_evaluations=sum(c[1] for c in counts), wall_clock_s=state["seconds"])


def write_result(out: Path, result: UniversalResult, extra: dict | None = None) -> None:
    """``out/result.json`` (the attack's result and ``extra``, e.g. its evaluation) and ``out/loss.png``."""
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "result.json", json.dumps({**result.to_dict(), **(extra or {})}, indent=2) + "\n")
    if result.steps:
        from ..plots import plot_metrics
        plot_metrics(out / "metrics.jsonl", out / "loss.png", keys=("loss", "prompts"),
                     title="universal GCG: summed loss and prompts in the set")


# ------------------------------------------------------------------------------------------------- evaluation

def read_suffix(value: str) -> tuple[str, dict | None]:
    """The attack string ``value`` names and, when it comes from a gcg-universal run, the behaviours that run was
    measured on: the run's folder or ``result.json`` (fields ``suffix``, ``behaviours``), another file (its text
    without a final newline), else ``value`` itself."""
    path = _existing(value)
    if path is not None and path.is_dir():
        path = path / "result.json"
        if not path.is_file():
            raise LLMLabError(f"{value}: a folder without result.json; give a gcg-universal run's folder, a file "
                              "or the string itself")
    if path is None:
        text = value
    elif path.suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise LLMLabError(f"{path}: not valid JSON ({e.msg})") from None
        suffix = data.get("suffix") if isinstance(data, dict) else None
        if not isinstance(suffix, str) or not suffix.strip():
            raise LLMLabError(f"{path}: no field 'suffix' with the attack string (as `llmlab attack gcg-universal` "
                              "writes it)")
        return suffix, data.get("behaviours")
    else:
        text = path.read_text(encoding="utf-8").removesuffix("\n")
    if not text.strip():
        raise LLMLabError(f"the attack string {value!r} is empty")
    return text, None


def _existing(value: str) -> Path | None:
    """``value`` as a path when it names a file or folder, else None."""
    try:
        path = Path(value)
        return path if path.exists() else None
    except (OSError, ValueError):         # an attack string too long for a file name, or holding a NUL, is none
        return None


def replies_of(answerer: Answerer) -> Answer:
    """An ``Answer`` from an undefended ``Answerer`` (built with ``skip_too_long``): the reply texts, None for a
    conversation too long for the model's context."""
    def answer(conversations: list[list[dict]]) -> list[str | None]:
        return [None if r.finish_reason == "too_long" else r.text for r in answerer(conversations)]
    return answer


def engine_answerer(model, tokenizer, template: str, reply_tokens: int = REPLY_TOKENS) -> Answer:
    """Greedy replies of ``reply_tokens`` at most from a local model, as every judge reads them."""
    from ..infer.replies import engine_for
    return replies_of(Answerer(engine_for(model, tokenizer, template), template, greedy_reply_params(reply_tokens),
                               skip_too_long=True))


def local_answerer(model, template: str | None = None, reply_tokens: int = REPLY_TOKENS, device: str = "cpu"
                   ) -> Answer:
    """``engine_answerer`` for any model llmlab loads: our folders, Hugging Face folders or hub ids, ``.gguf``."""
    from ..hub.folder import ModelDir
    from ..hub.load import load_model
    model_dir = ModelDir.of(model)
    return engine_answerer(load_model(model_dir, device=device), model_dir.tokenizer(), model_dir.template(template),
                           reply_tokens)


def hosted_answerer(api_base: str, api_model: str | None = None, api_key: str | None = None,
                    reply_tokens: int = REPLY_TOKENS) -> Answer:
    """Replies from an OpenAI-compatible chat API (``client.chat``; temperature 0, ``reply_tokens`` at most): the
    server renders each conversation with its own template. Without ``api_model``, the model the server lists
    first; without ``api_key``, none (a local ``llmlab serve``)."""
    def answer(conversations: list[list[dict]]) -> list[str | None]:
        # the client's "local" provider is any URL whose key we pass ourselves
        return [client.chat(c, provider="local", base_url=api_base, model=api_model, api_key=api_key,
                            temperature=0.0, max_tokens=reply_tokens) for c in conversations]
    return answer


def primary_judge(behaviours: list[dict]) -> str:
    """The objective judge when the behaviours carry a secret (a task world), else the refusal keywords."""
    return "objective" if any(b.get("vault_code") for b in behaviours) else "keyword"


def evaluate(answer: Answer, behaviours: list[dict], suffix: str, judges: list, system: str | None = None) -> dict:
    """The string in each behaviour's slot, the greedy replies and each judge's verdicts: ``{"primary_judge",
    "asr": {judge: {"asr", "k", "n", "low", "high"}}, "records"}``, ASR with its Wilson 95% interval. A
    conversation too long to send is a failure for every judge that has a verdict."""
    if not behaviours:
        raise LLMLabError("universal GCG: no behaviours to evaluate the string on")
    conversations = [fill(attack_messages(b, system, i), suffix) for i, b in enumerate(behaviours)]
    replies = answer(conversations)
    verdicts = judge_all(judges, behaviours, [r or "" for r in replies])
    verdicts = [v if r is not None else {k: None if x is None else False for k, x in v.items()}
                for v, r in zip(verdicts, replies)]
    names = [j.name for j in judges]
    return {"primary_judge": primary_judge(behaviours),
            "asr": {name: success_rate([v[name] for v in verdicts]) for name in names},
            "records": [{"where": where(b, i), "target": b["target"], "messages": c, "reply": r, "success": v}
                        for i, (b, c, r, v) in enumerate(zip(behaviours, conversations, replies, verdicts))]}


def asr_line(evaluation: dict) -> str:
    """``0.40 [0.17–0.69] (4/10, keyword judge)``: the primary judge's ASR for a printed summary."""
    rate = evaluation["asr"][evaluation["primary_judge"]]
    if not rate["n"]:
        return "no verdict"
    return (f"{rate['asr']:.2f} [{rate['low']:.2f}–{rate['high']:.2f}] ({rate['k']}/{rate['n']}, "
            f"{evaluation['primary_judge']} judge)")
