"""`eardrum serve`: an OpenAI-compatible HTTP server for one checkpoint (see `eardrum.inference.server`),
and `eardrum web`: the same server with its chat page at / (see `eardrum.inference.web`).

    eardrum serve --model DIR [--host 127.0.0.1] [--port 8000] [--model-name NAME] [--device auto] [--web]
    eardrum web --model DIR [--host 127.0.0.1] [--port 7860]

The model folder and the port are checked before anything heavy is imported or loaded, so a wrong
path or a busy port is a one-line error (exit code 2) within a second, not after the model loads;
so is a folder that is not a checkpoint, a few seconds later. The port is bound and listening from
then on; requests that arrive while the model loads wait for it.
"""

from __future__ import annotations

import argparse
import os
import socket
from pathlib import Path

from eardrum.adapters.hub import is_hub_id, split_revision
from eardrum.inference.server_settings import BATCHING, ServerSettings

from .options import add_placement_options, field_default, placement

LOG_LEVELS = ("critical", "error", "warning", "info", "debug")


def _positive(kind: type):
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}") from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value

    return parse


def _non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}")
    return value


def _port(text: str) -> int:
    if not (text.isdigit() and 0 <= int(text) <= 65535):
        raise argparse.ArgumentTypeError(f"expected a port number from 0 to 65535, got {text!r}")
    return int(text)


WEB_PORT = 7860  # `eardrum web`'s default port, the one browser demos of speech models usually take


def add_serve_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Register `serve` and `web` on the `eardrum` subcommands (handler `run`); returns `serve`'s parser."""
    serve = subparsers.add_parser(
        "serve",
        help="serve a checkpoint over HTTP, OpenAI chat-completions compatible (audio as input_audio parts)",
        description="Serve one checkpoint at /v1/chat/completions, /v1/models and /health (and with --web the "
        "chat page at /).",
    )
    _server_arguments(serve, port=8000)
    serve.add_argument("--web", action="store_true", help="also serve the chat page at / (as `eardrum web`)")
    web = subparsers.add_parser(
        "web",
        help="a chat page for recordings in the browser: upload or record, ask, see answers stream in",
        description="Serve one checkpoint's chat page at / (and the same API as `eardrum serve`); open the printed "
        "address in a browser. Uploads in webm/opus or m4a need `pip install 'eardrum[web]'` (PyAV, FFmpeg "
        "bundled).",
    )
    _server_arguments(web, port=WEB_PORT)
    web.set_defaults(web=True)
    return serve


