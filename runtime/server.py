"""`kiln serve`: an OpenAI-compatible HTTP server over the serving engine.

Endpoints: GET /health, GET /v1/models, POST /v1/completions,
POST /v1/chat/completions (the artifact's chat template), GET /metrics
(Prometheus text). `stream: true` answers with server-sent events
(`stream_options.include_usage` adds a usage chunk). Errors have OpenAI's
JSON shape: {"error": {"message", "type", "param", "code"}}.

Starlette on uvicorn (the optional extra `kiln[serve]`; `kiln bundle` carries
them). The HTTP side never runs the model: requests go to the engine, which
runs in a process of its own (runtime/engine_process.py: each side has its own
GIL), and its events come back through the event loop.
A client that disconnects cancels its request: its sequence and KV pages are
freed on the engine's next step. SIGTERM: stop accepting, let running
requests finish for the grace period, cancel the rest, exit 0.

Limits (every field is checked; bad input is a 4xx naming the field, never a
crash): body <= 1 MiB, messages <= 256 of <= 256 KiB text each, prompt (text
or ids) within the context, max_tokens in [1, context], n = 1, stop <= 16
strings, temperature in [0, 2], top_p in (0, 1], top_k in [0, vocab],
logprobs (completions: 0-20 alternatives; chat: a boolean and top_logprobs
0-20), each token's log-probability under the model's distribution before
temperature and top-p.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import sys
import threading
import time
import uuid
from pathlib import Path

from ..errors import KilnError, RequestError
from .engine import MAX_TOP_LOGPROBS, Event, QueueFullError, ShuttingDownError
from .engine_process import EngineProcess, ServedModel
from .request import check_tokens
from .sampler import SamplingParams

MAX_BODY_BYTES = 1 << 20
DRAIN_BODY_BYTES = 16 << 20  # a refused body up to this size is read before the 413 (larger: the connection closes)
MAX_MESSAGES = 256
MAX_TEXT_CHARS = 256 * 1024
GIL_SWITCH_INTERVAL = 0.0005  # seconds; see serve()
KEEP_ALIVE_SECONDS = 30  # idle keep-alive connections are closed after this (see serve())
ROLES = ("system", "user", "assistant", "developer", "tool")


class HTTPError(Exception):
    def __init__(self, status: int, message: str, *, param: str | None = None, kind: str = "invalid_request_error",
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.kind, self.code, self.headers = status, message, param, kind, code, headers or {}


class _Mailbox:
    """Engine events for one event loop, handed over in one wakeup per burst: a decode step
    of 128 streams posted 128 call_soon_threadsafe callbacks (a self-pipe write and a loop handle
    each), now one."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.items: list = []
        self.lock = threading.Lock()

    def post(self, queue: asyncio.Queue, ev) -> None:  # the engine process's reader thread
        with self.lock:
            self.items.append((queue, ev))
            first = len(self.items) == 1
        if first:
            self.loop.call_soon_threadsafe(self._flush)

    def _flush(self) -> None:  # event loop
        with self.lock:
            items, self.items = self.items, []
        for queue, ev in items:
            queue.put_nowait(ev)

def _bad(message: str, param: str | None = None) -> HTTPError:
    return HTTPError(400, message, param=param)


