"""The HTTP layer: FastAPI routes over an `Engine`, OpenAI-compatible, plus policies, health and metrics.

    app = create_app(engine, tokenizer, registry, ServerConfig(model_id="smollm2"))
    Server(uvicorn.Config(app, host="127.0.0.1", port=8000), engine).run()   # SIGTERM: stop admitting, drain

Routes: ``POST /v1/chat/completions`` and ``/v1/completions`` (JSON or SSE with ``"stream": true``),
``GET /v1/models``, ``POST|GET /v1/policies``, ``GET|DELETE /v1/policies/{id}``, ``GET /health``,
``GET /metrics``. With ``api_key`` set, every ``/v1`` route needs ``Authorization: Bearer <key>``;
``/health`` and ``/metrics`` stay open (bind them to a private interface). Errors are OpenAI-style
``{"error": {...}}`` bodies (`hyperlora.serving.protocol`).

Handlers run on the event loop and never touch the model: they tokenize, validate, `Engine.submit` and then
read the request's events from an asyncio queue that the scheduler thread feeds. A client that disconnects
(a closed stream, or a non-streaming request whose connection drops) cancels its generation.
"""
from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass
from typing import Any, AsyncIterator, Sequence

import uvicorn
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from hyperlora.decisions.decide import Decision, decide
from hyperlora.modeling.prompts import end_of_turn, render_messages  # THE chat rendering (template, else ChatML)
from hyperlora.serving.engine import DrainingError, Engine, QueueFullError, Request, RequestError, SamplingParams
from hyperlora.serving.metrics import CONTENT_TYPE
from hyperlora.serving.protocol import (APIError, ChatCompletionRequest, CompletionRequest, PolicyCreate,
                                        error_body)
from hyperlora.serving.registry import PolicyRegistry

log = logging.getLogger(__name__)

__all__ = ["ServerConfig", "create_app", "Server"]


@dataclass
class ServerConfig:
    """model_id: the name of the plain base model in ``model``; max_tokens: the most tokens one request may ask
    for (also the default when it asks for none); max_body_bytes: request body limit; retry_after: seconds
    sent in ``Retry-After`` with 429 / 503; calibrator / verifier / budget: what ``decide()`` uses for a request
    with ``options``."""

    model_id: str = "hyperlora"
    api_key: str | None = None
    max_tokens: int = 512
    max_body_bytes: int = 1 << 20
    retry_after: int = 1
    calibrator: Any = None  # a decisions Calibrator for requests with options (None: raw probabilities)
    verifier: str | None = "in_context"  # decide()'s verifier
    budget: float = 0.1  # decide()'s review budget


