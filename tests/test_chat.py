import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from llmlab.chat import (TEMPLATES, assistant_spans, encode_chat, end_of_turn, get_template, load_template,
                         render, reply_params, save_template, stop_strings, validate_messages)
from llmlab.infer.engine import SamplingParams
from llmlab.errors import LLMLabError
from llmlab.tokenizer import SPECIAL_TOKENS, train_bpe

# The turn markers of the formats, special tokens in the real models' tokenizers.
FORMAT_TOKENS = ["<|eot_id|>", "<|start_header_id|>", "<|end_header_id|>", "<start_of_turn>", "<end_of_turn>",
                 "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>"]

SINGLE = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "It is 4."}]
MULTI = [
    {"role": "system", "content": "You are brief."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "It is 6."},
]
PROMPT = MULTI[:2]
CONVERSATIONS = [SINGLE, MULTI, PROMPT, SINGLE[:1], MULTI[:4]]

# What the model must produce for MULTI, per template: each answer and its end-of-turn token.
EXPECTED_RUNS = {
    "chatml": ["It is 4.<|im_end|>", "It is 6.<|im_end|>"],
    "llmlab": [" It is 4.<|im_end|>", " It is 6.<|im_end|>"],
    "llama-3": ["It is 4.<|eot_id|>", "It is 6.<|eot_id|>"],
    "gemma": ["It is 4.<end_of_turn>", "It is 6.<end_of_turn>"],
    "llama-2": [" It is 4. <|eos|>", " It is 6. <|eos|>"],
    # GLM-4's generation prompt is "<|assistant|>": the model writes the newline; the next "<|user|>" ends a
    # turn, and the EOS is appended after the last answer.
    "glm-4": ["\nIt is 4.<|user|>", "\nIt is 6.<|eos|>"],
}


@pytest.fixture(scope="module")
def tokenizer():
    corpus = [render(c, t, bos_token="<|bos|>", eos_token="<|eos|>") for c in CONVERSATIONS for t in TEMPLATES.values()]
    tok = train_bpe(corpus * 3, vocab_size=400)
    tok.add_special_tokens({"additional_special_tokens": SPECIAL_TOKENS[4:] + tuple(FORMAT_TOKENS)})
    return tok


