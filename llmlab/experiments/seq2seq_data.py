"""The data of ``decoder-vs-encoder-decoder``: the task world's string and arithmetic problems as (source, target)
pairs, the world's corpus as windows, one character vocabulary, and the batches each architecture trains on.

The same example, two layouts (characters as ids; ``<bos>``, ``<sep>``, ``<eos>`` and ``<pad>`` special):

    decoder-only     input  <bos> s_1 … s_S <sep> t_1 … t_T          loss on t_1 … t_T <eos> only
                     target  s_1 … s_S <sep> t_1 … t_T <eos>         (the source positions are ignored: -100)
    encoder-decoder  source s_1 … s_S  →  decoder input <bos> t_1 … t_T,  target t_1 … t_T <eos>

Language modelling on a window w_1 … w_W of the corpus: the decoder-only model predicts every w_{i+1} from w_≤i (W − 1
targets). The encoder-decoder needs a source and a target, so each window is cut at a *prefix split* p drawn
uniformly from 1 … W − 1 (T5's prefix-LM objective): the encoder reads w_1 … w_p, the decoder predicts w_{p+1} … w_W
(W − p targets, on average half the window). Held-out windows are cut at W/2 for both, so both models are scored on
the same tokens from the same context.

Samplers draw batch ``k`` from a generator seeded with (seed, k), so a resumed run draws the same batches.
"""
from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import LLMLabError
from ..world.build import build_world, preset as world_preset
from ..world.content import Task, arithmetic_tasks, reverse_tasks, sort_tasks
from ..world.records import split_groups

PAD, BOS, SEP, EOS = 0, 1, 2, 3
SPECIALS = ("<pad>", "<bos>", "<sep>", "<eos>")
IGNORE = -100
MAKERS = {"reverse": lambda rng, n, s: reverse_tasks(rng, n), "sort": lambda rng, n, s: sort_tasks(rng, n),
          "arithmetic": lambda rng, n, s: arithmetic_tasks(rng, s["max_operand"])}


class CharVocab:
    """One id per character that the data holds, after the four special ids."""

    def __init__(self, texts):
        self.chars = sorted(set("".join(texts)))
        self.index = {c: i + len(SPECIALS) for i, c in enumerate(self.chars)}

    def __len__(self) -> int:
        return len(SPECIALS) + len(self.chars)

    def encode(self, text: str) -> list[int]:
        try:
            return [self.index[c] for c in text]
        except KeyError as e:
            raise LLMLabError(f"character {e.args[0]!r} is not in the experiment's vocabulary") from None

    def decode(self, ids) -> str:
        return "".join(self.chars[i - len(SPECIALS)] for i in ids if i >= len(SPECIALS))


@dataclass
class Pair:
    kind: str
    source: list[int]
    target: list[int]


@dataclass
class Data:
    vocab: CharVocab
    train: list[Pair]
    heldout: dict[str, list[Pair]]      # kind → one phrasing per held-out problem
    corpus_train: np.ndarray            # the corpus's characters as ids
    corpus_val: np.ndarray


def task_split(s: dict) -> tuple[list[Task], dict[str, list[Task]]]:
    """Every phrasing of the training problems, and one phrasing per held-out problem, for each kind in ``kinds``
    (the world's generators, drawn from ``world_seed``; problems are held out whole, as the world does)."""
    rng = random.Random(f"{s['world_seed']}:seq2seq")
    train, held = [], {}
    for kind in s["kinds"]:
        tr, he = split_groups(rng, MAKERS[kind](rng, int(s["groups"]), s), float(s["heldout_frac"]))
        train += tr
        firsts = list({t.group: t for t in reversed(he)}.values())[::-1]
        held[kind] = firsts[:int(s["eval_examples"])]
    return train, held


def build_data(s: dict) -> Data:
    train, held = task_split(s)
    world = build_world(world_preset(s["world"], seed=int(s["world_seed"])))
    docs = world.pretrain_texts
    n_val = max(1, len(docs) // 10)
    texts = [t.question + t.reference for t in train] + [t.question + t.reference for ts in held.values() for t in ts]
    vocab = CharVocab(texts + docs)

    def pair(t: Task) -> Pair:
        return Pair(t.kind, vocab.encode(t.question), vocab.encode(t.reference))

    corpus = ["\n".join(docs[:-n_val]), "\n".join(docs[-n_val:])]
    train_ids, val_ids = (np.asarray(vocab.encode(c), dtype=np.int64) for c in corpus)
    if len(val_ids) <= int(s["lm_window"]):
        raise LLMLabError(f"lm_window = {s['lm_window']}: longer than the held-out corpus ({len(val_ids)} characters)")
    return Data(vocab, [pair(t) for t in train], {k: [pair(t) for t in ts] for k, ts in held.items()},
                train_ids, val_ids)


# --- batches ---------------------------------------------------------------------------------------------------

def pad(rows: list[list[int]], value: int) -> torch.Tensor:
    width = max(map(len, rows))
    return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)


