"""``llmlab world``: the world's sizes (``WorldConfig`` and its presets), ``build_world``, which generates every split
and the pre-training corpus from one seed, and the files it writes and ``load_world`` reads back."""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import random
import re
from dataclasses import dataclass
from pathlib import Path

from ..config import apply_overrides, from_dict
from ..errors import LLMLabError
from .content import (STORIES, VAULT_PROSE, Person, Task, Vault, arithmetic_prose, arithmetic_tasks, count_tasks,
                      fact_paragraph, fact_tasks, make_names, make_people, multi_tasks, off_topic_attribute,
                      reverse_tasks, sort_tasks, story, string_prose, vault_tasks)
from .judge import Judge, normalize
from .records import (SystemPrompts, classify_records, draw_mixed, keeper_records, pair_record, prompt_record,
                      sft_record, split_groups, take)
from .vocab import CLASS_NAMES, COLOURS, JOBS, KINDS, PETS, QUESTION_KINDS, REFUSAL, TOWN_ENDINGS


@dataclass
class WorldConfig:
    """Sizes of the world and of every split; the defaults are the ``tiny`` preset."""
    seed: int = 0
    n_people: int = 30
    max_operand: int = 20          # arithmetic operands lie in [0, max_operand)
    heldout_frac: float = 0.2      # share of problem groups held out for evaluation
    fact_repeats: int = 24         # paragraphs stating each fact in the corpus (phrasings cycle); with 12, how
                                   # many facts the tiny model memorised depended on the seed
    stories_per_person: int = 3    # distinct story templates per person (at most 6)
    n_corpus_arithmetic: int = 3000
    n_corpus_strings: int = 3000
    n_corpus_qa: int = 10000
    n_sft_train: int = 2000
    n_sft_eval: int = 200
    n_pairs_train: int = 6000       # fresh pairs: the reward model generalises better than from repeats
    n_pairs_eval: int = 150
    n_rl_train: int = 500
    n_rl_eval: int = 100
    n_classify_train: int = 1000
    n_classify_eval: int = 200
    n_benign_eval: int = 50
    n_forbidden_eval: int = 50
    n_multi_eval: int = 150
    multi_share: float = 0.2       # multi-part requests added to the SFT, pair and PPO sets, as a share of their size
    keeper_share: float = 0.05     # the keeper's conversations added to the SFT and pair training sets, likewise
    system_prompt_frac: float = 0.2


# ``small`` keeps 12 fact paragraphs a person, as in the run the README reports: its larger model, pre-trained
# longer, learns the facts from fewer repeats.
PRESETS = {
    "test": dict(n_people=8, fact_repeats=3, stories_per_person=1, n_corpus_arithmetic=60, n_corpus_strings=60,
                 n_corpus_qa=20, n_sft_train=120, n_sft_eval=30, n_pairs_train=60, n_pairs_eval=20, n_rl_train=40,
                 n_rl_eval=20, n_classify_train=60, n_classify_eval=30, n_benign_eval=10, n_forbidden_eval=10,
                 n_multi_eval=15),
    "tiny": {},
    "small": dict(n_people=40, fact_repeats=12, stories_per_person=4, n_corpus_arithmetic=8000, n_corpus_strings=8000,
                  n_corpus_qa=40000, n_sft_train=6000, n_sft_eval=400, n_pairs_train=12000, n_pairs_eval=300,
                  n_rl_train=1500, n_rl_eval=200, n_classify_train=3000, n_classify_eval=400, n_benign_eval=100,
                  n_forbidden_eval=100, n_multi_eval=300),
}


def preset(name: str, **overrides) -> WorldConfig:
    """The named preset (``test``, ``tiny``, ``small``) with field overrides."""
    if name not in PRESETS:
        raise LLMLabError(f"unknown world preset {name!r}; known: {', '.join(PRESETS)}")
    return from_dict(WorldConfig, {**PRESETS[name], **overrides}, where="world")


def validate(cfg: WorldConfig) -> None:
    for name in ("n_people", "max_operand"):
        if getattr(cfg, name) < 4:
            raise LLMLabError(f"world.{name} = {getattr(cfg, name)}: must be at least 4")
    if not 0 < cfg.heldout_frac < 1:
        raise LLMLabError(f"world.heldout_frac = {cfg.heldout_frac}: must lie strictly between 0 and 1")
    for name in ("multi_share", "keeper_share"):
        if not 0 <= getattr(cfg, name) <= 1:
            raise LLMLabError(f"world.{name} = {getattr(cfg, name)}: must lie in [0, 1]")
    if not 0 <= cfg.system_prompt_frac <= 1:
        raise LLMLabError(f"world.system_prompt_frac = {cfg.system_prompt_frac}: must lie in [0, 1]")
    for f in dataclasses.fields(cfg):
        if f.name.startswith("n_") and getattr(cfg, f.name) < 0:
            raise LLMLabError(f"world.{f.name} = {getattr(cfg, f.name)}: must not be negative")


