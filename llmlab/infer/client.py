"""A client for hosted chat APIs (Zhipu GLM, OpenAI, a local server, any OpenAI-compatible URL).

``chat(...)`` sends one conversation through the official ``openai`` SDK and returns the answer's text. The retry
policy is ours, not the SDK's (its own retries are off): on HTTP 429, 5xx, connection errors and timeouts it waits
``min(Retry-After, backoff_max)`` when the server sends ``Retry-After`` (seconds or an HTTP date), otherwise a
"full jitter" delay uniform(0, min(backoff_max, backoff_base · 2^k)) before retry k = 0, 1, ...; a rejected key
(401/403) and other client errors fail at once. The API key never appears in a log line, an exception message or
a repr: error texts are scrubbed of it.

``llmlab ask TEXT --provider zhipu|openai|local`` is the command-line face, streaming to stdout.
"""
from __future__ import annotations

import argparse
import email.utils
import logging
import os
import random
import sys
import time
from dataclasses import dataclass
from typing import Callable

import openai

from ..errors import LLMLabError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Provider:
    base_url: str
    model: str
    key_env: str | None  # None: the endpoint needs no key


PROVIDERS = {
    "zhipu": Provider("https://open.bigmodel.cn/api/paas/v4/", "glm-4-flash", "ZHIPUAI_API_KEY"),
    "openai": Provider("https://api.openai.com/v1", "gpt-4o-mini", "OPENAI_API_KEY"),
    "local": Provider("http://127.0.0.1:8000/v1", "llmlab", None),
}
LOCAL_PLACEHOLDER_KEY = "not-needed"


def _resolve_key(provider: str, api_key: str | None) -> str:
    if api_key:
        return api_key
    env = PROVIDERS[provider].key_env
    if env is None:
        return LOCAL_PLACEHOLDER_KEY
    key = os.environ.get(env)
    if not key:
        raise LLMLabError(f"no API key for provider {provider!r}: set the environment variable {env} "
                          "(or pass api_key=...)")
    return key


def _as_messages(messages_or_text) -> list[dict]:
    if isinstance(messages_or_text, str):
        return [{"role": "user", "content": messages_or_text}]
    messages = list(messages_or_text)
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            raise LLMLabError(f"message {i} must be a dict with 'role' and 'content', got {m!r}")
    if not messages:
        raise LLMLabError("chat needs at least one message")
    return messages


def _scrub(text: str, secret: str) -> str:
    """Replace every occurrence of the secret (the API key) with ``***``."""
    return text.replace(secret, "***") if secret else text


def retry_after_seconds(value: str | None, now: float | None = None) -> float | None:
    """Parse a ``Retry-After`` header: delay in seconds, or an HTTP date (delay = date − now, at least 0)."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError):
        return None
    return max(when - (time.time() if now is None else now), 0.0)


def _is_retryable(error: Exception) -> bool:
    if isinstance(error, openai.APIStatusError):
        return error.status_code == 429 or error.status_code >= 500
    return isinstance(error, openai.APIConnectionError)  # includes APITimeoutError


def _backoff(error: Exception, retry: int, base: float, cap: float) -> float:
    """Seconds to wait before retry ``retry`` (0-based): the server's Retry-After, else full jitter."""
    if isinstance(error, openai.APIStatusError):
        hinted = retry_after_seconds(error.response.headers.get("retry-after"))
        if hinted is not None:
            return min(hinted, cap)
    return random.uniform(0.0, min(cap, base * 2 ** retry))


def _describe(error: Exception, key: str) -> str:
    text = _scrub(f"{type(error).__name__}: {error}", key)  # scrub before cutting: no partial key survives
    return text if len(text) <= 500 else text[:500] + "..."


def _complete(client: openai.OpenAI, request: dict, stream: bool, on_text: Callable[[str], None] | None,
              emitted: list[str]) -> str:
    """One attempt. Streamed pieces go to ``on_text`` and are appended to ``emitted`` as they arrive."""
    if not stream:
        response = client.chat.completions.create(**request)
        text = (response.choices[0].message.content or "") if response.choices else ""
        if on_text is not None:
            on_text(text)
        emitted.append(text)
        return text
    with client.chat.completions.create(**request, stream=True) as chunks:
        for chunk in chunks:
            piece = chunk.choices[0].delta.content if chunk.choices else None
            if piece:
                emitted.append(piece)
                if on_text is not None:
                    on_text(piece)
    return "".join(emitted)


