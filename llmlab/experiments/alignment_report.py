"""The report of ``llmlab experiment alignment``: the verdict, the tables, the figures and the texts.

The verdict tests four textbook expectations, each confirmed or refuted by the run's means over seeds:

1. both methods improve on SFT: win rate W > ½ against SFT, judged by the world's true reward;
2. DPO is cheaper than PPO: less training wall-clock (loop and whole process), lower peak RSS and fewer parameters
   held;
3. DPO varies less across seeds than PPO: std of W over seeds, DPO's below PPO's;
4. PPO over-optimises the reward model it is trained on: on the held-out answers Δ_RM = RM(PPO) − RM(SFT) > 0
   while Δ_world = world(PPO) − world(SFT) ≤ 0 (means over seeds); over training, PPO's rollouts gain reward-model
   score and not true reward: with d the last quarter's mean minus the first quarter's (pooled over seeds) and se
   its standard error were the curve flat noise, d_RM > 2·se_RM and d_world < 2·se_world.
"""
from __future__ import annotations

import math
from pathlib import Path

from ..plots import save
from .common import show

METHODS = ("dpo", "ppo")
NAMES = {"base": "base", "sft": "SFT", "dpo": "DPO", "ppo": "PPO"}
COLUMNS = (("win_rate", "win rate vs SFT"), ("kl", "KL / token vs SFT"), ("reward_model", "RM score"),
           ("world_reward", "world reward"), ("exact_match", "exact match"), ("refusal_rate", "refusal rate"))


def _f(v: float, digits: int = 3) -> str:
    return "—" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}g}"


# --- tables ----------------------------------------------------------------------------------------------------

def result_table(per_method: dict, fixed: dict) -> list[list[str]]:
    rows = [["model", *(label for _, label in COLUMNS)]]
    for name in ("base", "sft"):
        rows.append([NAMES[name], *(_f(fixed[name][k]) for k, _ in COLUMNS)])
    for m in METHODS:
        rows.append([NAMES[m], *(show(per_method[m][k], 3) for k, _ in COLUMNS)])
    return rows


def seed_table(per_seed: dict, seeds: list[int]) -> list[list[str]]:
    rows = [["seed", "method", "win rate", "KL / token", "RM score", "world reward"]]
    for seed in seeds:
        for m in METHODS:
            r = per_seed[seed][m]
            rows.append([str(seed), NAMES[m], _f(r["win_rate"]), _f(r["kl"]), _f(r["reward_model"]),
                         _f(r["world_reward"])])
    return rows


def cost_table(per_method: dict) -> list[list[str]]:
    rows = [["method", "training wall-clock (s)", "whole process (s)", "peak RSS (MiB)", "RSS after imports (MiB)", "models held",
             "parameters held", "trainable"]]
    for m in METHODS:
        a, held = per_method[m], per_method[m]["held"]
        models = " + ".join(f"{name} {n:,}" for name, n in held["models"].items())
        if "cached_reference_numbers" in held:
            models += f" + cached reference log-probs ({held['cached_reference_numbers']:,} numbers)"
        rows.append([NAMES[m], show(a["train_seconds"], 3), show(a["process_seconds"], 3), show(a["peak_rss_mib"], 4),
                     show(a["rss_after_imports_mib"], 4), models, f"{held['total']:,}", f"{held['trainable']:,}"])
    return rows


def samples_table(samples: dict) -> list[list[str]]:
    """RM score / world reward of each model's answer to each sample prompt."""
    models = [m for m in NAMES if m in samples]
    rows = [["prompt", "kind", *(f"{NAMES[m]} (RM / world)" for m in models)]]
    for i, kind in enumerate(samples["kinds"]):
        rows.append([str(i + 1), str(kind), *(f"{samples[m]['rm'][i]:.2f} / {samples[m]['world'][i]:.2f}"
                                              for m in models)])
    return rows


def samples_list(samples: dict) -> list[tuple[str, str]]:
    pairs = []
    for i, prompt in enumerate(samples["prompts"]):
        pairs.append((f"prompt {i + 1} ({samples['kinds'][i]})",
                      f"{prompt}\n(reference: {samples['references'][i]})"))
        for m in (m for m in NAMES if m in samples):
            text = samples[m]["texts"][i].replace("\n", " ⏎ ").strip() or "(nothing)"
            pairs.append((NAMES[m], f"{text}   [RM {samples[m]['rm'][i]:.2f}, world {samples[m]['world'][i]:.2f}]"))
    return pairs


