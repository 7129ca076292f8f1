"""``llmlab serve``: an OpenAI-compatible HTTP API (FastAPI + uvicorn) over one model, with continuous batching.

Routes: ``GET /v1/models``, ``POST /v1/chat/completions``, ``POST /v1/completions`` (streamed as server-sent events
when ``stream`` is true), ``GET /health`` and the chat page at ``/``. Generation runs in one scheduler thread
(``batcher.Batcher``); each HTTP request submits its choices there and waits on an asyncio queue fed from that thread.

Errors have OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 for a malformed or invalid
request (bad JSON, missing field, empty messages, unknown role, max_tokens < 1, prompt + max_tokens over the
context), 401 for a missing or wrong API key, 404 for an unknown model or route, 422 for a field of the wrong type.

With ``--defense NAME[,NAME...]`` (``llmlab.redteam.defenses``) a chat answer comes whole from the defended model
(a stream sends it as one piece); a blocked answer is the refusal with ``finish_reason`` ``"content_filter"``,
and the response's ``defense`` field says which filter blocked each choice and what the defenses cost. Defended
answers run one request at a time on their own engine (sharing the weights) beside the batch, and
``/v1/completions`` is refused: raw text has no conversation to defend.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import os
import threading
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import ClassVar, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field, StrictBool, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import chat
from ..errors import LLMLabError
from ..hub.folder import ModelDir
from ..redteam.defended import Answerer, DefendedChat, Defense
from ..redteam.defenses import GENERIC_REFUSAL, add_defense_args, build_defenses, parse_names, parse_settings
from ..world.vocab import REFUSAL
from .batcher import Batcher, Event
from .engine import Engine, SamplingParams

PAGE = Path(__file__).parent / "static" / "index.html"


# ----------------------------------------------------------------------------------------------- request models

class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart]
    name: str | None = None

    def text(self) -> str:
        return self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)


class StreamOptions(BaseModel):
    include_usage: StrictBool = False


class GenerationRequest(BaseModel):
    """The fields both completion endpoints share (unknown fields are ignored, as OpenAI-compatible servers do)."""
    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    n: int = Field(1, ge=1, le=16)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, ge=-2 ** 63, le=2 ** 63 - 16)     # choice c samples with seed + c (c < 16)
    stream: StrictBool = False
    stream_options: StreamOptions | None = None

    is_chat: ClassVar[bool] = False

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > 4 or not all(stops):
            raise APIError(400, "'stop' takes at most 4 non-empty strings", param="stop")
        return stops

    def sampling(self, budget: int, extra_stops: list[str], choice: int) -> SamplingParams:
        """Engine parameters for choice ``choice`` (seeded choices get seed + choice so they differ)."""
        seed = None if self.seed is None else self.seed + choice
        return SamplingParams(max_new_tokens=budget, temperature=self.temperature, top_p=self.top_p,
                              stop=self.stops() + extra_stops, seed=seed, lstrip=self.is_chat)


class ChatRequest(GenerationRequest):
    messages: list[Message] = Field(min_length=1)
    is_chat: ClassVar[bool] = True          # a reply starts without the space some templates put before it


class CompletionRequest(GenerationRequest):
    prompt: str | list[str] = Field(min_length=1)


# ----------------------------------------------------------------------------------------------- errors

class APIError(Exception):
    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(body, status_code=self.status, headers=headers)


def _is_type_error(error: dict) -> bool:
    """pydantic's "a value of the wrong type" errors (``string_type``, ``float_parsing``, ``int_from_float``...):
    these give 422."""
    return error["type"].endswith(("_type", "_parsing")) or error["type"] == "int_from_float"


def validation_error(errors: list[dict]) -> APIError:
    """One APIError for pydantic's error list: 422 when every error is a wrong type, else 400."""
    first = errors[0]
    param = _param_name(first.get("loc", ()))
    wrong_types = all(_is_type_error(e) for e in errors)
    if first["type"] == "json_invalid":
        return APIError(400, f"the request body is not valid JSON: {first.get('ctx', {}).get('error', first['msg'])}")
    status = 422 if wrong_types else 400
    message = f"{param}: {first['msg']}" if param else first["msg"]
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return APIError(status, message, param=param, code="invalid_type" if wrong_types else None)


