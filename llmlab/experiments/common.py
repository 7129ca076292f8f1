"""What every experiment shares: presets, seeds, the settings a user may change, resume, and the report.

An experiment is a module with

    CLAIM     the statement the run tests (the report's introduction)
    PRESETS   {"test": {...}, "default": {...}, "large": {...}}: its settings; "seeds" is how many seeds
    OPEN      settings sections handed to a stage as a recipe overlay (the stage checks their keys), e.g.
              ("model", "train"): ``--set model.d_model=64`` passes; any other key must exist in the preset
    run(ctx)  trains and measures through the stage entry points and returns a ``Result``
    check_settings(settings)  (optional) refuses bad settings before the output folder is claimed
    CHILD_PROCESSES  (optional) True when ``run`` trains its arms in child processes, which ``torchrun`` cannot
              reach; SINGLE_PROCESS when it trains in one process only: either refuses to start under ``torchrun``

``run_experiment`` resolves the settings (preset, then ``--set``), refuses an ``--out`` folder that holds another
experiment or other settings (``experiment.json``), calls ``run`` and writes ``report.md``, ``report.html`` and
``summary.json`` (the settings, the seeds, the machine, the wall time and every number the report shows).
Resume: each arm of each seed is a stage run in its own folder (``ctx.run_dir(arm, seed)``) that the stage resumes
from its checkpoints, or skips when it is finished; a rerun with more seeds trains only the new ones.

Under ``torchrun`` every process runs the experiment: the stages it calls train data-parallel (DDP) over all of
them, the measurements are repeated in each (they are cheap next to training), and only rank 0 claims the folder
and writes the report.
"""
from __future__ import annotations

import copy
import datetime
import importlib
import json
import math
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..config import apply_overrides
from ..errors import LLMLabError
from ..report import Section, write_report

EXPERIMENTS = {       # name → (module, one line for --list)
    "encoder-vs-decoder": ("encoder_vs_decoder", "why a masked-LM encoder is not a text generator (perplexity, "
                                                 "samples, cost per token)"),
    "warmup": ("warmup", "why warm up the learning rate: warm-up 0 vs N at three learning rates, pre- vs post-norm"),
    "max-length": ("max_length", "what the row length does: tokens/s, attention's share, activation memory, loss "
                                 "past the trained length (learned vs rotary positions)"),
    "tokenizer": ("tokenizer", "characters vs byte-level BPE at 262…8k tokens: bytes per token, embedding share, "
                               "bits per byte at equal compute"),
    "decoder-vs-encoder-decoder": ("decoder_vs_encoder_decoder", "why decoder-only dominates: an encoder-decoder "
                                   "of equal size on seq2seq tasks and LM (quality, tokens/s, KV cache)"),
    "lora-vs-full": ("lora_vs_full", "LoRA at ranks 4…64 vs full fine-tuning for SFT: exact match, trainable "
                                     "parameters, optimizer memory, time per step"),
    "classify-bert-vs-gpt": ("classify_bert_vs_gpt", "a BERT encoder vs GPT decoders on IMDB: untrained head, "
                            "zero-shot, linear probes by read-out position, fine-tuning; accuracy, time, memory"),
    "alignment": ("alignment", "base vs SFT vs DPO vs PPO side by side; DPO vs PPO over seeds: win rate, KL, "
                               "cost, models held, reward-model score vs true reward"),
}
RECORD = "experiment.json"     # in the output folder: which experiment, preset and settings it holds


@dataclass
class Context:
    """What an experiment's ``run`` receives."""
    name: str
    out: Path
    preset: str
    settings: dict
    seeds: list[int]

    def run_dir(self, arm: str, seed: int) -> Path:
        """The folder of one stage run: ``out/seed-N/ARM``."""
        return self.out / f"seed-{seed}" / arm


@dataclass
class Result:
    """What an experiment's ``run`` returns: the report's title, its setup text, sections and numbers."""
    title: str
    setup: str
    sections: list[Section]
    summary: dict
    headline: str                         # one line for the terminal
    figures: list[str] = field(default_factory=list)


# --- numbers over seeds ----------------------------------------------------------------------------------------

def spread(values: list[float]) -> dict:
    """Mean, standard deviation (n − 1), min and max of one number over seeds; non-finite values count as such
    (a diverged run's NaN makes the mean NaN, which the report shows)."""
    values = [float(v) for v in values]
    finite = all(math.isfinite(v) for v in values)
    mean = statistics.fmean(values) if finite else math.nan
    std = statistics.stdev(values) if finite and len(values) > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(values) if finite else math.nan,
            "max": max(values) if finite else math.nan, "n": len(values), "values": values}


