"""An OpenAI-compatible HTTP API over a ChatSession (`demo_chatbot.py MODEL --serve`).

`GET /v1/models` and `POST /v1/chat/completions` (plain or streamed as server-sent events), so
tools written for the OpenAI API (the `openai` client, Open WebUI, editors) can use a model trained
here. The model answers one request at a time; up to `queue` more wait their turn and the rest get
HTTP 429. Every error is OpenAI's JSON error object with a 4xx code (5xx only for a failure of the
server itself), never a traceback. Starlette and uvicorn serve it (both come with Gradio).
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import json
import threading
import time
import uuid
from typing import Optional

from .apirequest import ChatRequest, RequestError, StopScanner, error_body
from .chat import ChatSession
from .errors import ChatkitError

BODY_SECONDS = 60.0  # to receive a request's body
MAX_BODY_BYTES = 8 << 20  # far more than any context this serves; a larger body is refused before it is read


class Generator:
    """One model, one answer at a time: the lock, the waiting count and the request settings."""

    def __init__(self, session: ChatSession, queue: int):
        self.session, self.queue = session, queue
        self.lock = asyncio.Lock()
        self.waiting = 0
        self.defaults = dataclasses.replace(session.settings)
        self.default_system = session.system_prompt
        session.on_notice = lambda text: None

    def configure(self, request: ChatRequest) -> None:
        settings = dataclasses.replace(self.defaults)
        for name, value in (("temperature", request.temperature), ("top_p", request.top_p),
                            ("max_new_tokens", request.max_tokens), ("seed", request.seed)):
            if value is not None:
                setattr(settings, name, value)
        if settings.top_p == 0:
            settings.temperature = 0  # only the likeliest token is left
        self.session.settings = settings
        self.session.system_prompt = request.system if request.system is not None else self.default_system
        self.session.history = list(request.history)

    def reserve(self) -> "Ticket":
        """A place in the queue, or HTTP 429 when one answer is running and `queue` more are waiting."""
        if self.waiting > self.queue:
            raise RequestError(f"the server is busy: {self.waiting} requests are being answered or waiting; try "
                               "again shortly", status=429, kind="rate_limit_exceeded")
        self.waiting += 1
        return Ticket(self)

    async def pieces(self, request: ChatRequest, ticket: "Ticket"):
        """The answer's text pieces, generated in a worker thread, in turn with other requests."""
        try:
            async with self.lock:
                generate = self._generate(request)
                try:
                    async for piece in generate:
                        yield piece
                finally:
                    await generate.aclose()  # the worker has ended: the counts are this answer's
                    ticket.usage, ticket.max_tokens = _usage(self.session), self.session.new_tokens
        finally:
            ticket.release()

    async def _generate(self, request: ChatRequest):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        stop = threading.Event()

        def work():
            try:
                # Under the session's own lock: a request cancelled while its worker still runs (a client
                # that hung up) cannot let the next one configure and generate into the same cache.
                with self.session.generating:
                    self.configure(request)
                    stream = self.session.stream(request.prompt)
                    for piece in stream:
                        loop.call_soon_threadsafe(queue.put_nowait, ("piece", piece))
                        if stop.is_set():
                            stream.close()  # generation ends at the next token
                            break
            except Exception as exc:  # handed to the request, which answers with an error
                loop.call_soon_threadsafe(queue.put_nowait, ("error", exc))
            finally:
                loop.call_soon_threadsafe(queue.put_nowait, ("end", None))

        worker = loop.run_in_executor(None, work)
        try:
            while True:
                kind, value = await queue.get()
                if kind == "end":
                    break
                if kind == "error":
                    if isinstance(value, ChatkitError):
                        raise RequestError(str(value), "messages", code="context_length_exceeded")
                    raise value
                yield value
        finally:
            stop.set()
            await asyncio.shield(worker)


class Ticket:
    """A request's place in the queue (released once, whatever ends it) and, at its end, its token counts."""

    def __init__(self, generator: Generator):
        self.generator, self.held = generator, True
        self.usage = {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}
        self.max_tokens = 0

    def release(self) -> None:
        if self.held:
            self.held = False
            self.generator.waiting -= 1

    def finish_reason(self, scanner: StopScanner) -> str:
        return "length" if not scanner.stopped and self.usage["completion_tokens"] >= self.max_tokens else "stop"


class Completion:
    """Builds the response objects of one request."""

    def __init__(self, model_id: str):
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model_id = model_id

    def _head(self, kind: str) -> dict:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model_id}

    def chunk(self, delta: dict, finish_reason: Optional[str] = None) -> dict:
        return self._head("chat.completion.chunk") | {
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}]}

    def usage_chunk(self, usage: dict) -> dict:
        return self._head("chat.completion.chunk") | {"choices": [], "usage": usage}

    def whole(self, text: str, finish_reason: str, usage: dict) -> dict:
        message = {"role": "assistant", "content": text}
        return self._head("chat.completion") | {
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": finish_reason}],
            "usage": usage}


