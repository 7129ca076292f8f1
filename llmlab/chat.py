"""Chat templates: Jinja strings as Hugging Face keeps them, rendering, and the assistant-token mask for training.

A template is a Jinja string rendered with the variables ``apply_chat_template`` passes (``messages``,
``bos_token``, ``eos_token``, ``add_generation_prompt``), in a sandboxed environment set up as transformers sets it
up, so ``render(messages, t)`` equals ``tokenizer.apply_chat_template(messages, chat_template=t, tokenize=False)``.

The built-in templates were written from the formats' public descriptions:

- ``llama-2``  ``<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>`` (BOS/EOS from the tokenizer)
- ``llama-3``  ``<|begin_of_text|><|start_header_id|>{role}<|end_header_id|>\\n\\n{content}<|eot_id|>``
- ``gemma``    ``<start_of_turn>user\\n{content}<end_of_turn>\\n<start_of_turn>model\\n``; no system role: the
  system message is folded into the first user turn
- ``chatml``   ``<|im_start|>{role}\\n{content}<|im_end|>\\n``
- ``glm-4``    ``[gMASK]<sop><|system|>\\n{system}<|user|>\\n{user}<|assistant|>\\n{answer}``; an answer has no
  closing token: the model ends its turn by emitting ``<|user|>`` (or ``<|observation|>`` / ``<|endoftext|>``)
- ``llmlab``   our default: ChatML with the tokenizer's BOS (``<|bos|>`` for our tokenizers) in front and, as in
  Llama-2's format, a space before each (trimmed) message content: ``<|im_start|>{role}\\n {content}<|im_end|>\\n``.
  A byte-level BPE has different tokens for a word after a space (``" Zekro"``, ``" 33"``) and at the start of a
  line (``"Zekro"``, ``"33"``); with the space, an answer begins with the token the model saw in running text and
  in the question, which a small model trained on little data needs to copy a name or a number. The generation
  prompt ends at the newline, so the model emits the space inside its first token; replies are left-stripped.

Llama-2/3 and Gemma trim message contents, as their reference templates do.
"""
from __future__ import annotations

import dataclasses
import json
import secrets
from datetime import datetime
from functools import lru_cache
from pathlib import Path

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from .encoding import encode_rendered
from .errors import LLMLabError

ROLES = ("system", "user", "assistant")
TEMPLATE_FILE = "chat_template.jinja"

_LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}"
    "{% set system = '<<SYS>>\\n' + messages[0]['content'] | trim + '\\n<</SYS>>\\n\\n' %}"
    "{% set loop_messages = messages[1:] %}"
    "{% else %}{% set system = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('llama-2: after an optional system message, roles must alternate user/assistant') }}"
    "{% endif %}"
    "{% if message['role'] == 'user' %}"
    "{{ bos_token + '[INST] ' + (system if loop.first else '') + message['content'] | trim + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] | trim + ' ' + eos_token }}{% endif %}"
    "{% endfor %}"
)

_LLAMA3 = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{% endif %}"
)

_GEMMA = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] == 'system' %}"
    "{% set first_prefix = messages[0]['content'] | trim + '\\n\\n' %}{% set loop_messages = messages[1:] %}"
    "{% else %}{% set first_prefix = '' %}{% set loop_messages = messages %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('gemma: after an optional system message, roles must alternate user/assistant') }}"
    "{% endif %}"
    "{% set role = 'model' if message['role'] == 'assistant' else 'user' %}"
    "{{ '<start_of_turn>' + role + '\\n' + (first_prefix if loop.first else '') + message['content'] | trim"
    " + '<end_of_turn>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\\n' }}{% endif %}"
)

_CHATML_TURNS = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_LLMLAB = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n ' + message['content'] | trim + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

_GLM4 = (
    "[gMASK]<sop>"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ '<|system|>\\n' }}"
    "{% elif message['role'] == 'user' %}{{ '<|user|>\\n' }}"
    "{% else %}{{ '<|assistant|>\\n' }}{% endif %}"
    "{{ message['content'] }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)

