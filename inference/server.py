"""An HTTP server for one eardrum checkpoint that speaks OpenAI's chat-completions format.

    POST /v1/chat/completions   text and base64 `input_audio` parts in; an answer, or SSE chunks with stream
    GET  /v1/models             the one model served (also GET /v1/models/{id})
    GET  /health                liveness; requests waiting, batches and requests run, the largest batch
    GET  /                      with `web` on: the chat page (`eardrum.inference.web`, `eardrum web`)

Requests to /v1 must send their body as `application/json` (415 otherwise: a web page cannot post one
across origins without the browser asking first) and, when the server has an API key, the header
`Authorization: Bearer KEY` (401 otherwise). Browsers get CORS headers only for the origins the server
names (`--cors-origin`); with none named, no page on another origin can read an answer.

A request's body is read with a size limit on the event loop; its JSON is validated, its audio
decoded and its prompt tokenized on a pool thread; then it is queued for the generation thread of
`batch_engine`, which batches requests continuously (streaming ones included; a row joins a running
batch within a few steps) and reports back through a queue the request's coroutine awaits. The event
loop never waits on the model.

The server never opens a file a client names: audio comes only as base64 `input_audio` data and is
handed to the processor as decoded arrays; text parts stay text.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import io
import logging
import signal
import socket
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass

import numpy as np
import soundfile as sf
import uvicorn
from jinja2 import TemplateError
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from eardrum.adapters.audio import SAMPLING_RATE, AudioError, AudioTooLongError, load_audio
from eardrum.adapters.placement import Placement, load_placed
from eardrum.adapters.processor import AudioProcessor, ConversationError

from .batch_engine import Finished, GenerationEngine, Job
from .connections import guarded_protocol, limit_log_floods
from .library import (
    NOTHING_FOUND,
    Hit,
    LibraryError,
    find_windows,
    hints_fingerprint,
    sources_line,
    user_question,
    window_parts,
)
from .openai_schema import (
    APIError,
    AudioClip,
    ChatRequest,
    bad_request,
    chunk_body,
    completion_body,
    model_body,
    parse_chat_request,
    parse_json,
    sse,
    usage_body,
)
from .server_settings import ServerSettings

logger = logging.getLogger(__name__)
SHUTDOWN_DEADLINE_S = 10  # after a stop signal, how long the running batch may take before uvicorn cuts it off


def decode_request_audio(messages: list[dict], max_seconds: float) -> list[dict]:
    """The conversation with each `AudioClip` decoded to `(wave, 16000)`.

    All clips of one request together may last at most `max_seconds`.
    """
    used = 0.0

    def decode(part: dict) -> dict:
        nonlocal used
        if part["type"] != "audio":
            return part
        wave = _decode_clip(part["audio"], max_seconds, used)
        used += len(wave) / SAMPLING_RATE
        return {"type": "audio", "audio": (wave, SAMPLING_RATE)}

    out = []
    for message in messages:
        content = message["content"]
        content = content if isinstance(content, str) else [decode(part) for part in content]
        out.append({"role": message["role"], "content": content})
    return out


def _decode_clip(clip: AudioClip, limit: float, used: float) -> np.ndarray:
    # The header is read first: a few megabytes of compressed audio can hold hours.
    seconds = _header_seconds(clip.data)
    if seconds is not None and used + seconds > limit:
        raise _too_long(clip.where, seconds, limit, used)
    try:
        wave = load_audio(clip.data, max_seconds=limit, name=clip.where)
    except AudioTooLongError as err:
        raise bad_request(str(err), clip.where, code="audio_too_long") from err
    except AudioError as err:
        raise bad_request(str(err), clip.where, code="invalid_audio") from err
    except Exception as err:  # a decoder failing on a client's bytes is still about those bytes
        raise bad_request(f"{clip.where}: could not decode the audio ({err})", clip.where, "invalid_audio") from err
    if used + len(wave) / SAMPLING_RATE > limit:
        raise _too_long(clip.where, len(wave) / SAMPLING_RATE, limit, used)
    return wave


def _header_seconds(data: bytes) -> float | None:
    try:
        info = sf.info(io.BytesIO(data))
    except Exception:  # unreadable: load_audio then says what is wrong with it
        return None
    return info.frames / info.samplerate if info.samplerate > 0 and info.frames > 0 else None


def _too_long(where: str, seconds: float, limit: float, used: float) -> APIError:
    before = f", after {used:.1f} s in the clips before it" if used else ""
    return bad_request(
        f"{where}: the audio lasts {seconds:.1f} s{before}; this server accepts at most {limit:g} s of audio "
        "per request (--max-audio-seconds)",
        where,
        code="audio_too_long",
    )


def llm_context(model) -> int | None:
    """The most positions the model's LLM holds (its config's `max_position_embeddings`), or None if unsaid."""
    config = getattr(getattr(model, "llm", None), "config", None)
    value = getattr(config, "max_position_embeddings", None)
    return int(value) if isinstance(value, int) and value > 0 else None


class RequestReader:
    """Raw body -> validated request, decoded audio and prompt length. Runs on pool threads."""

    def __init__(self, processor: AudioProcessor, settings: ServerSettings, context: int | None = None) -> None:
        # A copy, so request threads never share a tokenizer with the generation thread; a transcriber
        # (Whisper's decoder, for transcript hints) is a frozen model, shared rather than copied.
        shared = {id(processor.transcriber): processor.transcriber} if processor.transcriber is not None else {}
        self.processor = copy.deepcopy(processor, shared)
        self.settings = settings
        self.hints_for = hints_fingerprint(processor)  # library windows' stored hints are read, not decoded again
        # The longest prompt taken: --max-prompt-tokens, and below the LLM's context (room for one new token).
        limits = [n for n in (settings.max_prompt_tokens, context - 1 if context else None) if n]
        self.max_prompt_tokens = min(limits) if limits else None
        self._lock = threading.Lock()  # the copy is shared by the pool threads

    def __call__(self, raw: bytes) -> tuple[ChatRequest, list[dict], int, list[Hit]]:
        """(request, conversation with decoded audio, prompt tokens, library windows heard)."""
        chat = parse_chat_request(parse_json(raw), max_new_tokens=self.settings.max_new_tokens)
        if chat.model != self.settings.model_name:
            raise APIError(
                404,
                f"the model {chat.model!r} does not exist; this server serves {self.settings.model_name!r}",
                param="model",
                code="model_not_found",
            )
        conversation = decode_request_audio(chat.messages, self.settings.max_audio_seconds)
        hits = self._library_windows(conversation) if chat.library else []
        tokens = self._prompt_tokens(conversation)
        if self.max_prompt_tokens is not None and tokens > self.max_prompt_tokens:
            raise APIError(
                400,
                f"messages: the prompt is {tokens} tokens (audio tokens included); this server takes prompts of at "
                f"most {self.max_prompt_tokens} tokens. Shorten the messages or the audio",
                param="messages",
                code="context_length_exceeded",
            )
        return chat, conversation, tokens, hits

    def _library_windows(self, conversation: list[dict]) -> list[Hit]:
        """Search the library with the last user message's question (a follow-up with the ones before it) and
        put the windows found, each with its intro, before that question; returns them."""
        if self.settings.library is None:
            raise bad_request("library: this server has no library; start it with eardrum serve --library LIB",
                              "library", code="no_library")
        asked = [m for m in conversation if m["role"] == "user"]
        last = user_question(asked[-1]) if asked else None
        if not last or not last.strip():
            raise bad_request("messages: a library question needs a last user message that ends in text", "messages")
        earlier = [q for q in map(user_question, asked[:-1]) if q]
        try:
            hits = find_windows(self.settings.library, last, earlier, hints_for=self.hints_for)
        except LibraryError as err:
            raise APIError(500, f"the server's library cannot be read: {err}", type="server_error") from err
        content = asked[-1]["content"]
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else content
        asked[-1]["content"] = [*parts[:-1], *window_parts(hits), parts[-1]]
        return hits

    def _prompt_tokens(self, conversation: list[dict]) -> int:
        with self._lock:
            try:
                batch = self.processor([conversation], add_generation_prompt=True, featurize=False)
            except (ConversationError, AudioError) as err:
                raise bad_request(f"messages: {err}", "messages") from err
            except TemplateError as err:
                raise bad_request(f"messages: the model's chat template refused them ({err})", "messages") from err
        return int(batch["input_ids"].shape[1])  # audio placeholders included


@dataclass(frozen=True)
class _Reply:
    """What every response body of one request shares."""

    id: str
    created: int
    model: str
    prompt_tokens: int
    sources: list[Hit] | None = None  # a library question: the windows heard (cited at the end of the answer)

    def chunk(self, delta: dict | None, finish_reason: str | None = None, usage: dict | None = None) -> str:
        body = chunk_body(self.id, self.created, self.model, delta, finish_reason, usage)
        if finish_reason is not None and self.sources is not None:
            body["sources"] = self.source_list()
        return sse(body)

    def source_list(self) -> list[dict]:
        """The windows heard, as {"path", "start", "end"} (seconds)."""
        return [{"path": h.path, "start": h.start, "end": h.end} for h in self.sources or []]

    def cited(self, text: str) -> str:
        """`text` ending with the Sources line of the windows heard (unchanged without any)."""
        return f"{text}{sources_line(self.sources)}" if self.sources else text


async def _stream(job: Job, reply: _Reply, include_usage: bool):
    try:
        yield reply.chunk({"role": "assistant", "content": ""})
        while True:
            event = await job.events.get()
            if isinstance(event, str):
                yield reply.chunk({"content": event})
            elif isinstance(event, APIError):  # headers are sent: the error goes in the stream
                yield sse(event.body())
                return
            else:
                if reply.sources:
                    yield reply.chunk({"content": sources_line(reply.sources)})
                yield reply.chunk({}, event.finish_reason)
                if include_usage:
                    yield reply.chunk(None, usage=usage_body(reply.prompt_tokens, event.completion_tokens))
                yield sse("[DONE]")
                return
    finally:
        job.cancelled = True  # a client that left stops costing generation steps


async def _complete(job: Job, reply: _Reply) -> dict:
    try:
        event = await job.events.get()
    except asyncio.CancelledError:
        job.cancelled = True
        raise
    if isinstance(event, APIError):
        raise event
    usage = usage_body(reply.prompt_tokens, event.completion_tokens)
    body = completion_body(reply.id, reply.created, reply.model, reply.cited(event.text), event.finish_reason, usage)
    if reply.sources is not None:
        body["sources"] = reply.source_list()
    return body


async def _read_body(request: Request, limit: int, timeout_s: float) -> bytes:
    """The whole body, at most `limit` bytes (413) and received within `timeout_s` (408)."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise _too_large(int(declared), limit)
    body = bytearray()

    async def read() -> None:
        async for piece in request.stream():
            body.extend(piece)
            if len(body) > limit:  # a chunked upload with no declared length
                raise _too_large(None, limit)

    try:
        await asyncio.wait_for(read(), timeout_s)
    except asyncio.TimeoutError:
        logger.warning("%s sent %d bytes of its body in %g s (--body-timeout); answered 408", _peer(request),
                       len(body), timeout_s)
        raise APIError(408, f"the request body was not all received within {timeout_s:g} s (--body-timeout); "
                       f"{len(body)} bytes arrived", code="request_timeout") from None
    return bytes(body)