def create_app(engine: EngineProcess, model: ServedModel, *, api_key: str | None = None, grace: float = 10.0):
    """The ASGI app over a started engine; the app's lifespan stops it."""
    from starlette.applications import Starlette  # noqa: PLC0415
    from starlette.requests import Request  # noqa: PLC0415
    from starlette.responses import JSONResponse, PlainTextResponse, StreamingResponse  # noqa: PLC0415
    from starlette.routing import Route  # noqa: PLC0415

    model_name = model.name
    created = int(time.time())

    def error_response(err: HTTPError):
        body = {"error": {"message": err.message, "type": err.kind, "param": err.param, "code": err.code}}
        return JSONResponse(body, status_code=err.status, headers=err.headers)

    def handler(fn):
        async def wrapped(request: Request):
            try:
                if api_key is not None and request.url.path.startswith("/v1/"):
                    auth = request.headers.get("authorization", "")
                    if not hmac.compare_digest(auth.encode(), f"Bearer {api_key}".encode()):
                        raise HTTPError(401, "invalid API key", kind="authentication_error", code="invalid_api_key")
                return await fn(request)
            except HTTPError as err:
                return error_response(err)
            except RequestError as err:
                return error_response(_bad(str(err)))

        return wrapped

    async def read_json(request: Request) -> dict:
        size = request.headers.get("content-length")
        if size is not None and (not size.isdigit() or int(size) > MAX_BODY_BYTES):
            if size.isdigit() and int(size) <= DRAIN_BODY_BYTES:
                # read it (and drop it) first: answering while the client is still sending
                # makes it see a broken pipe instead of the 413
                async for _ in request.stream():
                    pass
            raise HTTPError(413, f"request body over {MAX_BODY_BYTES} bytes", code="body_too_large")
        raw = bytearray()
        async for chunk in request.stream():
            raw += chunk
            if len(raw) > MAX_BODY_BYTES:
                raise HTTPError(413, f"request body over {MAX_BODY_BYTES} bytes", code="body_too_large")
        try:
            body = json.loads(raw.decode("utf-8"), parse_constant=lambda c: (_ for _ in ()).throw(ValueError(f"{c} is not JSON")))
        except (UnicodeDecodeError, ValueError, RecursionError) as err:
            raise _bad(f"the body is not valid JSON: {str(err)[:200]}") from None
        if not isinstance(body, dict):
            raise _bad("the body must be a JSON object")
        return body

    def check_model(body: dict) -> None:
        m = body.get("model")
        if not isinstance(m, str):
            raise _bad("'model' must be a string", "model")
        if m != model_name:
            raise HTTPError(404, f"model {m[:100]!r} does not exist; this server serves {model_name!r}", param="model", code="model_not_found")

    def generation_args(body: dict, prompt_len: int) -> dict:
        """Sampling and limits from an OpenAI request body, checked."""
        def number(name, default, lo, hi, *, integer=False, lo_open=False):
            v = body.get(name)
            if v is None:
                return default
            ok = (isinstance(v, int) if integer else isinstance(v, (int, float))) and not isinstance(v, bool)
            if not ok or (not integer and not math.isfinite(v)) or v < lo or v > hi or (lo_open and v == lo):
                raise _bad(f"'{name}' must be {'an integer' if integer else 'a number'} in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}"[:300], name)
            return v

        for unsupported in ("tools", "functions", "response_format", "logit_bias"):
            v = body.get(unsupported)
            if v not in (None, False) and not (unsupported == "response_format" and v == {"type": "text"}):
                raise _bad(f"'{unsupported}' is not supported by this server", unsupported)
        if number("n", 1, 1, 1, integer=True) != 1:
            raise _bad("'n' must be 1", "n")
        context = model.max_seq_len
        if prompt_len >= context:
            raise HTTPError(413, f"the prompt has {prompt_len} tokens; this model's context holds {context} (prompt + completion)",
                            param="messages" if "messages" in body else "prompt", code="context_length_exceeded")
        limit_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
        max_tokens = number(limit_name, context - prompt_len, 1, context, integer=True)
        stop = body.get("stop")
        if stop is not None:
            stop = [stop] if isinstance(stop, str) else stop
            if not isinstance(stop, list) or len(stop) > 16 or not all(isinstance(s, str) and 0 < len(s) <= 256 for s in stop):
                raise _bad("'stop' must be a string or a list of at most 16 non-empty strings of at most 256 characters", "stop")
        seed = number("seed", None, 0, 2**63 - 1, integer=True)
        sampling = SamplingParams(
            temperature=float(number("temperature", 1.0, 0.0, 2.0)),
            top_p=float(number("top_p", 1.0, 0.0, 1.0, lo_open=True)),
            top_k=int(number("top_k", 0, 0, model.vocab_size, integer=True)),
            repetition_penalty=float(number("repetition_penalty", 1.0, 0.0, 10.0, lo_open=True)),
            seed=seed,
        )
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise _bad("'ignore_eos' must be a boolean", "ignore_eos")
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise _bad("'stream' must be a boolean", "stream")
        opts = body.get("stream_options")
        if opts is not None and (not isinstance(opts, dict) or not isinstance(opts.get("include_usage", False), bool)):
            raise _bad("'stream_options' must be an object with a boolean 'include_usage'", "stream_options")
        if "messages" in body:  # chat: a boolean, and how many alternatives per token
            want = body.get("logprobs")
            if want is not None and not isinstance(want, bool):
                raise _bad("'logprobs' must be a boolean", "logprobs")
            top = number("top_logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)
            if top is not None and not want:
                raise _bad("'top_logprobs' needs 'logprobs': true", "top_logprobs")
            logprobs = (top or 0) if want else None
        else:  # completions: how many alternatives per token
            if body.get("top_logprobs") is not None:
                raise _bad("'top_logprobs' is for chat completions; completions take 'logprobs': N", "top_logprobs")
            logprobs = number("logprobs", None, 0, MAX_TOP_LOGPROBS, integer=True)
        return {"max_new_tokens": max_tokens, "sampling": sampling, "stop": stop, "ignore_eos": ignore_eos,
                "stream": stream, "include_usage": bool(opts and opts.get("include_usage")), "logprobs": logprobs}

    def prompt_ids(body: dict) -> list[int]:
        p = body.get("prompt")
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]  # a batch of one
        if isinstance(p, str):
            if len(p) > MAX_TEXT_CHARS:
                raise HTTPError(413, f"'prompt' is over {MAX_TEXT_CHARS} characters", param="prompt", code="context_length_exceeded")
            if model.tokenizer is None:
                raise _bad("this model has no tokenizer: send 'prompt' as a list of token ids", "prompt")
            ids = model.tokenizer.encode(p)
        elif isinstance(p, list) and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            if len(p) > model.max_seq_len:
                raise HTTPError(413, f"the prompt has {len(p)} tokens; this model's context holds {model.max_seq_len}",
                                param="prompt", code="context_length_exceeded")
            try:
                ids = check_tokens(p, model.vocab_size)
            except RequestError as err:
                raise _bad(str(err), "prompt") from None
        else:
            raise _bad("'prompt' must be a string, or a list of token ids (one prompt per request)", "prompt")
        if not ids:
            raise _bad("'prompt' is empty", "prompt")
        return ids

    def chat_ids(body: dict) -> list[int]:
        msgs = body.get("messages")
        if not isinstance(msgs, list) or not msgs:
            raise _bad("'messages' must be a non-empty list", "messages")
        if len(msgs) > MAX_MESSAGES:
            raise _bad(f"'messages' holds at most {MAX_MESSAGES} messages", "messages")
        clean = []
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise _bad(f"messages[{i}].role must be one of {', '.join(ROLES)}", f"messages[{i}].role")
            c = m.get("content")
            if isinstance(c, list):  # content parts: text only
                if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in c):
                    raise _bad(f"messages[{i}].content: only text parts are supported", f"messages[{i}].content")
                c = "".join(p["text"] for p in c)
            if not isinstance(c, str):
                raise _bad(f"messages[{i}].content must be a string", f"messages[{i}].content")
            if len(c) > MAX_TEXT_CHARS:
                raise HTTPError(413, f"messages[{i}].content is over {MAX_TEXT_CHARS} characters", param=f"messages[{i}].content",
                                code="context_length_exceeded")
            clean.append({"role": "system" if m["role"] == "developer" else m["role"], "content": c})
        if model.tokenizer is None or not model.tokenizer.chat_template:
            raise _bad("this model has no chat template: use /v1/completions", "messages")
        return model.tokenizer.encode_chat(clean)

    mailboxes: dict = {}  # event loop -> its _Mailbox

    async def submit(ids: list[int], args: dict, loop: asyncio.AbstractEventLoop):
        """(engine request, asyncio queue of its events)."""
        events: asyncio.Queue = asyncio.Queue()
        box = mailboxes.get(loop)
        if box is None:
            box = mailboxes[loop] = _Mailbox(loop)

        def on_event(ev: Event) -> None:  # the engine process's reader thread
            box.post(events, ev)

        try:
            req = await engine.submit(ids, on_event, max_new_tokens=args["max_new_tokens"], sampling=args["sampling"],
                                stop=args["stop"], ignore_eos=args["ignore_eos"], logprobs=args["logprobs"])
        except QueueFullError as err:
            raise HTTPError(429, str(err), kind="rate_limit_error", code="queue_full", headers={"Retry-After": "1"}) from None
        except ShuttingDownError as err:
            raise HTTPError(503, str(err), kind="server_error", code="shutting_down", headers={"Retry-After": "5"}) from None
        return req, events

    async def collect(request: Request, req, events: asyncio.Queue, tokens: list) -> tuple[str, str, int]:
        """Wait for the whole completion, cancelling it if the client goes away;
        the token events are appended to `tokens` (for logprobs)."""
        async def client_gone():
            while True:
                msg = await request.receive()
                if msg["type"] == "http.disconnect":
                    return

        gone = asyncio.ensure_future(client_gone())
        texts = []
        try:
            while True:
                get = asyncio.ensure_future(events.get())
                done, _ = await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
                if gone in done:
                    get.cancel()
                    engine.cancel(req)
                    raise asyncio.CancelledError
                ev = get.result()
                if ev.kind == "token":
                    texts.append(ev.text)
                    if ev.token >= 0:
                        tokens.append(ev)
                elif ev.kind == "error":
                    raise HTTPError(500, f"generation failed: {ev.error}", kind="server_error")
                else:
                    return "".join(texts), ev.finish, req.completion_tokens
        finally:
            gone.cancel()

    def token_text(t: int) -> str:
        return model.tokenizer.decode([t]) if model.tokenizer is not None else str(t)

    def logprobs_json(tokens: list, chat: bool, offset: int = 0) -> dict:
        """Token events with logprobs -> OpenAI's logprobs object (chat: `content`
        entries with bytes; completions: parallel lists with text offsets)."""
        if chat:
            def entry(t, lp):
                text = token_text(t)
                raw = model.tokenizer.token_bytes(t) if model.tokenizer is not None else text.encode("utf-8")
                return {"token": text, "logprob": lp, "bytes": list(raw)}

            return {"content": [{**entry(ev.token, ev.logprob), "top_logprobs": [entry(t, lp) for t, lp in ev.top or []]}
                                for ev in tokens]}
        texts = [token_text(ev.token) for ev in tokens]
        offsets = []
        for text in texts:
            offsets.append(offset)
            offset += len(text)
        return {"tokens": texts, "token_logprobs": [ev.logprob for ev in tokens],
                "top_logprobs": [{token_text(t): lp for t, lp in ev.top or []} for ev in tokens], "text_offset": offsets}

    def finish_reason(f: str | None) -> str:
        return "length" if f == "length" else "stop"

    def usage(req) -> dict:
        return {"prompt_tokens": req.prompt_tokens, "completion_tokens": req.completion_tokens,
                "total_tokens": req.prompt_tokens + req.completion_tokens}

    async def run(request: Request, body: dict, ids: list[int], chat: bool):
        args = generation_args(body, len(ids))
        loop = asyncio.get_running_loop()
        req, events = await submit(ids, args, loop)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        obj = "chat.completion" if chat else "text_completion"
        now = int(time.time())
        want_lp = args["logprobs"] is not None
        if not args["stream"]:
            tokens: list = []
            try:
                text, finish, _ = await collect(request, req, events, tokens)
            except asyncio.CancelledError:
                return PlainTextResponse("", status_code=499)
            lp = logprobs_json(tokens, chat) if want_lp else None
            choice = ({"index": 0, "message": {"role": "assistant", "content": text}, "logprobs": lp, "finish_reason": finish_reason(finish)}
                      if chat else {"index": 0, "text": text, "logprobs": lp, "finish_reason": finish_reason(finish)})
            return JSONResponse({"id": rid, "object": obj, "created": now, "model": model_name, "choices": [choice], "usage": usage(req)})

        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        offset = [0]  # completions' text_offset across chunks

        # a token's chunk without logprobs: the fixed parts encoded once per request (json.dumps of the
        # whole body per token was a large share of the event loop's work at 128 streams)
        head = f'data: {{"id": "{rid}", "object": "{chunk_obj}", "created": {now}, "model": {json.dumps(model_name, ensure_ascii=False)}, '
        head += '"choices": [{"index": 0, "delta": {"content": ' if chat else '"choices": [{"index": 0, "text": '
        tail = ('}, ' if chat else ', ') + '"logprobs": null, "finish_reason": null}]}\n\n'

        def chunk(delta: dict | None = None, text: str | None = None, finish: str | None = None, ev=None, **extra) -> bytes:
            if not want_lp and finish is None and not extra and ev is not None:
                return (head + json.dumps(text or "", ensure_ascii=False) + tail).encode()
            lp = logprobs_json([ev], chat, offset[0]) if want_lp and ev is not None and ev.token >= 0 else None
            if lp is not None and not chat:
                offset[0] += len(lp["tokens"][0])
            if chat:
                choices = [{"index": 0, "delta": delta or {}, "logprobs": lp, "finish_reason": finish}]
            else:
                choices = [{"index": 0, "text": text or "", "logprobs": lp, "finish_reason": finish}]
            body = {"id": rid, "object": chunk_obj, "created": now, "model": model_name, "choices": choices, **extra}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n".encode()

        async def sse():
            finished = False
            try:
                if chat:
                    yield chunk({"role": "assistant", "content": ""})
                while not finished:
                    # the events waiting now go out in one write (one SSE event per token still): when the
                    # event loop falls behind the engine, it catches up in fewer, larger writes
                    batch = [await events.get()]
                    while not events.empty():
                        batch.append(events.get_nowait())
                    out = []
                    for ev in batch:
                        if ev.kind == "token":
                            # one chunk per token, its text possibly "" (a character or a stop string held
                            # back; no tokenizer): clients see progress and the token count as it grows
                            if ev.token >= 0 or ev.text:
                                out.append(chunk({"content": ev.text}, ev.text, ev=ev))
                        elif ev.kind == "error":
                            err = {"error": {"message": f"generation failed: {ev.error}", "type": "server_error", "param": None, "code": None}}
                            out.append(f"data: {json.dumps(err)}\n\n".encode())
                            finished = True
                            break
                        else:
                            out.append(chunk(finish=finish_reason(ev.finish)))
                            if args["include_usage"]:
                                body = {"id": rid, "object": chunk_obj, "created": now, "model": model_name, "choices": [], "usage": usage(req)}
                                out.append(f"data: {json.dumps(body)}\n\n".encode())
                            finished = True
                            break
                    if finished:
                        out.append(b"data: [DONE]\n\n")
                    if out:
                        yield b"".join(out)
            finally:
                if not finished:  # the client went away (or the server is stopping): free the request's pages now
                    engine.cancel(req)

        return StreamingResponse(sse(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    @handler
    async def completions(request: Request):
        body = await read_json(request)
        check_model(body)
        return await run(request, body, prompt_ids(body), chat=False)

    @handler
    async def chat_completions(request: Request):
        body = await read_json(request)
        check_model(body)
        return await run(request, body, chat_ids(body), chat=True)

    @handler
    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [{"id": model_name, "object": "model", "created": created, "owned_by": "kiln",
                                                         "max_model_len": model.max_seq_len}]})

    async def health(request: Request):
        if engine.dead is not None:
            return JSONResponse({"status": "error", "message": engine.dead}, status_code=503)
        return JSONResponse({"status": "ok"})

    async def metrics(request: Request):
        try:
            st = await asyncio.get_running_loop().run_in_executor(None, engine.stats)
        except KilnError as err:
            return error_response(HTTPError(503, str(err), kind="server_error"))
        return PlainTextResponse(prometheus_text(st), media_type="text/plain; version=0.0.4")

    async def not_found(request: Request, exc):
        return error_response(HTTPError(404, f"no route {request.url.path[:100]}", code="not_found"))

    async def method_not_allowed(request: Request, exc):
        return error_response(HTTPError(405, f"{request.method} is not allowed on {request.url.path[:100]}"))

    from contextlib import asynccontextmanager  # noqa: PLC0415

    @asynccontextmanager
    async def lifespan(app):
        try:
            yield
        finally:
            await asyncio.get_running_loop().run_in_executor(None, engine.stop, grace)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
    ]
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers={404: not_found, 405: method_not_allowed})


