"""The HTTP side of the hf engine: one FastAPI app per replica, OpenAI routes and error contract.

`make_app(server)` needs only `server.engine` (a cluster.serve_engines.HFEngine or anything with
its methods), `server.model_id` and `server.api_key`, so tests drive it with starlette's
TestClient as well as through Ray Serve. Order of checks on every model route: API key (401),
body size against max_request_bytes (413: from Content-Length, else while reading), body (400),
fields the engine cannot honour (400, `serve_openai.engine_refusal`), model name (404), prompt
length against max_model_len (400: first from its character count, which needs no
tokenisation, then in tokens), then generation. A chat with `tools` (tool_choice not "none") is
rendered with them and each answer parsed for tool calls (cluster/serve_tools.py); streamed,
the calls come as one `tool_calls` delta at the end of their choice.

Nothing of one request holds the event loop for long: the body is bounded, tokenisation runs
on the engine's tokenizer thread, decode steps on its model thread. Any unexpected exception
becomes a 500 JSON body; the replica keeps serving.
"""
import functools
import hmac
import time

from cluster.serve_openai import (
    DEFAULT_MAX_REQUEST_BYTES, ChatCompletionRequest, CompletionRequest, OpenAIError, bad_request,
    chat_chunk, chat_logprobs, chat_response, completion_chunk, completion_logprobs, completion_response,
    engine_refusal, error_body, model_card, new_id, parse_request, sse, too_large, usage, usage_chunk,
)
from cluster.serve_tools import ToolStream, parse_tool_calls

DEFAULT_COMPLETION_TOKENS = 16      # OpenAI's default max_tokens for /v1/completions


async def read_body(request, limit: int) -> bytes:
    """The body, or a 413 as soon as it is known to exceed `limit` bytes: from Content-Length
    before anything is read, else while reading (a chunked upload)."""
    length = request.headers.get("content-length")
    if length is not None:
        try:
            size = int(length)
        except ValueError:
            raise bad_request(f"Content-Length header: expected a number of bytes, got {length[:40]!r}",
                              param="Content-Length") from None
        if size > limit:
            raise too_large(limit, size)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def internal_error(e: BaseException) -> dict:
    return error_body(f"internal error: {type(e).__name__}: {e}", type="server_error",
                      code="internal_error")


def _guard(fn):
    """Turn any exception of a handler into an OpenAI error response (500 for the unexpected)."""
    @functools.wraps(fn)
    async def wrapper(*args, **kwargs):
        from starlette.responses import JSONResponse

        try:
            return await fn(*args, **kwargs)
        except OpenAIError as e:
            return JSONResponse(e.body(), status_code=e.status)
        except Exception as e:  # noqa: BLE001 - the replica must survive whatever a request does
            return JSONResponse(internal_error(e), status_code=500)
    return wrapper