def show(s: dict, digits: int = 4) -> str:
    """``mean ± std`` (or the one value) of a ``spread``, as the report prints it."""
    if s["n"] == 1:
        return f"{s['values'][0]:.{digits}g}"
    if not math.isfinite(s["mean"]):
        return " / ".join(f"{v:.{digits}g}" for v in s["values"])
    return f"{s['mean']:.{digits}g} ± {s['std']:.2g}"


def base_model_recipe(config: str, p: dict, max_length: int, logs: int) -> dict:
    """The ``llmlab pretrain`` recipe of an experiment's base model: the built-in ``config`` with the experiment's
    ``pretrain`` settings ``p`` (size, vocabulary, batch, steps, learning rate, warm-up), rows of ``max_length``
    tokens, one evaluation at the end, a checkpoint half-way and ``logs`` log lines; seed 0, no progress bar."""
    from ..stages.common import resolve_recipe
    steps = int(p["steps"])
    return resolve_recipe({}, config, [
        f"model.n_layer={p['n_layer']}", f"model.n_head={p['n_head']}", f"model.d_model={p['d_model']}",
        f"model.max_seq_len={max_length}", f"data.max_length={max_length}",
        f"data.batch_size={p['batch_size']}", f"tokenizer.vocab_size={p['vocab_size']}",
        f"train.max_steps={steps}", f"train.lr={p['lr']}", f"train.warmup_steps={min(p['warmup_steps'], steps)}",
        f"train.eval_every={steps}", "train.eval_batches=4", f"train.checkpoint_every={max(1, steps // 2)}",
        f"train.log_every={max(1, steps // logs)}", "train.seed=0", "train.progress=false"])