def _server_arguments(serve: argparse.ArgumentParser, port: int) -> None:
    serve.add_argument("--model", required=True, metavar="DIR",
                       help="the checkpoint folder, or a Hub id org/name[@revision]")
    serve.add_argument("--model-name",
                       help="the id clients send as `model` (default: the folder's name, or the Hub id)")
    serve.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    serve.add_argument("--port", type=_port, default=port, help="port to listen on (default: %(default)s)")
    default = lambda name: field_default(ServerSettings, name)  # noqa: E731
    serve.add_argument(
        "--max-batch",
        type=_positive(int),
        default=default("max_batch"),
        help="rows decoded together at most (default: %(default)s)",
    )
    serve.add_argument(
        "--batching",
        choices=BATCHING,
        default=default("batching"),
        help="continuous: requests join a running batch between decoding steps and leave it when answered; "
        "static: they wait until the running batch has ended (for comparison) (default: %(default)s)",
    )
    serve.add_argument(
        "--batch-wait-ms",
        type=_non_negative_float,
        default=default("batch_wait_ms"),
        help="how long a request waits for others to share its batch (default: %(default)s)",
    )
    serve.add_argument(
        "--max-new-tokens",
        type=_positive(int),
        default=default("max_new_tokens"),
        help="the most tokens one answer may have; larger max_tokens are capped (default: %(default)s)",
    )
    serve.add_argument(
        "--max-request-bytes",
        type=_positive(int),
        default=default("max_request_bytes"),
        help="larger request bodies get 413 (default: %(default)s)",
    )
    serve.add_argument(
        "--max-audio-seconds",
        type=_positive(float),
        default=default("max_audio_seconds"),
        help="the most audio one request may hold, all clips together (default: %(default)s)",
    )
    serve.add_argument(
        "--max-prompt-tokens",
        type=_positive(int),
        default=default("max_prompt_tokens"),
        help="longer prompts, audio tokens included, get 400 before any generation (default: the LLM's context)",
    )
    serve.add_argument(
        "--api-key",
        default=os.environ.get("EARDRUM_API_KEY") or None,
        help="require `Authorization: Bearer KEY` on /v1 requests (default: $EARDRUM_API_KEY; none: open)",
    )
    serve.add_argument(
        "--cors-origin",
        action="append",
        default=[],
        metavar="ORIGIN",
        help="a web origin (e.g. https://app.example.com, or *) whose pages may call the API; repeatable "
        "(default: none, no CORS headers)",
    )
    serve.add_argument(
        "--library",
        metavar="LIB",
        help='a library of recordings (eardrum index); requests with "library": true are answered from its '
        "windows, with their sources",
    )
    serve.add_argument(
        "--max-connections",
        type=_positive(int),
        default=default("max_connections"),
        help="open connections at most; one more is answered 503 and closed (default: %(default)s, lowered "
        "to fit the open-file limit)",
    )
    serve.add_argument(
        "--header-timeout",
        type=_positive(float),
        default=default("header_timeout_s"),
        metavar="SECONDS",
        help="a connection that has not sent a whole request head this long after it opens (or after its last "
        "answer) is closed (default: %(default)s)",
    )
    serve.add_argument(
        "--body-timeout",
        type=_positive(float),
        default=default("body_timeout_s"),
        metavar="SECONDS",
        help="a request body not all received this long after its head gets 408 (default: %(default)s)",
    )
    serve.add_argument("--log-level", choices=LOG_LEVELS, default="info", help="server log level (default: info)")
    add_placement_options(serve)
    serve.set_defaults(run=run_serve)


def _check_model_dir(model: str) -> Path:
    # A folder, or a Hub id fetched now, before the port is taken; what is inside is checked when it loads.
    path = Path(model)
    if path.is_dir():
        return path
    if path.exists() or not is_hub_id(model):
        raise ValueError(f"--model {model}: no such folder; expected an eardrum checkpoint folder or a Hub id "
                         "org/name[@revision]")
    from eardrum.adapters.checkpoint import checkpoint_folder

    return checkpoint_folder(model)


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to `host:port` and listening, or an OSError that says the port is taken."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError as err:
        raise OSError(f"--host {host}: cannot resolve it ({err})") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # restarts need not wait out TIME_WAIT
        sock.bind(address)
        sock.listen(2048)
    except OSError as err:
        sock.close()
        raise OSError(
            f"cannot listen on {host}:{port}: {err.strerror or err}; is another server using it? choose another --port"
        ) from None
    return sock


def run_serve(args: argparse.Namespace) -> int:
    """Handler of `eardrum serve`: check the arguments, take the port, then load and serve until stopped."""
    model_dir = _check_model_dir(args.model)
    chosen = placement(args)  # a bad --device, --dtype or --quantization is named before anything loads
    settings = ServerSettings(
        model_name=args.model_name or (split_revision(args.model)[0] if not Path(args.model).exists()
                                       else model_dir.resolve().name),
        max_batch=args.max_batch,
        batch_wait_ms=args.batch_wait_ms,
        batching=args.batching,
        max_new_tokens=args.max_new_tokens,
        max_request_bytes=args.max_request_bytes,
        max_audio_seconds=args.max_audio_seconds,
        max_prompt_tokens=args.max_prompt_tokens,
        api_key=args.api_key,
        cors_origins=tuple(args.cors_origin),
        library=args.library,
        max_connections=args.max_connections,
        header_timeout_s=args.header_timeout,
        body_timeout_s=args.body_timeout,
        web=args.web,
    )
    settings.validate()  # a bad --cors-origin or empty --api-key is named before the port is taken
    if settings.library is not None:
        from eardrum.inference.library import open_library

        open_library(settings.library).close()  # a --library that is not one is named before the model loads
    sock = listen(args.host, args.port)
    from eardrum.inference.server import serve

    try:
        serve(str(model_dir), sock, settings, placement=chosen, log_level=args.log_level)
    finally:
        sock.close()
    return 0