class _Handlers:
    """Request handling shared by the chat and completion endpoints."""

    def __init__(self, server, max_request_bytes: int):
        self.s = server
        self.max_request_bytes = max_request_bytes

    async def body(self, request, cls):
        req = parse_request(cls, await read_body(request, self.max_request_bytes))
        engine = self.s.engine
        refusal = engine_refusal(req, getattr(engine, "features", frozenset()),
                                 getattr(engine, "name", type(engine).__name__))
        if refusal is not None:
            raise refusal
        return req

    def pieces(self, raw) -> list:
        """An Event's logprobs (token ids) -> serve_openai.TokenLogprob entries (token texts)."""
        piece = self.s.engine.token_piece
        out = []
        for tok, lp, top in raw or []:
            text, data = piece(tok)
            out.append((text, data, lp, [(*piece(i), alp) for i, alp in top]))
        return out

    def check_key(self, request) -> None:
        key = self.s.api_key
        if not key:
            return
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if not header:
            raise OpenAIError(401, "Missing API key: send 'Authorization: Bearer <key>'.",
                              code="invalid_api_key")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise OpenAIError(401, "Incorrect API key provided.", code="invalid_api_key")

    def check_model(self, name: str | None) -> str:
        if name not in (None, "", self.s.model_id):
            raise OpenAIError(404, f"The model {name!r} does not exist; this server serves "
                                   f"{self.s.model_id!r}.", param="model", code="model_not_found")
        return self.s.model_id

    def check_chars(self, n_chars: int, param: str) -> None:
        """400 for a text that cannot fit max_model_len whatever it tokenises to (no token covers
        more than engine.max_token_chars characters); checked before tokenising it."""
        engine = self.s.engine
        limit, per_token = engine.max_model_len, engine.max_token_chars
        if n_chars > limit * per_token:
            raise bad_request(
                f"This model's maximum context length (max_model_len) is {limit} tokens, but the "
                f"{param} has {n_chars} characters, more than {limit} tokens can hold (at most "
                f"{per_token} characters each). Shorten the {param}.", param=param,
                code="context_length_exceeded")

    def budget(self, n_prompt: int, requested: int | None, default: int | None, param: str) -> int:
        """max_tokens for this prompt, or a 400 naming max_model_len."""
        limit = self.s.engine.max_model_len
        if n_prompt == 0:
            raise bad_request("the prompt is empty", param=param)
        if n_prompt >= limit:
            raise bad_request(
                f"This model's maximum context length (max_model_len) is {limit} tokens, but the "
                f"prompt has {n_prompt} tokens. Shorten the {param}.", param=param,
                code="context_length_exceeded")
        room = limit - n_prompt
        if requested is None:
            return min(default, room) if default else room
        if requested > room:
            raise bad_request(
                f"This model's maximum context length (max_model_len) is {limit} tokens; the prompt "
                f"has {n_prompt} tokens, so max_tokens may be at most {room} (asked for {requested}).",
                param="max_tokens", code="context_length_exceeded")
        return requested

    def gen_args(self, req, max_tokens: int) -> dict:
        args = dict(n=req.n, max_tokens=max_tokens, temperature=req.temperature, top_p=req.top_p,
                    stop=req.stop, seed=req.seed, ignore_eos=req.ignore_eos)
        if req.logprobs_k() is not None:
            args["logprobs"] = req.logprobs_k()
        args.update({k: v for k, v in req.penalties().items() if v != (1.0 if k == "repetition_penalty" else 0.0)})
        if req.structured() is not None:
            args["response_format"] = req.structured()
        return args

    # -- chat -----------------------------------------------------------------------------
    async def chat(self, request):
        from starlette.responses import JSONResponse, StreamingResponse

        self.check_key(request)
        req = await self.body(request, ChatCompletionRequest)
        model = self.check_model(req.model)
        engine = self.s.engine
        if not engine.has_chat_template():
            raise bad_request("this model's tokenizer has no chat template; use /v1/completions",
                              param="messages")
        chat, plan = req.chat(), req.tool_plan()
        self.check_chars(sum(len(m["content"]) for m in chat), "messages")
        prefill = ""
        try:
            if plan.active or req.has_tool_messages():
                ids, prefill = await engine.encode_tool_chat(chat, plan)
            else:
                ids = await engine.encode(chat)
        except Exception as e:  # noqa: BLE001 - template errors are the request's fault
            raise bad_request(f"messages could not be rendered with the chat template: {e}",
                              param="messages") from None
        max_tokens = self.budget(len(ids), req.requested_max_tokens(), None, "messages")
        args = self.gen_args(req, max_tokens)
        rid = new_id("chatcmpl")
        tools = plan if plan.active else None
        if req.stream:
            return StreamingResponse(self._chat_stream(rid, model, ids, args, req.include_usage(), tools, prefill),
                                     media_type="text/event-stream")
        texts, reasons, total = [""] * req.n, ["length"] * req.n, 0
        lps: list[list] = [[] for _ in range(req.n)]
        async for ev in engine.stream(ids, **args):
            texts[ev.index] += ev.text
            lps[ev.index] += self.pieces(ev.logprobs)
            if ev.finish_reason:
                reasons[ev.index] = ev.finish_reason
                total += ev.tokens
        want_lp = "logprobs" in args
        choices = []
        for text, reason, lp in zip(texts, reasons, lps):
            calls = None
            if tools is not None:           # the answer starts with the prefill (a forced call)
                text, calls = parse_tool_calls(prefill + text, tools)
                reason = "tool_calls" if calls else reason
            choices.append((text, reason, chat_logprobs(lp) if want_lp else None, calls))
        return JSONResponse(chat_response(rid, model, choices, usage(len(ids), total)))

    async def _chat_stream(self, rid, model, ids, args, include_usage, tools=None, prefill=""):
        created, total = int(time.time()), 0
        # with tools: each choice's text goes through a ToolStream (calls held back, sent at its end)
        held = [ToolStream(tools, prefill) for _ in range(args["n"])] if tools is not None else None
        try:
            for i in range(args["n"]):
                yield sse(chat_chunk(rid, model, created, i, {"role": "assistant", "content": ""}))
            async for ev in self.s.engine.stream(ids, **args):
                text = held[ev.index].feed(ev.text) if held else ev.text
                if text or ev.logprobs:
                    lp = chat_logprobs(self.pieces(ev.logprobs)) if ev.logprobs else None
                    yield sse(chat_chunk(rid, model, created, ev.index, {"content": text}, logprobs=lp))
                if ev.finish_reason:
                    total += ev.tokens
                    reason = ev.finish_reason
                    if held:
                        rest, calls = held[ev.index].finish()
                        if rest:
                            yield sse(chat_chunk(rid, model, created, ev.index, {"content": rest}))
                        if calls:
                            reason = "tool_calls"
                            delta = {"tool_calls": [{"index": k, **c} for k, c in enumerate(calls)]}
                            yield sse(chat_chunk(rid, model, created, ev.index, delta))
                    yield sse(chat_chunk(rid, model, created, ev.index, {}, reason))
            if include_usage:
                yield sse(usage_chunk(rid, model, created, "chat.completion.chunk", usage(len(ids), total)))
        except Exception as e:  # noqa: BLE001 - headers are sent; report in-band
            yield sse(internal_error(e))
        yield sse("[DONE]")

    # -- completions ----------------------------------------------------------------------
    async def encode_prompts(self, req: CompletionRequest) -> tuple[list[list[int]], list[int]]:
        """Token ids of each prompt and its max_tokens; length checks before the costly steps."""
        engine, out, budgets = self.s.engine, [], []
        for p in req.prompts():
            if isinstance(p, str):
                self.check_chars(len(p), "prompt")
                ids = await engine.encode(p)
            elif isinstance(p, list) and all(isinstance(t, int) for t in p):
                ids = list(p)
            else:
                raise bad_request("prompt must be a string, a list of strings, or token ids",
                                  param="prompt")
            budgets.append(self.budget(len(ids), req.requested_max_tokens(),
                                       DEFAULT_COMPLETION_TOKENS, "prompt"))
            if not isinstance(p, str) and any(t < 0 or t >= engine.vocab_size for t in ids):
                raise bad_request(f"prompt token ids must be in [0, {engine.vocab_size})", param="prompt")
            out.append(ids)
        return out, budgets

    async def completions(self, request):
        from starlette.responses import JSONResponse, StreamingResponse

        self.check_key(request)
        req = await self.body(request, CompletionRequest)
        model = self.check_model(req.model)
        prompts, budgets = await self.encode_prompts(req)
        rid = new_id("cmpl")
        if req.stream:
            return StreamingResponse(self._completion_stream(rid, model, req, prompts, budgets),
                                     media_type="text/event-stream")
        choices, n_prompt, total = [], 0, 0
        want_lp = req.logprobs_k() is not None
        for ids, mt in zip(prompts, budgets):
            texts, reasons = [""] * req.n, ["length"] * req.n
            lps: list[list] = [[] for _ in range(req.n)]
            async for ev in self.s.engine.stream(ids, **self.gen_args(req, mt)):
                texts[ev.index] += ev.text
                lps[ev.index] += self.pieces(ev.logprobs)
                if ev.finish_reason:
                    reasons[ev.index] = ev.finish_reason
                    total += ev.tokens
            choices.extend((t, r, completion_logprobs(lp) if want_lp else None)
                           for t, r, lp in zip(texts, reasons, lps))
            n_prompt += len(ids)
        return JSONResponse(completion_response(rid, model, choices, usage(n_prompt, total)))

    async def _completion_stream(self, rid, model, req, prompts, budgets):
        created, n_prompt, total = int(time.time()), 0, 0
        offsets: dict[int, int] = {}                    # choice index -> text_offset of its next token
        try:
            for p, (ids, mt) in enumerate(zip(prompts, budgets)):
                async for ev in self.s.engine.stream(ids, **self.gen_args(req, mt)):
                    index = p * req.n + ev.index        # OpenAI numbers choices across prompts
                    lp = None
                    if ev.logprobs:
                        lp = completion_logprobs(self.pieces(ev.logprobs), offsets.get(index, 0))
                        offsets[index] = lp["text_offset"][-1] + len(lp["tokens"][-1])
                    if ev.text or ev.finish_reason or lp:
                        yield sse(completion_chunk(rid, model, created, index, ev.text, ev.finish_reason, lp))
                    if ev.finish_reason:
                        total += ev.tokens
                n_prompt += len(ids)
            if req.include_usage():
                yield sse(usage_chunk(rid, model, created, "text_completion", usage(n_prompt, total)))
        except Exception as e:  # noqa: BLE001
            yield sse(internal_error(e))
        yield sse("[DONE]")