TEMPLATES: dict[str, str] = {
    "llama-2": _LLAMA2,
    "llama-3": _LLAMA3,
    "gemma": _GEMMA,
    "chatml": _CHATML_TURNS,
    "glm-4": _GLM4,
    "llmlab": _LLMLAB,
}
DEFAULT_TEMPLATE = "llmlab"

# End-of-turn markers recognised in any template (ours or a Hugging Face folder's), most specific first.
# "<|end|>" (Phi-3) comes before "<|user|>" because Phi-3 templates contain both.
_TURN_ENDS = ("<|eot_id|>", "<end_of_turn>", "<|im_end|>", "<|end|>", "<|user|>")
# GLM-4 also stops on a tool call and on end of text (its generation_config lists all three).
_EXTRA_STOPS = {"<|user|>": ("<|observation|>", "<|endoftext|>")}


def get_template(name: str) -> str:
    """The built-in template called ``name``."""
    if name not in TEMPLATES:
        raise LLMLabError(f"unknown chat template {name!r}; known templates: {', '.join(TEMPLATES)}")
    return TEMPLATES[name]


def _template_text(name_or_template: str) -> str:
    return TEMPLATES.get(name_or_template, name_or_template)


def end_of_turn(name_or_template: str, eos_token: str | None = None) -> str:
    """The string that closes an assistant turn: what the model emits to stop, and what SFT must teach it.

    Found from the template's text: ``<|eot_id|>`` (Llama-3), ``<end_of_turn>`` (Gemma), ``<|im_end|>`` (ChatML,
    llmlab), ``<|end|>`` (Phi-3), ``<|user|>`` (GLM-4: a turn ends when the model opens the next user turn);
    else a template that closes turns with ``eos_token`` (Llama-2, Mistral) gives ``eos_token`` (``</s>`` when
    not given).
    """
    text = _template_text(name_or_template)
    for marker in _TURN_ENDS:
        if marker in text:
            return marker
    if "eos_token" in text:
        return eos_token or "</s>"
    raise LLMLabError("cannot tell how this chat template ends an assistant turn (no known end-of-turn marker "
                      "and no eos_token in it); use one of the built-in templates: " + ", ".join(TEMPLATES))


def end_of_turn_id(tokenizer, chat_template: str) -> int | None:
    """The special token the template puts right after an assistant message (``<|im_end|>``, ``<|eot_id|>``,
    ``<end_of_turn>``...), found by rendering a probe conversation; None when the template ends turns with
    plain text."""
    probe = "llmlab-probe-answer"
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": probe}]
    try:
        text = tokenizer.apply_chat_template(messages, chat_template=chat_template, tokenize=False)
    except Exception as e:   # a template is user input: any rendering failure is theirs to fix
        raise LLMLabError(f"the chat template does not render a user/assistant conversation: {e}") from e
    if probe not in text:
        return None
    after = tokenizer.encode(text.split(probe, 1)[1], add_special_tokens=False)
    special = set(tokenizer.all_special_ids) | set(getattr(tokenizer, "added_tokens_decoder", {}))
    return after[0] if after and after[0] in special else None


def stop_strings(name_or_template: str, eos_token: str | None = None) -> list[str]:
    """Every string that ends generation: the end of turn, GLM-4's other stop tokens, and ``eos_token``."""
    eot = end_of_turn(name_or_template, eos_token)
    stops = [eot, *_EXTRA_STOPS.get(eot, ())]
    if eos_token and eos_token not in stops:
        stops.append(eos_token)
    return stops


def reply_params(params, name_or_template: str, eos_token: str | None = None):
    """``params`` (``SamplingParams``) for an assistant reply under this template: generation also stops at the
    template's stop strings (``stop_strings``), and the reply is left-stripped (templates such as ``llmlab`` and
    Llama-2's write a space before each content)."""
    stops = list(dict.fromkeys([*params.stop, *stop_strings(name_or_template, eos_token)]))
    return dataclasses.replace(params, stop=stops, lstrip=True)