class _BodyLimit:
    """ASGI middleware: a body over `limit` bytes (by Content-Length, or counted while read) is a 400."""

    def __init__(self, app: Any, limit: int):
        self.app, self.limit = app, int(limit)

    async def _refuse(self, send: Any) -> None:
        body = json.dumps(error_body(f"the request body exceeds {self.limit} bytes (--max-body-bytes)",
                                     code="request_too_large")).encode()
        await send({"type": "http.response.start", "status": 400,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.limit:
            await self._refuse(send)
            return
        seen = 0
        started = False

        async def counted() -> dict:
            nonlocal seen
            msg = await receive()
            if msg["type"] == "http.request":
                seen += len(msg.get("body", b""))
                if seen > self.limit:
                    raise _TooLarge()
            return msg

        async def tracked(msg: dict) -> None:
            nonlocal started
            started = started or msg["type"] == "http.response.start"
            await send(msg)

        try:
            await self.app(scope, counted, tracked)
        except _TooLarge:
            if not started:
                await self._refuse(send)


class _TooLarge(Exception):
    pass


class _Events:
    """A request's events, moved from the scheduler thread onto the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def emit(self, kind: str, value: Any) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))

    async def get(self) -> tuple[str, Any]:
        return await self.queue.get()


class _Detokenizer:
    """Token ids -> text deltas. Holds back an incomplete UTF-8 character and any tail that could start a stop
    string; `stopped` once a stop string appears (the text before it is the reply)."""

    def __init__(self, tokenizer: Any, stops: Sequence[str]):
        self.tok, self.stops = tokenizer, list(stops)
        self.ids: list[int] = []
        self.sent = 0
        self.stopped = False
        self._reply = ""

    def _text(self) -> str:
        return self.tok.decode(self.ids, skip_special_tokens=True)

    def push(self, tok: int) -> str:
        self.ids.append(tok)
        text = self._text()
        for s in self.stops:
            at = text.find(s)
            if at >= 0:
                self.stopped = True
                return self._take(text[:at])
        end = len(text)
        if text.endswith("\ufffd"):
            end -= 1
        for s in self.stops:
            for k in range(min(len(s) - 1, end), 0, -1):
                if text[:end].endswith(s[:k]):
                    end = min(end, len(text[:end]) - k)
                    break
        return self._take(text[:max(end, self.sent)])

    def flush(self) -> str:
        return "" if self.stopped else self._take(self._text())

    def text(self) -> str:
        """The whole reply so far (up to a stop string, if one appeared)."""
        if not self.stopped:
            self.flush()
        return self._reply

    def _take(self, upto: str) -> str:
        delta = upto[self.sent:]
        self.sent = max(self.sent, len(upto))
        self._reply = upto if len(upto) >= len(self._reply) else self._reply
        return delta



def _stop_ids(tokenizer: Any, model: Any, chat: bool) -> tuple[int, ...]:
    ids: set[int] = set()
    for e in (getattr(tokenizer, "eos_token_id", None), getattr(getattr(model, "generation_config", None),
                                                                "eos_token_id", None)):
        if isinstance(e, int):
            ids.add(e)
        elif isinstance(e, (list, tuple)):
            ids.update(int(x) for x in e)
    if chat:
        eot = end_of_turn(tokenizer)
        enc = tokenizer(eot, add_special_tokens=False)["input_ids"] if eot else []
        if len(enc) == 1:
            ids.add(int(enc[0]))
    return tuple(sorted(ids))


def create_app(engine: Engine, tokenizer: Any, registry: PolicyRegistry, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app over a started (or to-be-started) `engine`; the app's lifespan starts it and drains it."""
    cfg = config or ServerConfig()
    metrics = engine.metrics
    chat_stops = _stop_ids(tokenizer, engine.model, chat=True)
    text_stops = _stop_ids(tokenizer, engine.model, chat=False)
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        engine.start()
        yield
        engine.drain()
        await asyncio.get_running_loop().run_in_executor(None, engine.join, 60.0)

    app = FastAPI(title="hyperlora", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(_BodyLimit, limit=cfg.max_body_bytes)

    # ---- errors -----------------------------------------------------------------------------

    @app.exception_handler(APIError)
    async def _api_error(_: HTTPRequest, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: HTTPRequest, exc: RequestValidationError) -> JSONResponse:
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        msg = "; ".join(f"{'.'.join(str(x) for x in e.get('loc', ()) if x != 'body') or 'body'}: {e.get('msg')}"
                        for e in errs[:5])
        return JSONResponse(error_body(msg or "malformed request", param=".".join(loc) or None,
                                       code="invalid_request"), status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: HTTPRequest, exc: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(error_body(str(exc.detail), code="not_found" if exc.status_code == 404 else None),
                            status_code=exc.status_code)

    @app.middleware("http")
    async def _auth_and_count(request: HTTPRequest, call_next: Any) -> Response:
        path = request.url.path
        if cfg.api_key and path.startswith("/v1"):
            given = request.headers.get("authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {cfg.api_key}".encode()):
                metrics.requests.labels(endpoint=path, status="401").inc()
                return JSONResponse(error_body("a valid API key is required: Authorization: Bearer <key>",
                                               type="authentication_error", code="invalid_api_key"), status_code=401)
        response = await call_next(request)
        endpoint = "/v1/policies/{id}" if path.startswith("/v1/policies/") else path
        metrics.requests.labels(endpoint=endpoint, status=str(response.status_code)).inc()
        return response

    # ---- plain routes -----------------------------------------------------------------------

    @app.get("/health")
    async def health() -> JSONResponse:
        state = engine.load()
        status = "draining" if engine.draining else "ok"
        return JSONResponse({"status": status, **state}, status_code=503 if engine.draining else 200)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models() -> dict:
        base = {"id": cfg.model_id, "object": "model", "created": registry.created, "owned_by": "hyperlora",
                "root": cfg.model_id, "parent": None}
        rest = [{"id": n, "object": "model", "created": registry.created, "owned_by": "hyperlora", "root": n,
                 "parent": cfg.model_id, "kind": "adapter"} for n in registry.adapters]
        rest += [{"id": p.id, "object": "model", "created": p.created, "owned_by": "hyperlora", "root": p.id,
                  "parent": cfg.model_id, "kind": "policy"} for p in registry.policies()]
        return {"object": "list", "data": [base] + rest}

    # ---- policies ---------------------------------------------------------------------------

    @app.post("/v1/policies")
    async def add_policy(body: PolicyCreate, request: HTTPRequest) -> JSONResponse:
        registry.check_text(body.text, "text")
        # resolve the adapter now (generated once; refused texts are refused here, not at first use)
        await _run(request, Request(prompt=[], entry=body.text, params=SamplingParams(max_tokens=1),
                                    emit=None, prepare_only=True))  # type: ignore[arg-type]
        p, new = registry.register(body.text)
        return JSONResponse(p.card(), status_code=201 if new else 200)

    @app.get("/v1/policies")
    async def list_policies() -> dict:
        return {"object": "list", "data": [p.card() for p in registry.policies()]}

    @app.get("/v1/policies/{pid}")
    async def get_policy(pid: str) -> dict:
        return registry.get(pid).card()

    @app.delete("/v1/policies/{pid}")
    async def delete_policy(pid: str) -> dict:
        p = registry.remove(pid)
        return {"id": p.id, "object": "policy", "deleted": True}

    # ---- generation -------------------------------------------------------------------------

    def _submit(req: Request) -> None:
        try:
            engine.submit(req)
        except QueueFullError as exc:
            raise APIError(429, f"{exc}; retry later", type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": str(cfg.retry_after)}) from None
        except DrainingError as exc:
            raise APIError(503, str(exc), type="server_error", code="shutting_down",
                           headers={"Retry-After": str(cfg.retry_after)}) from None
        except RequestError as exc:
            raise APIError(400, str(exc), code="context_length_exceeded") from None

    def _as_api_error(exc: BaseException) -> APIError:
        if isinstance(exc, APIError):
            return exc
        if isinstance(exc, RequestError):
            return APIError(400, str(exc), param="policy", code="invalid_policy")
        log.error("hyperlora serve: request failed: %r", exc)
        return APIError(500, f"the server failed on this request: {type(exc).__name__}", type="server_error")

    async def _run(request: HTTPRequest, req: Request, detok: _Detokenizer | None = None
                   ) -> tuple[list[int], str, Any]:
        """Submit and wait (non-streaming): (tokens, finish reason, a job's result). Cancels the generation when
        the client disconnects, or when `detok` sees a stop string."""
        ev = _Events(asyncio.get_running_loop())
        req.emit = ev.emit
        _submit(req)
        toks: list[int] = []
        scores = None
        while True:
            try:
                kind, value = await asyncio.wait_for(ev.get(), timeout=0.25)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    engine.cancel(req)
                    raise APIError(499, "client disconnected", code="client_disconnected") from None
                continue
            if kind == "token":
                toks.append(value)
                if detok is not None:
                    detok.push(value)
                    if detok.stopped:
                        engine.cancel(req)
                        return toks, "stop", None
            elif kind == "result":
                scores = value
            elif kind == "error":
                raise _as_api_error(value)
            else:
                return toks, value, scores

    def _params(body: Any, n_prompt: int, chat: bool) -> SamplingParams:
        asked = body.requested_tokens()
        if asked is not None and asked > cfg.max_tokens:
            raise APIError(400, f"max_tokens={asked} exceeds this server's limit of {cfg.max_tokens} "
                                f"(--max-tokens)", param="max_tokens", code="max_tokens_exceeded")
        n = asked if asked is not None else max(1, min(cfg.max_tokens, engine.max_len - n_prompt))
        return SamplingParams(max_tokens=n, temperature=float(body.temperature), top_p=float(body.top_p),
                              top_k=body.top_k, seed=body.seed,
                              stop_token_ids=() if body.ignore_eos else chat_stops if chat else text_stops)

    def _prompt_ids(body: Any, chat: bool) -> list[int]:
        if chat:
            msgs = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
            text = render_messages(tokenizer, msgs, add_generation_prompt=True)
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])
        p = body.prompt
        if isinstance(p, list) and p and isinstance(p[0], int):
            vocab = len(tokenizer)
            if any(not 0 <= t < vocab for t in p):
                raise APIError(400, f"prompt token ids must be in [0, {vocab})", param="prompt")
            return list(p)
        text = p[0] if isinstance(p, list) else p
        return list(tokenizer(text)["input_ids"])

    async def _generate(request: HTTPRequest, body: Any, chat: bool) -> Response:
        entry = registry.resolve(body.policy, body.model)
        prompt = _prompt_ids(body, chat)
        params = _params(body, len(prompt), chat)
        created = int(time.time())
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        if body.options is not None:
            if body.stream:
                raise APIError(400, "options cannot be streamed", param="stream")
            record, options, family = _record(body, chat), list(body.options), body.family

            def job() -> Decision:
                return decide(engine.rt, [record], entry, [options], tokenizer=tokenizer, family=family,
                              calibrator=cfg.calibrator, verifier=cfg.verifier, budget=cfg.budget)[0]

            req = Request(prompt=prompt, entry=entry, params=params, emit=None, job=job)  # type: ignore[arg-type]
            _, _, d = await _run(request, req)
            return JSONResponse(_decision_response(rid, created, chat, body, d, len(prompt)))
        req = Request(prompt=prompt, entry=entry, params=params, emit=None)  # type: ignore[arg-type]
        detok = _Detokenizer(tokenizer, body.stop_strings())
        if not body.stream:
            toks, reason, _ = await _run(request, req, detok)
            text = detok.text()
            usage = {"prompt_tokens": len(prompt), "completion_tokens": len(toks),
                     "total_tokens": len(prompt) + len(toks)}
            if chat:
                choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason,
                          "logprobs": None}
                obj = "chat.completion"
            else:
                choice = {"index": 0, "text": (body.prompt if body.echo and isinstance(body.prompt, str) else "")
                          + text, "finish_reason": reason, "logprobs": None}
                obj = "text_completion"
            if body.return_token_ids:
                choice["token_ids"] = toks
            return JSONResponse({"id": rid, "object": obj, "created": created, "model": body.model,
                                 "choices": [choice], "usage": usage})
        return await _stream(request, body, req, detok, rid, created, chat, len(prompt))

    async def _stream(request: HTTPRequest, body: Any, req: Request, detok: _Detokenizer, rid: str, created: int,
                      chat: bool, n_prompt: int) -> Response:
        ev = _Events(asyncio.get_running_loop())
        req.emit = ev.emit
        _submit(req)
        # wait for the first event so an error (a refused policy) is still a status code, not a broken stream
        first = await ev.get()
        if first[0] == "error":
            raise _as_api_error(first[1])
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(delta: str | None, reason: str | None, role: bool = False) -> str:
            if chat:
                d: dict = {}
                if role:
                    d["role"] = "assistant"
                if delta:
                    d["content"] = delta
                c = {"index": 0, "delta": d, "finish_reason": reason, "logprobs": None}
            else:
                c = {"index": 0, "text": delta or "", "finish_reason": reason, "logprobs": None}
            return "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": body.model,
                                          "choices": [c]}) + "\n\n"

        async def events() -> AsyncIterator[str]:
            n = 0
            done = False
            pending: tuple[str, Any] | None = first
            try:
                if chat:
                    yield chunk(None, None, role=True)
                while True:
                    kind, value = pending if pending is not None else await ev.get()
                    pending = None
                    if kind == "token":
                        n += 1
                        delta = detok.push(value)
                        if detok.stopped:
                            engine.cancel(req)
                            done = True
                            if delta:
                                yield chunk(delta, None)
                            yield chunk(None, "stop")
                            break
                        if delta:
                            yield chunk(delta, None)
                    elif kind == "error":
                        done = True
                        err = _as_api_error(value)
                        yield "data: " + json.dumps(err.body()) + "\n\n"
                        break
                    else:
                        done = True
                        tail = detok.flush()
                        if tail:
                            yield chunk(tail, None)
                        yield chunk(None, value)
                        break
                if include_usage:
                    yield "data: " + json.dumps({"id": rid, "object": obj, "created": created, "model": body.model,
                                                 "choices": [], "usage": {"prompt_tokens": n_prompt,
                                                                          "completion_tokens": n,
                                                                          "total_tokens": n_prompt + n}}) + "\n\n"
                yield "data: [DONE]\n\n"
            finally:
                if not done:  # the client went away (the response task was cancelled): stop generating
                    engine.cancel(req)

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _decision_response(rid: str, created: int, chat: bool, body: Any, d: Decision, n_prompt: int) -> dict:
        decision = {k: v for k, v in dataclasses.asdict(d).items() if k not in ("policy", "extra")}
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": d.answer}, "finish_reason": "stop",
                      "logprobs": None}
        else:
            choice = {"index": 0, "text": d.answer, "finish_reason": "stop", "logprobs": None}
        return {"id": rid, "object": "chat.completion" if chat else "text_completion", "created": created,
                "model": body.model, "choices": [choice], "decision": decision,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": 0, "total_tokens": n_prompt}}

    def _record(body: Any, chat: bool) -> str:
        """The record a decision is about: the one user message (decide() builds the prompt itself)."""
        if not chat:
            if not isinstance(body.prompt, str) and not (isinstance(body.prompt, list) and isinstance(body.prompt[0], str)):
                raise APIError(400, "options need the record as a text prompt, not token ids", param="prompt")
            return body.prompt if isinstance(body.prompt, str) else body.prompt[0]
        if len(body.messages) != 1 or body.messages[0].role != "user":
            raise APIError(400, "options need exactly one user message, the record (the policy goes in `policy`; "
                                "decide() builds the prompt)", param="messages")
        return body.messages[0].text()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: HTTPRequest) -> Response:
        return await _generate(request, body, chat=True)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: HTTPRequest) -> Response:
        return await _generate(request, body, chat=False)

    return app


class Server(uvicorn.Server):
    """uvicorn's server; on SIGTERM / SIGINT the engine stops admitting (503) at once, uvicorn stops accepting
    connections and waits for open requests, then the app's lifespan drains the engine."""

    def __init__(self, config: uvicorn.Config, engine: Engine):
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.engine.drain()
        super().handle_exit(sig, frame)
