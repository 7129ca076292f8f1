"""The training loop: LR schedules against their closed forms, weight-decay groups, gradient accumulation,
logging, evaluation, NaN handling, config validation and the loss plot."""
import importlib.util
import io
import json
import math
import time

import pytest
import torch
from torch import nn

from llmlab.config import from_dict
from llmlab.errors import LLMLabError
from llmlab.plots import plot_metrics, read_metrics
from llmlab.progress import LOG_INTERVAL, progress_bar
from llmlab.train import TrainConfig, lr_at, make_optimizer, param_groups, train
from llmlab.train.loop import accumulate_gradients
from train_script import TinyLM, TinySampler, lm_loss

FAST = dict(device="cpu", progress=False, checkpoint_every=0, seed=1)


def records(out_dir):
    return read_metrics(out_dir / "metrics.jsonl")


# --- schedules -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("schedule, step, expected", [
    ("cosine", 0, 0.1), ("cosine", 4, 0.5), ("cosine", 9, 1.0),          # warm-up: lr·(t+1)/W
    ("cosine", 10, 1.0), ("cosine", 35, 0.1 + 0.45 * (1 + math.sqrt(0.5))), ("cosine", 60, 0.55),
    ("cosine", 110, 0.1), ("cosine", 500, 0.1),
    ("constant", 9, 1.0), ("constant", 100, 1.0),
    ("wsd", 87, 1.0), ("wsd", 88, 1.0), ("wsd", 99, 0.55), ("wsd", 110, 0.1),   # decay from t=88 to t=110
])
def test_lr_schedule_closed_forms(schedule, step, expected):
    cfg = TrainConfig(max_steps=110, lr=1.0, min_lr_ratio=0.1, warmup_steps=10, schedule=schedule,
                      decay_fraction=0.2)
    assert lr_at(step, cfg) == pytest.approx(expected, abs=1e-12)


def test_wsd_decay_length_is_the_exact_floor_of_fraction_times_steps():
    for fraction, steps in [(0.57, 100), (0.29, 100), (0.58, 100), (0.1, 30)]:
        cfg = TrainConfig(max_steps=steps, lr=1.0, min_lr_ratio=0.0, warmup_steps=0, schedule="wsd",
                          decay_fraction=fraction)
        start = steps - round(fraction * steps)           # ⌊fraction · T⌋ of the decimal product, an integer here
        assert lr_at(start - 1, cfg) == 1.0 and lr_at(start + 1, cfg) < 1.0, (fraction, steps)


def test_no_warmup_starts_at_peak():
    cfg = TrainConfig(max_steps=10, lr=2.0, warmup_steps=0, min_lr_ratio=0.0)
    assert lr_at(0, cfg) == 2.0 and lr_at(5, cfg) == pytest.approx(1.0)


# --- optimizer groups ------------------------------------------------------------------------------------------

def test_weight_decay_only_on_matrices():
    model = nn.Sequential(nn.Embedding(10, 4), nn.LayerNorm(4), nn.Linear(4, 3))
    model[2].bias.requires_grad_(False)
    groups = param_groups(model, 0.1)
    decay = {id(p) for p in groups[0]["params"]}
    no_decay = {id(p) for p in groups[1]["params"]}
    assert groups[0]["weight_decay"] == 0.1 and groups[1]["weight_decay"] == 0.0
    assert decay == {id(model[0].weight), id(model[2].weight)}
    assert no_decay == {id(model[1].weight), id(model[1].bias)}      # frozen bias left out


def test_tied_weight_appears_once():
    model = TinyLM()
    optimizer = make_optimizer(model, TrainConfig(weight_decay=0.05), torch.device("cpu"))
    params = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(params) == 2 and isinstance(optimizer, torch.optim.AdamW)
    assert optimizer.param_groups[0]["params"][0] is model.embed.weight


# --- gradient accumulation -------------------------------------------------------------------------------------

def test_accumulated_gradients_equal_one_big_batch():
    torch.manual_seed(0)
    model = TinyLM(dropout=0.0)
    batch = TinySampler(8).next_batch()
    lm_loss(model, batch)[0].backward()
    reference = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    chunks = iter(batch.split(2))
    losses, n_tokens, _ = accumulate_gradients(model, lm_loss, lambda: next(chunks), 4, torch.device("cpu"))
    assert len(losses) == 4 and n_tokens == batch[:, 1:].numel()
    for p, ref in zip(model.parameters(), reference):
        assert (p.grad - ref).abs().max() <= 1e-6


