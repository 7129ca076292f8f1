"""DDP and FSDP under torchrun (2 CPU processes, gloo) reproduce one process with the same global batch."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llmlab.train import init_distributed, is_main, load_latest
from llmlab.train.checkpoint import load_safetensors
from train_script import run

SCRIPT = Path(__file__).with_name("train_script.py")
ARGS = dict(steps=6, batch=8, grad_accum=2, checkpoint_every=3, dropout=0.0)


def losses(out_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in (out_dir / "metrics.jsonl").read_text().splitlines()]


def test_single_process_helpers():
    assert init_distributed("cpu") == (0, 1, 0, torch.device("cpu"))
    assert is_main()


def test_ddp_and_fsdp_match_one_process(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(SCRIPT),
           "--out", str(tmp_path), "--parallel", "ddp,fsdp", "--steps", str(ARGS["steps"]),
           "--batch", str(ARGS["batch"]), "--grad-accum", str(ARGS["grad_accum"]),
           "--checkpoint-every", str(ARGS["checkpoint_every"]), "--dropout", "0"]
    launched = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    run(str(tmp_path / "single"), parallel="none", **ARGS)       # the reference, while torchrun starts up
    output, _ = launched.communicate(timeout=180)
    assert launched.returncode == 0, output[-3000:]

    reference = losses(tmp_path / "single")
    weights = load_safetensors(tmp_path / "single" / "final.safetensors")
    for mode in ("ddp", "fsdp"):
        out = tmp_path / mode
        assert losses(out) == pytest.approx(reference, abs=1e-5), mode      # one line per step: rank 0 only
        final = load_safetensors(out / "final.safetensors")
        assert final.keys() == weights.keys()
        for name in weights:
            assert (final[name] - weights[name]).abs().max() <= 1e-5, (mode, name)
        ckpt = load_latest(out)
        assert ckpt.step == 6 and ckpt.state["world_size"] == 2 and len(ckpt.state["ranks"]) == 2
        assert [r["sampler"]["position"] for r in ckpt.state["ranks"]] == [6 * 2 * 8] * 2
        assert (ckpt.model["head.bias"] - weights["head.bias"]).abs().max() <= 1e-5