def rank_0_first(fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` on rank 0, then, after a barrier, on the other ``torchrun`` ranks: a step that writes
    its result once and reuses it when it exists (a shared tokenizer, the world, token shards) is done by one
    process, and the others read what it wrote. In a single process, just the call."""
    from ..train import dist
    result = fn(*args, **kwargs) if dist.is_main() else None
    dist.barrier()
    return result if dist.is_main() else fn(*args, **kwargs)


# --- settings --------------------------------------------------------------------------------------------------

def load(name: str):
    """The module of experiment ``name``, or an error listing the known ones."""
    if name not in EXPERIMENTS:
        raise LLMLabError(f"unknown experiment {name!r}; known: {', '.join(EXPERIMENTS)} "
                          "(llmlab experiment --list)")
    return importlib.import_module(f"{__package__}.{EXPERIMENTS[name][0]}")


def check_keys(settings: dict, sets: list[str], open_sections: tuple[str, ...], name: str) -> None:
    """Every ``--set`` key must name a setting of the preset, or a key inside one of ``open_sections``."""
    for item in sets:
        key = item.split("=", 1)[0].strip()
        parts = key.split(".")
        if parts[0] in open_sections:
            continue
        node = settings
        for part in parts:
            if not isinstance(node, dict) or part not in node:
                known = ", ".join(sorted(k for k in settings if k != "seeds"))
                raise LLMLabError(f"--set {key}: experiment {name} has no such setting; its settings: {known} "
                                  f"(and any key under {', '.join(open_sections) or 'no section'})")
            node = node[part]


def resolve(module, name: str, preset: str, sets: list[str]) -> tuple[dict, int]:
    """The settings of ``preset`` with ``sets`` applied, and the preset's number of seeds."""
    if preset not in module.PRESETS:
        raise LLMLabError(f"experiment {name} has no preset {preset!r}; choose one of {', '.join(module.PRESETS)}")
    settings = copy.deepcopy(module.PRESETS[preset])
    seeds = settings.pop("seeds", 1)
    open_sections = tuple(getattr(module, "OPEN", ()))
    check_keys(settings, sets, open_sections, name)
    settings = apply_overrides(settings, sets)
    if hasattr(module, "check_settings"):
        module.check_settings(settings)
    return settings, seeds


def claim_folder(out: Path, record: dict) -> None:
    """Write ``experiment.json`` in ``out``, or check that the one there is this experiment with these settings;
    a folder holding anything else is refused, so nothing is overwritten (a folder holding only the record of a run
    that stopped before writing anything is taken over)."""
    path = out / RECORD
    if path.is_file() and [p.name for p in out.iterdir()] == [RECORD]:
        path.unlink()             # a run that stopped before its first result (bad data, say): nothing to keep
    if path.is_file():
        held = json.loads(path.read_text(encoding="utf-8"))
        if held.get("experiment") != record["experiment"]:
            raise LLMLabError(f"{out} holds the results of experiment {held.get('experiment')!r}, not "
                              f"{record['experiment']!r}; choose another --out")
        if held != record:
            differ = sorted(k for k in set(held["settings"]) | set(record["settings"])
                            if held["settings"].get(k) != record["settings"].get(k))
            raise LLMLabError(f"{out} holds a {record['experiment']} run with other settings (preset "
                              f"{held.get('preset')!r}; differing: {', '.join(differ) or 'preset'}); rerun with "
                              "the same preset and --set values to resume it, or choose another --out")
        return
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise LLMLabError(f"{out} exists and holds files that are not an experiment's; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def peak_rss_mib() -> float:
    """This process's peak resident memory in MiB: ``VmHWM`` of ``/proc/self/status`` on Linux, else
    ``getrusage``'s ``ru_maxrss``. Not ``ru_maxrss`` on Linux: it survives fork and exec, so a child started by a
    parent holding 600 MiB would report at least 600 MiB however little it used itself."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text(encoding="utf-8").splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024                         # kB
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024     # bytes on macOS, KiB elsewhere


def run_child(module: str, spec: dict, spec_path: Path, done: Path, what: str) -> dict:
    """Write ``spec`` to ``spec_path`` and run ``module.child_main(spec_path)`` in a child Python process (this
    checkout first on its path), which must write ``done`` (JSON) when it finished; returns what it wrote. A child
    process has its own peak memory and its own torch state. A failure names ``what`` and how to resume."""
    import subprocess
    from ..files import write_text_atomic
    spec_path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(spec_path, json.dumps(spec, indent=2, default=str) + "\n")
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    code = f"import sys; from {module} import child_main; child_main(sys.argv[1])"
    finished = subprocess.run([sys.executable, "-c", code, str(spec_path)], env=env)
    if finished.returncode != 0 or not done.is_file():
        raise LLMLabError(f"{what} failed in its child process (exit code {finished.returncode}; its error is "
                          "printed above); rerun the same command to resume it")
    return json.loads(done.read_text(encoding="utf-8"))


def machine() -> str:
    import torch
    cpu = platform.processor() or platform.machine()
    threads = torch.get_num_threads()
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return f"{platform.system()} {cpu}, {os.cpu_count()} CPUs, {threads} torch threads" + (f", {gpu}" if gpu else "")


def settings_table(settings: dict, prefix: str = "") -> list[list[str]]:
    rows = []
    for key, value in settings.items():
        if isinstance(value, dict):
            rows += settings_table(value, f"{prefix}{key}.")
        else:
            rows.append([f"{prefix}{key}", json.dumps(value)])
    return rows


# --- the run ---------------------------------------------------------------------------------------------------

def run_experiment(name: str, out_dir, *, preset: str = "default", seed: int = 0, seeds: int | None = None,
                   sets: list[str] | None = None) -> dict:
    """Run (or resume) experiment ``name`` into ``out_dir`` and write its report; returns the report's path, the
    headline and the summary."""
    module = load(name)
    settings, preset_seeds = resolve(module, name, preset, list(sets or []))
    count = preset_seeds if seeds is None else seeds
    if count < 1:
        raise LLMLabError(f"--seeds {count}: must be at least 1")
    out = Path(out_dir)
    from ..train import dist
    world = dist.init_distributed()[1]
    if world > 1 and getattr(module, "CHILD_PROCESSES", False):
        raise LLMLabError(f"experiment {name} trains its arms in child processes, which torchrun's process group "
                          "cannot reach: run it without torchrun")
    if world > 1 and getattr(module, "SINGLE_PROCESS", False):
        raise LLMLabError(f"experiment {name} trains in one process (its own loop has no data parallelism): run "
                          "it without torchrun")
    if dist.is_main():
        claim_folder(out, {"experiment": name, "preset": preset, "settings": settings})
    dist.barrier()
    ctx = Context(name=name, out=out, preset=preset, settings=settings, seeds=list(range(seed, seed + count)))
    start = time.perf_counter()
    result = module.run(ctx)
    wall = time.perf_counter() - start
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    host = machine()
    seed_text = (f"{count} seeds ({ctx.seeds[0]}…{ctx.seeds[-1]}); a ± b is the mean ± standard deviation over them"
                 if count > 1 else f"one seed ({seed}): no spread; use the default preset or --seeds 3 for one")
    setup = Section("Setup", text=f"{result.setup}\n\nPreset `{preset}`, {seed_text}. Run {when} on {host}; "
                                  f"this invocation took {wall:.0f} s (finished runs it found were not retrained).",
                    table=[["setting", "value"]] + settings_table(settings))
    summary = {"experiment": name, "preset": preset, "seeds": ctx.seeds, "settings": settings, "date": when,
               "machine": host, "wall_seconds": wall, **result.summary}
    if dist.is_main():
        write_report(out, result.title, module.CLAIM, [setup, *result.sections], summary)
    dist.barrier()
    return {"report": str(out / "report.md"), "headline": result.headline, "summary": summary}