def _usage(session: ChatSession) -> dict:
    prompt, answer = session.usage
    return {"prompt_tokens": prompt, "completion_tokens": answer, "total_tokens": prompt + answer}


LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def allowed_hosts(host: str, port: int) -> Optional[set]:
    """The Host header values this server answers to; None where it listens on every address (0.0.0.0).

    A web page the user visits can make the browser send requests to 127.0.0.1; with a name of its own
    that it points at 127.0.0.1 (DNS rebinding), it could also read the answers. Such requests carry
    the page's name as Host, so only this server's own address is answered."""
    if host in ("0.0.0.0", "::", ""):
        return None
    names = set(LOOPBACK) if host in LOOPBACK else {host if ":" not in host else f"[{host}]"}
    return {f"{name}:{port}" for name in names} | (names if port == 80 else set())


class Guard:
    """ASGI middleware: the API answers its own user only.

    Refused, as OpenAI-style errors: a Host header other than the served address (421), a browser's
    cross-site request (an Origin other than the served address: 403), a POST whose body is not
    declared application/json (415: a page may send text/plain without asking first), and, with an
    API key, a request without `Authorization: Bearer KEY` (401)."""

    def __init__(self, app, hosts: Optional[set], api_key: Optional[str]):
        self.app, self.hosts, self.api_key = app, hosts, api_key

    def refusal(self, scope) -> Optional[RequestError]:
        import hmac
        from urllib.parse import urlparse

        headers = {name.decode("latin-1").lower(): value.decode("latin-1") for name, value in scope["headers"]}
        host = headers.get("host", "")
        if self.hosts is not None and host.lower() not in self.hosts:
            return RequestError(f"this server answers requests for {sorted(self.hosts)[0]} only, not {host!r}",
                                status=421, kind="invalid_request_error", code="misdirected_request")
        origin = headers.get("origin")
        if origin is not None and urlparse(origin).netloc.lower() != host.lower():
            return RequestError(f"cross-site requests are refused (Origin {origin})", status=403,
                                kind="permission_error", code="cross_site_request")
        # Media types and auth schemes are case-insensitive (RFC 9110, 8.3.1 and 11.1).
        media_type = headers.get("content-type", "").split(";")[0].strip().lower()
        if scope["method"] == "POST" and media_type != "application/json":
            return RequestError("the request body must be sent as Content-Type: application/json", status=415)
        if self.api_key is not None:
            scheme, _, given = headers.get("authorization", "").strip().partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), self.api_key.encode()):
                return RequestError("a valid API key is needed: Authorization: Bearer KEY (the --api-key the "
                                    "server was started with)", status=401, kind="invalid_request_error",
                                    code="invalid_api_key")
        return None

    async def __call__(self, scope, receive, send):
        from starlette.responses import JSONResponse

        refusal = self.refusal(scope) if scope["type"] == "http" else None
        if refusal is None:
            return await self.app(scope, receive, send)
        response = JSONResponse(error_body(str(refusal), refusal.kind, refusal.param, refusal.code),
                                status_code=refusal.status)
        await response(scope, receive, send)