def load_template(model_dir, override: str | None = None) -> str:
    """The chat template for a model folder.

    In order: ``override`` (a built-in name or a path to a ``.jinja`` file); the folder's ``chat_template.jinja``;
    the ``chat_template`` key of its ``tokenizer_config.json`` (older folders); the ``llmlab`` default.
    """
    if override is not None:
        if override in TEMPLATES:
            return TEMPLATES[override]
        if Path(override).is_file():
            return Path(override).read_text(encoding="utf-8")
        raise LLMLabError(f"unknown chat template {override!r}: not a file; known templates: {', '.join(TEMPLATES)}")
    folder = Path(model_dir)
    if not folder.is_dir():
        raise LLMLabError(f"model folder not found: {folder}")
    if (folder / TEMPLATE_FILE).is_file():
        return (folder / TEMPLATE_FILE).read_text(encoding="utf-8")
    config_path = folder / "tokenizer_config.json"
    if config_path.is_file():
        found = _template_from_config(config_path)
        if found is not None:
            return found
    return TEMPLATES[DEFAULT_TEMPLATE]


def _template_from_config(config_path: Path) -> str | None:
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise LLMLabError(f"{config_path}: not valid JSON ({e.msg}, line {e.lineno})") from None
    value = config.get("chat_template")
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):  # older multi-template form: [{"name": ..., "template": ...}, ...]
        named = {item.get("name"): item.get("template") for item in value if isinstance(item, dict)}
        if isinstance(named.get("default"), str):
            return named["default"]
    raise LLMLabError(f"{config_path}: field 'chat_template' must be a string or a list with a 'default' entry")


def save_template(out_dir, template: str) -> Path:
    """Write ``template`` to ``out_dir/chat_template.jinja`` (the file transformers reads)."""
    path = Path(out_dir) / TEMPLATE_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(template, encoding="utf-8")
    return path


def _raise_exception(message: str):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


class _GenerationTag(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask markers): renders its body as is."""

    tags = {"generation"}

    def parse(self, parser):
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body).set_lineno(lineno)


@lru_cache(maxsize=64)
def _compile(template: str) -> jinja2.Template:
    """Compile in the environment transformers uses for chat templates (sandboxed, trim/lstrip blocks)."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols, _GenerationTag])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except jinja2.TemplateSyntaxError as e:
        raise LLMLabError(f"chat template: Jinja syntax error on line {e.lineno}: {e.message}") from None


def render(messages: list[dict], template: str, *, bos_token: str = "", eos_token: str = "",
           add_generation_prompt: bool = False) -> str:
    """The conversation as text, as ``tokenizer.apply_chat_template(..., tokenize=False)`` renders it."""
    try:
        return _compile(template).render(messages=messages, bos_token=bos_token, eos_token=eos_token,
                                         add_generation_prompt=add_generation_prompt)
    except jinja2.TemplateError as e:
        raise LLMLabError(f"chat template: {e}") from None


def generation_prompt_ids(tokenizer, messages: list[dict], template: str) -> list[int]:
    """Token ids that ask the model for the next assistant turn: the conversation rendered with the generation
    prompt and the tokenizer's own BOS/EOS strings, encoded with nothing added (``encoding.encode_rendered``)."""
    text = render(messages, template, bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or "",
                  add_generation_prompt=True)
    return encode_rendered(tokenizer, text)


def validate_messages(messages, where: str, field: str = "messages") -> None:
    """Check a conversation: a non-empty list of ``{"role", "content"}`` dicts, roles system/user/assistant,
    string contents that are not blank, a system message only first. Errors name ``where`` and the field."""
    if not isinstance(messages, list) or not messages:
        raise LLMLabError(f"{where}: field {field!r} must be a non-empty list of messages")
    for i, message in enumerate(messages):
        name = f"{field}[{i}]"
        if not isinstance(message, dict):
            raise LLMLabError(f"{where}: {name} must be an object with 'role' and 'content'")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise LLMLabError(f"{where}: {name}.role is {role!r}; expected one of {', '.join(ROLES)}")
        if role == "system" and i > 0:
            raise LLMLabError(f"{where}: {name}: a system message may only come first")
        if not isinstance(content, str):
            raise LLMLabError(f"{where}: {name}.content must be a string, got {type(content).__name__}")
        if not content.strip():
            raise LLMLabError(f"{where}: {name}.content is empty")