# --- the verdict -----------------------------------------------------------------------------------------------

def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def _drift(values: list[float]) -> tuple[float, float]:
    """(d, se): the mean of the last quarter of a curve minus the mean of its first quarter, and the standard error
    of that difference were the curve flat noise, se = sd · √(2/q) with sd the curve's standard deviation and q the
    quarter's length; (NaN, NaN) for a curve shorter than 2 points."""
    if len(values) < 2:
        return math.nan, math.nan
    q = max(1, len(values) // 4)
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1))
    return sum(values[-q:]) / q - sum(values[:q]) / q, sd * math.sqrt(2 / q)


def _pooled(drifts: list[tuple[float, float]]) -> tuple[float, float]:
    """Mean drift over seeds and its standard error √(Σ se²) / n."""
    if not drifts:
        return math.nan, math.nan
    return _mean([d for d, _ in drifts]), math.sqrt(sum(se * se for _, se in drifts)) / len(drifts)


def judge(s: dict, per_method: dict, fixed: dict, traces: dict, batch: int = 16) -> tuple[str, dict]:
    """The verdict text and its numbers; ``batch`` is DPO's pairs per step."""
    d, p = per_method["dpo"], per_method["ppo"]
    w = {m: per_method[m]["win_rate"]["mean"] for m in METHODS}
    improve = {m: w[m] > 0.5 for m in METHODS}
    cheaper = {"time": d["train_seconds"]["mean"] < p["train_seconds"]["mean"],
               "process_time": d["process_seconds"]["mean"] < p["process_seconds"]["mean"],
               "memory": d["peak_rss_mib"]["mean"] < p["peak_rss_mib"]["mean"],
               "parameters": d["held"]["total"] < p["held"]["total"]}
    n = len(d["win_rate"]["values"])
    steadier = d["win_rate"]["std"] < p["win_rate"]["std"] if n > 1 else None
    d_rm = p["reward_model"]["mean"] - fixed["sft"]["reward_model"]
    d_world = p["world_reward"]["mean"] - fixed["sft"]["world_reward"]
    (rm_d, rm_se), (world_d, world_se) = (_pooled([_drift(t[k]) for t in traces.values()]) for k in ("rm", "world"))
    over_eval = d_rm > 0 and d_world <= 0
    over_train = rm_d > 2 * rm_se and world_d < 2 * world_se      # RM rose beyond noise, the true reward did not
    trained_on = "the reward model" if s["ppo_reward"] == "rm" else "the world's true reward"

    def word(ok):
        return "confirmed" if ok else "refuted" if ok is not None else "not tested (one seed)"
    both = all(improve.values())
    beat = [NAMES[m] for m in METHODS if improve[m]]
    lost = [NAMES[m] for m in METHODS if not improve[m]]
    who = ("Both DPO and PPO beat" if both else f"{beat[0]} beat SFT, {lost[0]} did not beat" if beat else
           "Neither DPO nor PPO beat")
    head = (f"{who} SFT on the held-out prompts (win rate against SFT, ties ½, judged by the true reward: "
            f"DPO {show(d['win_rate'], 3)}, PPO {show(p['win_rate'], 3)}); DPO took "
            f"{d['train_seconds']['mean'] / max(p['train_seconds']['mean'], 1e-9):.2f}× PPO's training time and held "
            f"{d['held']['total'] / p['held']['total']:.2f}× its parameters.")
    lines = [
        head,
        f"1. Both improve on SFT: {word(both)} (DPO {'>' if improve['dpo'] else '≤'} ½, PPO "
        f"{'>' if improve['ppo'] else '≤'} ½). KL per token against SFT: DPO {show(d['kl'], 3)}, PPO "
        f"{show(p['kl'], 3)} nats.",
        f"2. DPO is cheaper: time {word(cheaper['time'])} ({show(d['train_seconds'], 3)} s vs "
        f"{show(p['train_seconds'], 3)} s in the training loop, for {s['dpo_steps']} DPO steps and {s['ppo_steps']} PPO "
        f"steps), whole process {word(cheaper['process_time'])} ({show(d['process_seconds'], 3)} s vs "
        f"{show(p['process_seconds'], 3)} s: DPO's also encodes every pair and runs the reference over all of them "
        f"once, {d['held']['cached_reference_numbers'] // 2:,} pairs, of which its steps use "
        f"{min(int(s['dpo_steps']) * batch, d['held']['cached_reference_numbers'] // 2):,}); peak "
        f"memory {word(cheaper['memory'])} ({show(d['peak_rss_mib'], 4)} vs {show(p['peak_rss_mib'], 4)} MiB RSS, "
        f"of which about {p['rss_after_imports_mib']['mean']:.0f} MiB is Python and torch); parameters held "
        f"{word(cheaper['parameters'])} ({d['held']['total']:,} vs {p['held']['total']:,}).",
        f"3. DPO varies less across seeds: {word(steadier)} (std of the win rate over {n} seeds: DPO "
        f"{d['win_rate']['std']:.3g}, PPO {p['win_rate']['std']:.3g}; min–max DPO "
        f"{d['win_rate']['min']:.3g}–{d['win_rate']['max']:.3g}, PPO {p['win_rate']['min']:.3g}–"
        f"{p['win_rate']['max']:.3g}).",
        f"4. PPO, trained on {trained_on}, over-optimises the reward model: on the held-out answers "
        f"{word(over_eval)} (mean over seeds: Δ RM score vs SFT {d_rm:+.3g}, Δ world reward {d_world:+.3g}); over "
        f"its rollouts {word(over_train)} (last quarter minus first quarter of the steps, mean over seeds ± its "
        f"standard error were the curves flat noise: RM {rm_d:+.3g} ± {rm_se:.2g}, world {world_d:+.3g} ± "
        f"{world_se:.2g}; confirmed needs the RM's rise above 2 standard errors and the world's below)."
        + (" PPO was trained on the true reward here, so this only shows whether the reward model agrees with it."
           if s["ppo_reward"] != "rm" else ""),
    ]
    refuted = [i for i, ok in ((1, both), (2, all(cheaper.values())), (3, steadier), (4, over_eval or over_train))
               if ok is False]
    if refuted:
        lines.append("The run refutes expectation " + ", ".join(map(str, refuted)) + " at these settings; see "
                     "'What the numbers mean' for why a small run can.")
    return "\n\n".join(lines), {
        "improves_on_sft": improve, "dpo_cheaper": cheaper, "dpo_steadier": steadier,
        "overoptimisation": {"eval": over_eval, "training": over_train, "delta_rm": d_rm, "delta_world": d_world,
                             "drift_rm": [rm_d, rm_se], "drift_world": [world_d, world_se]},
        "refuted": refuted}