async def not_found(request, exc):
    """404 and 405 as OpenAI-style errors naming the two endpoints."""
    from starlette.responses import JSONResponse

    status = getattr(exc, "status_code", 404)
    message = {404: f"no such endpoint: {request.method} {request.url.path} (this server has GET /v1/models "
                    "and POST /v1/chat/completions)",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(status, str(exc.detail))
    return JSONResponse(error_body(message), status_code=status)


async def server_error(request, exc):
    """A failure of the server itself: a 500 that names the kind of failure, never a traceback."""
    from starlette.responses import JSONResponse

    return JSONResponse(error_body(f"the server failed to answer ({type(exc).__name__})", "server_error"),
                        status_code=500)


@functools.lru_cache(maxsize=None)
def stream_class():
    """Starlette's streaming response, giving its request's queue place back however it ends, even when the
    client hangs up before the first event (the events' own `finally` never runs then)."""
    from starlette.responses import StreamingResponse

    class Stream(StreamingResponse):
        def __init__(self, content, on_end, **kwargs):
            super().__init__(content, **kwargs)
            self.on_end = on_end

        async def __call__(self, scope, receive, send):
            try:
                await super().__call__(scope, receive, send)
            finally:
                await self.body_iterator.aclose()
                self.on_end()

    return Stream


def build_app(session: ChatSession, model_id: str, queue: int = 8, hosts: Optional[set] = None,
              api_key: Optional[str] = None, guard: bool = True):
    """The Starlette application serving one loaded model (behind its Guard unless `guard` is False)."""
    from starlette.applications import Starlette
    from starlette.exceptions import HTTPException
    from starlette.responses import JSONResponse
    from starlette.routing import Route


    generator = Generator(session, queue)

    def error(exc: RequestError) -> JSONResponse:
        return JSONResponse(error_body(str(exc), exc.kind, exc.param, exc.code), status_code=exc.status)

    async def models(request):
        return JSONResponse({"object": "list", "data": [
            {"id": model_id, "object": "model", "created": int(time.time()), "owned_by": "chatkit"}]})

    async def completions(request):
        try:
            body = json.loads(await _body(request) or b"null")
        except RequestError as exc:
            return error(exc)
        except (ValueError, UnicodeDecodeError):
            return error(RequestError("the request body is not valid JSON"))
        except RecursionError:
            return error(RequestError("the request body is nested too deeply"))
        try:
            parsed = ChatRequest.parse(body)
            ticket = generator.reserve()
        except RequestError as exc:
            return error(exc)
        completion, scanner = Completion(model_id), StopScanner(parsed.stop)
        pieces = generator.pieces(parsed, ticket)
        if parsed.stream:
            return stream_class()(_events(pieces, ticket, parsed, completion, scanner), on_end=ticket.release,
                          media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        text = ""
        try:
            async for piece in pieces:
                text += scanner.feed(piece)
                if scanner.stopped:
                    break
        except RequestError as exc:
            return error(exc)
        finally:
            await pieces.aclose()
            ticket.release()
        text = (text + scanner.flush()).strip()
        return JSONResponse(completion.whole(text, ticket.finish_reason(scanner), ticket.usage))

    routes = [Route("/v1/models", models, methods=["GET"]),
              Route("/v1/chat/completions", completions, methods=["POST"])]
    app = Starlette(routes=routes, exception_handlers={HTTPException: not_found, Exception: server_error})
    return Guard(app, hosts, api_key) if guard else app


async def _body(request) -> bytes:
    """The request body, read no further than MAX_BODY_BYTES (HTTP 413 past it) and for no longer than
    BODY_SECONDS (HTTP 408: a client that announces a chunk it never sends holds no connection for good)."""
    from starlette.requests import ClientDisconnect

    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > MAX_BODY_BYTES:
        raise RequestError(_TOO_LARGE, status=413)

    async def read() -> bytes:
        data = bytearray()
        async for chunk in request.stream():
            data += chunk
            if len(data) > MAX_BODY_BYTES:
                raise RequestError(_TOO_LARGE, status=413)
        return bytes(data)

    try:
        return await asyncio.wait_for(read(), BODY_SECONDS)
    except asyncio.TimeoutError:
        raise RequestError(f"the request body did not arrive whole within {BODY_SECONDS:g} s", status=408) from None
    except ClientDisconnect:
        raise RequestError("the client hung up before the request body arrived whole") from None


_TOO_LARGE = (f"the request body is over {MAX_BODY_BYTES >> 20} MB; a conversation this server can answer is far "
              "smaller (the model's context is a few thousand tokens)")


def _sse(data) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def _events(pieces, ticket: Ticket, request: ChatRequest, completion: Completion, scanner: StopScanner):
    """Server-sent events in OpenAI's chunk format, ending with `data: [DONE]`."""
    started = False
    try:
        async for piece in pieces:
            if not started:
                started = True
                yield _sse(completion.chunk({"role": "assistant", "content": ""}))
                piece = piece.lstrip()
            text = scanner.feed(piece)
            if text:
                yield _sse(completion.chunk({"content": text}))
            if scanner.stopped:
                break
        tail = scanner.flush().rstrip()
        if tail:
            yield _sse(completion.chunk({"content": tail}))
    except RequestError as exc:
        yield _sse(error_body(str(exc), exc.kind, exc.param, exc.code))
        yield "data: [DONE]\n\n"
        return
    finally:
        await pieces.aclose()
        ticket.release()
    if not started:
        yield _sse(completion.chunk({"role": "assistant", "content": ""}))
    yield _sse(completion.chunk({}, ticket.finish_reason(scanner)))
    if request.include_usage:
        yield _sse(completion.usage_chunk(ticket.usage))
    yield "data: [DONE]\n\n"


def serve(session: ChatSession, model_id: str, host: str = "127.0.0.1", port: int = 8000, queue: int = 8,
          verbose: bool = False, api_key: Optional[str] = None) -> None:
    """Serve until Ctrl-C."""
    try:
        import uvicorn
    except ImportError:
        raise ChatkitError("--serve needs uvicorn and starlette: pip install uvicorn starlette "
                           "(both come with gradio)") from None
    app = build_app(session, model_id, queue, hosts=allowed_hosts(host, port), api_key=api_key)
    uvicorn.run(app, host=host, port=port, log_level="info" if verbose else "warning", access_log=verbose)