def decoder_batch(sources: list[list[int]], targets: list[list[int]], eos: bool = True) -> dict:
    """``<bos> source <sep> target <eos>``, right-padded; loss on the target (and ``<eos>``) only. An empty source
    (a language-modelling window) has no ``<sep>``: every token of the window is a target. ``eos=False`` for corpus
    windows, which are cut from running text and do not end."""
    end = [EOS] if eos else []
    seqs = [[BOS] + s + ([SEP] if s else []) + t + end for s, t in zip(sources, targets)]
    labels = [[IGNORE] * (len(s) + (1 if s else 0)) + t + end for s, t in zip(sources, targets)]
    return {"ids": pad([q[:-1] for q in seqs], PAD), "labels": pad(labels, IGNORE),
            "tokens": sum(len(s) + len(t) for s, t in zip(sources, targets))}


def encdec_batch(sources: list[list[int]], targets: list[list[int]], eos: bool = True) -> dict:
    """Right-padded sources with their mask; decoder input ``<bos> target`` (without its last token when there is
    no ``<eos>`` to predict), labels ``target <eos>``."""
    end = [EOS] if eos else []
    return {"src": pad(sources, PAD), "src_mask": pad([[1] * len(s) for s in sources], 0),
            "tgt": pad([([BOS] + t + end)[:-1] for t in targets], PAD), "labels": pad([t + end for t in targets], IGNORE),
            "tokens": sum(len(s) + len(t) for s, t in zip(sources, targets))}


def lm_split(window: list[int], arm: str, rng: np.random.Generator | None) -> tuple[list[int], list[int]]:
    """(source, target) of one corpus window: the decoder-only model takes it whole as its target; the
    encoder-decoder cuts it at p (uniform in 1 … W−1 with ``rng``, else W/2)."""
    if arm == "decoder-only":
        return [], window
    p = int(rng.integers(1, len(window))) if rng is not None else len(window) // 2
    return window[:p], window[p:]


def make_batch(arm: str, sources: list[list[int]], targets: list[list[int]], eos: bool = True) -> dict:
    return (decoder_batch if arm == "decoder-only" else encdec_batch)(sources, targets, eos)


class Sampler:
    """Batches for ``train.loop.train``: ``next_batch``, ``state_dict``, ``load_state_dict``; batch k is drawn with
    ``numpy.random.default_rng((seed, k))``."""

    def __init__(self, data: Data, job: str, arm: str, batch_size: int, seed: int, window: int):
        self.data, self.job, self.arm, self.batch_size, self.seed, self.window = data, job, arm, batch_size, seed, window
        self.k = 0

    def next_batch(self) -> dict:
        rng = np.random.default_rng((self.seed, self.k))
        self.k += 1
        if self.job == "tasks":
            picks = [self.data.train[i] for i in rng.integers(0, len(self.data.train), self.batch_size)]
            sources, targets = [p.source for p in picks], [p.target for p in picks]
        else:
            corpus = self.data.corpus_train
            starts = rng.integers(0, len(corpus) - self.window, self.batch_size)
            pairs = [lm_split(corpus[a:a + self.window].tolist(), self.arm, rng) for a in starts]
            sources, targets = [p[0] for p in pairs], [p[1] for p in pairs]
        return make_batch(self.arm, sources, targets, eos=self.job == "tasks")

    def state_dict(self) -> dict:
        return {"k": self.k}

    def load_state_dict(self, state: dict) -> None:
        self.k = int(state["k"])


def heldout_windows(data: Data, window: int, count: int) -> list[list[int]]:
    """``count`` windows spread evenly over the held-out corpus."""
    n = len(data.corpus_val) - window
    return [data.corpus_val[i * n // max(count - 1, 1):][:window].tolist() for i in range(count)]
