"""``llmlab experiment``: the list, a ``test``-preset warmup run end to end on a tiny local text, its resume, its
report, and the errors for bad input."""
import json
import math
import re
from pathlib import Path

import pytest

from llmlab import cli
from llmlab.experiments import EXPERIMENTS
from llmlab.experiments.common import show, spread
from llmlab.stages import pretrain

LINES = ["Shall I compare thee to a summer's day?", "Thou art more lovely and more temperate:",
         "Rough winds do shake the darling buds of May,", "And summer's lease hath all too short a date."]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "sonnet.txt"
    path.write_text("\n".join(LINES * 12) + "\n", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def warmup_run(tmp_path_factory, corpus) -> Path:
    out = tmp_path_factory.mktemp("exp") / "warmup"
    assert cli.main(["experiment", "warmup", "--preset", "test", "--data", str(corpus), "--out", str(out)]) == 0
    return out


def test_list_names_every_experiment_on_one_line(capsys):
    assert cli.main(["experiment", "--list"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [line.split()[0] for line in lines] == list(EXPERIMENTS)
    assert {"warmup", "encoder-vs-decoder", "classify-bert-vs-gpt"} <= set(EXPERIMENTS)
    assert len({len(line) - len(line[len(line.split()[0]):].lstrip()) for line in lines}) == 1   # one column


def test_warmup_writes_every_run_and_the_report(warmup_run):
    summary = json.loads((warmup_run / "summary.json").read_text())
    assert summary["experiment"] == "warmup" and summary["preset"] == "test" and summary["seeds"] == [0]
    assert len(summary["arms"]) == 12                    # 2 norms × 3 learning rates × (no warm-up, warm-up)
    for name in summary["arms"]:
        records = [json.loads(line) for line in (warmup_run / "seed-0" / name / "metrics.jsonl").open()]
        assert [r["step"] for r in records] == list(range(1, 13))
        assert all("grad_norm" in r and "update_ratio" in r for r in records if not r.get("skipped"))
    for name in ("report.md", "report.html", "loss_curves.png", "val_loss.png", "grad_norm.png",
                 "update_ratio.png"):
        assert (warmup_run / name).stat().st_size > 0, name
    html = (warmup_run / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 4
    assert summary["confirmed"] in (True, False)


def test_the_report_shows_the_numbers_of_summary_json(warmup_run):
    summary = json.loads((warmup_run / "summary.json").read_text())
    report = (warmup_run / "report.md").read_text()
    rows = {(m[1], m[2]): m.groups()[2:] for m in re.finditer(
        r"^\| (pre|post) \| ([0-9.e-]+) \| (\S+) \| (\S+) \| (\d+/\d+, \d+/\d+) \| (\d+/\d+, \d+/\d+) \|$",
        report, re.M)}
    assert len(rows) == 6, report
    warm = summary["settings"]["warmup"]
    for (norm, lr), (cold_val, hot_val, cold_div, hot_div) in rows.items():
        cold, hot = summary["arms"][f"{norm}-lr{lr}-warm0"], summary["arms"][f"{norm}-lr{lr}-warm{warm}"]
        assert cold_val == show(cold["val_loss"]) == f"{cold['val_loss']['values'][0]:.4g}"
        assert hot_val == show(hot["val_loss"])
        assert (cold_div, hot_div) == (f"{cold['diverged']}/1, {cold['stuck']}/1", f"{hot['diverged']}/1, {hot['stuck']}/1")
    verdict = "Confirmed" if summary["confirmed"] else "Refuted"
    assert verdict in report and f"{summary['unigram_loss']:.3f}" in report


def test_a_second_invocation_trains_nothing(warmup_run, corpus, monkeypatch):
    def no_training(*args, **kwargs):
        raise AssertionError("a finished run was trained again")
    monkeypatch.setattr(pretrain, "train", no_training)
    metrics = sorted(warmup_run.glob("seed-0/*/metrics.jsonl"))
    before = [p.read_bytes() for p in metrics]
    assert cli.main(["experiment", "warmup", "--preset", "test", "--data", str(corpus), "--out",
                     str(warmup_run)]) == 0
    assert [p.read_bytes() for p in metrics] == before


@pytest.mark.parametrize("args, message", [
    (["experiment", "no-such-thing"], "unknown experiment 'no-such-thing'"),
    (["experiment", "warmup", "--preset", "huge"], "no preset 'huge'"),
    (["experiment", "warmup", "--seeds", "0"], "--seeds 0"),
    (["experiment", "warmup", "--set", "nonsense=1"], "--set nonsense: experiment warmup has no such setting"),
    (["experiment", "warmup", "--set", "lrs.first=1"], "--set lrs.first"),
])
def test_bad_input_is_a_clear_error(args, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert cli.main(args + ["--preset", "test"] * ("--preset" not in args) + ["--out", str(out)]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_a_folder_of_another_experiment_or_other_settings_is_refused(warmup_run, corpus, capsys):
    before = {p: p.stat().st_mtime_ns for p in warmup_run.rglob("*")}
    args = ["--preset", "test", "--data", str(corpus), "--out", str(warmup_run)]
    assert cli.main(["experiment", "encoder-vs-decoder", *args]) == 2
    assert "holds the results of experiment 'warmup'" in capsys.readouterr().err
    assert cli.main(["experiment", "warmup", *args, "--set", "steps=13"]) == 2
    err = capsys.readouterr().err
    assert "other settings" in err and "differing: steps" in err
    assert {p: p.stat().st_mtime_ns for p in warmup_run.rglob("*")} == before


def test_spread_and_how_the_report_shows_it():
    s = spread([1.0, 2.0, 3.0])
    assert (s["mean"], s["std"], s["min"], s["max"], s["n"]) == (2.0, 1.0, 1.0, 3.0, 3)
    assert show(s) == "2 ± 1" and show(spread([2.5])) == "2.5"
    assert show(spread([1.0, float("nan")])) == "1 / nan"


def test_trace_updates_adds_update_sizes_and_changes_no_other_number(corpus, tmp_path):
    base = {"model": {"preset": "gpt2", "n_layer": 1, "n_head": 2, "d_model": 16, "max_seq_len": 16},
            "data": {"max_length": 16, "batch_size": 2}, "tokenizer": {"kind": "char"},
            "train": {"max_steps": 3, "warmup_steps": 1, "log_every": 1, "eval_batches": 1, "progress": False}}
    runs = {}
    for trace in (0, 2):
        recipe = json.loads(json.dumps(base))
        recipe["train"]["trace_updates"] = trace
        pretrain.run(None, str(corpus), tmp_path / f"trace{trace}", recipe)
        runs[trace] = [json.loads(line) for line in (tmp_path / f"trace{trace}" / "metrics.jsonl").open()]
    assert not any("update_norm" in r for r in runs[0])
    assert ["update_norm" in r for r in runs[2]] == [True, True, False]
    assert all(r["update_norm"] > 0 and 0 < r["update_ratio"] < 1 for r in runs[2][:2])
    keep = ("step", "loss", "lr", "grad_norm", "tokens", "val_loss")
    assert [{k: r.get(k) for k in keep} for r in runs[0]] == [{k: r.get(k) for k in keep} for r in runs[2]]


def test_max_length_end_to_end(corpus, tmp_path):
    out = tmp_path / "max-length"
    pairs = tmp_path / "pairs.jsonl"
    with pairs.open("w") as f:
        for i in range(8):                     # one or two prompt lines, answers of one to four lines
            prompt = f"\n\nHuman: {LINES[i % 4]}" * (1 + i % 2)
            f.write(json.dumps({"chosen": f"{prompt}\n\nAssistant: {' '.join(LINES[:1 + i // 2])}",
                                "rejected": f"{prompt}\n\nAssistant: no."}) + "\n")
    assert cli.main(["experiment", "max-length", "--preset", "test", "--data", str(corpus), "--out", str(out),
                     "--set", f"sft_data={pairs}"]) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert set(summary["arms"]) == {"learned-L16", "learned-L32", "rope-L16", "rope-L32"}
    assert summary["arms"]["learned-L16"]["steps"] == 2 * summary["arms"]["learned-L32"]["steps"]   # equal tokens
    profile = summary["profile"]
    assert profile["32"]["activation_mib"] > profile["16"]["activation_mib"] > 0
    assert all(len(c[0]) == 64 for c in summary["position_loss"].values())     # every position of eval_length
    report = (out / "report.md").read_text()
    for name, arm in summary["arms"].items():
        row = f"| {arm['pos']} | {arm['length']} | {show(arm['loss_short'])} | {show(arm['loss_own'])} | "
        assert row in report, (row, report)
    cuts = summary["sft"]["cuts"]
    assert summary["sft"]["conversations"] == 8
    assert cuts["32"]["examples_cut"] >= cuts["64"]["examples_cut"] >= cuts["128"]["examples_cut"]
    assert cuts["32"]["answers_lost"] == 1.0 and 0 < cuts["64"]["answer_tokens_cut"] < 1
    assert f"| 64 | {cuts['64']['examples_cut']:.1%} | {cuts['64']['answer_tokens_cut']:.1%} |" in report
    effect = summary["sft_effect"]                  # SFT at max_length 64 and 128, read on the same held-out set
    assert (effect["context"], effect["heldout"], effect["train"]) == (128, 2, 6)
    assert list(effect["arms"]) == ["64", "128"] and effect["answer_tokens_past"]["64"] > 0
    for n, a in effect["arms"].items():
        assert a["loss_all"]["n"] == len(summary["seeds"]) == 1
        assert all(0 < a[k]["mean"] < 20 for k in ("loss_all", "loss_short"))
        assert len(a["by_bucket"][0]) == len(effect["bucket_starts"])
        assert (out / "seed-0" / f"sft-M{n}" / "model" / "config.json").is_file()
    short, full = effect["arms"]["64"], effect["arms"]["128"]
    assert short["truncated"] > 0 and short["answer_tokens_kept"] < full["answer_tokens_kept"] <= 1.0
    assert full["gap_past"] is None and math.isfinite(short["gap_past"]["mean"] + short["gap_before"]["mean"])
    assert short["loss_past_reference"]["mean"] == pytest.approx(short["loss_past"]["mean"] - short["gap_past"]["mean"])
    assert f"| 64 | {short['truncated']:.1%} ({short['dropped']:.1%}) | {short['answer_tokens_kept']:.1%} |" in report
    assert "not measured" not in report and re.search(r"is (confirmed|refuted|partly confirmed)", report)
    for name in ("report.html", "throughput.png", "step_profile.png", "loss_by_position.png",
                 "sft_loss_by_position.png"):
        assert (out / name).stat().st_size > 0


@pytest.mark.parametrize("cold, verdict", [({"diverged": 3, "stuck": 0}, "confirmed"),
                                           ({"diverged": 1, "stuck": 2}, "weaker"),
                                           ({"diverged": 1, "stuck": 0}, "refuted")])
def test_the_warmup_verdict_follows_the_counts(cold, verdict):
    from llmlab.experiments.warmup import judge
    s = {"warmup": 5, "lrs": [0.01], "norms": ["pre", "post"], "trace": 10}
    loss = spread([2.0, 2.1, 2.2])
    arm = {"runs": 3, "diverged": 0, "stuck": 0, "val_loss": loss, "max_grad_norm": spread([1.0, 2.0, 3.0])}
    per_arm = {"pre-lr0.01-warm0": arm, "pre-lr0.01-warm5": arm, "post-lr0.01-warm5": arm,
               "post-lr0.01-warm0": {**arm, **cold}}
    text, numbers = judge(s, per_arm, unigram=3.3)
    assert numbers["verdict"] == verdict and numbers["confirmed"] == (verdict != "refuted")
    assert text.startswith({"confirmed": "Confirmed:", "weaker": "Confirmed in a weaker form",
                            "refuted": "Refuted"}[verdict])


# --- llmlab experiment tokenizer ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tokenizer_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("exp") / "tokenizer"
    assert cli.main(["experiment", "tokenizer", "--preset", "test", "--out", str(out)]) == 0
    return out


def test_tokenizer_experiment_end_to_end(tokenizer_run):
    summary = json.loads((tokenizer_run / "summary.json").read_text())
    assert summary["experiment"] == "tokenizer" and summary["seeds"] == [0]
    arms = summary["arms"]
    assert set(arms) == {"char", "bpe-262", "bpe-320"}
    assert arms["bpe-262"]["vocab_size"] == 262 and arms["bpe-262"]["bytes_per_token"] == 1.0   # ASCII: bytes
    assert arms["bpe-320"]["bytes_per_token"] > 1.0                  # merges pack more bytes into a token
    assert arms["char"]["params"]["share"] < arms["bpe-262"]["params"]["share"] < arms["bpe-320"]["params"]["share"]
    for name, arm in arms.items():                                   # equal compute: equal tokens, equal body
        records = [json.loads(line) for line in (tokenizer_run / "seed-0" / name / "metrics.jsonl").open()]
        assert records[-1]["tokens"] == summary["training_tokens"] == 4 * 4 * 16
        assert arm["params"]["total"] - arm["params"]["embedding"] == arms["char"]["params"]["total"] - \
            arms["char"]["params"]["embedding"]
        assert 0 < arm["bits_per_byte"]["mean"] < 10
    report = (tokenizer_run / "report.md").read_text()
    for name, arm in arms.items():
        assert f"| {name} | {arm['vocab_size']:,} | {arm['bytes_per_token']:.3f} |" in report
        assert f"| {show(arm['bits_per_byte'])} | {show(arm['nats_per_token'])} |" in report
    assert summary["verdict"] in ("confirmed", "within-noise", "refuted") and "one seed" in report
    for name in ("report.html", "compression.png", "parameters.png", "bits_per_byte.png", "loss_per_byte.png"):
        assert (tokenizer_run / name).stat().st_size > 0, name


def test_bits_per_byte_of_a_uniform_model_is_log2_of_the_vocabulary_per_token():
    import math

    import torch

    from llmlab.experiments.tokenizer import bits_per_byte, stream_nll

    class Uniform:           # equal logits: −ln p = ln V for every token
        def __call__(self, x):
            return torch.zeros(*x.shape, 8)

    ids = [0, 5, 6, 7, 1, 0, 5, 1]                  # two documents: [BOS] 5 6 7 [EOS] [BOS] 5 [EOS]
    scored = [False, True, True, True, False, False, True, False]
    nll, count = stream_nll(Uniform(), ids, scored, window=3)
    assert count == 4 and nll == pytest.approx(4 * math.log(8))
    # the 4 text tokens stand for 10 bytes: 4 · log2(8) bits / 10 bytes
    assert bits_per_byte(nll, 10) == pytest.approx(4 * 3 / 10)
    assert bits_per_byte(10 * math.log(2) * 8, 10) == pytest.approx(8.0)       # 8 bits a byte: a uniform byte model


def test_the_heldout_stream_scores_text_tokens_only():
    from llmlab.experiments.tokenizer import heldout_stream
    from llmlab.tokenizer import train_char
    tok = train_char(["abc"])
    ids, scored = heldout_stream(tok, ["ab", "c"])
    assert ids == [tok.bos_token_id, 6, 7, tok.eos_token_id, tok.bos_token_id, 8, tok.eos_token_id]
    assert scored == [False, True, True, False, False, True, False]


def test_the_heldout_split():
    from llmlab.experiments.tokenizer import split_heldout, take_bytes
    docs = [f"doc {i}" for i in range(20)]
    train, held = split_heldout(docs, 0.1)
    assert held == ["doc 9", "doc 19"] and len(train) == 18
    text = "".join(f"line {i}\n" for i in range(100))                 # one document: its tail, at a line break
    train, held = split_heldout([text], 0.1)
    assert train[0] + held[0] == text and held[0].startswith("line ") and 0.09 < len(held[0]) / len(text) < 0.12
    assert take_bytes(["héllo", "world"], 4) == ["hél"]                # cut at a character boundary


def test_a_saturated_bpe_vocabulary_is_not_trained_twice(tmp_path):
    from llmlab.experiments.tokenizer import distinct_vocabularies
    from llmlab.tokenizer import save_tokenizer, train_bpe, train_char
    texts = ["the cat sat on the mat"] * 20                           # few words: BPE runs out of merges
    folders = {}
    for name, tok in (("char", train_char(texts)), ("bpe-300", train_bpe(texts, 300)),
                      ("bpe-400", train_bpe(texts, 400)), ("bpe-500", train_bpe(texts, 500))):
        folders[name] = save_tokenizer(tok, tmp_path / name)
    kept, saturated = distinct_vocabularies(folders)
    assert kept == ["char", "bpe-300"] and saturated == {"bpe-400": "bpe-300", "bpe-500": "bpe-300"}


@pytest.mark.parametrize("sets, message", [(["vocab_sizes=[100]"], "each ≥ 262"),
                                           (["heldout=0.9"], "heldout = 0.9")])
def test_tokenizer_experiment_bad_settings(sets, message, tmp_path, capsys):
    args = ["experiment", "tokenizer", "--preset", "test", "--out", str(tmp_path / "out")]
    assert cli.main(args + [x for s in sets for x in ("--set", s)]) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("char, bpe, verdict, turn", [
    (2.0, [2.1, 1.5, 1.0, 1.4], "confirmed", "bpe-2048"),      # BPE wins, then the largest turns back up
    (2.0, [2.1, 1.5, 1.0, 0.9], "confirmed", None),
    (1.0, [0.9, 1.5, 1.2, 1.3], "refuted", "bpe-2048"),        # plain bytes best: no merge helped
    (1.5, [2.0, 1.49, 1.6, 1.7], "within-noise", "bpe-1024"),
])
def test_the_tokenizer_verdict_follows_the_numbers(char, bpe, verdict, turn):
    from llmlab.experiments.tokenizer import judge
    names = ["bpe-262", "bpe-512", "bpe-1024", "bpe-2048"]

    def arm(vocab, value):
        return {"vocab_size": vocab, "bytes_per_token": 1.0 + vocab / 1000, "params": {"share": vocab / 10000},
                "bits_per_byte": spread([value - 0.01, value, value + 0.01])}
    per_arm = {"char": arm(80, char), **{n: arm(int(n[4:]), v) for n, v in zip(names, bpe)}}
    text, numbers = judge(per_arm)
    assert numbers["verdict"] == verdict and numbers["turns_up_at"] == turn
    assert numbers["compression_grows"] and text.split()[0] in ("Confirmed:", "Refuted", "Not")


def test_under_torchrun_the_stages_train_data_parallel_and_rank_0_reports(corpus, tmp_path):
    """Two CPU processes (gloo): each pre-training step sees both ranks' rows, twice the tokens of one process at
    the same settings, and the folder holds one report and no stray temporary files."""
    import os
    import subprocess
    import sys
    args = ["experiment", "warmup", "--preset", "test", "--data", str(corpus), "--set", "lrs=[0.001]",
            "--set", "norms=[pre]"]
    assert cli.main(args + ["--out", str(tmp_path / "one")]) == 0
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           "-m", "llmlab.cli", *args, "--out", str(tmp_path / "two")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("report in") == 1

    def tokens(folder):
        return json.loads((folder / "seed-0" / "pre-lr0.001-warm0" / "metrics.jsonl").read_text()
                          .splitlines()[-1])["tokens"]
    assert tokens(tmp_path / "two") == 2 * tokens(tmp_path / "one")
    assert json.loads((tmp_path / "two" / "summary.json").read_text())["experiment"] == "warmup"
    assert not list((tmp_path / "two").rglob("*.tmp*"))


def test_an_experiment_with_child_processes_refuses_torchrun(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr("llmlab.train.dist.init_distributed", lambda device="auto": (0, 2, 0, "cpu"))
    assert cli.main(["experiment", "alignment", "--preset", "test", "--out", str(tmp_path / "out")]) == 2
    assert "trains its arms in child processes" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_folder_holding_only_the_record_of_a_failed_start_is_taken_over(corpus, tmp_path, capsys):
    """A run that stopped before its first result (here: a corpus that does not exist) leaves only experiment.json;
    rerunning with corrected settings into the same folder works instead of being refused."""
    out = tmp_path / "out"
    args = ["experiment", "warmup", "--preset", "test", "--out", str(out), "--set", "lrs=[0.001]",
            "--set", "norms=[pre]"]
    assert cli.main(args + ["--data", str(tmp_path / "missing.txt")]) == 2
    assert [p.name for p in out.iterdir()] == ["experiment.json"]
    assert cli.main(args + ["--data", str(corpus)]) == 0
    assert json.loads((out / "experiment.json").read_text())["settings"]["corpus"] == str(corpus)
