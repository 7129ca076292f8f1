"""``--model`` takes a ``.gguf`` file and a Hugging Face hub id in every command that reads a model: each stage
runs a step or two from a tiny chat GGUF file and from the same model published in an offline local Hugging Face
cache (the weights, the tokenizer and the chat template all come from the one resolved folder)."""
import json
from types import SimpleNamespace

import pytest

from llmlab.chat import TEMPLATES
from llmlab.cli import main as cli_main
from llmlab.hub.folder import ModelDir
from llmlab.hub.load import load_our_model
from llmlab.hub.save import save_model
from conftest import offline_hub, write_tiny_llama_gguf
from conftest import one_thread
from test_sft import write_jsonl

TRAIN = ["train.max_steps=1", "train.warmup_steps=0", "train.progress=false", "train.checkpoint_every=0",
         "train.eval_every=0"]


@pytest.fixture(scope="module")
def lab(tmp_path_factory):
    """The tiny chat GGUF file, the hub id of the same model in an offline Hugging Face cache, a reward model on
    its tokenizer, and a few lines of every kind of data; the cache settings hold for the whole module."""
    pytest.importorskip("gguf")
    root = tmp_path_factory.mktemp("model_flag")
    with pytest.MonkeyPatch.context() as patch, one_thread():
        patch.setenv("LLMLAB_CACHE", str(root / "cache"))
        publish = offline_hub(patch, root / "hf-home")
        gguf_path = write_tiny_llama_gguf(root / "tiny-chat.gguf", chat=True)
        folder = ModelDir(gguf_path).path                       # converted once, here
        reward = save_model(load_our_model(folder, num_labels=1), root / "rm", ModelDir(folder).tokenizer(),
                            chat_template=TEMPLATES["llmlab"])
        classes = [{"text": f"{word} the dog", "label": label} for word, label in (("good", "positive"),
                                                                                  ("bad", "negative"))] * 4
        data = root / "classes"
        data.mkdir()
        write_jsonl(data / "train.jsonl", classes)
        write_jsonl(data / "test.jsonl", classes[:4])
        (root / "corpus.txt").write_text("the hound and the heron hide there. " * 80)
        yield SimpleNamespace(
            models={"gguf": str(gguf_path), "hub": publish("llmlab-test/tiny-chat", folder)}, reward=str(reward),
            classes=str(data), corpus=str(root / "corpus.txt"),
            conversations=str(write_jsonl(root / "sft.jsonl", [{"messages": [
                {"role": "user", "content": "hi"}, {"role": "assistant", "content": "the"}]}] * 4)),
            pairs=str(write_jsonl(root / "pairs.jsonl", [{"prompt": "hi", "chosen": "the", "rejected": "he"}] * 4)),
            prompts=str(write_jsonl(root / "prompts.jsonl", [{"prompt": "hi"}] * 2)))


def sets(*pairs: str) -> list[str]:
    return [arg for pair in pairs for arg in ("--set", pair)]


# stage → (its arguments after --model, given the lab and the output path; the file or folder it must write)
STAGES = {
    "sft": (lambda lab, out: ["--data", lab.conversations, "--out", out,
                              *sets(*TRAIN, "data.batch_size=2", "data.val_fraction=0")], "model/config.json"),
    "dpo": (lambda lab, out: ["--data", lab.pairs, "--out", out,
                              *sets(*TRAIN, "data.batch_size=2", "data.val_fraction=0")], "model/config.json"),
    "rm": (lambda lab, out: ["--data", lab.pairs, "--out", out,
                             *sets(*TRAIN, "data.batch_size=2", "data.val_fraction=0")], "model/config.json"),
    "ppo": (lambda lab, out: ["--data", lab.prompts, "--out", out, "--reward", lab.reward,
                              *sets(*TRAIN, "ppo.rollout_batch=2", "ppo.minibatch=2", "ppo.epochs=1",
                                    "ppo.max_new_tokens=4")], "model/config.json"),
    "pretrain": (lambda lab, out: ["--out", out, *sets(*TRAIN, f"data.path={lab.corpus}", "data.max_length=32",
                                                       "data.batch_size=2", "train.eval_batches=1")],
                 "model/config.json"),
    "eval": (lambda lab, out: ["--data", lab.prompts, "--out", out, "--max-new-tokens", "2"], "eval.json"),
    "pairs": (lambda lab, out: ["--prompts", lab.prompts, "--out", f"{out}/pairs.jsonl", "--reward", lab.reward,
                                "--k", "2", "--max-new-tokens", "2"], "pairs.jsonl"),
    "classify": (lambda lab, out: ["--data", lab.classes, "--out", out,
                                   *sets(*TRAIN, "classify.batch_size=4", "data.max_length=16")],
                 "tiny-chat/result.json"),
    "generate": (lambda lab, out: ["--prompt", "the", "--max-new-tokens", "2", "--temperature", "0"], None),
    "chat": (lambda lab, out: ["--prompt", "hi", "--max-new-tokens", "2", "--temperature", "0"], None),
}


@pytest.mark.parametrize("kind", ["gguf", "hub"])
@pytest.mark.parametrize("stage", STAGES)
def test_model_flag_takes_a_gguf_file_and_a_hub_id(stage, kind, lab, tmp_path, capsys):
    arguments, written = STAGES[stage]
    out = tmp_path / "out"
    assert cli_main(["--debug", stage, "--model", lab.models[kind], *arguments(lab, str(out))]) == 0
    if written:
        assert (out / written).is_file()
    else:
        assert capsys.readouterr().out.strip()


def test_sft_from_a_gguf_file_keeps_its_tokenizer_and_chat_template(lab, tmp_path):
    """The tokenizer and the template come from the converted file (ChatML, its <|pad|>), not llmlab's defaults."""
    out = tmp_path / "sft"
    assert cli_main(["--debug", "sft", "--model", lab.models["gguf"], "--data", lab.conversations, "--out",
                     str(out), *sets(*TRAIN, "data.batch_size=2", "data.val_fraction=0")]) == 0
    saved = ModelDir(out / "model")
    tokenizer = saved.tokenizer()
    assert tokenizer.pad_token == "<|pad|>" and saved.template() == TEMPLATES["chatml"]
    generation = json.loads((out / "model" / "generation_config.json").read_text())
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") in generation["eos_token_id"]