@pytest.fixture(scope="module")
def merging_tokenizer():
    """Byte-level BPE without pre-tokenization: merges run across template/content boundaries."""
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    corpus = [render(c, TEMPLATES[name], bos_token="<|bos|>", eos_token="<|eos|>") for c in CONVERSATIONS
              for name in ("llama-2", "llama-3", "gemma", "chatml", "glm-4")]
    trainer = trainers.BpeTrainer(vocab_size=330, special_tokens=list(SPECIAL_TOKENS[:2]),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    backend.train_from_iterator(corpus * 5, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|bos|>", eos_token="<|eos|>")


def masked_runs(tokenizer, ids, mask):
    """The decoded text of each maximal run of masked tokens."""
    runs, current = [], []
    for token, bit in zip(ids + [None], mask + [0]):
        if bit:
            current.append(token)
        elif current:
            runs.append(tokenizer.decode(current))
            current = []
    return runs


@pytest.mark.parametrize("name", TEMPLATES)
@pytest.mark.parametrize("conversation", CONVERSATIONS, ids=["single", "multi", "prompt", "user", "multi-user"])
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_render_matches_transformers(tokenizer, name, conversation, generation_prompt):
    expected = tokenizer.apply_chat_template(conversation, chat_template=TEMPLATES[name], tokenize=False,
                                             add_generation_prompt=generation_prompt)
    got = render(conversation, TEMPLATES[name], bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
                 add_generation_prompt=generation_prompt)
    assert got == expected


def test_formats_by_hand():
    assert render(MULTI, TEMPLATES["llama-2"], bos_token="<s>", eos_token="</s>") == (
        "<s>[INST] <<SYS>>\nYou are brief.\n<</SYS>>\n\nWhat is 2+2? [/INST] It is 4. </s>"
        "<s>[INST] And 3+3? [/INST] It is 6. </s>")
    assert render(PROMPT, TEMPLATES["llama-3"], bos_token="<|begin_of_text|>", add_generation_prompt=True) == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nWhat is 2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n")
    assert render(MULTI[:3], TEMPLATES["gemma"], bos_token="<bos>") == (
        "<bos><start_of_turn>user\nYou are brief.\n\nWhat is 2+2?<end_of_turn>\n"
        "<start_of_turn>model\nIt is 4.<end_of_turn>\n")
    assert render(PROMPT, TEMPLATES["chatml"], add_generation_prompt=True) == (
        "<|im_start|>system\nYou are brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert render(MULTI[:3], TEMPLATES["glm-4"]) == (
        "[gMASK]<sop><|system|>\nYou are brief.<|user|>\nWhat is 2+2?<|assistant|>\nIt is 4.")
    assert render(SINGLE, TEMPLATES["llmlab"], bos_token="<|bos|>") == (
        "<|bos|><|im_start|>user\n What is 2+2?<|im_end|>\n<|im_start|>assistant\n It is 4.<|im_end|>\n")


def test_llmlab_answers_start_with_the_running_text_token(tokenizer):
    """The space before each content makes a reply's first word the token it is inside a sentence."""
    messages = [{"role": "user", "content": "Is it 4?"}, {"role": "assistant", "content": "It is 4."}]
    ids, mask = encode_chat(tokenizer, messages, TEMPLATES["llmlab"])
    first_answer_token = ids[mask.index(1)]
    assert first_answer_token == tokenizer.encode("What is 2+2? It", add_special_tokens=False)[-1]
    assert first_answer_token != tokenizer.encode("\nIt", add_special_tokens=False)[-1]


def test_llama3_never_renders_as_llama2(tokenizer, tmp_path):
    save_template(tmp_path, TEMPLATES["llama-3"])
    text = render(MULTI, load_template(tmp_path), bos_token="<|begin_of_text|>")
    assert "[INST]" not in text and "<<SYS>>" not in text
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\n")


@pytest.mark.parametrize("name", TEMPLATES)
def test_assistant_mask_covers_answers_and_end_of_turn(tokenizer, name):
    ids, mask = encode_chat(tokenizer, MULTI, TEMPLATES[name])
    assert masked_runs(tokenizer, ids, mask) == EXPECTED_RUNS[name]
    text = render(MULTI, TEMPLATES[name], bos_token="<|bos|>", eos_token="<|eos|>")
    if name == "glm-4":
        text += "<|eos|>"
    assert ids == tokenizer.encode(text, add_special_tokens=False)
    unmasked = tokenizer.decode([t for t, m in zip(ids, mask) if not m])
    for user_text in ("You are brief.", "What is 2+2?", "And 3+3?"):
        assert user_text in unmasked


@pytest.mark.parametrize("name", TEMPLATES)
def test_prompt_tokens_at_inference_are_a_prefix_of_training_tokens(tokenizer, name):
    train_ids, _ = encode_chat(tokenizer, MULTI[:3], TEMPLATES[name])
    prompt_ids, prompt_mask = encode_chat(tokenizer, PROMPT, TEMPLATES[name], add_generation_prompt=True,
                                          require_assistant=False)
    assert not any(prompt_mask)
    assert train_ids[:len(prompt_ids)] == prompt_ids


@pytest.mark.parametrize("name", ["chatml", "llama-3"])
def test_mask_matches_transformers_generation_tags(tokenizer, name):
    """transformers computes an assistant mask for templates with {% generation %} tags: the same answer."""
    eot = end_of_turn(name)
    # The same format written with the assistant content and end-of-turn inside {% generation %}.
    header = {"chatml": "'<|im_start|>' + message['role'] + '\\n'",
              "llama-3": "'<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n'"}[name]
    content = "message['content'] | trim" if name == "llama-3" else "message['content']"
    after = "'\\n'" if name == "chatml" else "''"
    tagged = ("{% for message in messages %}{{ " + header + " }}"
              "{% if message['role'] == 'assistant' %}{% generation %}{{ " + content + " + '" + eot + "' }}"
              "{% endgeneration %}{% else %}{{ " + content + " + '" + eot + "' }}{% endif %}{{ " + after + " }}"
              "{% endfor %}"
              "{% if add_generation_prompt %}{{ " + header.replace("message['role']", "'assistant'") + " }}{% endif %}")
    plain = TEMPLATES[name].replace("{{ bos_token }}", "")
    messages = [dict(m) for m in MULTI]
    messages[2]["content"] = "  It is 4.  "
    assert render(messages, tagged) == render(messages, plain)
    reference = tokenizer.apply_chat_template(messages, chat_template=tagged, tokenize=True, return_dict=True,
                                              return_assistant_tokens_mask=True)
    ids, mask = encode_chat(tokenizer, messages, plain)
    assert ids == reference["input_ids"]
    assert mask == reference["assistant_masks"]


@pytest.mark.parametrize("name", TEMPLATES)
def test_mask_with_token_boundaries_across_segments(merging_tokenizer, name):
    tok = merging_tokenizer
    ids, mask = encode_chat(tok, MULTI, TEMPLATES[name])
    text, spans = assistant_spans(MULTI, TEMPLATES[name], bos_token="<|bos|>", eos_token="<|eos|>")
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    assert len(offsets) == len(ids)
    masked = [o for o, m in zip(offsets, mask) if m]
    covered = {c for s, e in masked for c in range(s, e)}
    straddles = 0
    for a, b in spans:
        assert set(range(a, b)) <= covered  # every character the model must write is learned
        straddles += sum(1 for s, e in masked if s < b and e > a and (s < a or e > b))
    for s, e in masked:  # every masked token touches an answer
        assert any(s < b and e > a for a, b in spans)
    for user_text in ("You are brief.", "What is 2+2?", "And 3+3?"):
        start = text.find(user_text)
        assert not covered & set(range(start, start + len(user_text)))
    if name in ("chatml", "llmlab", "gemma"):
        assert straddles > 0  # this tokenizer does merge across the edges of the spans


def test_trimming_templates_mask_the_trimmed_content(tokenizer):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "  Hello there \n"}]
    ids, mask = encode_chat(tokenizer, messages, TEMPLATES["llama-3"])
    assert masked_runs(tokenizer, ids, mask) == ["Hello there<|eot_id|>"]
    ids, mask = encode_chat(tokenizer, messages, TEMPLATES["chatml"])
    assert masked_runs(tokenizer, ids, mask) == ["  Hello there \n<|im_end|>"]


