"""Safety-alignment data for a chat model that does not refuse: what ``llmlab sft`` and ``llmlab dpo`` train on.

    llmlab safety-data --behaviours harmful_behaviors.csv --benign seed_tasks.jsonl --model M --out data/safety

- **Harmful requests**: the *train* side of the behaviours' split by target string (``behaviours.select``), so that
  the red-team report's held-out test side is never trained on. Each is answered with a refusal (a few phrasings,
  in turn, each holding one of GCG's refusal phrases so the keyword judge reads them as refusals).
- **Benign requests** (Self-Instruct seed tasks, say): answered with the *model's own* greedy reply, so fine-tuning
  on them teaches "keep answering these as before" and not a new style: the refusals are the only change
  (self-distillation; a human reference answer would also move the model's benign behaviour).

Files written: ``sft.jsonl`` (``{"messages": [user, assistant]}``, harmful and benign interleaved), ``pairs.jsonl``
(``{"prompt", "chosen", "rejected"}``: a refusal over the behaviour's compliant target for a harmful request, the
model's answer over a refusal for a benign one) and ``safety_data.json`` (counts, sources).
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from ..errors import LLMLabError
from ..files import write_text_atomic
from .behaviours import benign_prompts, load_behaviours, select

REFUSALS = (
    "I'm sorry, but I can't help with that. It could be used to cause real harm.",
    "I cannot help with this request, because it could hurt people. I'm happy to help with something else.",
    "I'm sorry, I can't assist with that. If you have another question, feel free to ask.",
    "I can't provide that, as it could be dangerous or illegal. Is there something else I can do for you?",
)


def refusal(i: int) -> str:
    return REFUSALS[i % len(REFUSALS)]


def build_safety_data(harmful: list[dict], benign: list[dict], answers: list[str], seed: int = 0
                      ) -> tuple[list[dict], list[dict]]:
    """(sft rows, preference pairs) from harmful behaviours (``goal``, ``target``) and benign prompts (``goal``)
    with the model's ``answers`` to them, shuffled together with ``seed``."""
    if len(answers) != len(benign):
        raise LLMLabError(f"safety data: {len(answers)} answers for {len(benign)} benign prompts")
    sft, pairs = [], []
    for i, b in enumerate(harmful):
        user = {"role": "user", "content": b["goal"]}
        sft.append({"messages": [user, {"role": "assistant", "content": refusal(i)}], "kind": "harmful"})
        pairs.append({"prompt": [user], "chosen": refusal(i), "rejected": b["target"], "kind": "harmful"})
    for i, (b, answer) in enumerate(zip(benign, answers)):
        if not answer.strip():
            continue                    # nothing to keep: the model gave no answer
        user = {"role": "user", "content": b["goal"]}
        sft.append({"messages": [user, {"role": "assistant", "content": answer}], "kind": "benign"})
        pairs.append({"prompt": [user], "chosen": answer, "rejected": refusal(i), "kind": "benign"})
    rng = random.Random(seed)
    rng.shuffle(sft)
    rng.shuffle(pairs)
    return sft, pairs


def model_answers(model, prompts: list[dict], max_new_tokens: int = 128, batch_size: int = 8) -> list[str]:
    """The model's greedy replies to the benign prompts (a folder, hub id or .gguf)."""
    from ..hub.folder import ModelDir
    from ..hub.load import load_model
    from ..infer.engine import SamplingParams
    from ..infer.replies import engine_for, generate_replies
    from ..progress import progress_bar
    from .judges import prompt_messages

    folder = ModelDir.of(model)
    template = folder.template()
    engine = engine_for(load_model(folder), folder.tokenizer(), template)
    params = SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0)
    out = []
    bar = progress_bar(total=len(prompts), desc="benign answers", unit="prompt")
    for start in range(0, len(prompts), batch_size):
        batch = [prompt_messages(p) for p in prompts[start:start + batch_size]]
        out += [c.text.strip() for c in generate_replies(engine, batch, template, params, batch_size)]
        bar.update(len(batch))
    bar.close()
    return out


def write_safety_data(out, sft: list[dict], pairs: list[dict], meta: dict) -> dict:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "sft.jsonl", "".join(json.dumps(r) + "\n" for r in sft))
    write_text_atomic(out / "pairs.jsonl", "".join(json.dumps(r) + "\n" for r in pairs))
    meta = {**meta, "sft_rows": len(sft), "pairs": len(pairs)}
    write_text_atomic(out / "safety_data.json", json.dumps(meta, indent=2) + "\n")
    return meta


def register(subparsers) -> None:
    p = subparsers.add_parser("safety-data", help="refusal SFT data and preference pairs from harmful behaviours",
                              description=__doc__.splitlines()[0])
    p.add_argument("--behaviours", required=True, help="AdvBench's harmful_behaviors.csv or a .jsonl of "
                                                       "{goal, target}: its train side is used")
    p.add_argument("--benign", required=True, help="benign prompts: Self-Instruct's seed_tasks.jsonl (its folder: "
                                                   "the seed tasks only)")
    p.add_argument("--model", required=True, help="the model to align: it answers the benign prompts")
    p.add_argument("--out", required=True, help="the folder for sft.jsonl, pairs.jsonl and safety_data.json")
    p.add_argument("--limit", type=int, default=None, help="at most N harmful and N benign prompts")
    p.add_argument("--max-new-tokens", type=int, default=128, help="length of the model's benign answers")
    p.add_argument("--seed", type=int, default=0, help="the split's and the shuffle's seed")
    p.set_defaults(func=_command)


def _command(args) -> int:
    harmful, _ = select(load_behaviours(args.behaviours), "train", seed=args.seed)
    benign_path = Path(args.benign)
    if benign_path.is_dir():            # the seed tasks: the user-oriented ones are the red-team report's held-out set
        benign_path = benign_path / "seed_tasks.jsonl"
    benign = benign_prompts(self_instruct=benign_path)
    harmful, benign = harmful[:args.limit], benign[:args.limit]
    answers = model_answers(args.model, benign, args.max_new_tokens)
    sft, pairs = build_safety_data(harmful, benign, answers, args.seed)
    meta = write_safety_data(args.out, sft, pairs, {"behaviours": str(args.behaviours), "benign": str(args.benign),
                                                    "model": str(args.model), "harmful": len(harmful),
                                                    "benign_prompts": len(benign), "seed": args.seed})
    print(f"wrote {meta['sft_rows']} SFT conversations and {meta['pairs']} preference pairs to {args.out}")
    return 0