def _served_model(client: openai.OpenAI) -> str:
    """The model a local server lists first (``llmlab serve`` serves one); ``llmlab`` when it cannot say."""
    try:
        listed = client.models.list().data
    except openai.APIError:
        return PROVIDERS["local"].model
    return listed[0].id if listed else PROVIDERS["local"].model


def chat(messages_or_text, *, provider: str = "zhipu", model: str | None = None, base_url: str | None = None,
         api_key: str | None = None, stream: bool = False, temperature: float | None = None,
         max_tokens: int | None = None, max_retries: int = 5, timeout: float = 60,
         on_text: Callable[[str], None] | None = None, backoff_base: float = 0.5, backoff_max: float = 30.0) -> str:
    """Send a conversation (a string is one user message) and return the assistant's whole answer.

    With ``stream=True`` each piece goes to ``on_text(piece)`` as it arrives (without streaming, ``on_text`` gets
    the whole answer once). Up to ``max_retries`` retries (so ``1 + max_retries`` attempts) on 429, 5xx,
    connection errors and timeouts; a stream that breaks after text was emitted is not retried (the text would
    repeat). Raises ``LLMLabError`` on a missing or rejected key, another client error, or an exhausted budget.
    """
    if provider not in PROVIDERS:
        raise LLMLabError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    if max_retries < 0:
        raise LLMLabError(f"max_retries must be >= 0, got {max_retries}")
    key = _resolve_key(provider, api_key)
    url = base_url or PROVIDERS[provider].base_url
    client = openai.OpenAI(api_key=key, base_url=url, max_retries=0, timeout=timeout)
    if model is None:
        model = _served_model(client) if provider == "local" else PROVIDERS[provider].model
    request = {"model": model, "messages": _as_messages(messages_or_text)}
    if temperature is not None:
        request["temperature"] = temperature
    if max_tokens is not None:
        request["max_tokens"] = max_tokens
    attempts = 1 + max_retries
    for attempt in range(1, attempts + 1):
        emitted: list[str] = []
        try:
            return _complete(client, request, stream, on_text, emitted)
        except (openai.AuthenticationError, openai.PermissionDeniedError) as e:
            env = PROVIDERS[provider].key_env or "the api_key argument"
            raise LLMLabError(f"{url} rejected the API key (HTTP {e.status_code}); check {env}") from None
        except openai.APIError as e:
            error = e
        what = _describe(error, key)
        if not _is_retryable(error):
            raise LLMLabError(f"chat request to {url} failed: {what}") from None
        if emitted:
            raise LLMLabError(f"the stream from {url} broke after {len(''.join(emitted))} characters: {what}") from None
        if attempt == attempts:
            break
        delay = _backoff(error, attempt - 1, backoff_base, backoff_max)
        log.warning("chat: attempt %d/%d to %s failed (%s); retrying in %.2fs", attempt, attempts, url, what, delay)
        time.sleep(delay)
    raise LLMLabError(f"chat: gave up after {attempts} attempts to {url}: last error {what}")


def _ask(args: argparse.Namespace) -> int:
    messages = ([{"role": "system", "content": args.system}] if args.system else [])
    messages.append({"role": "user", "content": args.text})

    def write(piece: str) -> None:
        sys.stdout.write(piece)
        sys.stdout.flush()

    chat(messages, provider=args.provider, model=args.model, base_url=args.base_url, stream=not args.no_stream,
         temperature=args.temperature, max_tokens=args.max_tokens, on_text=write)
    sys.stdout.write("\n")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("ask", help="send one message to a hosted chat API and print the answer")
    p.add_argument("text", help="the user message")
    p.add_argument("--provider", choices=sorted(PROVIDERS), default="zhipu",
                   help="zhipu (ZHIPUAI_API_KEY), openai (OPENAI_API_KEY) or local (no key)")
    p.add_argument("--model", default=None, help="model name (default: the provider's)")
    p.add_argument("--base-url", default=None, help="any OpenAI-compatible endpoint, e.g. http://host:8000/v1")
    p.add_argument("--system", default=None, help="system message")
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--max-tokens", type=int, default=None)
    p.add_argument("--no-stream", action="store_true", help="wait for the whole answer instead of streaming")
    p.set_defaults(func=_ask)