def test_accumulation_matches_larger_batch_in_training(tmp_path):
    def run(name, batch, accum):
        torch.manual_seed(0)
        model = TinyLM(dropout=0.0)
        cfg = TrainConfig(max_steps=5, lr=1e-2, warmup_steps=1, grad_accum=accum, log_every=1, **FAST)
        train(model, lm_loss, TinySampler(batch), cfg, tmp_path / name)
        return model, [r["loss"] for r in records(tmp_path / name)]

    big, big_losses = run("big", 8, 1)
    small, small_losses = run("accum", 2, 4)
    assert small_losses == pytest.approx(big_losses, abs=1e-6)
    for a, b in zip(big.parameters(), small.parameters()):
        assert (a - b).abs().max() <= 1e-5


# --- logging, eval, save ---------------------------------------------------------------------------------------

def test_train_logs_evaluates_saves_and_plots(tmp_path):
    torch.manual_seed(0)
    model = TinyLM()
    val = TinySampler(16, seed=99).next_batch()
    eval_calls, saved = [], []

    def eval_fn(m):
        assert not m.training and not torch.is_grad_enabled()
        eval_calls.append(1)
        loss = lm_loss(m, val)[0]
        return {"val_loss": loss, "val_ppl": math.exp(loss.item())}

    cfg = TrainConfig(max_steps=7, lr=3e-2, warmup_steps=2, log_every=2, eval_every=3, peak_flops=1e9, **FAST)
    summary = train(model, lm_loss, TinySampler(8), cfg, tmp_path, eval_fn=eval_fn,
                    save_fn=lambda m, out: saved.append((m, out)), flops_per_token=100.0)

    logged = records(tmp_path)
    assert [r["step"] for r in logged] == [2, 3, 4, 6, 7]
    assert len(eval_calls) == 3 and all("val_loss" in r for r in logged if r["step"] in (3, 6, 7))
    for r in logged:
        assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "elapsed", "accuracy", "tokens"} <= set(r)
        assert r["lr"] == pytest.approx(lr_at(r["step"] - 1, cfg))
        assert r["mfu"] == pytest.approx(100.0 * r["tokens_per_s"] / 1e9)
        assert r["tokens"] == r["step"] * 8 * 8
    assert saved == [(model, tmp_path)]
    assert summary["steps"] == 7 and summary["tokens"] == 7 * 64
    assert summary["final_loss"] == logged[-1]["loss"] and summary["val_loss"] == logged[-1]["val_loss"]
    assert logged[-1]["loss"] < logged[0]["loss"]
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_progress_bar_in_a_log_redraws_every_few_seconds_not_every_step(tmp_path, capsys):
    """stderr is not a terminal under pytest, as in CI, nohup or a log file: 40 steps of 10 ms (0.4 s in all)
    leave the first and the final drawing of the bar only, where tqdm's default (and a postfix refreshed every
    step) would write a line per step."""
    def slow_loss(model, batch):
        time.sleep(0.01)
        return lm_loss(model, batch)

    cfg = TrainConfig(max_steps=40, lr=1e-3, warmup_steps=0, **{**FAST, "progress": True})
    train(TinyLM(), slow_loss, TinySampler(4), cfg, tmp_path)
    err = capsys.readouterr().err
    assert "40/40" in err and err.count("\r") <= 3, err


def test_progress_bars_keep_their_pace_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    with progress_bar(total=1, file=Terminal()) as bar:
        assert bar.mininterval == 0.1                      # tqdm's own default
    with progress_bar(total=1, file=io.StringIO()) as bar:
        assert bar.mininterval == LOG_INTERVAL == 5.0
    with progress_bar(total=1, file=io.StringIO(), mininterval=1.0) as bar:
        assert bar.mininterval == 1.0                      # a caller's choice stands


def test_tensorboard_missing_gives_a_message(tmp_path, capsys):
    cfg = TrainConfig(max_steps=2, lr=1e-3, warmup_steps=0, tensorboard=True, **FAST)
    train(TinyLM(), lm_loss, TinySampler(4), cfg, tmp_path)
    if importlib.util.find_spec("tensorboard") is None:
        assert "pip install tensorboard" in capsys.readouterr().err
    else:
        assert any((tmp_path / "tensorboard").iterdir())


# --- non-finite losses -----------------------------------------------------------------------------------------