def prometheus_text(st: dict) -> str:
    """The engine's stats (EngineProcess.stats) as Prometheus text."""
    lines = []

    def metric(name: str, kind: str, help_: str, value, labels: str = "") -> None:
        lines.append(f"# HELP kiln_{name} {help_}")
        lines.append(f"# TYPE kiln_{name} {kind}")
        lines.append(f"kiln_{name}{labels} {value}")

    metric("requests_total", "counter", "requests accepted", st.get("requests", 0))
    lines.append("# HELP kiln_requests_finished_total requests finished, by outcome")
    lines.append("# TYPE kiln_requests_finished_total counter")
    for outcome in ("completed", "cancelled", "failed"):
        lines.append(f'kiln_requests_finished_total{{outcome="{outcome}"}} {st.get(f"requests_{outcome}", 0)}')
    metric("requests_rejected_total", "counter", "requests refused because the queue was full", st.get("rejected_queue_full", 0))
    metric("queue_depth", "gauge", "requests waiting to start", st["waiting"])
    metric("running", "gauge", "requests in the running batch", st["running"])
    metric("max_batch", "gauge", "sequences the engine runs at once", st["max_batch"])
    metric("sequences_open", "gauge", "sequences holding KV cache pages", st["sequences_open"])
    metric("threads", "gauge", "threads in the server and engine processes", threading.active_count() + st["threads"])
    if st.get("kv_pages_total") is not None:
        metric("kv_pages_total", "gauge", "pages in the KV cache pool", st["kv_pages_total"])
        metric("kv_pages_free", "gauge", "KV cache pages held by no sequence", st["kv_pages_free"])
    metric("prefix_cache_entries", "gauge", "prompt prefixes kept in the KV cache", st.get("prefix_entries", 0))
    metric("prefix_cache_hit_tokens_total", "counter", "prompt tokens reused from cached prefixes", st.get("prefix_hit_tokens", 0))
    metric("prefix_cache_lookup_tokens_total", "counter", "prompt tokens looked up in the prefix cache (hit rate: hits / lookups)",
           st.get("prefix_lookup_tokens", 0))
    metric("preemptions_total", "counter", "running requests preempted for KV pages (recomputed later)", st.get("preemptions", 0))
    metric("prompt_tokens_total", "counter", "prompt tokens prefilled", st.get("prompt_tokens", 0))
    metric("completion_tokens_total", "counter", "tokens generated", st.get("completion_tokens", 0))
    for name, (bounds, counts, total, n), help_ in (("time_to_first_token_seconds", st["ttft"], "arrival to first token"),
                                                    ("inter_token_latency_seconds", st["itl"], "time between tokens of a request")):
        lines.append(f"# HELP kiln_{name} {help_}")
        lines.append(f"# TYPE kiln_{name} histogram")
        cum = 0
        for b, c in zip([*bounds, "+Inf"], counts):
            cum += c
            lines.append(f'kiln_{name}_bucket{{le="{b}"}} {cum}')
        lines.append(f"kiln_{name}_sum {total:.6f}")
        lines.append(f"kiln_{name}_count {n}")
    return "\n".join(lines) + "\n"


