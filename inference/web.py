"""The chat page of `eardrum web` (and `eardrum serve --web`): one static page on the server's own origin.

    GET  /              the page (inference/web/index.html): recordings, questions, streamed answers
    GET  /web/config    what the page needs to ask as `AudioChat` asks: the model's name, the text that
                        introduces each recording, the task shortcuts' prompts, the server's limits
    POST /web/probe     {"data": BASE64, "format": ..., "name": ...} -> {"seconds": ...}: a recording is
                        decoded by the server when it is added, so a file that is not audio (or is too long)
                        is refused at once, with the reason, and the page shows the duration the model hears

The page talks to the OpenAI-compatible `/v1/chat/completions` of the same server with `stream: true`, so
what it shows is exactly what any API client gets. Each question carries the recordings ticked for it that
the conversation does not hold yet, each introduced by `Recording "NAME":` as `AudioChat` introduces them,
so the page and `AudioChat.ask` answer the same question about the same recording alike.
"""

from __future__ import annotations

import logging
from importlib import resources

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response
from starlette.routing import Route

from eardrum.adapters.audio import SAMPLING_RATE

from .chat import CAPTION_PROMPT, RECORDING_INTRO, TRANSCRIBE_PROMPT
from .openai_schema import AUDIO_FORMATS, APIError, bad_request, parse_input_audio, parse_json
from .server_settings import ServerSettings

logger = logging.getLogger(__name__)

PAGE_FILE = "web/index.html"  # beside this module, shipped as package data
MAX_NAME_CHARS = 200  # a recording's name as the page shows it and the prompt introduces it


def page_html() -> str:
    """The page's HTML (one file: markup, style and script)."""
    return resources.files("eardrum.inference").joinpath(PAGE_FILE).read_text(encoding="utf-8")


def web_routes(settings: ServerSettings, check_api_key, read_body, decode_clip) -> list[Route]:
    """The page's routes. `check_api_key(request)`, `read_body(request) -> bytes` and
    `decode_clip(AudioClip, max_seconds, used_seconds) -> wave` are the server's own, so the page's requests
    meet the same key, size limit and decoder as the API's."""
    page = page_html()

    async def index(request: Request) -> Response:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    async def config(request: Request) -> Response:
        return JSONResponse({
            "model": settings.model_name,
            "recording_intro": RECORDING_INTRO,
            "prompts": {"transcribe": TRANSCRIBE_PROMPT, "caption": CAPTION_PROMPT},
            "max_new_tokens": settings.max_new_tokens,
            "max_audio_seconds": settings.max_audio_seconds,
            "max_request_bytes": settings.max_request_bytes,
            "audio_formats": list(AUDIO_FORMATS),
            "api_key_required": settings.api_key is not None,
        })

    async def probe(request: Request) -> Response:
        check_api_key(request)
        raw = await read_body(request)
        body = parse_json(raw)
        name = body.get("name")
        if not isinstance(name, str) or not name.strip() or len(name) > MAX_NAME_CHARS:
            raise bad_request(f"name: expected the recording's name, 1 to {MAX_NAME_CHARS} characters, "
                              f"got {name!r:.60}", "name")
        try:
            clip = parse_input_audio({"data": body.get("data"), "format": body.get("format")},
                                     f"recording {name!r}")
            wave = await run_in_threadpool(decode_clip, clip, settings.max_audio_seconds, 0.0)
        except APIError as err:
            logger.warning("web: recording %r refused: %.300s", name, err.message)
            raise
        seconds = len(wave) / SAMPLING_RATE
        logger.info("web: recording %r decoded, %.2f s", name, seconds)
        return JSONResponse({"name": name, "seconds": round(seconds, 3)})

    return [
        Route("/", index, methods=["GET"]),
        Route("/web/config", config, methods=["GET"]),
        Route("/web/probe", probe, methods=["POST"]),
    ]