def _param_name(loc) -> str | None:
    """('messages', 0, 'role') → 'messages[0].role'; pydantic's union branch names ('str', 'list[str]') are dropped."""
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        elif part in ("body", "str", "int", "float", "bool") or "[" in part:
            continue
        else:
            name += f".{part}" if name else str(part)
    return name or None


# ----------------------------------------------------------------------------------------------- the app

class Server:
    """The state behind the routes: the engine, its batcher, the chat template, the served name and the key."""

    def __init__(self, engine: Engine, *, model_name: str, template: str, api_key: str | None = None,
                 max_batch: int = 32, defenses: list[Defense] | None = None, refusal: str = GENERIC_REFUSAL):
        self.engine, self.model_name, self.template, self.api_key = engine, model_name, template, api_key
        self.batcher = Batcher(engine, max_batch=max_batch)
        self.chat_stops = [s for s in chat.stop_strings(template, engine.tokenizer.eos_token) if s]
        self.created = int(time.time())
        self.defenses, self.refusal = list(defenses or []), refusal
        if self.defenses:       # its own adapter and cache: the batcher's are touched by its thread alone
            self.defended_engine = Engine(engine.model, engine.tokenizer, eos_token_ids=sorted(engine.eos_token_ids))
            self.defended_lock = threading.Lock()

    def defended_replies(self, body: ChatRequest, budget: int) -> list:
        """The ``n`` choices of a chat request, each answered behind the defenses (a worker thread runs this)."""
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        with self.defended_lock:
            return [DefendedChat(Answerer(self.defended_engine, self.template, body.sampling(budget, [], c)),
                                 self.defenses, self.refusal).answer([messages])[0] for c in range(body.n)]

    # -------------------------------------------------------------------------------------- checks

    def check_key(self, request: Request) -> None:
        if self.api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[7:].strip() if header[:7].lower() == "bearer " else ""
        if not given:
            raise APIError(401, "missing API key: send the header 'Authorization: Bearer KEY'",
                           code="invalid_api_key")
        if not hmac.compare_digest(given.encode(), self.api_key.encode()):
            raise APIError(401, "incorrect API key", code="invalid_api_key")

    async def parse(self, request: Request, model: type[GenerationRequest]) -> GenerationRequest:
        self.check_key(request)
        try:
            body = model.model_validate_json(await request.body())
        except ValidationError as e:
            raise validation_error(e.errors(include_url=False)) from None
        if body.model != self.model_name:
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")
        return body

    def budget(self, body: GenerationRequest, prompt_len: int) -> int:
        """max_tokens, checked against the context (OpenAI's rule: prompt + max_tokens must fit); by default
        everything the context leaves."""
        context = self.engine.context
        if prompt_len == 0:
            raise APIError(400, "the prompt is empty once tokenized", param="prompt")
        if prompt_len >= context:
            raise APIError(400, f"the prompt has {prompt_len} tokens; this model's context is {context} tokens "
                                "(at least one must be left for the answer)",
                           param="messages" if body.is_chat else "prompt", code="context_length_exceeded")
        asked = body.max_completion_tokens or body.max_tokens
        if asked is None:
            return context - prompt_len
        if prompt_len + asked > context:
            raise APIError(400, f"this model's context is {context} tokens; the prompt has {prompt_len} and "
                                f"max_tokens asks for {asked} more; lower max_tokens to at most "
                                f"{context - prompt_len}", param="max_tokens", code="context_length_exceeded")
        return asked

    def chat_prompt(self, body: ChatRequest) -> list[int]:
        messages = [{"role": m.role, "content": m.text()} for m in body.messages]
        try:
            chat.validate_messages(messages, "request")
            return chat.generation_prompt_ids(self.engine.tokenizer, messages, self.template)
        except LLMLabError as e:
            raise APIError(400, str(e), param="messages") from None

    def completion_prompts(self, body: CompletionRequest) -> list[list[int]]:
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not texts or not all(texts):
            raise APIError(400, "'prompt' must be a non-empty string or list of non-empty strings", param="prompt")
        return [self.engine.encode(t) for t in texts]

    # -------------------------------------------------------------------------------------- generation

    def start(self, prompts: list[list[int]], body: GenerationRequest, extra_stops: list[str]):
        """Submit n choices per prompt; returns (sequences, queue of (choice index, Event))."""
        budgets = [self.budget(body, len(p)) for p in prompts]
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        seqs = []
        for i, (prompt, budget) in enumerate(zip(prompts, budgets)):
            for c in range(body.n):
                index = i * body.n + c
                def sink(ev, index=index):
                    loop.call_soon_threadsafe(queue.put_nowait, (index, ev))
                seqs.append(self.batcher.submit(prompt, body.sampling(budget, extra_stops, c), sink))
        return seqs, queue

    async def collect(self, seqs, queue) -> tuple[list[str], list[str], int]:
        """Wait for every choice to finish: (texts, finish reasons, completion tokens)."""
        texts, reasons, tokens = [""] * len(seqs), [None] * len(seqs), 0
        try:
            while any(r is None for r in reasons):
                index, ev = await queue.get()
                texts[index] += ev.text
                if ev.finish_reason:
                    _raise_if_failed(ev)
                    reasons[index], tokens = ev.finish_reason, tokens + ev.completion_tokens
        finally:
            for seq in seqs:
                self.batcher.cancel(seq)
        return texts, reasons, tokens

    async def events(self, seqs, queue):
        """Yield (choice index, Event) until every choice has finished."""
        left = len(seqs)
        while left:
            index, ev = await queue.get()
            if ev.finish_reason:
                left -= 1
            yield index, ev

    def sse(self, chunks, seqs) -> StreamingResponse:
        """Server-sent events: one ``data: JSON`` per chunk, then ``data: [DONE]``; a failure mid-stream (the
        status line is already sent) becomes a last ``data: {"error": ...}``."""
        async def body():
            try:
                async for chunk in chunks:
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            except APIError as e:
                yield f"data: {e.response().body.decode()}\n\n"
            yield "data: [DONE]\n\n"

        def close():
            for seq in seqs:
                self.batcher.cancel(seq)
        return _ClosingStream(body(), on_close=close)