def make_app(server, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES):
    """The FastAPI app of one replica. `server` has .engine, .model_id, .api_key; a request
    body over `max_request_bytes` is answered 413 without being read further."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.responses import JSONResponse

    app = FastAPI(title="ray-posttrain", docs_url=None, redoc_url=None, openapi_url=None)
    h = _Handlers(server, max_request_bytes)
    created = int(time.time())

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return JSONResponse(error_body(f"{request.method} {request.url.path}: {exc.detail}", code=code),
                            status_code=exc.status_code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return JSONResponse(error_body(f"invalid request: {exc.errors()[:1]}"), status_code=400)

    @app.exception_handler(Exception)
    async def _unexpected(request, exc):     # whatever escapes the routes' _guard: still JSON
        return JSONResponse(internal_error(exc), status_code=500)

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": server.model_id}

    @app.get("/v1/models")
    @_guard
    async def models(request: Request):
        h.check_key(request)
        return {"object": "list", "data": [model_card(server.model_id, server.engine.max_model_len, created)]}

    @app.get("/v1/models/{model:path}")
    @_guard
    async def model(model: str, request: Request):
        h.check_key(request)
        h.check_model(model)
        return model_card(server.model_id, server.engine.max_model_len, created)

    @app.post("/v1/chat/completions")
    @_guard
    async def chat(request: Request):
        return await h.chat(request)

    @app.post("/v1/completions")
    @_guard
    async def completions(request: Request):
        return await h.completions(request)

    return app
