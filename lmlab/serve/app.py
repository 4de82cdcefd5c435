"""The OpenAI-compatible HTTP API (FastAPI) over the continuous-batching scheduler.

    app = create_app(model, tokenizer, template="chatml", model_id="sft", settings=cfg)

Routes: `POST /v1/chat/completions` (messages rendered with the model's chat template),
`POST /v1/completions` (raw text or token-id prompts), `GET /v1/models`, `GET /health`,
`GET /metrics` (Prometheus text: queue depth, active sequences, tokens/s, time to first
token), and the web chat page at `/`. With `stream: true` a completion arrives as server-sent
events, one chunk per piece of text, ending `data: [DONE]`. Each request waits for the
scheduler through an asyncio queue fed from its thread; when the client disconnects, its
sequences are cancelled and their decoding slots freed at the next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, Response, JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from lmlab.infer.prompting import Stops, chat_stops
from lmlab.infer.sampling import Sampling
from lmlab.serve.protocol import ROLES, APIError, ChatRequest, CompletionRequest, validation_error
from lmlab.serve.scheduler import QueueFull, Scheduler, Sequence

log = logging.getLogger("lmlab.serve")
STATIC = Path(__file__).parent / "static"


def create_app(model, tokenizer, template: Optional[str], model_id: str, settings, scheduler: Optional[Scheduler] = None,
               created: int = 0) -> FastAPI:
    """The app serving `model`; `settings` is lmlab.serve.stage.Config (limits, key, CORS)."""
    ctx = int(settings.context or model.cfg.max_seq_len)
    # truncate=sinks: prompts and replies may outgrow a bounded context (attention sinks)
    streaming = settings.truncate == "sinks" and getattr(model, "max_context", None) is not None
    sched = scheduler or Scheduler(model, tokenizer, max_batch=settings.max_batch, max_queue=settings.max_queue,
                                   max_len=ctx, sinks=settings.sinks if streaming else None)
    status_counts: dict[int, int] = {}

    @asynccontextmanager
    async def lifespan(app):
        if sched._thread is None:
            sched.start()
        yield
        sched.close()

    app = FastAPI(title="lmlab", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.scheduler = sched
    if settings.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
                           allow_headers=["Authorization", "Content-Type"])
    app.add_middleware(AccessLog, counts=status_counts)

    # ------------------------------------------------------------------ errors

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError):
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, e: RequestValidationError):
        err = validation_error(list(e.errors()))
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, e: StarletteHTTPException):
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(e.status_code, "invalid_request_error")
        msg = f"no route {request.method} {request.url.path}" if e.status_code in (404, 405) else str(e.detail)
        return JSONResponse(APIError(e.status_code, msg, kind).body(), status_code=e.status_code)

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, e: Exception):
        return Response(status_code=499)  # nobody reads it: the client has left

    @app.exception_handler(Exception)
    async def _bug(request: Request, e: Exception):
        log.exception("internal error")
        return JSONResponse(APIError(500, f"internal error: {type(e).__name__}: {e}", "server_error").body(),
                            status_code=500)

    def authorize(request: Request) -> None:
        if not settings.api_key:
            return
        got = request.headers.get("authorization", "")
        if got != f"Bearer {settings.api_key}":
            raise APIError(401, "Incorrect API key provided: send `Authorization: Bearer KEY` with this server's key"
                           if got else "You didn't provide an API key: send `Authorization: Bearer KEY`",
                           code="invalid_api_key")

    def check_common(req, request: Request) -> None:
        authorize(request)
        if req.model != model_id:
            raise APIError(404, f"The model '{req.model}' does not exist; this server serves '{model_id}'",
                           param="model", code="model_not_found")
        bad = req.unsupported()
        if bad:
            raise APIError(400, f"'{bad}' is not supported by lmlab's server: leave it out (or at its default)",
                           param=bad, code="unsupported_parameter")
        if req.n > settings.max_n:
            raise APIError(400, f"n={req.n} is over this server's limit of {settings.max_n}", param="n")
        stops = req.stop_strings()
        if len(stops) > 4:
            raise APIError(400, f"at most 4 stop sequences are allowed, got {len(stops)}", param="stop")

    def budget(requested: Optional[int], prompt_len: int, param: str, prompt_param: str) -> int:
        """The completion's token budget: `requested` (checked) or what the limit and context leave."""
        if requested is not None and requested > settings.max_tokens:
            raise APIError(400, f"{param}={requested} is over this server's limit of {settings.max_tokens}",
                           param=param)
        if streaming:  # the cache streams past the context
            return requested if requested is not None else settings.max_tokens
        room = ctx - prompt_len
        if room < 1 or (requested is not None and requested > room):
            raise APIError(400, f"This model's maximum context length is {ctx} tokens. However, you requested "
                                f"{prompt_len + (requested or 1)} tokens ({prompt_len} in the prompt, "
                                f"{requested or 1} for the completion). Shorten the prompt or lower {param}.",
                           param=prompt_param, code="context_length_exceeded")
        return requested if requested is not None else min(settings.max_tokens, room)

    def sampling(req, max_new: int, i: int) -> Sampling:
        base = req.seed if req.seed is not None else uuid.uuid4().int % (2 ** 31)
        return Sampling(max_new_tokens=max_new, temperature=1.0 if req.temperature is None else req.temperature,
                        top_k=req.top_k or 0, top_p=1.0 if req.top_p is None else req.top_p, seed=base + i)

    # ------------------------------------------------------------------ routes

    @app.get("/", response_class=HTMLResponse)
    async def page():
        f = STATIC / "chat.html"
        if not f.is_file():
            raise APIError(404, "the web chat page is not installed (lmlab/serve/static/chat.html)")
        return HTMLResponse(f.read_text(encoding="utf-8"))

    @app.get("/health")
    async def health():
        m = sched.metrics()
        return {"status": "ok", "model": model_id, "active_sequences": m["active_sequences"],
                "queue_depth": m["queue_depth"]}

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        return {"object": "list", "data": [_model_card(model_id, created)]}

    @app.get("/v1/models/{name}")
    async def one_model(name: str, request: Request):
        authorize(request)
        if name != model_id:
            raise APIError(404, f"The model '{name}' does not exist; this server serves '{model_id}'",
                           param="model", code="model_not_found")
        return _model_card(model_id, created)

    @app.get("/metrics")
    async def metrics(request: Request):
        authorize(request)
        return PlainTextResponse(_prometheus(sched.metrics(), status_counts, settings.max_batch),
                                 media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatRequest, request: Request):
        check_common(req, request)
        if template is None:
            raise APIError(400, "this model has no chat template, so it cannot answer chat messages: use "
                                "/v1/completions, or restart the server with template=NAME", param="messages",
                           code="no_chat_template")
        messages = _messages(req, settings)
        from lmlab.data.chat import prompt_ids

        requested = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        param = "max_completion_tokens" if req.max_completion_tokens is not None else "max_tokens"
        ids = prompt_ids(template, messages, tokenizer)
        if settings.truncate == "oldest" and len(ids) + (requested or 1) > ctx:
            ids = prompt_ids(template, messages, tokenizer, max_len=max(1, ctx - (requested or settings.max_tokens)))
        max_new = budget(requested, len(ids), param, "messages")
        # ignore_eos: the template's end of turn (its ids and turn markers) does not end the reply either
        stops = Stops(tuple(req.stop_strings())) if req.ignore_eos else chat_stops(template, tokenizer,
                                                                                    extra=req.stop_strings())
        seqs = [Sequence(ids, sampling(req, max_new, i), stops, ignore_eos=req.ignore_eos) for i in range(req.n)]
        return await _respond(request, req, seqs, [len(ids)], "chat.completion", lambda i: 0)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        check_common(req, request)
        prompts = _prompt_ids(req, tokenizer, model.cfg.vocab_size)
        if settings.truncate == "oldest":
            keep = max(1, ctx - (req.max_tokens or 1))
            prompts = [p if len(p) <= keep else p[-keep:] for p in prompts]
        stops = Stops(tuple(req.stop_strings()))
        seqs = []
        for p in prompts:
            max_new = budget(req.max_tokens, len(p), "max_tokens", "prompt")
            seqs += [Sequence(p, sampling(req, max_new, i), stops, ignore_eos=req.ignore_eos) for i in range(req.n)]
        return await _respond(request, req, seqs, [len(p) for p in prompts], "text_completion",
                              lambda i: i // req.n, echo=[tokenizer.decode(p) for p in prompts] if req.echo else None)

    async def _respond(request: Request, req, seqs: list[Sequence], prompt_lens: list[int], kind: str,
                       prompt_of, echo: Optional[list[str]] = None):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        for i, s in enumerate(seqs):
            s.on_event = (lambda i: lambda ev: loop.call_soon_threadsafe(queue.put_nowait, (i, ev)))(i)
        submitted = []
        try:
            for s in seqs:
                sched.submit(s)
                submitted.append(s)
        except QueueFull:
            for s in submitted:
                sched.cancel(s)
            raise APIError(429, f"the server is busy ({settings.max_queue} requests waiting); retry shortly",
                           "rate_limit_error", code="rate_limit_exceeded", headers={"Retry-After": "1"})
        rid = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + uuid.uuid4().hex[:24]
        now = int(time.time())
        deadline = loop.time() + settings.request_timeout

        def usage() -> dict:
            p, c = sum(prompt_lens), sum(len(s.ids) for s in seqs)
            request.scope["lmlab.usage"] = (p, c)
            return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

        checked = [loop.time()]

        async def next_event():
            """(index, Event), or None when the request timed out; raises when the client left.
            (A stream learns of a disconnect from its cancelled task; a plain request looks
            every half second, busy or not.)"""
            while True:
                left = deadline - loop.time()
                if left <= 0:
                    return None
                if not req.stream and loop.time() - checked[0] >= 0.5:
                    checked[0] = loop.time()
                    if await request.is_disconnected():
                        raise ClientGone()
                try:
                    return await asyncio.wait_for(queue.get(), timeout=min(0.5, left))
                except asyncio.TimeoutError:
                    continue

        def cancel_all():
            for s in seqs:
                if not s.done:
                    sched.cancel(s)

        if not req.stream:
            texts, reasons = [""] * len(seqs), [None] * len(seqs)
            try:
                while any(r is None for r in reasons):
                    got = await next_event()
                    if got is None:
                        raise APIError(408, f"the request timed out after {settings.request_timeout:g} s",
                                       "timeout", code="timeout")
                    i, ev = got
                    texts[i] += ev.text
                    if ev.finish_reason == "error":
                        raise APIError(500, f"generation failed: {ev.error}", "server_error")
                    reasons[i] = ev.finish_reason
            finally:
                cancel_all()
            choices = []
            for i, (t, r) in enumerate(zip(texts, reasons)):
                if kind == "chat.completion":
                    choices.append({"index": i, "message": {"role": "assistant", "content": t}, "logprobs": None,
                                    "finish_reason": r})
                else:
                    choices.append({"index": i, "text": (echo[prompt_of(i)] if echo else "") + t, "logprobs": None,
                                    "finish_reason": r})
            return {"id": rid, "object": kind, "created": now, "model": model_id, "choices": choices,
                    "usage": usage()}

        chunk_kind = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        def chunk(i: int, text: Optional[str], reason: Optional[str] = None, role: bool = False) -> str:
            if kind == "chat.completion":
                delta = ({"role": "assistant", "content": ""} if role else {})
                if text:
                    delta["content"] = text
                choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": reason}
            else:
                choice = {"index": i, "text": text or "", "logprobs": None, "finish_reason": reason}
            body = {"id": rid, "object": chunk_kind, "created": now, "model": model_id, "choices": [choice]}
            if include_usage:
                body["usage"] = None
            return _sse(body)

        async def events():
            try:
                for i in range(len(seqs)):
                    if kind == "chat.completion":
                        yield chunk(i, None, role=True)
                    elif echo:
                        yield chunk(i, echo[prompt_of(i)])
                left = len(seqs)
                while left:
                    got = await next_event()
                    if got is None:
                        yield _sse(APIError(408, f"the request timed out after {settings.request_timeout:g} s",
                                            "timeout", code="timeout").body())
                        break
                    i, ev = got
                    if ev.finish_reason == "error":
                        yield _sse(APIError(500, f"generation failed: {ev.error}", "server_error").body())
                        break
                    if ev.text:
                        yield chunk(i, ev.text)
                    if ev.finish_reason:
                        left -= 1
                        yield chunk(i, None, ev.finish_reason)
                if include_usage:
                    yield _sse({"id": rid, "object": chunk_kind, "created": now, "model": model_id, "choices": [],
                                "usage": usage()})
                else:
                    usage()
                yield "data: [DONE]\n\n"
            finally:  # also when the client disconnects mid-stream (the task is cancelled)
                cancel_all()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    return app


class ClientGone(Exception):
    """The client disconnected before its (non-streamed) completion was ready."""


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _model_card(model_id: str, created: int) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "lmlab"}