def _raise_if_failed(ev: Event) -> None:
    if ev.finish_reason == "error":
        raise APIError(500, f"generation failed: {ev.error}", type="server_error")


class _ClosingStream(StreamingResponse):
    """A server-sent-event stream that runs ``on_close`` however it ends (finished, client gone, cancelled), so a
    client that disconnects frees its batch slots at once."""

    def __init__(self, content, on_close):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self.on_close()


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def create_app(engine: Engine, *, model_name: str, template: str | None = None, api_key: str | None = None,
               max_batch: int = 32, defenses: list[Defense] | None = None, refusal: str = GENERIC_REFUSAL) -> FastAPI:
    """The FastAPI app serving ``engine`` as ``model_name``; the batcher thread runs while the app does;
    ``defenses`` guard the chat route."""
    state = Server(engine, model_name=model_name, template=template or chat.TEMPLATES[chat.DEFAULT_TEMPLATE],
                   api_key=api_key, max_batch=max_batch, defenses=defenses, refusal=refusal)

    @asynccontextmanager
    async def lifespan(app):
        state.batcher.start()
        try:
            yield
        finally:
            state.batcher.stop()

    app = FastAPI(title="llmlab", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.server = state
    _install_error_handlers(app)

    @app.get("/", include_in_schema=False)
    async def page():
        return FileResponse(PAGE, media_type="text/html")

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": state.model_name, "active": state.batcher.active,
                "waiting": len(state.batcher.waiting)}

    @app.get("/v1/models")
    async def models(request: Request):
        state.check_key(request)
        return {"object": "list", "data": [{"id": state.model_name, "object": "model", "created": state.created,
                                            "owned_by": "llmlab"}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await state.parse(request, ChatRequest)
        prompt = state.chat_prompt(body)
        if state.defenses:
            return await _defended_chat(state, body, prompt)
        seqs, queue = state.start([prompt], body, state.chat_stops)
        head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_name}
        if body.stream:
            return state.sse(_chat_chunks(state, head, body, seqs, queue, len(prompt)), seqs)
        texts, reasons, tokens = await state.collect(seqs, queue)
        choices = [{"index": i, "message": {"role": "assistant", "content": t}, "finish_reason": r,
                    "logprobs": None} for i, (t, r) in enumerate(zip(texts, reasons))]
        return {**head, "object": "chat.completion", "choices": choices, "usage": _usage(len(prompt), tokens)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await state.parse(request, CompletionRequest)
        if state.defenses:
            raise APIError(400, "this server answers behind defenses: use /v1/chat/completions (raw completions "
                                "have no conversation to defend)", code="defended_server")
        prompts = state.completion_prompts(body)
        seqs, queue = state.start(prompts, body, [])
        head = {"id": f"cmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_name}
        prompt_tokens = sum(len(p) for p in prompts)
        if body.stream:
            return state.sse(_completion_chunks(state, head, body, seqs, queue, prompt_tokens), seqs)
        texts, reasons, tokens = await state.collect(seqs, queue)
        choices = [{"index": i, "text": t, "finish_reason": r, "logprobs": None}
                   for i, (t, r) in enumerate(zip(texts, reasons))]
        return {**head, "object": "text_completion", "choices": choices, "usage": _usage(prompt_tokens, tokens)}

    return app


async def _defended_chat(state: Server, body: ChatRequest, prompt: list[int]):
    """A chat response whose choices come from ``Server.defended_replies``; streamed as one piece per choice."""
    budget = state.budget(body, len(prompt))
    try:
        replies = await asyncio.to_thread(state.defended_replies, body, budget)
    except LLMLabError as e:
        raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None
    reasons = ["content_filter" if r.blocked_by else r.finish_reason for r in replies]
    tokens = sum(len(r.token_ids) for r in replies)
    head = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": state.model_name,
            "defense": [{"blocked_by": r.blocked_by, "forward_tokens": r.cost.forward_tokens,
                         "generations": r.cost.generations, "seconds": r.cost.seconds} for r in replies]}
    if not body.stream:
        choices = [{"index": i, "message": {"role": "assistant", "content": r.text}, "finish_reason": why,
                    "logprobs": None} for i, (r, why) in enumerate(zip(replies, reasons))]
        return {**head, "object": "chat.completion", "choices": choices, "usage": _usage(len(prompt), tokens)}

    async def chunks():
        chunk = {**head, "object": "chat.completion.chunk"}
        for i, (r, why) in enumerate(zip(replies, reasons)):
            for delta, finish in (({"role": "assistant", "content": ""}, None), ({"content": r.text}, None),
                                  ({}, why)):
                yield {**chunk, "choices": [{"index": i, "delta": delta, "finish_reason": finish}]}
        if body.stream_options and body.stream_options.include_usage:
            yield {**chunk, "choices": [], "usage": _usage(len(prompt), tokens)}
    return state.sse(chunks(), [])


async def _chat_chunks(state: Server, head: dict, body: ChatRequest, seqs, queue, prompt_tokens: int):
    """chat.completion.chunk objects: a role delta per choice, content deltas, a final delta with the reason."""
    chunk = {**head, "object": "chat.completion.chunk"}
    for i in range(len(seqs)):
        yield {**chunk, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                     "finish_reason": None}]}
    tokens = 0
    async for index, ev in state.events(seqs, queue):
        if ev.text:
            yield {**chunk, "choices": [{"index": index, "delta": {"content": ev.text}, "finish_reason": None}]}
        if ev.finish_reason:
            _raise_if_failed(ev)
            tokens += ev.completion_tokens
            yield {**chunk, "choices": [{"index": index, "delta": {}, "finish_reason": ev.finish_reason}]}
    if body.stream_options and body.stream_options.include_usage:
        yield {**chunk, "choices": [], "usage": _usage(prompt_tokens, tokens)}