def nan_at_call(n):
    calls = []

    def loss_fn(model, batch):
        calls.append(1)
        loss, tokens, metrics = lm_loss(model, batch)
        return (loss * math.nan if len(calls) == n else loss), tokens, metrics
    return loss_fn


def test_nan_loss_stops_naming_the_step(tmp_path):
    cfg = TrainConfig(max_steps=5, lr=1e-3, warmup_steps=0, **FAST)
    with pytest.raises(LLMLabError, match="step 3"):
        train(TinyLM(), nan_at_call(3), TinySampler(4), cfg, tmp_path)


def test_nan_loss_skip_leaves_weights_untouched(tmp_path):
    model = TinyLM()
    snapshots = {}
    cfg = TrainConfig(max_steps=5, lr=1e-2, warmup_steps=0, on_nan="skip", log_every=1, **FAST)
    train(model, nan_at_call(3), TinySampler(4), cfg, tmp_path,
          on_step=lambda step, rec: snapshots.__setitem__(step, [p.detach().clone() for p in model.parameters()]))
    assert all(torch.equal(a, b) for a, b in zip(snapshots[2], snapshots[3]))
    assert not all(torch.equal(a, b) for a, b in zip(snapshots[3], snapshots[4]))
    logged = {r["step"]: r for r in records(tmp_path)}
    assert logged[3]["skipped"] is True and logged[3]["loss"] is None
    assert math.isfinite(logged[5]["loss"])


# --- configuration and misuse ----------------------------------------------------------------------------------

def test_config_from_recipe_coerces_yaml_strings():
    cfg = from_dict(TrainConfig, {"lr": "3e-4", "betas": [0.9, "0.99"], "max_steps": "20"}, "train")
    assert cfg.lr == 3e-4 and cfg.betas == (0.9, 0.99) and cfg.max_steps == 20
    assert from_dict(TrainConfig, {"max_steps": "1e3", "warmup_steps": 10.0}, "train").max_steps == 1000
    assert from_dict(TrainConfig, {"seed": "123456789012345678"}, "train").seed == 123456789012345678


@pytest.mark.parametrize("bad, field", [({"schedule": "linear"}, "schedule"), ({"on_nan": "retry"}, "on_nan"),
                                        ({"grad_accum": 0}, "grad_accum"), ({"lr": "fast"}, "lr"),
                                        ({"warmup_steps": -1}, "warmup_steps"),
                                        ({"parallel": "tp"}, "parallel"),
                                        ({"max_steps": 2.5}, "max_steps: expected a whole number"),
                                        ({"grad_accum": "1.5"}, "grad_accum: expected a whole number")])
def test_bad_config_is_a_clear_error(bad, field):
    with pytest.raises(LLMLabError, match=field):
        from_dict(TrainConfig, bad, "train")


@pytest.mark.parametrize("value", ["maybe", 1, None])
def test_a_switch_takes_true_or_false_only(value):
    """A string such as 'maybe' would otherwise switch train.compile on (any non-empty string is truthy)."""
    with pytest.raises(LLMLabError, match=r"train\.compile = .*expected true or false"):
        from_dict(TrainConfig, {"compile": value}, "train")
    assert from_dict(TrainConfig, {"compile": True}, "train").compile is True


def test_batch_source_without_sampler_interface(tmp_path):
    with pytest.raises(LLMLabError, match="next_batch"):
        train(TinyLM(), lm_loss, iter([]), TrainConfig(max_steps=1, warmup_steps=0, **FAST), tmp_path)


def test_loss_fn_must_return_a_scalar(tmp_path):
    bad = lambda model, batch: (model(batch), 1, {})  # noqa: E731
    with pytest.raises(LLMLabError, match="scalar"):
        train(TinyLM(), bad, TinySampler(4), TrainConfig(max_steps=1, warmup_steps=0, **FAST), tmp_path)


# --- plots -----------------------------------------------------------------------------------------------------

def test_plot_metrics(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": None, "skipped": True},
             {"step": 3, "loss": 2.0, "val_loss": 2.5}]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    out = plot_metrics(path, tmp_path / "fig" / "loss.png", title="test")
    assert out.read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(LLMLabError, match="not found"):
        plot_metrics(tmp_path / "missing.jsonl", tmp_path / "x.png")
    path.write_text("{not json\n")
    with pytest.raises(LLMLabError, match=":1:"):
        plot_metrics(path, tmp_path / "x.png")
