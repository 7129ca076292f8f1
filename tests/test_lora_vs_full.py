"""``llmlab experiment lora-vs-full``: the test preset end to end, the parameter and optimizer-state counts, resume,
and the errors for bad settings."""
import json
import re
from pathlib import Path

import pytest
from torch import nn

from llmlab import cli
from llmlab.experiments import lora_vs_full as lvf
from llmlab.experiments.common import EXPERIMENTS, resolve
from llmlab.hub.load import load_our_model
from llmlab.stages import sft

ARMS = ["full", "r2", "r4"]                      # the test preset: full fine-tuning and ranks 2, 4


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exp") / "lora"
    assert cli.main(["experiment", "lora-vs-full", "--preset", "test", "--out", str(out)]) == 0
    return out


def test_registered():
    assert EXPERIMENTS["lora-vs-full"][0] == "lora_vs_full"


def test_the_test_preset_writes_every_run_the_report_and_the_figures(lora_run):
    summary = json.loads((lora_run / "summary.json").read_text())
    assert summary["experiment"] == "lora-vs-full" and summary["seeds"] == [0]
    assert list(summary["arms"]) == ARMS
    assert (lora_run / "base" / "model" / "config.json").is_file()           # pre-trained once, shared
    for arm in ARMS:
        result = json.loads((lora_run / "seed-0" / arm / "result.json").read_text())
        assert 0 <= result["exact_match"] <= 1 and result["seconds_per_step"] > 0
        assert summary["arms"][arm]["exact_match"]["values"] == [result["exact_match"]]
    for name in ("report.md", "report.html", "exact_match.png", "costs.png", "loss_curves.png"):
        assert (lora_run / name).stat().st_size > 0, name
    assert (lora_run / "report.html").read_text().count("data:image/png;base64,") == 3
    assert summary["verdict"] in ("confirmed", "partly", "refuted", "inconclusive")
    report = (lora_run / "report.md").read_text()
    rows = re.findall(r"^\| (full|r\d+) \| [0-9.e-]+ \| ([0-9,]+) \(", report, re.M)
    assert [(arm, int(n.replace(",", ""))) for arm, n in rows] == \
        [(arm, summary["arms"][arm]["params"]["trainable"]) for arm in ARMS]


def test_trainable_parameters_are_r_times_d_in_plus_d_out_per_adapted_linear(lora_run):
    base = lora_run / "base" / "model"
    settings, _ = resolve(lvf, "lora-vs-full", "test", [])
    plain = load_our_model(base)
    adapted = [m for name, m in plain.named_modules()
               if isinstance(m, nn.Linear) and name.rpartition(".")[2] in settings["targets"]]
    assert len(adapted) == 4                                  # qkv, o_proj, up, down of the one block
    n_all = sum(p.numel() for p in plain.parameters())
    for rank in (2, 4, 7):
        counts = lvf.parameter_counts(base, settings, rank)
        expected = sum(rank * (m.in_features + m.out_features) for m in adapted)
        assert counts["trainable"] == counts["formula"] == expected
        assert counts["adapted_linears"] == len(adapted) and counts["all"] == n_all + expected
        assert counts["bytes"]["adam"] == 2 * 4 * expected
    full = lvf.parameter_counts(base, settings, 0)
    assert full["trainable"] == full["all"] == n_all and full["bytes"]["total"] == 4 * 4 * n_all


def test_the_adam_state_read_from_each_checkpoint_equals_the_count(lora_run):
    summary = json.loads((lora_run / "summary.json").read_text())
    for arm, a in summary["arms"].items():
        assert a["adam_bytes_measured"]["values"] == [a["params"]["bytes"]["adam"]], arm
    assert summary["adam_count_agrees"] is True
    assert summary["arms"]["r2"]["params"]["bytes"]["adam"] < summary["arms"]["full"]["params"]["bytes"]["adam"]


def test_a_rerun_trains_nothing_and_an_interrupted_arm_resumes(lora_run, monkeypatch):
    metrics = sorted(lora_run.glob("seed-0/*/metrics.jsonl"))
    before = [p.read_bytes() for p in metrics]
    real_run = sft.run

    def no_training(*args, **kwargs):
        raise AssertionError("a finished arm was trained again")
    monkeypatch.setattr(sft, "run", no_training)
    assert cli.main(["experiment", "lora-vs-full", "--preset", "test", "--out", str(lora_run)]) == 0
    assert [p.read_bytes() for p in metrics] == before

    # r4 killed after its last checkpoint, before it was measured: the rerun resumes it, training no step again
    done = lora_run / "seed-0" / "r4" / "result.json"
    measured = json.loads(done.read_text())
    done.unlink()
    calls = []

    def resumed(*args, resume=False, **kwargs):
        calls.append(resume)
        return real_run(*args, resume=resume, **kwargs)
    monkeypatch.setattr(sft, "run", resumed)
    assert cli.main(["experiment", "lora-vs-full", "--preset", "test", "--out", str(lora_run)]) == 0
    assert calls == [True]
    again = json.loads(done.read_text())
    steps = [json.loads(line)["step"] for line in (lora_run / "seed-0" / "r4" / "metrics.jsonl").open()]
    assert steps.count(4) <= 3 and max(steps) == 4            # no second pass over the steps
    for key in ("exact_match", "val_loss", "final_loss", "adam_bytes_measured"):
        assert again[key] == pytest.approx(measured[key]), key


@pytest.mark.parametrize("sets, message", [
    (["nonsense=1"], "--set nonsense: experiment lora-vs-full has no such setting"),
    (["ranks=[0, 4]"], "ranks must be a whole number ≥ 1"),
    (["ranks=[4, 4]"], "ranks must be a list of distinct LoRA ranks"),
    (["ranks=8"], "ranks must be a list"),
    (["lr_lora=-1"], "lr_lora must be a positive number"),
    (["steps=0"], "steps must be a whole number ≥ 1"),
    (["targets=[]"], "targets must name the linear layers"),
    (["world=huge"], "world must be one of"),
    (["base=/no/such/model"], "base = '/no/such/model' is not a model folder"),
    (["pretrain.d_model=0"], "pretrain.d_model must be a whole number"),
    (["pretrain.depth=3"], "--set pretrain.depth"),
])
def test_bad_settings_are_clear_errors(sets, message, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["experiment", "lora-vs-full", "--preset", "test", "--out", str(out)]
    assert cli.main(args + [x for s in sets for x in ("--set", s)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_an_unknown_lora_target_names_the_models_linears(lora_run, tmp_path, capsys):
    base = lora_run / "base" / "model"
    out = tmp_path / "out"
    assert cli.main(["experiment", "lora-vs-full", "--preset", "test", "--out", str(out), "--set", f"base={base}",
                     "--set", "targets=[qkv, nope]"]) == 2
    err = capsys.readouterr().err
    assert "lora.targets: no linear layer named nope" in err and "o_proj" in err