def _messages(req: ChatRequest, settings) -> list[dict]:
    """The request's messages as the chat template's {role, content} (checked against the limits)."""
    if not req.messages:
        raise APIError(400, "'messages' is empty: send at least one message", param="messages")
    if len(req.messages) > settings.max_messages:
        raise APIError(400, f"{len(req.messages)} messages are over this server's limit of {settings.max_messages}",
                       param="messages")
    out, total = [], 0
    for i, m in enumerate(req.messages):
        if m.role not in ROLES:
            raise APIError(400, f"messages[{i}].role is '{m.role}'; valid roles: {', '.join(ROLES)}",
                           param=f"messages[{i}].role")
        text = m.text()
        if text is None:
            raise APIError(400, f"messages[{i}] holds non-text content; this model reads text only",
                           param=f"messages[{i}].content")
        if len(text) > settings.max_message_chars:
            raise APIError(400, f"messages[{i}] has {len(text)} characters, over this server's limit of "
                                f"{settings.max_message_chars}", param=f"messages[{i}].content")
        total += len(text)
        role = "system" if m.role == "developer" else m.role
        if role == "system" and i != 0:
            raise APIError(400, f"messages[{i}] is a system message; a system message may only come first",
                           param=f"messages[{i}].role")
        out.append({"role": role, "content": text})
    if total > settings.max_prompt_chars:
        raise APIError(400, f"the messages hold {total} characters, over this server's limit of "
                            f"{settings.max_prompt_chars}", param="messages")
    return out