# --- figures ---------------------------------------------------------------------------------------------------

def _figure(size):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    fig = Figure(figsize=size, dpi=110)
    FigureCanvasAgg(fig)
    return fig


COLOURS = {"base": "tab:gray", "sft": "tab:blue", "dpo": "tab:green", "ppo": "tab:red"}


def draw(out: Path, per_seed: dict, per_method: dict, fixed: dict, traces: dict, seeds: list[int]) -> list[str]:
    names = ["quality.png", "overoptimisation.png", "costs.png"]

    fig = _figure((10, 3.8))
    for ax, (key, label) in zip(fig.subplots(1, 3), COLUMNS[:3]):
        for x, name in enumerate(("base", "sft")):
            ax.bar(x, fixed[name][key] if math.isfinite(fixed[name][key]) else 0, color=COLOURS[name], alpha=0.6)
        for x, m in enumerate(METHODS, 2):
            a = per_method[m][key]
            ax.bar(x, a["mean"], yerr=a["std"], color=COLOURS[m], alpha=0.6, capsize=3)
            ax.scatter([x] * len(a["values"]), a["values"], color="black", s=10, zorder=3)
        ax.set_xticks(range(4), [NAMES[n] for n in NAMES])
        ax.set_title(label, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("held-out prompts: mean ± std over seeds, dots = seeds", fontsize=10)
    fig.tight_layout()
    save(fig, out / names[0])

    fig = _figure((10, 4))
    left, right = fig.subplots(1, 2)
    for name in ("base", "sft"):
        left.scatter(fixed[name]["world_reward"], fixed[name]["reward_model"], color=COLOURS[name], marker="s",
                     s=40, label=NAMES[name])
    for m in METHODS:
        left.scatter([per_seed[seed][m]["world_reward"] for seed in seeds],
                     [per_seed[seed][m]["reward_model"] for seed in seeds], color=COLOURS[m], label=NAMES[m])
        for seed in seeds:
            left.annotate(str(seed), (per_seed[seed][m]["world_reward"], per_seed[seed][m]["reward_model"]),
                          fontsize=7, textcoords="offset points", xytext=(3, 3))
    left.set_xlabel("world (true) reward")
    left.set_ylabel("reward-model score")
    left.set_title("held-out answers: one point per method and seed", fontsize=9)
    left.legend(fontsize=8)
    for seed, t in traces.items():
        steps = list(range(1, len(t["rm"]) + 1))
        right.plot(steps, t["rm"], color="tab:red", alpha=0.8, label="RM score" if seed == seeds[0] else None)
        right.plot(steps, t["world"], color="tab:purple", linestyle="--", alpha=0.8,
                   label="world reward" if seed == seeds[0] else None)
    right.set_xlabel("PPO step")
    right.set_ylabel("mean over the step's rollouts")
    right.set_title("PPO's rollouts during training, one line per seed", fontsize=9)
    right.legend(fontsize=8)
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    save(fig, out / names[1])

    fig = _figure((10, 3.6))
    labels = [NAMES[m] for m in METHODS]
    for ax, (key, title) in zip(fig.subplots(1, 3), (("train_seconds", "training wall-clock (s)"),
                                                     ("peak_rss_mib", "peak RSS (MiB)"), ("held", "parameters held"))):
        if key == "held":
            bottom = [0.0, 0.0]
            parts = list(dict.fromkeys(p for m in METHODS for p in per_method[m]["held"]["models"]))
            for part in parts:
                values = [per_method[m]["held"]["models"].get(part, 0) for m in METHODS]
                ax.bar(labels, values, bottom=bottom, label=part)
                bottom = [b + v for b, v in zip(bottom, values)]
            ax.legend(fontsize=7)
        else:
            ax.bar(labels, [per_method[m][key]["mean"] for m in METHODS],
                   yerr=[per_method[m][key]["std"] for m in METHODS], capsize=3,
                   color=[COLOURS[m] for m in METHODS], alpha=0.7)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    save(fig, out / names[2])
    return names


# --- texts -----------------------------------------------------------------------------------------------------

def setup_text(s: dict, recipes: dict, held: dict) -> str:
    """The setup paragraph; the DPO and PPO hyper-parameters are read from the recipes the runs used."""
    p, dpo, ppo = s["pretrain"], recipes["dpo"], recipes["ppo"]
    base = (f"read from the `llmlab run` folder `{s['run']}` (its world, pretrain, sft and rm)" if s["run"] else
            f"trained once here: world preset `{s['world']}` (seed {s['world_seed']}); a Llama-style decoder "
            f"({p['n_layer']} layer{'s' if p['n_layer'] > 1 else ''}, width {p['d_model']}, BPE of {p['vocab_size']} tokens; "
            f"{held['dpo']['total']:,} parameters) pre-trained for {p['steps']} steps (`base/`), SFT for "
            f"{s['sft_steps']} steps (`sft/`), the reward model for {s['rm_steps']} steps on the preference pairs "
            "(`rm/`), all with the world recipes of `llmlab run` (`sft-world`, `rm-world`)")
    reward = "the reward model (RLHF)" if s["ppo_reward"] == "rm" else "the world's programmatic (true) reward"
    kl = (f"adaptive KL penalty from β = {ppo['ppo']['kl_coef']:g} toward {ppo['ppo']['kl_target']:g} nats"
          if ppo["ppo"].get("kl_target") else f"KL penalty β = {ppo['ppo']['kl_coef']:g}")
    return (f"Shared models {base}. Per seed, from the same SFT model: DPO (`dpo-world`: β = "
            f"{dpo['dpo']['beta']:g}, RPO α = {dpo['dpo']['rpo_alpha']:g}, η = {dpo['train']['lr']:g}) for "
            f"{s['dpo_steps']} steps of {dpo['data']['batch_size']} pairs, and PPO (`ppo-world`: η = "
            f"{ppo['train']['lr']:g}, clip {ppo['ppo']['clip_range']:g}, {kl}, value head at "
            f"{ppo['ppo']['value_lr_scale']:g}× η) for {s['ppo_steps']} steps of {s['rollout_batch']} rollouts of ≤ "
            f"{s['ppo_max_new_tokens']} tokens, {ppo['ppo']['epochs']} epochs each, against {reward}. The recipes' "
            "own step counts "
            "(200 DPO, 120 PPO) are cut to fit the preset's time budget; the number of seeds is not. Each method "
            "trains in a child process (its peak RSS is its own). Evaluation: greedy answers of ≤ "
            f"{s['max_new_tokens']} tokens to the first {s['eval_items']} prompts of the world's held-out "
            "`rl_eval.jsonl`, scored by the world's judge (true reward, the judge of the win rate) and the reward "
            "model; KL per token against SFT exact over the vocabulary. Wall-clock on a CPU shared with other work.")


OVEROPT = """\
Left: every method's mean reward-model score against its mean true (world) reward on the same held-out answers, \
one point per seed (base and SFT once). A method above and to the left of SFT pleases the reward model more while \
earning less true reward: over-optimisation. Right: PPO's rollouts at each training step, scored by both (the \
policy is trained on the reward-model score when ppo_reward = rm). The table gives every seed's numbers."""

COSTS = """\
Training wall-clock: the training loop's seconds (DPO's includes no reference pass; that pass is one forward \
over the pairs before the loop). Whole process: the child's seconds from its imports to its end: loading the \
models, DPO's reference pass, training, saving (of the last attempt only, when a run was resumed). Peak RSS: the \
high-water mark of the resident set (`VmHWM`) of the child process that trained the method, Python and torch \
included; the column after it is the same mark right after the imports, the floor every process pays. Parameters \
held: counted exactly from the saved models. DPO as llmlab implements it caches the reference's log-probabilities \
(2 numbers per pair) instead of holding a second model; textbook DPO holds policy + reference. PPO holds the policy \
with its value head (trainable), the frozen SFT copy (reference for the KL penalty) and the reward model."""

SAMPLES = """\
The same held-out prompts (one of each kind first) answered greedily by the base model, SFT, and DPO and PPO of \
seed {seed}; each answer is followed by its reward-model score and its world reward (1 is the top)."""

MEANING = """\
Win rate W = (wins + ties/2)/n against SFT, judged by the world's reward: ½ is no change. Many prompts already get \
the top reward from SFT and can only tie, so W stays near ½ unless a method breaks something (W < ½) or fixes \
what SFT misses (multi-part requests, refusals). KL per token says how far each method moved from SFT; DPO's \
implicit KL is set by β and its step count, PPO's by its penalty and its steps, so compare W at the KL each paid.

DPO needs no sampling during training: one forward and backward pass over a chosen and a rejected answer per pair, \
with the reference's log-probabilities computed once. PPO samples every step (generation is sequential and \
dominates on a CPU), scores with the reward model, runs the reference for the KL, and makes four optimisation \
passes per batch: more time and more models in memory. On a model this small the extra copies are a few MiB each \
(4 bytes a parameter), so the peak resident memory is set by the rest: Python and torch, the encoded data set, \
and the activations of one step, where DPO's batch (chosen and rejected answers of every pair, packed into long \
rows, logits over the vocabulary) can outweigh PPO's short rollouts. On a 7B model each extra copy of the weights \
is gigabytes and the count of models held decides what fits.

Over-optimisation (Gao et al. 2023) needs a reward model that is wrong somewhere the policy can find, and enough \
optimisation to find it: with few PPO steps and a strong KL penalty PPO may not move far enough to show it, and \
a run here that does not show it does not refute it in general; it says that at this budget the reward model and \
the true reward still agree. Seed-to-seed spread with 3 seeds is itself a rough number: a std over 3 values has a \
relative error of about 50%."""
