"""``llmlab run --preset test``: every stage, a complete report, and an interrupted run that continues to the same
numbers."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmlab.pipeline import STAGES, run_pipeline

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
SECTIONS = ("The task world", "Pre-training", "Supervised fine-tuning", "Reward model", "DPO", "PPO", "Evaluation",
            "Exact match by kind", "World reward by kind", "Classification", "Samples", "Time")


def numbers(summary: dict) -> dict:
    """The report's numbers without wall-clock times."""
    timing = {"seconds", "total_seconds", "peak_memory_mb", "seconds_training", "train_seconds", "examples_per_s",
              "seconds_per_query"}

    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if k not in timing}
        return value
    return strip(summary)


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "full"
    return out, run_pipeline(out, preset="test")


def test_every_stage_runs_and_the_report_is_complete(finished):
    out, summary = finished
    assert all(stage in summary or stage == "samples" for stage in STAGES)
    assert set(summary["seconds"]) == set(STAGES)
    report = (out / "report.md").read_text()
    for title in SECTIONS:
        assert f"## {title}" in report
    figures = [line.split("](")[1].rstrip(")") for line in report.splitlines() if line.startswith("![")]
    assert len(figures) >= 7
    for fig in figures:
        assert (out / fig).read_bytes()[:8] == PNG_MAGIC, fig
    html = (out / "report.html").read_text()
    assert html.count("data:image/png;base64,") == len(figures)
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["eval"]["SFT"]["exact_match"] == summary["eval"]["SFT"]["exact_match"]
    for model in ("base", "SFT", "DPO", "PPO"):
        assert {"exact_match", "refusal_rate", "false_refusal_rate", "reward_model"} <= set(summary["eval"][model])
    assert 0 <= summary["classify"]["after"] <= 1 and summary["rm"]["val_accuracy"] is not None
    ceiling = summary["eval"]["DPO"]["win_rate_ceiling"]
    assert summary["eval"]["PPO"]["win_rate_ceiling"] == ceiling and summary["eval"]["SFT"]["win_rate_ceiling"] is None
    assert f"no model can win more than {ceiling:.3f} against it" in report
    assert set(summary["eval"]["SFT"]["world_reward_by_kind"]) == {"fact", "arithmetic", "reverse", "sort", "count",
                                                                  "multi", "forbidden", "benign"}


def test_the_world_fingerprint_follows_the_generator_and_its_configuration(tmp_path, monkeypatch):
    """A changed world (another generator, in any module of ``llmlab.world``, or WorldConfig) reruns the world and
    every stage after it."""
    from llmlab import pipeline
    run = pipeline.Run(tmp_path, "test", 0, {})
    first = pipeline.fingerprint(run, "world", {})
    assert pipeline.fingerprint(pipeline.Run(tmp_path, "test", 1, {}), "world", {}) != first
    presets = pipeline.world_build.PRESETS
    monkeypatch.setitem(presets, "test", {**presets["test"], "n_multi_eval": 3})
    assert pipeline.fingerprint(run, "world", {}) != first
    monkeypatch.undo()
    sources = tmp_path / "sources"
    sources.mkdir()
    for source in Path(pipeline.world_build.__file__).parent.glob("*.py"):
        (sources / source.name).write_text(source.read_text(encoding="utf-8"), encoding="utf-8")
    monkeypatch.setattr(pipeline.world_build, "__file__", str(sources / "build.py"))
    assert pipeline.fingerprint(run, "world", {}) == first
    with open(sources / "content.py", "a", encoding="utf-8") as f:
        f.write("\n")
    assert pipeline.fingerprint(run, "world", {}) != first


def test_a_second_run_skips_every_finished_stage(finished, capsys):
    out, summary = finished
    again = run_pipeline(out, preset="test")
    assert numbers(again) == numbers(summary)
    assert capsys.readouterr().err.count("skipped") == len(STAGES)


def test_a_changed_recipe_reruns_its_stage_and_what_reads_it(finished, tmp_path, monkeypatch, capsys):
    """Editing the rm-world recipe reruns the reward model and the evaluation that scores with it; pre-training,
    SFT, DPO, PPO and classification stay as they are."""
    import shutil

    import llmlab.config
    out, _ = finished
    configs = tmp_path / "configs"
    shutil.copytree(llmlab.config.CONFIG_DIR, configs)
    with open(configs / "rm-world.yaml", "a") as f:
        f.write("# edited\n")
    monkeypatch.setattr(llmlab.config, "CONFIG_DIR", configs)
    copy = tmp_path / "run"
    shutil.copytree(out, copy)
    capsys.readouterr()
    run_pipeline(copy, preset="test")
    err = capsys.readouterr().err
    rerun = {stage for stage in STAGES if f"{stage}: running" in err}
    assert rerun == {"rm", "eval"}, err


def test_a_killed_run_continues_to_the_same_numbers(finished, tmp_path, capsys):
    _, summary = finished
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "llmlab.cli", "run", "--preset", "test", "--out", str(out)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = out / "sft" / "checkpoints" / "latest"
    deadline = time.time() + 300
    while not latest.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert latest.exists(), "the run never reached its first SFT checkpoint"
    assert not json.loads((out / "sft" / "stage.json").read_text())["done"]
    capsys.readouterr()
    resumed = run_pipeline(out, preset="test")
    err = capsys.readouterr().err
    assert "sft: resuming" in err and "pretrain: done before" in err and "rm: running" in err
    assert numbers(resumed) == numbers(summary)


def test_the_first_stages_alone_end_with_a_report_of_what_ran(tmp_path, capsys):
    """``llmlab run --stages world pretrain`` trains the base model and exits 0 with a report of those two stages;
    a later ``--stages sft`` adds its own, and a stage whose input never ran is refused before anything runs."""
    from llmlab import cli
    out = tmp_path / "first"
    assert cli.main(["run", "--preset", "test", "--stages", "world", "pretrain", "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert {"world", "pretrain"} <= set(summary) and not set(summary) & set(STAGES[2:])
    assert set(summary["seconds"]) == {"world", "pretrain"}
    report = (out / "report.md").read_text()
    assert [line for line in report.splitlines() if line.startswith("## ")] == [
        "## The task world", "## Pre-training", "## Time"]
    assert "Not run yet: sft, rm, dpo, ppo, eval, classify, samples" in report
    assert (out / "report.html").read_text().count("data:image/png;base64,") == report.count("![") == 1

    assert cli.main(["run", "--preset", "test", "--stages", "sft", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert [line for line in report.splitlines() if line.startswith("## ")] == [
        "## The task world", "## Pre-training", "## Supervised fine-tuning", "## Time"]
    assert json.loads((out / "summary.json").read_text())["pretrain"] == summary["pretrain"]
    capsys.readouterr()
    assert cli.main(["run", "--preset", "test", "--stages", "eval", "--out", str(out)]) == 2
    assert "stage 'eval' reads the output of rm, dpo, ppo, which have not run" in capsys.readouterr().err
    assert not (out / "eval").exists()


def test_unknown_preset_and_stage_are_rejected(tmp_path):
    from llmlab.errors import LLMLabError
    with pytest.raises(LLMLabError, match="unknown preset"):
        run_pipeline(tmp_path, preset="huge")
    with pytest.raises(LLMLabError, match="unknown stage"):
        run_pipeline(tmp_path, preset="test", stages=["pretraining"])
    with pytest.raises(LLMLabError, match="'sft' reads the output of pretrain, which has not run"):
        run_pipeline(tmp_path / "fresh", preset="test", stages=["sft"])
