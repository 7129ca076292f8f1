"""``llmlab pretrain`` and ``llmlab experiment encoder-vs-decoder`` end to end, on tiny models and a tiny text."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import transformers

from llmlab import cli
from llmlab.errors import LLMLabError
from llmlab.hub.folder import ModelDir
from llmlab.hub.load import load_encoder, load_model, load_our_model, read_weights
from llmlab.model.decoder import build_model
from llmlab.stages.common import resolve_recipe
from llmlab.experiments.encoder_vs_decoder import decoder_nll, encoder_nll
from llmlab.stages.pretrain import DEFAULTS
from llmlab.stages.pretrain import run as run_pretrain
from llmlab.train.checkpoint import load_latest

REPO = Path(__file__).resolve().parent.parent
TINY = ["--set", "tokenizer.kind=char", "--set", "model.n_layer=2", "--set", "model.d_model=32",
        "--set", "model.n_head=2", "--set", "data.max_length=16", "--set", "data.batch_size=4",
        "--set", "train.max_steps=6", "--set", "train.warmup_steps=2", "--set", "train.eval_batches=2",
        "--set", "train.log_every=1", "--set", "train.checkpoint_every=2", "--set", "train.progress=false"]
LINES = ["Shall I compare thee to a summer's day?", "Thou art more lovely and more temperate:",
         "Rough winds do shake the darling buds of May,", "And summer's lease hath all too short a date."]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "sonnet.txt"
    path.write_text("\n".join(LINES * 12) + "\n", encoding="utf-8")
    return path


def run_cli(*args) -> int:
    return cli.main(["pretrain", *args])


@pytest.fixture(scope="module")
def decoder_run(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("decoder")
    assert run_cli("--set", f"data.path={corpus}", *TINY, "--set", "model.preset=gpt2", "--out", str(out)) == 0
    return out


def trained_weights(out: Path, model) -> torch.nn.Module:
    """Our model class filled with the last checkpoint's weights (the objective's ``lm.`` submodule)."""
    state = {k.removeprefix("lm."): v for k, v in load_latest(out).model.items()}
    model.load_state_dict(state)
    return model.eval()


def test_decoder_run_writes_a_model_transformers_loads(decoder_run):
    for name in ("loss.png", "metrics.jsonl", "run.yaml", "tokenizer/tokenizer.json", "data/index.json",
                 "model/config.json", "model/model.safetensors", "model/chat_template.jinja"):
        assert (decoder_run / name).is_file(), name
    records = [json.loads(line) for line in (decoder_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4, 5, 6]
    assert "val_loss" in records[-1] and records[-1]["val_ppl"] == pytest.approx(torch.tensor(records[-1]["val_loss"]).exp().item())

    ours, tokenizer = load_model(decoder_run / "model"), ModelDir(decoder_run / "model").tokenizer()
    trained = trained_weights(decoder_run, build_model(ours.config))
    hf = transformers.AutoModelForCausalLM.from_pretrained(decoder_run / "model").eval()
    assert type(hf).__name__ == "GPT2LMHeadModel"
    ids = torch.tensor([tokenizer.encode("Shall I compare", add_special_tokens=False)])
    with torch.no_grad():
        expected = trained(ids)
        assert torch.allclose(hf(ids).logits, expected, atol=1e-5)
        assert torch.allclose(ours(ids), expected, atol=1e-6)
    assert "<|im_start|>" in (decoder_run / "model" / "chat_template.jinja").read_text()


def test_resume_after_a_finished_run_does_not_train(decoder_run, capsys):
    weights = decoder_run / "model" / "model.safetensors"
    before = (weights.stat().st_mtime_ns, (decoder_run / "metrics.jsonl").read_text())
    assert run_cli("--set", "data.path=unused.txt", *TINY, "--set", "model.preset=gpt2", "--out", str(decoder_run),
                   "--resume") == 0
    assert "nothing to do" in capsys.readouterr().err
    assert (weights.stat().st_mtime_ns, (decoder_run / "metrics.jsonl").read_text()) == before


def test_kill_then_resume_is_bitwise_identical(decoder_run, corpus, tmp_path):
    out = tmp_path / "killed"
    argv = ["--set", f"data.path={corpus}", *TINY, "--set", "model.preset=gpt2"]
    script = ("import os, signal, sys; from llmlab.stages.common import resolve_recipe; "
              "from llmlab.stages.pretrain import DEFAULTS, run; "
              "sets = [a for a in sys.argv[2:] if a != '--set']; "
              "kill = lambda step, record: step == 3 and os.kill(os.getpid(), signal.SIGKILL); "
              "run(None, None, sys.argv[1], resolve_recipe(DEFAULTS, None, sets), on_step=kill)")
    killed = subprocess.run([sys.executable, "-c", script, str(out), *argv], cwd=REPO, capture_output=True, text=True)
    assert killed.returncode == -9, killed.stderr[-2000:]
    assert load_latest(out).step == 2 and not (out / "model").exists()

    assert run_cli(*argv, "--out", str(out), "--resume") == 0
    resumed = read_weights(out / "model")
    reference = read_weights(decoder_run / "model")
    assert resumed.keys() == reference.keys()
    for name, tensor in reference.items():
        assert torch.equal(resumed[name], tensor), name
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5, 6]


def test_compiled_training_matches_eager(decoder_run, corpus, tmp_path):
    """``train.compile=true`` runs the same training (inductor's fused kernels round differently: close, not equal);
    a stage whose loss does not go through one forward call refuses the option."""
    out = tmp_path / "compiled"
    assert run_cli("--set", f"data.path={corpus}", *TINY, "--set", "model.preset=gpt2", "--set", "train.compile=true",
                   "--out", str(out)) == 0
    compiled, eager = read_weights(out / "model"), read_weights(decoder_run / "model")
    for name, tensor in eager.items():
        assert torch.allclose(compiled[name], tensor, atol=1e-4), name
    from llmlab.stages.sft import DEFAULTS as SFT_DEFAULTS, run as run_sft
    with pytest.raises(LLMLabError, match="train.compile=true is supported by `llmlab pretrain` only"):
        run_sft(str(decoder_run / "model"), str(corpus), str(tmp_path / "sft"),
                resolve_recipe(SFT_DEFAULTS, None, ["train.compile=true", "train.progress=false"]))


def test_encoder_saves_a_bert_for_masked_lm(corpus, tmp_path):
    out = tmp_path / "encoder"
    assert run_cli("--set", f"data.path={corpus}", *TINY, "--set", "model.preset=bert", "--out", str(out)) == 0
    ours = load_encoder(out / "model")
    trained = trained_weights(out, build_model(ours.config))
    hf = transformers.BertForMaskedLM.from_pretrained(out / "model").eval()
    tokenizer = ModelDir(out / "model").tokenizer()
    ids = torch.tensor([tokenizer.encode("art <|mask|> love", add_special_tokens=False)])
    assert tokenizer.mask_token_id in ids[0].tolist()
    with torch.no_grad():
        assert torch.allclose(hf(ids).logits, trained(ids), atol=1e-4)
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert records[-1]["val_loss"] > 0


def test_two_processes_under_torchrun(corpus, tmp_path):
    sets = ["--set", f"data.path={corpus}", *TINY, "--set", "train.checkpoint_every=0"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "llmlab.cli",
           "pretrain", *sets, "--out", str(tmp_path / "ddp")]
    launched = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "OMP_NUM_THREADS": "1"})
    # the same global batch in one process: 2 ranks × 4 rows = 8 rows
    assert run_cli(*sets, "--set", "data.batch_size=8", "--out", str(tmp_path / "single")) == 0
    output, _ = launched.communicate(timeout=240)
    assert launched.returncode == 0, output[-3000:]

    def losses(run):
        return [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert losses("ddp") == pytest.approx(losses("single"), abs=1e-4)
    assert (tmp_path / "ddp" / "model" / "model.safetensors").is_file()


@pytest.mark.parametrize("change, message", [
    ({"data.path": "EMPTY"}, "empty corpus"),
    ({"data.path": "missing/corpus.txt"}, "no such file"),
    ({"data.path": None}, "data.path is not set"),
    ({"data.max_length": 64, "model.max_seq_len": 32}, "exceeds the model's context length of 32"),
    ({"tokenizer.kind": "words"}, "tokenizer.kind"),
])
def test_user_errors(corpus, tmp_path, change, message):
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n\n", encoding="utf-8")
    sets = [s for s in TINY if s != "--set"] + [f"data.path={corpus}"]
    sets += [f"{k}={empty if v == 'EMPTY' else ('null' if v is None else v)}" for k, v in change.items()]
    with pytest.raises(LLMLabError, match=message):
        run_pretrain(None, None, tmp_path / "run", resolve_recipe(DEFAULTS, None, sets))
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_encoder_vs_decoder_experiment(corpus, tmp_path):
    out = tmp_path / "exp"
    assert cli.main(["experiment", "encoder-vs-decoder", "--preset", "test", "--data", str(corpus), "--steps", "4",
                     "--out", str(out),
                     "--set", "model.n_layer=1", "--set", "model.d_model=32", "--set", "model.n_head=2",
                     "--set", "model.max_seq_len=16", "--set", "data.max_length=16", "--set", "data.batch_size=4",
                     "--set", "train.progress=false"]) == 0
    report = (out / "report.md").read_text()
    ppl = {m[1]: float(m[2]) for m in re.finditer(r"^\| (decoder|encoder) \|[^|]*\|[^|]*\| ([0-9.]+) \|", report, re.M)}
    assert set(ppl) == {"decoder", "encoder"} and all(1 < p < 1e4 for p in ppl.values()), report
    assert "Samples" in report and "full forward pass" in report
    assert (out / "perplexity.png").stat().st_size > 0

    decoder = load_our_model(out / "seed-0" / "decoder" / "model").eval()
    encoder = load_our_model(out / "seed-0" / "encoder" / "model").eval()
    mask_id = ModelDir(out / "seed-0" / "encoder" / "model").tokenizer().mask_token_id
    window = torch.tensor([[0, 12, 20, 25, 9, 14, 30, 11]])
    with torch.no_grad():   # each position on its own, unpadded: the batched versions must agree
        dec = [-decoder(window[:, :t]).log_softmax(-1)[0, -1, window[0, t]] for t in range(1, 8)]
        enc = [-encoder(torch.cat([window[:, :t], torch.tensor([[mask_id]])], 1)).log_softmax(-1)[0, -1, window[0, t]]
               for t in range(1, 8)]
    assert torch.allclose(decoder_nll(decoder, window)[0], torch.stack(dec), atol=1e-5)
    assert torch.allclose(encoder_nll(encoder, window, mask_id)[0], torch.stack(enc), atol=1e-5)
