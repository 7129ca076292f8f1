"""Prompt encoding at every entry point, with a tokenizer that puts BOS in front by default (as Gemma's and
Llama's do): raw text gets exactly one BOS, a rendered chat prompt exactly the BOS its template writes."""
import pytest
import torch
from tokenizers import processors

from llmlab import chat
from llmlab.encoding import encode_rendered, encode_text, special_affixes
from llmlab.infer.chat_cli import ChatSession
from llmlab.infer.engine import Engine, SamplingParams
from llmlab.infer.server import CompletionRequest, Server
from llmlab.model.config import preset
from llmlab.model.decoder import build_model
from conftest import make_byte_tokenizer

MESSAGES = [{"role": "user", "content": "hello world"}]


@pytest.fixture(scope="module")
def bos_tokenizer():
    """Our byte-level test tokenizer, with a post-processor that prepends <|bos|> (add_special_tokens=True)."""
    tok = make_byte_tokenizer()
    bos = tok.bos_token_id
    tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<|bos|> $A", pair="<|bos|> $A <|bos|> $B", special_tokens=[("<|bos|>", bos)])
    assert tok("hello")["input_ids"][0] == bos
    return tok


@pytest.fixture(scope="module")
def engine(bos_tokenizer):
    torch.manual_seed(0)
    cfg = preset("llama", vocab_size=len(bos_tokenizer), n_layer=1, d_model=32, n_head=2, max_seq_len=64)
    return Engine(build_model(cfg).eval(), bos_tokenizer, eos_token_ids=[])


def test_raw_text_is_encoded_as_the_tokenizer_does_by_default(bos_tokenizer, byte_tokenizer):
    bos = bos_tokenizer.bos_token_id
    assert special_affixes(bos_tokenizer) == ([bos], [])
    assert encode_text(bos_tokenizer, "hello world") == bos_tokenizer("hello world")["input_ids"]
    assert encode_text(bos_tokenizer, "<|bos|>hello").count(bos) == 1
    assert encode_text(byte_tokenizer, "hello") == byte_tokenizer.encode("hello", add_special_tokens=False)


def test_engine_and_completions_endpoint_add_the_bos(engine, bos_tokenizer):
    bos = bos_tokenizer.bos_token_id
    assert engine.encode("hello world") == bos_tokenizer("hello world")["input_ids"]
    assert engine.encode("hello world")[0] == bos
    out = engine.generate(["hello world"], SamplingParams(max_new_tokens=2, temperature=0))[0]
    assert out.prompt_tokens == len(bos_tokenizer("hello world")["input_ids"])
    server = Server(engine, model_name="m", template=chat.TEMPLATES["chatml"])
    body = CompletionRequest(model="m", prompt=["hello world", "the fox"])
    assert server.completion_prompts(body) == [bos_tokenizer(t)["input_ids"] for t in body.prompt]


@pytest.mark.parametrize("name", ["llmlab", "chatml", "gemma", "llama-3"])
def test_chat_prompts_never_get_a_second_bos(engine, bos_tokenizer, name):
    template = chat.TEMPLATES[name]
    rendered = chat.render(MESSAGES, template, bos_token="<|bos|>", add_generation_prompt=True)
    expected = encode_rendered(bos_tokenizer, rendered)
    assert chat.generation_prompt_ids(bos_tokenizer, MESSAGES, template) == expected
    assert expected.count(bos_tokenizer.bos_token_id) == rendered.count("<|bos|>") <= 1
    session = ChatSession(engine, template, SamplingParams(max_new_tokens=2, temperature=0))
    assert session.encode(MESSAGES) == expected