def _peer(request: Request) -> str:
    """host:port of the client, for the log."""
    return f"{request.client.host}:{request.client.port}" if request.client else "a client"


def _too_large(size: int | None, limit: int) -> APIError:
    size_text = f" ({size} bytes)" if size is not None else ""
    return APIError(
        413,
        f"the request body{size_text} is over this server's limit of {limit} bytes (--max-request-bytes)",
        code="request_too_large",
    )


def check_json_body(request: Request) -> None:
    """415 unless the request declares its body as JSON (`Content-Type: application/json`)."""
    declared = request.headers.get("content-type", "")
    if declared.split(";")[0].strip().lower() != "application/json":
        raise APIError(
            415,
            f"the request body must be JSON, sent with Content-Type: application/json; got {declared or 'none'!r}",
            code="unsupported_media_type",
        )


def check_api_key(request: Request, api_key: str | None) -> None:
    """401 in OpenAI's shape unless the server has no key or the request sends `Authorization: Bearer <key>`."""
    if api_key is None:
        return
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), api_key.encode()):
        what = "a wrong API key" if given else "no API key"
        raise APIError(
            401,
            f"this server needs an API key: the request sent {what}; send the header Authorization: Bearer KEY",
            code="invalid_api_key",
        )


def create_app(model, processor: AudioProcessor, settings: ServerSettings) -> Starlette:
    """The ASGI app; its lifespan starts and stops the generation thread."""
    settings.validate()
    engine = GenerationEngine(
        model, processor, max_batch=settings.max_batch, batch_wait_s=settings.batch_wait_ms / 1000,
        continuous=settings.batching == "continuous",
    )
    reader = RequestReader(processor, settings, context=llm_context(model))
    started = int(time.time())

    async def chat_completions(request: Request) -> Response:
        check_api_key(request, settings.api_key)
        check_json_body(request)
        try:
            raw = await _read_body(request, settings.max_request_bytes, settings.body_timeout_s)
        except ClientDisconnect:  # nobody is left to answer: one line in the log, no traceback
            logger.info("%s disconnected while sending its request body; nothing was run", _peer(request))
            return Response(status_code=400)
        chat, conversation, prompt_tokens, hits = await run_in_threadpool(reader, raw)
        reply = _Reply(f"chatcmpl-{uuid.uuid4().hex}", int(time.time()), settings.model_name, prompt_tokens,
                       hits if chat.library else None)
        job = Job(conversation, chat.options, chat.stream, asyncio.get_running_loop())
        if chat.library and not hits:  # nothing in the library matches: said so, no generation
            job.emit(Finished(NOTHING_FOUND, "stop", 0))
        else:
            engine.submit(job)
        if chat.stream:
            stream = _stream(job, reply, chat.include_usage)
            return StreamingResponse(stream, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        return JSONResponse(await _complete(job, reply))

    async def models(request: Request) -> Response:
        check_api_key(request, settings.api_key)
        return JSONResponse({"object": "list", "data": [model_body(settings.model_name, started)]})

    async def one_model(request: Request) -> Response:
        check_api_key(request, settings.api_key)
        name = request.path_params["name"]
        if name != settings.model_name:
            raise APIError(404, f"the model {name!r} does not exist", param="model", code="model_not_found")
        return JSONResponse(model_body(name, started))

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok", "model": settings.model_name, **engine.stats()})

    @asynccontextmanager
    async def lifespan(app: Starlette):
        engine.start()
        try:
            yield
        finally:
            await run_in_threadpool(engine.close)

    routes = [
        Route("/v1/chat/completions", chat_completions, methods=["POST"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/models/{name:path}", one_model, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
    ]
    if settings.web:
        from .web import web_routes

        async def read_json_body(request: Request) -> bytes:
            check_json_body(request)
            return await _read_body(request, settings.max_request_bytes, settings.body_timeout_s)

        routes += web_routes(settings, lambda request: check_api_key(request, settings.api_key), read_json_body,
                             _decode_clip)
    handlers = {APIError: _api_error, HTTPException: _http_error, Exception: _server_error}
    middleware = []
    if settings.cors_origins:  # none named: no CORS headers at all, so other origins cannot read answers
        middleware.append(Middleware(
            CORSMiddleware, allow_origins=list(settings.cors_origins), allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        ))
    app = Starlette(routes=routes, exception_handlers=handlers, lifespan=lifespan, middleware=middleware)
    app.state.engine = engine  # `serve` drains it the moment a stop signal arrives
    return app


class DrainingServer(uvicorn.Server):
    """uvicorn's server, which on SIGINT / SIGTERM first drains the generation engine: requests still
    waiting get 503 `shutting_down` at once, the running batch finishes (within uvicorn's graceful-shutdown
    deadline), and the process then exits 0."""

    def __init__(self, config: uvicorn.Config, engine: GenerationEngine) -> None:
        super().__init__(config)
        self.engine = engine

    def handle_exit(self, sig: int, frame) -> None:
        waiting = self.engine.drain()
        logger.warning("signal %d: draining (%d waiting requests answered 503 shutting_down); the running batch "
                    "finishes, then the server exits", sig, waiting)
        super().handle_exit(sig, frame)
        # uvicorn raises a captured SIGTERM again once it has shut down, so the process would end killed by it;
        # a drained server has done what SIGTERM asks and exits 0 instead.
        captured = getattr(self, "_captured_signals", None)
        if sig == signal.SIGTERM and captured:
            captured[:] = [s for s in captured if s != signal.SIGTERM]


async def _api_error(request: Request, exc: APIError) -> Response:
    # one line per refused request, so the log says what a client (or the page) was told
    logger.warning("%s %s from %s: %d %.300s", request.method, request.url.path, _peer(request), exc.status,
                   exc.message)
    # 408 and 413 leave part of the body unread: the connection cannot carry another request
    unread = exc.status in (408, 413)
    return JSONResponse(exc.body(), status_code=exc.status, headers={"Connection": "close"} if unread else None)


async def _http_error(request: Request, exc: HTTPException) -> Response:
    error = APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}")
    return JSONResponse(error.body(), status_code=exc.status_code, headers=exc.headers)


async def _server_error(request: Request, exc: Exception) -> Response:
    error = APIError(500, "internal server error; the server log has the details", type="server_error")
    return JSONResponse(error.body(), status_code=500)


def serve(
    model_dir: str,
    sock: socket.socket,
    settings: ServerSettings,
    *,
    placement: Placement | None = None,
    log_level: str = "info",
) -> None:
    """Load the checkpoint in `model_dir` (placed by `load_placed`) and serve it on `sock` (bound, listening)
    until stopped."""
    model, processor = load_placed(model_dir, placement or Placement())
    app = create_app(model, processor, settings)
    host, port = sock.getsockname()[:2]
    print(
        f"eardrum serve: {settings.model_name!r} on http://{host}:{port} ({model.device}, up to {settings.max_batch} "
        "requests per batch)" + (f"; the chat page: open http://{host}:{port}/ in a browser" if settings.web else ""),
        flush=True,
    )
    DrainingServer(server_config(app, settings, log_level), app.state.engine).run(sockets=[sock])


def server_config(app: Starlette, settings: ServerSettings, log_level: str = "info") -> uvicorn.Config:
    """uvicorn's settings for `app`: the guarded protocol (connection cap, request-head deadline), the drain
    deadline, and log lines that cannot flood (`connections.limit_log_floods`)."""
    config = uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=SHUTDOWN_DEADLINE_S,
                            http=guarded_protocol(settings))
    limit_log_floods()
    return config
