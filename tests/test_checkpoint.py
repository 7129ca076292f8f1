"""Checkpoints: atomic writes that survive a crash, tied weights, keep-K, safe loading, RNG state, and a resume
after SIGKILL that reproduces the uninterrupted run bit for bit."""
import io
import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llmlab.errors import LLMLabError
from llmlab.train import TrainConfig, list_checkpoints, load_latest, save_checkpoint, train
from llmlab.train import checkpoint as ckpt
from llmlab.train.checkpoint import (capture_rng, load_optimizer_state_by_name, load_safetensors,
                                     optimizer_state_by_name, restore_rng)
from train_script import TinyLM, TinySampler, lm_loss

SCRIPT = Path(__file__).with_name("train_script.py")


def trained_model_and_optimizer():
    torch.manual_seed(0)
    model = TinyLM(dropout=0.0)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    lm_loss(model, TinySampler(4).next_batch())[0].backward()
    optimizer.step()
    optimizer.zero_grad()
    return model, optimizer


def save(out_dir, step, model, optimizer, **kw):
    return save_checkpoint(out_dir, step, model.state_dict(), optimizer_state_by_name(model, optimizer),
                           {"step": step, "extra": {"note": "hi"}}, info={"lr": 0.5}, **kw)


def test_roundtrip_with_tied_weights(tmp_path):
    model, optimizer = trained_model_and_optimizer()
    path = save(tmp_path, 7, model, optimizer)
    assert path == tmp_path / "checkpoints" / "step_00000007"
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step_00000007"
    with open(path / "model.safetensors", "rb") as f:                 # the tied matrix is stored once
        header = json.loads(f.read(int.from_bytes(f.read(8), "little")))
    assert "head.weight" not in header and "embed.weight" in header
    loaded = load_latest(tmp_path)
    assert loaded.step == 7 and loaded.info == {"step": 7, "lr": 0.5} and loaded.state["extra"] == {"note": "hi"}
    assert loaded.model.keys() == model.state_dict().keys()
    for name, t in model.state_dict().items():
        assert torch.equal(loaded.model[name], t)

    fresh = TinyLM(dropout=0.0)
    fresh.load_state_dict(loaded.model)
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-2)
    load_optimizer_state_by_name(fresh, fresh_opt, loaded.optimizer)
    for opt, m in ((optimizer, model), (fresh_opt, fresh)):           # one more identical step on both
        lm_loss(m, TinySampler(4, seed=5).next_batch())[0].backward()
        opt.step()
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))


def test_keeps_only_the_newest(tmp_path):
    model, optimizer = trained_model_and_optimizer()
    for step in (10, 20, 30, 40):
        save(tmp_path, step, model, optimizer, keep=2)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [30, 40]


def test_crash_mid_write_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    model, optimizer = trained_model_and_optimizer()
    good = save(tmp_path, 10, model, optimizer)
    before = {f: (good / f).read_bytes() for f in ckpt.CHECKPOINT_FILES}

    def crash(*args, **kwargs):
        raise OSError("disk full")
    monkeypatch.setattr(ckpt.torch, "save", crash)          # model.safetensors is written, optimizer.pt is not
    with pytest.raises(OSError, match="disk full"):
        save(tmp_path, 20, model, optimizer)
    monkeypatch.undo()

    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000010"]
    assert (root / "latest").read_text().strip() == "step_00000010"
    assert {f: (good / f).read_bytes() for f in ckpt.CHECKPOINT_FILES} == before
    assert load_latest(tmp_path).step == 10


def test_killed_writes_and_incomplete_dirs_are_ignored(tmp_path):
    model, optimizer = trained_model_and_optimizer()
    save(tmp_path, 10, model, optimizer)
    root = tmp_path / "checkpoints"
    (root / ".tmp-step_00000020-999").mkdir()                  # a writer killed before its rename
    (root / ".tmp-step_00000020-999" / "model.safetensors").write_bytes(b"partial")
    (root / "step_00000030").mkdir()                           # a directory someone left half-filled
    (root / "step_00000030" / "state.json").write_text("{}")
    assert load_latest(tmp_path).step == 10
    save(tmp_path, 20, model, optimizer)
    assert not (root / ".tmp-step_00000020-999").exists()      # stale temporary directories are cleared
    assert load_latest(tmp_path).step == 20
    assert load_latest(tmp_path / "nothing-here") is None


