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