async def _completion_chunks(state: Server, head: dict, body: CompletionRequest, seqs, queue, prompt_tokens: int):
    chunk = {**head, "object": "text_completion"}
    tokens = 0
    async for index, ev in state.events(seqs, queue):
        if ev.finish_reason:
            _raise_if_failed(ev)
            tokens += ev.completion_tokens
        if ev.text or ev.finish_reason:
            yield {**chunk, "choices": [{"index": index, "text": ev.text, "finish_reason": ev.finish_reason,
                                         "logprobs": None}]}
    if body.stream_options and body.stream_options.include_usage:
        yield {**chunk, "choices": [], "usage": _usage(prompt_tokens, tokens)}


def _install_error_handlers(app: FastAPI) -> None:
    """Every error leaves in OpenAI's shape, FastAPI's own 422 and Starlette's 404/405 included."""

    @app.exception_handler(APIError)
    async def api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def request_validation(request, exc: RequestValidationError):
        return validation_error(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code).response()

    @app.exception_handler(Exception)
    async def server_error(request, exc: Exception):
        return APIError(500, f"internal error: {type(exc).__name__}", type="server_error").response()


# ----------------------------------------------------------------------------------------------- CLI

def _serve_command(args) -> None:
    import uvicorn

    from ..device import parse_dtype
    if not 0 < args.port < 65536:
        raise LLMLabError(f"--port must be in 1..65535, got {args.port}")
    if args.max_batch < 1:
        raise LLMLabError(f"--max-batch must be ≥ 1, got {args.max_batch}")
    model = ModelDir(args.model)
    engine = Engine.from_path(model, device=args.device, dtype=parse_dtype(args.dtype))
    template = model.template(args.template)
    name = args.model_name or model.name
    api_key = args.api_key or os.environ.get("LLMLAB_API_KEY") or None
    names = parse_names(args.defense)
    defenses = build_defenses(names, parse_settings(names, args.defense_sets), model=engine.model,
                              tokenizer=engine.tokenizer, world=args.world, device=args.device)
    app = create_app(engine, model_name=name, template=template, api_key=api_key, max_batch=args.max_batch,
                     defenses=defenses, refusal=REFUSAL if args.world else GENERIC_REFUSAL)
    print(f"serving {name!r} on http://{args.host}:{args.port} (chat page at /, API at /v1)"
          + (", API key required" if api_key else "") + (f", behind {','.join(names)}" if names else ""))
    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")


def register(sub) -> None:
    p = sub.add_parser("serve", help="OpenAI-compatible API (continuous batching) and a chat page for a model")
    p.add_argument("--model", required=True, help="model directory, Hugging Face folder or name, or .gguf file")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require this key as 'Authorization: Bearer KEY' "
                                                   "(default: $LLMLAB_API_KEY, else no key)")
    p.add_argument("--max-batch", type=int, default=32, help="most sequences decoded together")
    p.add_argument("--model-name", default=None, help="name clients use in 'model' (default: the folder's name)")
    p.add_argument("--template", default=None, help="chat template: a built-in name or a .jinja file")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, help="float32 (default on CPU) or bfloat16")
    add_defense_args(p)
    p.add_argument("--world", default=None, metavar="DIR", help="task world folder: the secret the 'secret' defense "
                                                                "guards, the 'icd' demonstrations, the refusal")
    p.set_defaults(func=_serve_command)