def assistant_spans(messages: list[dict], template: str, *, bos_token: str = "", eos_token: str = "",
                    add_generation_prompt: bool = False) -> tuple[str, list[tuple[int, int]]]:
    """The rendered text and, per assistant message, the character span ``[start, end)`` the model must produce.

    A span runs from the end of the generation prompt (the text the template renders for the preceding messages
    with ``add_generation_prompt=True``; the content start when that is not a prefix of the text) to the end of
    the end-of-turn string that follows the content (whitespace between them included, e.g. Llama-2's
    ``answer </s>``). Content is located by rendering once with unique markers in place of the assistant
    contents; a template may pass a content through unchanged or trimmed. When nothing closes the final answer
    (GLM-4 closes a turn only by opening the next one), ``eos_token`` (else the end-of-turn string) is appended to
    the text and to the span, as GLM-4's own fine-tuning recipe appends its EOS.
    """
    kw = dict(bos_token=bos_token, eos_token=eos_token)
    text = render(messages, template, add_generation_prompt=add_generation_prompt, **kw)
    content_spans = _locate_contents(messages, template, text, add_generation_prompt, kw)
    eot = end_of_turn(template, eos_token or None)
    spans = []
    for index, (c_start, c_end) in content_spans.items():
        start = _generation_start(messages[:index], template, text, c_start, kw)
        stop = _turn_end(text, c_end, eot)
        if stop is None:
            if text[c_end:].strip() or index != len(messages) - 1:
                raise LLMLabError(f"chat template: assistant message {index} is not followed by the end-of-turn "
                                  f"string {eot!r}; the template and its end-of-turn marker do not match")
            text = text[:c_end] + (eos_token or eot)
            stop = len(text)
        spans.append((start, stop))
    return text, spans


@lru_cache(maxsize=32)
def reply_closing(template: str, eos_token: str = "") -> str:
    """The string that closes a final assistant reply in ``assistant_spans``: the template's end-of-turn string,
    or, for a template that leaves the last answer open (GLM-4), the ``eos_token`` appended there."""
    probe = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    rendered = render(probe, template, eos_token=eos_token)
    text, _ = assistant_spans(probe, template, eos_token=eos_token)
    return text[len(rendered):] if len(text) > len(rendered) else end_of_turn(template, eos_token or None)


def _locate_contents(messages, template, text, add_generation_prompt, kw) -> dict[int, tuple[int, int]]:
    """Character span of each assistant content in ``text``, by rendering with markers instead of the contents."""
    tag = secrets.token_hex(8)
    markers = {i: f"\u27e6{tag}:{i}\u27e7" for i, m in enumerate(messages) if m["role"] == "assistant"}
    marked = [dict(m, content=markers[i]) if i in markers else m for i, m in enumerate(messages)]
    rest = render(marked, template, add_generation_prompt=add_generation_prompt, **kw)
    pieces = []  # the template's own text before each marker, then after the last one
    for i, marker in markers.items():
        before, found, rest = rest.partition(marker)
        if not found:
            raise LLMLabError(f"chat template drops assistant message {i}; cannot build a loss mask")
        pieces.append(before)
    pieces.append(rest)
    spans, pos = {}, 0
    for i, before, after in zip(markers, pieces, pieces[1:]):
        if not text.startswith(before, pos):
            raise _shifted_template()
        pos += len(before)
        content = messages[i]["content"]
        shown = next((c for c in (content, content.strip())
                      if text.startswith(c, pos) and text.startswith(after, pos + len(c))), None)
        if shown is None:
            raise LLMLabError(f"chat template rewrites assistant message {i} (beyond trimming); "
                              "cannot build a loss mask")
        spans[i] = (pos, pos + len(shown))
        pos += len(shown)
    if markers and text[pos:] != pieces[-1]:
        raise _shifted_template()
    return spans


def _shifted_template() -> LLMLabError:
    return LLMLabError("chat template renders differently around the assistant messages when their contents "
                       "change; cannot build a loss mask")


