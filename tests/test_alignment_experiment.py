"""``llmlab experiment alignment``: the test preset end to end, the numbers of the report against summary.json, the
models held, resume without retraining, and the errors for bad settings."""
import json
import math
import re
import statistics
from pathlib import Path

import pytest

from llmlab import cli
from llmlab.experiments import alignment
from llmlab.experiments.alignment_report import _drift
from llmlab.experiments.common import EXPERIMENTS, resolve, show
from llmlab.hub.load import load_our_model
from llmlab.model.heads import RewardModel

TEST = resolve(alignment, "alignment", "test", [])[0]


def run_cli(out: Path, *sets: str) -> int:
    return cli.main(["experiment", "alignment", "--preset", "test", "--out", str(out),
                     *[a for s in sets for a in ("--set", s)]])


@pytest.fixture(scope="module")
def align_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exp") / "align"
    assert run_cli(out) == 0
    return out


def test_registered():
    assert EXPERIMENTS["alignment"][0] == "alignment"


def test_the_test_preset_writes_every_run_the_report_and_the_figures(align_run):
    summary = json.loads((align_run / "summary.json").read_text())
    assert summary["experiment"] == "alignment" and summary["seeds"] == [0]
    for name in ("world/world.json", "base/model/config.json", "sft/model/config.json", "rm/model/config.json"):
        assert (align_run / name).is_file(), name                         # shared, trained once
    for method in ("dpo", "ppo"):
        result = json.loads((align_run / "seed-0" / method / "result.json").read_text())
        assert 0 <= result["win_rate"] <= 1 and result["kl"] >= -1e-6
        assert result["peak_rss_mib"] >= result["rss_after_imports_mib"] > 0 and result["train_seconds"] > 0
        assert summary["methods"][method]["win_rate"]["values"] == [result["win_rate"]]
    for name in ("report.md", "report.html", "quality.png", "overoptimisation.png", "costs.png"):
        assert (align_run / name).stat().st_size > 0, name
    assert (align_run / "report.html").read_text().count("data:image/png;base64,") == 3
    trace = (align_run / "seed-0" / "ppo" / alignment.TRACE).read_text().splitlines()
    assert len(trace) == TEST["ppo_steps"] * TEST["rollout_batch"]          # every rollout, scored by both
    assert set(json.loads(trace[0])) == {"rm", "world"}
    assert len(summary["per_seed"]["0"]["ppo"]["trace"]["rm"]) == TEST["ppo_steps"]
    samples = summary["samples"]
    assert len(samples["prompts"]) == TEST["samples"] and set(samples) >= {"base", "sft", "dpo", "ppo"}
    assert set(summary["improves_on_sft"]) == {"dpo", "ppo"} and isinstance(summary["refuted"], list)


def test_the_numbers_in_the_report_are_those_of_the_summary(align_run):
    summary = json.loads((align_run / "summary.json").read_text())
    report = (align_run / "report.md").read_text()
    for method, label in (("dpo", "DPO"), ("ppo", "PPO")):
        m = summary["methods"][method]
        row = re.search(rf"^\| {label} \| ([^|]+) \| ([^|]+) \| ([^|]+) \| ([^|]+) \|", report, re.M)
        assert [c.strip() for c in row.groups()] == [show(m[k], 3) for k in
                                                      ("win_rate", "kl", "reward_model", "world_reward")]
        cost = re.search(rf"^\| {label} \| ([^|]+) \| [^|]+ \| ([^|]+) \| [^|]+ \| policy [^|]+ \| ([0-9,]+) \|", report, re.M)
        assert cost.group(1).strip() == show(m["train_seconds"], 3)
        assert cost.group(2).strip() == show(m["peak_rss_mib"], 4)
        assert int(cost.group(3).replace(",", "")) == m["held"]["total"]
    for i, kind in enumerate(summary["samples"]["kinds"]):
        rm, world = summary["samples"]["ppo"]["rm"][i], summary["samples"]["ppo"]["world"][i]
        assert f"| {i + 1} | {kind} |" in report and f"{rm:.2f} / {world:.2f} |" in report


def test_models_held_are_counted_from_the_models(align_run):
    summary = json.loads((align_run / "summary.json").read_text())
    policy = load_our_model(align_run / "sft" / "model")
    n = sum(p.numel() for p in policy.parameters())
    n_rm = sum(p.numel() for p in RewardModel.load(align_run / "rm" / "model").parameters())
    ppo, dpo = summary["methods"]["ppo"]["held"], summary["methods"]["dpo"]["held"]
    assert ppo["models"] == {"policy": n, "value head": policy.config.d_model + 1, "reference": n,
                             "reward model": n_rm}
    assert ppo["total"] == 2 * n + policy.config.d_model + 1 + n_rm and ppo["trainable"] == n + policy.config.d_model + 1
    pairs = len((align_run / "world" / "pairs_train.jsonl").read_text().splitlines())
    assert dpo == {"models": {"policy": n}, "total": n, "trainable": n, "cached_reference_numbers": 2 * pairs}