def test_a_crash_while_rewriting_a_step_keeps_that_step(tmp_path):
    model, optimizer = trained_model_and_optimizer()
    save(tmp_path, 10, model, optimizer, keep=1)
    root = tmp_path / "checkpoints"
    os.rename(root / "step_00000010", root / ".old-step_00000010-999")     # killed between the rewrite's renames
    (root / ".tmp-step_00000010-999").mkdir()
    assert load_latest(tmp_path).step == 10
    assert sorted(p.name for p in root.iterdir()) == [".tmp-step_00000010-999", "latest", "step_00000010"]
    save(tmp_path, 10, model, optimizer, keep=1)                             # the rewrite itself, completed
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000010"]
    (root / ".old-step_00000010-998").mkdir()                                # an aside copy the new one replaced
    assert load_latest(tmp_path).step == 10 and not (root / ".old-step_00000010-998").exists()


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def test_unsafe_or_corrupt_files_are_refused(tmp_path):
    model, optimizer = trained_model_and_optimizer()
    path = save(tmp_path, 1, model, optimizer)
    (path / "state.pt").write_bytes(pickle.dumps(Exploit(), protocol=2))
    with pytest.raises(LLMLabError, match="state.pt"):
        load_latest(tmp_path)
    torch.save({"x": Exploit()}, path / "state.pt")
    with pytest.raises(LLMLabError, match="state.pt"):
        load_latest(tmp_path)
    (path / "model.safetensors").write_bytes(b"\x00" * 20)
    with pytest.raises(LLMLabError, match="model.safetensors"):
        load_latest(tmp_path)


def test_rng_state_roundtrip():
    state = capture_rng()
    first = (random.random(), np.random.rand(), torch.rand(3))
    buffer = io.BytesIO()
    torch.save(state, buffer)                                  # must survive weights_only loading
    buffer.seek(0)
    restore_rng(torch.load(buffer, weights_only=True))
    second = (random.random(), np.random.rand(), torch.rand(3))
    assert first[0] == second[0] and first[1] == second[1] and torch.equal(first[2], second[2])


def counting_loss(state):
    def loss_fn(model, batch):
        state["calls"] += 1
        return lm_loss(model, batch)
    return loss_fn


def test_resume_restores_extra_state_and_refuses_to_overwrite(tmp_path):
    cfg = TrainConfig(max_steps=4, lr=1e-2, warmup_steps=0, checkpoint_every=2, log_every=1, device="cpu",
                      progress=False)
    extra = {"calls": 0}
    train(TinyLM(), counting_loss(extra), TinySampler(4), cfg, tmp_path, extra_state=extra)
    with pytest.raises(LLMLabError, match="--resume"):
        train(TinyLM(), lm_loss, TinySampler(4), cfg, tmp_path)
    with open(tmp_path / "metrics.jsonl", "a") as f:       # logged after the last checkpoint, then killed mid-line
        f.write('{"step": 5, "loss": 1.0}\n{"step": 6, "lo')
    restored = {"calls": -100}
    cfg.max_steps = 6
    summary = train(TinyLM(), counting_loss(restored), TinySampler(4), cfg, tmp_path, extra_state=restored,
                    resume=True)
    assert restored == {"calls": 6} and summary["steps"] == 6 and summary["tokens"] == 6 * 4 * 8
    assert [r["step"] for r in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines())] \
        == [1, 2, 3, 4, 5, 6]


def test_resuming_a_finished_run_reevaluates_without_logging_the_final_step_twice(tmp_path):
    cfg = TrainConfig(max_steps=2, lr=1e-2, warmup_steps=0, checkpoint_every=2, log_every=1, eval_every=2,
                      device="cpu", progress=False)

    def eval_fn(model):
        return {"val_loss": 1.5}

    first = train(TinyLM(), lm_loss, TinySampler(4), cfg, tmp_path, eval_fn=eval_fn)
    again = train(TinyLM(), lm_loss, TinySampler(4), cfg, tmp_path, eval_fn=eval_fn, resume=True)
    assert first["val_loss"] == again["val_loss"] == 1.5 and again["steps"] == 2
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged] == [1, 2] and logged[-1]["val_loss"] == 1.5


def start_script(out, *args):
    return subprocess.Popen([sys.executable, str(SCRIPT), "--out", str(out), "--steps", "20", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def finish(proc) -> tuple[int, str]:
    output, _ = proc.communicate(timeout=120)
    return proc.returncode, output[-3000:]


def test_resume_after_sigkill_is_bitwise_identical(tmp_path):
    straight = start_script(tmp_path / "straight")                  # the two first runs share the two cores
    killed = start_script(tmp_path / "resumed", "--checkpoint-every", "10", "--kill-at", "10")
    rc, output = finish(killed)
    assert rc == -9, output                                         # SIGKILL right after the step-10 checkpoint
    assert not (tmp_path / "resumed" / "final.safetensors").exists()
    resumed = start_script(tmp_path / "resumed", "--checkpoint-every", "10", "--resume")
    for proc in (straight, resumed):
        rc, output = finish(proc)
        assert rc == 0, output

    a = load_safetensors(tmp_path / "straight" / "final.safetensors")
    b = load_safetensors(tmp_path / "resumed" / "final.safetensors")
    assert a.keys() == b.keys() == {"embed.weight", "head.weight", "head.bias"}
    assert all(torch.equal(a[k], b[k]) for k in a)
    losses = [[json.loads(line)["loss"] for line in (tmp_path / d / "metrics.jsonl").read_text().splitlines()]
              for d in ("straight", "resumed")]
    assert len(losses[0]) == 20 and losses[0] == losses[1]