def test_no_assistant_turn_is_an_error_for_training(tokenizer):
    with pytest.raises(LLMLabError, match="no assistant turn"):
        encode_chat(tokenizer, PROMPT, TEMPLATES["chatml"])
    ids, mask = encode_chat(tokenizer, PROMPT, TEMPLATES["chatml"], add_generation_prompt=True,
                            require_assistant=False)
    assert len(ids) == len(mask) and not any(mask)


def test_unknown_template_name_lists_known_ones(tmp_path):
    with pytest.raises(LLMLabError) as err:
        get_template("llama-4")
    for name in TEMPLATES:
        assert name in str(err.value)
    with pytest.raises(LLMLabError, match="chatml"):
        load_template(tmp_path, override="vicuna")


def test_load_template_sources(tmp_path):
    assert load_template(tmp_path) == TEMPLATES["llmlab"]  # nothing in the folder: our default
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"chat_template": TEMPLATES["gemma"]}))
    assert load_template(tmp_path) == TEMPLATES["gemma"]
    save_template(tmp_path, TEMPLATES["glm-4"])
    assert load_template(tmp_path) == TEMPLATES["glm-4"]  # chat_template.jinja wins over tokenizer_config.json
    assert load_template(tmp_path, override="llama-2") == TEMPLATES["llama-2"]
    custom = tmp_path / "mine.jinja"
    custom.write_text("{% for m in messages %}{{ m['content'] }}{{ eos_token }}{% endfor %}")
    assert load_template(tmp_path, override=str(custom)) == custom.read_text()
    (tmp_path / "old").mkdir()
    (tmp_path / "old" / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": [{"name": "tool_use", "template": "x"}, {"name": "default", "template": "y"}]}))
    assert load_template(tmp_path / "old") == "y"
    with pytest.raises(LLMLabError, match="not found"):
        load_template(tmp_path / "missing")


def test_end_of_turn_and_stop_strings():
    assert {n: end_of_turn(n) for n in TEMPLATES} == {
        "llama-2": "</s>", "llama-3": "<|eot_id|>", "gemma": "<end_of_turn>", "chatml": "<|im_end|>",
        "glm-4": "<|user|>", "llmlab": "<|im_end|>"}
    assert end_of_turn("llama-2", eos_token="<|eos|>") == "<|eos|>"
    mistral_like = "{% for m in messages %}[INST] {{ m['content'] }} [/INST]{{ eos_token }}{% endfor %}"
    assert end_of_turn(mistral_like, eos_token="</s>") == "</s>"
    assert stop_strings("glm-4") == ["<|user|>", "<|observation|>", "<|endoftext|>"]
    assert stop_strings("llmlab", eos_token="<|eos|>") == ["<|im_end|>", "<|eos|>"]
    with pytest.raises(LLMLabError, match="end-of-turn"):
        end_of_turn("{% for m in messages %}{{ m['content'] }}{% endfor %}")


def test_reply_params_add_the_templates_stops_once_and_strip_the_reply():
    params = SamplingParams(max_new_tokens=5, temperature=0.7, stop=["END", "<|im_end|>"])
    reply = reply_params(params, "llmlab", eos_token="<|eos|>")
    assert reply.stop == ["END", "<|im_end|>", "<|eos|>"] and reply.lstrip
    assert (reply.max_new_tokens, reply.temperature) == (5, 0.7) and not params.lstrip    # a copy


def test_template_errors_are_clear():
    with pytest.raises(LLMLabError, match="alternate"):
        render([{"role": "user", "content": "a"}, {"role": "user", "content": "b"}], TEMPLATES["llama-2"])
    with pytest.raises(LLMLabError, match="syntax error on line 1"):
        render(SINGLE, "{% for m in messages %}")


@pytest.mark.parametrize("messages, message", [
    ([], "non-empty list"),
    ([{"role": "robot", "content": "x"}], r"data.jsonl:3: messages\[0\].role is 'robot'"),
    ([{"role": "user", "content": 5}], r"messages\[0\].content must be a string"),
    ([{"role": "user", "content": "  "}], r"messages\[0\].content is empty"),
    ([{"role": "user", "content": "a"}, {"role": "system", "content": "b"}], "system message may only come first"),
    (["hello"], "must be an object"),
])
def test_validate_messages(messages, message):
    with pytest.raises(LLMLabError, match=message):
        validate_messages(messages, "data.jsonl:3")