def _generation_start(previous: list[dict], template: str, text: str, content_start: int, kw) -> int:
    """Where the model starts generating: the end of the generation prompt, if it is a prefix of ``text``."""
    if not previous:
        return content_start
    prompt = render(previous, template, add_generation_prompt=True, **kw)
    return len(prompt) if text.startswith(prompt) and len(prompt) <= content_start else content_start


def _turn_end(text: str, content_end: int, eot: str) -> int | None:
    """The end of ``eot`` if it follows ``content_end`` after whitespace only; else None."""
    at = text.find(eot, content_end)
    if at < 0 or text[content_end:at].strip():
        return None
    return at + len(eot)


def encode_chat(tokenizer, messages: list[dict], template: str, add_generation_prompt: bool = False, *,
                require_assistant: bool = True) -> tuple[list[int], list[int]]:
    """Token ids of the rendered conversation and the assistant mask (1 = the model learns this token).

    The text is tokenized as a whole (no special tokens added: the template writes BOS), so the ids are those
    inference sees. A token is in the mask when its characters overlap an assistant span of
    ``assistant_spans``: the content, the end-of-turn token after it, and any text the model must produce
    between the generation prompt and the content (GLM-4's newline). A token that straddles a span's edge
    (``" answer"`` after Llama-2's ``[/INST]``) is in the mask, so every character of an answer is learned.
    ``require_assistant`` (the default, for training) makes a conversation without an assistant turn an error.
    """
    validate_messages(messages, "encode_chat")
    if require_assistant and not any(m["role"] == "assistant" for m in messages):
        raise LLMLabError("encode_chat: the conversation has no assistant turn, so nothing would be learned; "
                          "pass require_assistant=False to encode a prompt")
    if not getattr(tokenizer, "is_fast", False):
        raise LLMLabError("encode_chat needs a fast (Rust) tokenizer, which gives character offsets")
    text, spans = assistant_spans(messages, template, bos_token=tokenizer.bos_token or "",
                                  eos_token=tokenizer.eos_token or "", add_generation_prompt=add_generation_prompt)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    mask = [int(any(_overlaps(offset, span) for span in spans)) for offset in encoded["offset_mapping"]]
    return list(encoded["input_ids"]), mask


def last_turn_mask(mask: list[int]) -> list[int]:
    """Keep only the last run of ones of an ``encode_chat`` mask: the final assistant answer and its end-of-turn
    token."""
    end = max(i for i, m in enumerate(mask) if m) + 1
    start = end
    while start > 0 and mask[start - 1]:
        start -= 1
    return [0] * start + [1] * (end - start) + [0] * (len(mask) - end)


def _overlaps(offset: tuple[int, int], span: tuple[int, int]) -> bool:
    """Whether token characters ``[s, e)`` meet ``span``; a zero-width token counts at its position."""
    s, e = offset
    if s == e:
        return span[0] <= s < span[1]
    return s < span[1] and e > span[0]


def encode_reply(tokenizer, template: str, prompt: list[dict], reply: str) -> tuple[list[int], list[int]]:
    """Token ids of ``prompt`` + the assistant ``reply`` + its end-of-turn token, nothing after, and the mask of
    the reply's tokens (1 on the reply and its end-of-turn token).

    The conversation is rendered and tokenized as a whole (``encode_chat``), then cut after the last assistant
    token, so that the score is read at the end-of-turn token whatever the template writes after it. An empty
    reply (a policy may stop at once) is the generation prompt followed by what closes any final reply
    (``chat.reply_closing``: the end-of-turn string, or GLM-4's EOS).
    """
    if not reply.strip():
        ids, _ = encode_chat(tokenizer, prompt, template, add_generation_prompt=True, require_assistant=False)
        eot = tokenizer.encode(reply_closing(template, tokenizer.eos_token or ""), add_special_tokens=False)
        return ids + eot, [0] * len(ids) + [1] * len(eot)
    ids, mask = encode_chat(tokenizer, prompt + [{"role": "assistant", "content": reply}], template)
    end = max(i for i, m in enumerate(mask) if m) + 1
    return ids[:end], last_turn_mask(mask)[:end]