def _prompt_ids(req: CompletionRequest, tokenizer, vocab: int) -> list[list[int]]:
    from lmlab.infer.engine import encode_prompt

    p = req.prompt
    if isinstance(p, str):
        prompts = [encode_prompt(tokenizer, p)]
    elif p and all(isinstance(x, str) for x in p):
        prompts = [encode_prompt(tokenizer, x) for x in p]
    elif p and all(isinstance(x, int) for x in p):
        prompts = [list(p)]
    elif p and all(isinstance(x, list) for x in p):
        prompts = [list(x) for x in p]
    else:
        raise APIError(400, "'prompt' must be a string, a list of strings, or token ids", param="prompt")
    for ids in prompts:
        if not ids:
            raise APIError(400, "a token-id prompt is empty", param="prompt")
        bad = [t for t in ids if not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"token id {bad[0]} is outside the model's vocabulary (0..{vocab - 1})", param="prompt")
    return prompts


def _prometheus(m: dict, status_counts: dict[int, int], max_batch: int) -> str:
    lines = []

    def metric(name: str, kind: str, help_: str, samples: list[tuple[str, float]]):
        lines.extend([f"# HELP lmlab_{name} {help_}", f"# TYPE lmlab_{name} {kind}"])
        lines.extend(f"lmlab_{name}{labels} {value:g}" for labels, value in samples)

    metric("queue_depth", "gauge", "Requests waiting for a decoding slot.", [("", m["queue_depth"])])
    metric("active_sequences", "gauge", "Sequences decoding now.", [("", m["active_sequences"])])
    metric("active_sequences_peak", "gauge", "Most sequences decoded together so far.",
           [("", m["peak_active_sequences"])])
    metric("max_batch", "gauge", "Sequences decoded together at most.", [("", max_batch)])
    metric("generated_tokens_total", "counter", "Tokens generated since start.", [("", m["generated_tokens"])])
    metric("tokens_per_second", "gauge", "Generated tokens per second over the last 10 s.",
           [("", m["tokens_per_second"])])
    metric("time_to_first_token_seconds", "summary", "Time from submission to the first token (last 1000).",
           [(f'{{quantile="{q}"}}', v) for q, v in m["ttft_seconds"].items()] + [("_count", m["ttft_count"])])
    metric("requests_total", "counter", "Finished HTTP requests by status.",
           [(f'{{status="{s}"}}', n) for s, n in sorted(status_counts.items())])
    return "\n".join(lines) + "\n"


class AccessLog:
    """One log line per request once its response has ended (streams included): client, method,
    path, status, prompt/completion tokens, seconds. Also counts statuses for /metrics."""

    def __init__(self, app, counts: dict[int, int]):
        self.app, self.counts = app, counts

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        start, status, logged = time.monotonic(), [0], [False]

        def done(code: int) -> None:
            if logged[0]:
                return
            logged[0] = True
            self.counts[code] = self.counts.get(code, 0) + 1
            usage = scope.get("lmlab.usage")
            tokens = f" prompt={usage[0]} completion={usage[1]}" if usage else ""
            client = (scope.get("client") or ("-",))[0]
            log.info(f"{client} {scope['method']} {scope['path']} {code}{tokens} {time.monotonic() - start:.3f}s")

        async def send_(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)
            if msg["type"] == "http.response.body" and not msg.get("more_body", False):
                done(status[0])

        try:
            await self.app(scope, receive, send_)
        finally:
            if not logged[0]:
                done(status[0] or 499)  # 499: nginx's "client closed request"