def _server_class():
    import contextlib  # noqa: PLC0415
    import signal  # noqa: PLC0415

    import uvicorn  # noqa: PLC0415

    class Server(uvicorn.Server):
        """uvicorn re-raises SIGTERM after its graceful shutdown (the process then
        dies of the signal); a server asked to stop that stopped cleanly exits 0.
        A second signal forces the exit."""

        @contextlib.contextmanager
        def capture_signals(self):
            def on_signal(signum, frame):
                if self.should_exit:
                    self.force_exit = True
                self.should_exit = True

            prev = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
            try:
                yield
            finally:
                for sig, h in prev.items():
                    signal.signal(sig, h)

    return Server


def serve(artifact: str, *, host: str = "127.0.0.1", port: int = 8000, model_name: str | None = None, max_batch: int = 8,
          max_queue: int = 256, api_key: str | None = None, device: str = "cpu", random_weights: bool = False,
          max_seq_len: int | None = None, threads: int | None = None, grace: float = 10.0, on_ready=None,
          kv_pages: int | None = None, prefix_cache: int = 0) -> int:
    """Load the artifact, start the engine and serve until SIGTERM / SIGINT; returns the exit code."""
    import socket  # noqa: PLC0415

    try:
        import uvicorn  # noqa: PLC0415
    except ImportError:
        raise KilnError("kiln serve needs starlette and uvicorn: pip install 'kiln[serve]'") from None

    _Server = _server_class()
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise RequestError(f"--port must be in [0, 65535], got {port!r}")
    if isinstance(max_batch, bool) or not isinstance(max_batch, int) or not 1 <= max_batch <= 1024:
        raise RequestError(f"--max-batch must be an integer in [1, 1024], got {max_batch!r}")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
        sock.listen(2048)  # connections made before the app is up wait in the backlog
    except OSError as err:
        sock.close()
        raise KilnError(f"cannot listen on {host}:{port}: {err.strerror}") from None
    if isinstance(prefix_cache, bool) or not isinstance(prefix_cache, int) or not 0 <= prefix_cache <= 1024:
        raise RequestError(f"--prefix-cache must be an integer in [0, 1024], got {prefix_cache!r}")
    # prefix-cache entries are sequences too, but they share their pages with requests: the pool
    # stays max_batch contexts (not one more per entry) unless --kv-pages says otherwise
    load_options = {"device": device, "max_seq_len": max_seq_len, "threads": threads, "random_weights": random_weights,
                    "max_sequences": max_batch + prefix_cache, "kv_pages": kv_pages, "kv_contexts": max_batch if prefix_cache else None}
    exit_code = [0]
    server = None

    def on_dead(code: int) -> None:  # the engine process died under us: stop serving, exit 1
        print(f"kiln: the engine process exited with code {code}; stopping the server", file=sys.stderr, flush=True)
        exit_code[0] = 1
        if server is not None:
            server.should_exit = True

    try:
        # A thread that needs the GIL back waits up to the switch interval for the one holding it: at
        # the default 5 ms, with the event loop in the engine's process, that was ~6 ms of a 17.6 ms
        # step at 128 streams (H200, 8B). Each process still has two threads sharing a GIL (engine +
        # command reader; event loop + event reader): both keep the short interval.
        engine = EngineProcess(artifact, load_options, {"max_queue": max_queue, "prefix_cache": prefix_cache},
                               switch_interval=GIL_SWITCH_INTERVAL, on_dead=on_dead)
    except BaseException:
        sock.close()
        raise
    try:
        model = ServedModel.open(artifact, model_name or Path(artifact).name.removesuffix(".kiln"), engine.info)
    except BaseException:
        engine.stop()
        sock.close()
        raise
    app = create_app(engine, model, api_key=api_key, grace=grace)
    # Idle keep-alive connections stay open longer than clients keep them pooled (httpx, so the openai
    # client: 5 s). With uvicorn's own 5 s the server could close a connection just as a client reused it
    # -- "Server disconnected without sending a response" (seen in CI on a loaded box).
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=max(grace, 1), lifespan="on",
                            timeout_keep_alive=KEEP_ALIVE_SECONDS)
    server = _Server(config)
    bound = sock.getsockname()
    sys.setswitchinterval(GIL_SWITCH_INTERVAL)
    print(f"kiln: serving {model.name} on http://{bound[0]}:{bound[1]} (max batch {model.max_batch}, context {model.max_seq_len})",
          flush=True)
    if on_ready is not None:
        on_ready(bound)
    server.run(sockets=[sock])
    return exit_code[0]