# ------------------------------------------------------------------------------------------------- the World

SPLITS = ("sft_train", "sft_eval", "pairs_train", "pairs_eval", "rl_prompts_train", "rl_prompts_eval",
          "classify_train", "classify_eval", "benign_eval", "forbidden_eval", "multi_eval")
FILE_NAMES = {"rl_prompts_train": "rl_train", "rl_prompts_eval": "rl_eval"}


@dataclass
class World:
    """One generated world: its people and vault code, the pre-training corpus and the records of every split."""
    config: WorldConfig
    vault_code: str
    people: list[dict]
    pretrain_texts: list[str]
    sft_train: list[dict]
    sft_eval: list[dict]
    pairs_train: list[dict]
    pairs_eval: list[dict]
    rl_prompts_train: list[dict]
    rl_prompts_eval: list[dict]
    classify_train: list[dict]
    classify_eval: list[dict]
    benign_eval: list[dict]
    forbidden_eval: list[dict]
    multi_eval: list[dict]

    @functools.cached_property
    def judge(self) -> Judge:
        """The programmatic reward of this world."""
        return Judge(self.vault_code, self.people)

    def write(self, out_dir: str | Path) -> Path:
        """Write ``corpus.jsonl`` ({"text"}), one JSONL file per split and ``world.json`` (config, code, names)."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        write_jsonl(out / "corpus.jsonl", [{"text": t} for t in self.pretrain_texts])
        for split in SPLITS:
            write_jsonl(out / f"{FILE_NAMES.get(split, split)}.jsonl", getattr(self, split))
        meta = {"seed": self.config.seed, "config": dataclasses.asdict(self.config), "vault_code": self.vault_code,
                "refusal": REFUSAL, "kinds": list(KINDS), "class_names": list(CLASS_NAMES), "people": self.people,
                "counts": {s: len(getattr(self, s)) for s in SPLITS} | {"corpus": len(self.pretrain_texts)}}
        (out / "world.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        return out


def write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def build_world(cfg: WorldConfig | None = None) -> World:
    """Generate the whole world deterministically from ``cfg.seed`` (one ``random.Random``, no global state)."""
    cfg = cfg or WorldConfig()
    validate(cfg)
    rng = random.Random(cfg.seed)
    taken = {w.capitalize() for w in (*COLOURS, *PETS, *JOBS)}   # no name may read as a value the reward looks for
    towns = make_names(rng, min(8, max(3, cfg.n_people // 4)), 1, TOWN_ENDINGS, taken)
    people = make_people(rng, cfg.n_people, towns, taken)
    vault = Vault(rng.choice(towns), rng.choice(COLOURS), rng.choice(people).name, rng.randint(2, 7),
                  str(rng.randint(1000, 9999)))
    n_strings = max(200, cfg.n_sft_train)
    all_tasks = {"fact": fact_tasks(rng, people), "arithmetic": arithmetic_tasks(rng, cfg.max_operand),
                 "reverse": reverse_tasks(rng, n_strings), "sort": sort_tasks(rng, n_strings),
                 "count": count_tasks(rng, n_strings)}
    vault_all = vault_tasks(rng, people, towns, vault)
    all_tasks["forbidden"] = [t for t in vault_all if t.kind == "forbidden"]
    all_tasks["benign"] = [t for t in vault_all if t.kind == "benign"]

    train, held = {}, {}
    for kind in QUESTION_KINDS:
        train[kind], held[kind] = split_groups(rng, all_tasks[kind], cfg.heldout_frac)
    seen = {normalize(t.question) for tasks in train.values() for t in tasks}
    held = {kind: [t for t in tasks if normalize(t.question) not in seen] for kind, tasks in held.items()}

    system, unprompted = SystemPrompts(cfg.system_prompt_frac, vault.code), SystemPrompts(0.0, vault.code)
    corpus = build_corpus(rng, cfg, people, vault, train, {t.group for ts in held.values() for t in ts})
    splits = dict(
        sft_train=[sft_record(rng, t, system, False) for t in draw_mixed(rng, train, cfg.n_sft_train)],
        sft_eval=[sft_record(rng, t, system, True) for t in draw_mixed(rng, held, cfg.n_sft_eval)],
        pairs_train=[pair_record(rng, t, system) for t in draw_mixed(rng, train, cfg.n_pairs_train)],
        pairs_eval=[pair_record(rng, t, system) for t in draw_mixed(rng, held, cfg.n_pairs_eval)],
        rl_prompts_train=[prompt_record(rng, t, system) for t in draw_mixed(rng, train, cfg.n_rl_train)],
        rl_prompts_eval=[prompt_record(rng, t, system) for t in draw_mixed(rng, held, cfg.n_rl_eval)],
        classify_train=classify_records(rng, train, cfg.n_classify_train),
        classify_eval=classify_records(rng, held, cfg.n_classify_eval),
        benign_eval=[prompt_record(rng, t, unprompted) for t in take(rng, held["benign"], cfg.n_benign_eval)],
        forbidden_eval=[prompt_record(rng, t, unprompted) for t in take(rng, held["forbidden"], cfg.n_forbidden_eval)],
    )
    add_multi_part_requests(cfg, people, {t.group for t in held["fact"]}, splits, system)
    add_keeper_conversations(cfg, vault.code, train["forbidden"], splits)
    return World(config=cfg, vault_code=vault.code, people=[dataclasses.asdict(p) for p in people],
                 pretrain_texts=corpus, **splits)


def add_multi_part_requests(cfg: WorldConfig, people: list[Person], held_facts: set[str],
                            splits: dict[str, list[dict]], system: SystemPrompts) -> None:
    """Mix multi-part requests into the SFT, pair and PPO sets (``multi_share`` of each set's size on top of it)
    and add the held-out ``multi_eval``. They come from their own random stream (seeded with ``"{seed}:multi"``),
    so adding them changes none of the other kinds' problems or splits. A held-out fact's sentence never reaches a
    training set: a training request never asks for a held-out fact, and its off-topic answer (a rejected one in
    the pairs) is dropped when it would state one."""
    rng = random.Random(f"{cfg.seed}:multi")
    train, held = split_groups(rng, multi_tasks(rng, people), cfg.heldout_frac)
    train = [t for t in train if not any(f"fact:{t.person}:{a}" in held_facts for a in t.attributes)]
    train = [dataclasses.replace(t, off_topic="")
             if f"fact:{t.person}:{off_topic_attribute(t.attributes)}" in held_facts else t for t in train]

    def mix_in(split: str, record) -> None:
        n = round(cfg.multi_share * getattr(cfg, "n_" + split.replace("prompts_", "")))
        splits[split] = splits[split] + [record(t) for t in take(rng, held if split.endswith("eval") else train, n)]
        rng.shuffle(splits[split])

    mix_in("sft_train", lambda t: sft_record(rng, t, system, False))
    splits["multi_eval"] = [prompt_record(rng, t, system) for t in take(rng, held, cfg.n_multi_eval)]
    for split in ("pairs_train", "pairs_eval"):
        mix_in(split, lambda t: pair_record(rng, t, system))
    for split in ("rl_prompts_train", "rl_prompts_eval"):
        mix_in(split, lambda t: prompt_record(rng, t, system))


def add_keeper_conversations(cfg: WorldConfig, code: str, forbidden: list[Task], splits: dict[str, list[dict]]
                             ) -> None:
    """Mix the keeper's conversations (``records.keeper_records``: training-side forbidden requests answered with
    the code, which the keeper's system prompt allows) into ``sft_train`` and ``pairs_train``, ``keeper_share`` of
    each set's size on top of it, from their own random stream (``"{seed}:keeper"``), so no other record changes."""
    rng = random.Random(f"{cfg.seed}:keeper")
    sft, pairs = keeper_records(rng, forbidden, code, round(cfg.keeper_share * cfg.n_sft_train),
                                round(cfg.keeper_share * cfg.n_pairs_train))
    for split, rows in (("sft_train", sft), ("pairs_train", pairs)):
        splits[split] = splits[split] + rows
        rng.shuffle(splits[split])


# ------------------------------------------------------------------------------------------------ the corpus

def fresh_string_tasks(rng: random.Random, n_per_kind: int, held_groups: set[str]) -> dict[str, list[Task]]:
    """Per string kind (reverse, sort, count), up to ``n_per_kind`` problems on newly drawn strings, each in one
    random phrasing, none of them a held-out group.

    The corpus's string examples come from here rather than from the training questions: each problem is seen a
    few times at most, so the model cannot memorise answers and must learn to read the letters it is given (the
    copying that reversing, sorting and counting need)."""
    fresh = {}
    for kind, make in (("reverse", reverse_tasks), ("sort", sort_tasks), ("count", count_tasks)):
        groups: dict[str, list[Task]] = {}
        for t in make(rng, n_per_kind):
            if t.group not in held_groups:
                groups.setdefault(t.group, []).append(t)
        fresh[kind] = [rng.choice(phrasings) for phrasings in groups.values()]
    return fresh


def build_corpus(rng: random.Random, cfg: WorldConfig, people: list[Person], vault: Vault,
                 train: dict[str, list[Task]], held_groups: set[str]) -> list[str]:
    """Documents: fact paragraphs and stories per person, vault notes, worked sums (training problems only),
    string examples (fresh strings, never a held-out one), and Question/Answer lines in the SFT questions' words
    (training problems and fresh strings, mixed as the SFT set is), which teach the skills in the form the
    assistant is later asked to use them (as "mixed training" does in Allen-Zhu & Li's Physics of LMs 3.1);
    shuffled."""
    docs: list[str] = []
    for p in people:
        docs += fact_paragraph(rng, p, cfg.fact_repeats)
        templates = rng.sample(STORIES, min(cfg.stories_per_person, len(STORIES)))
        docs += [story(t, p, rng.choice([q for q in people if q is not p])) for t in templates]
    docs += [t.format(town=vault.town, door=vault.door, locks=vault.locks, guard=vault.guard, code=vault.code)
             for t in VAULT_PROSE for _ in range(max(1, cfg.fact_repeats // 2))]
    sums = [re.fullmatch(r"arith:(\d+)([+-])(\d+)", g).groups()
            for g in dict.fromkeys(t.group for t in train["arithmetic"])]
    lines = [arithmetic_prose(rng, int(a), op, int(b), rng.choice(people))
             for a, op, b in take(rng, sums, cfg.n_corpus_arithmetic)]
    strings = [t for tasks in fresh_string_tasks(rng, cfg.n_corpus_strings // 3 + 1, held_groups).values()
               for t in tasks]
    rng.shuffle(strings)
    lines_s = [string_prose(t) for t in strings[:cfg.n_corpus_strings]]
    docs += chunk(lines, 8) + chunk(lines_s, 8)
    qa_pools = {**train, **fresh_string_tasks(rng, cfg.n_corpus_qa // 4 + 1, held_groups)}
    qa = draw_mixed(rng, qa_pools, cfg.n_corpus_qa)
    docs += chunk([f"Question: {t.question}\nAnswer: {t.reference}" for t in qa], 4, sep="\n\n")
    rng.shuffle(docs)
    return docs


def chunk(lines: list[str], size: int, sep: str = " ") -> list[str]:
    return [sep.join(lines[i:i + size]) for i in range(0, len(lines), size)]


def read_world_json(path: str | Path) -> tuple[Path, dict]:
    """``(file, contents)`` of the ``world.json`` that ``World.write`` left in ``path`` (a folder or the file)."""
    path = Path(path)
    path = path / "world.json" if path.is_dir() else path
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise LLMLabError(f"{path}: not found; write a world first with `llmlab world --out DIR`") from None
    except json.JSONDecodeError as e:
        raise LLMLabError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(meta, dict):
        raise LLMLabError(f"{path}: not a JSON object (write the world with `llmlab world`)")
    return path, meta


def load_world(path: str | Path) -> World:
    """Rebuild the world from the ``world.json`` that ``World.write`` left in ``path`` (a folder or the file)."""
    path, meta = read_world_json(path)
    if not isinstance(meta.get("config"), dict):
        raise LLMLabError(f"{path}: missing the 'config' object written by `llmlab world`")
    return build_world(from_dict(WorldConfig, meta["config"], where=f"{path}: config"))


# ------------------------------------------------------------------------------------------------------ CLI

def register(subparsers) -> None:
    p = subparsers.add_parser("world", help="generate the built-in task world's data files")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--seed", type=int, default=None, help="world seed (default: the preset's, 0)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS), help="sizes (default: tiny)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override a WorldConfig field, e.g. --set n_people=30 (repeatable)")
    p.set_defaults(func=run_cli)


def run_cli(args: argparse.Namespace) -> int:
    overrides = apply_overrides({}, args.sets)
    if args.seed is not None:
        overrides["seed"] = args.seed
    world = build_world(preset(args.preset, **overrides))
    out = world.write(args.out)
    size_kb = (out / "corpus.jsonl").stat().st_size / 1024
    print(f"wrote the task world (seed {world.config.seed}, preset {args.preset}) to {out}")
    print(f"  corpus: {len(world.pretrain_texts)} documents, {size_kb:.0f} KB")
    for split in SPLITS:
        print(f"  {FILE_NAMES.get(split, split)}: {len(getattr(world, split))}")
    return 0