def test_a_rerun_trains_nothing_and_an_interrupted_ppo_resumes(align_run, monkeypatch):
    metrics = sorted(align_run.glob("seed-0/*/metrics.jsonl"))
    before = [p.read_bytes() for p in metrics]

    def no_child(*args, **kwargs):
        raise AssertionError("a finished method was trained again")
    monkeypatch.setattr("subprocess.run", no_child)
    assert run_cli(align_run) == 0
    assert [p.read_bytes() for p in metrics] == before
    monkeypatch.undo()

    # PPO killed after its last checkpoint, before it was measured: the rerun resumes it and trains no step again
    ppo_dir = align_run / "seed-0" / "ppo"
    measured = json.loads((ppo_dir / "result.json").read_text())
    for name in ("result.json", alignment.CHILD):
        (ppo_dir / name).unlink()
    with (ppo_dir / alignment.TRACE).open("a") as f:                       # a step the kill cut short
        f.write(json.dumps({"rm": 0.0, "world": 0.0}) + "\n")
    assert run_cli(align_run) == 0
    child = json.loads((ppo_dir / alignment.CHILD).read_text())
    assert child["resumed"] is True and child["steps"] == TEST["ppo_steps"]
    steps = [json.loads(line)["step"] for line in (ppo_dir / "metrics.jsonl").open()]
    assert steps == list(range(1, TEST["ppo_steps"] + 1))
    assert len((ppo_dir / alignment.TRACE).read_text().splitlines()) == TEST["ppo_steps"] * TEST["rollout_batch"]
    again = json.loads((ppo_dir / "result.json").read_text())
    assert again["trace"] == measured["trace"]                                # the rollouts before the kill
    for key in ("win_rate", "kl", "reward_model", "world_reward"):
        assert again[key] == pytest.approx(measured[key]), key


def test_drift_and_trace_per_step(tmp_path):
    d, se = _drift([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])             # quarters of 2: 7.5 − 1.5
    assert d == pytest.approx(6.0) and se == pytest.approx(statistics.stdev(range(1, 9)) * math.sqrt(2 / 2))
    assert all(math.isnan(x) for x in _drift([1.0]))
    path = tmp_path / "trace.jsonl"
    path.write_text("".join(json.dumps({"rm": float(i), "world": -float(i)}) + "\n" for i in range(5)))
    assert alignment.trace_per_step(path, 2) == {"rm": [0.5, 2.5], "world": [-0.5, -2.5]}   # the partial step: out


@pytest.mark.parametrize("sets, message", [
    (["nonsense=1"], "--set nonsense: experiment alignment has no such setting"),
    (["dpo_steps=0"], "dpo_steps must be a whole number ≥ 1"),
    (["ppo_steps=1.5"], "ppo_steps must be a whole number"),
    (["rollout_batch=-4"], "rollout_batch must be a whole number ≥ 1"),
    (["ppo_reward=oracle"], "ppo_reward must be rm"),
    (["world=huge"], "world must be one of"),
    (["run=/no/such/run"], "run = '/no/such/run' is not a finished `llmlab run` folder"),
    (["pretrain.d_model=0"], "pretrain.d_model must be a whole number"),
    (["pretrain.lr=-1"], "pretrain.lr must be a positive number"),
])
def test_bad_settings_are_clear_errors(sets, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert run_cli(out, *sets) != 0
    assert message in capsys.readouterr().err
    assert not out.exists()                                  # refused before the folder was claimed


def test_an_llmlab_run_folder_gives_the_shared_models(align_run, tmp_path):
    run = tmp_path / "run"                                   # the layout of `llmlab run`: world, pretrain, sft, rm
    run.mkdir()
    for name, source in (("world", "world"), ("pretrain", "base"), ("sft", "sft"), ("rm", "rm")):
        (run / name).symlink_to(align_run / source)
    out = tmp_path / "out"
    assert run_cli(out, f"run={run}") == 0
    assert not any((out / name).exists() for name in ("world", "base", "sft", "rm"))    # nothing shared trained
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["run"] == str(run) and f"`{run}`" in (out / "report.md").read_text()
    assert (out / "seed-0" / "dpo" / "model" / "config.json").is_file()
