"""`eardrum serve` under clients that never finish: request-head and body deadlines, the connection cap, and
log lines that cannot flood. A real uvicorn server in a thread of this process, on loopback, a tiny model."""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import httpx
import pytest

from eardrum.adapters.checkpoint import build_audio_llm
from eardrum.adapters.config import AudioLLMConfig
from eardrum.inference.connections import RateLimitedLog
from eardrum.inference.server import ServerSettings, create_app, server_config


@pytest.fixture(scope="module")
def built():
    return build_audio_llm(AudioLLMConfig(encoder="tiny:whisper", llm="tiny:llama"))


@pytest.fixture
def guarded_server(built, serve_in_thread):
    """`with guarded_server(**limits) as (host, port)`: eardrum serve's uvicorn settings (server_config) for a
    tiny model, from a thread."""

    @contextmanager
    def serve(**limits) -> Iterator[tuple[str, int]]:
        settings = ServerSettings(model_name="tiny", max_new_tokens=2, **limits)
        app = create_app(*built, settings)
        with serve_in_thread(app, server_config(app, settings, "warning")) as base:
            host, port = base.removeprefix("http://").split(":")
            yield host, int(port)

    return serve


def _read_all(sock: socket.socket, seconds: float) -> tuple[bytes, float]:
    """Everything the server sends until it closes the connection (or `seconds` pass), and when it closed."""
    sock.settimeout(seconds)
    start, data = time.monotonic(), b""
    try:
        while chunk := sock.recv(65536):
            data += chunk
    except TimeoutError:
        pass
    return data, time.monotonic() - start


def test_a_connection_without_a_whole_request_head_is_closed_at_the_header_deadline(guarded_server):
    with guarded_server(header_timeout_s=0.5) as (host, port):
        with socket.create_connection((host, port)) as slow:
            slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\n")  # and never the rest
            data, waited = _read_all(slow, 10)
        assert data == b"" and 0.3 <= waited < 5  # closed by the server, near its deadline
        with socket.create_connection((host, port)) as idle:
            data, waited = _read_all(idle, 10)  # nothing sent at all
        assert data == b"" and waited < 5
        with httpx.Client(base_url=f"http://{host}:{port}", timeout=10) as client:
            assert client.get("/health").status_code == 200
            time.sleep(0.2)
            assert client.get("/health").status_code == 200  # a keep-alive connection well used is kept


def test_a_body_not_all_received_by_its_deadline_gets_408_request_timeout(guarded_server):
    with guarded_server(body_timeout_s=0.5) as (host, port):
        with socket.create_connection((host, port)) as slow:
            slow.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n" + b'{"model": "tiny", ')
            data, waited = _read_all(slow, 10)
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408") and waited < 5
        error = json.loads(body)["error"]
        assert error["code"] == "request_timeout" and "--body-timeout" in error["message"]
        assert "18 bytes arrived" in error["message"]
        assert httpx.get(f"http://{host}:{port}/health", timeout=10).status_code == 200


def test_a_connection_over_the_cap_gets_503_at_once_and_the_server_recovers(guarded_server):
    with guarded_server(max_connections=3, header_timeout_s=30) as (host, port), ExitStack() as held:
        hogs = [held.enter_context(socket.create_connection((host, port))) for _ in range(3)]
        time.sleep(0.2)
        with socket.create_connection((host, port)) as extra:
            data, waited = _read_all(extra, 10)  # answered without sending anything
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 503") and waited < 5
        assert json.loads(body)["error"]["code"] == "server_busy"
        for hog in hogs:
            hog.close()
        time.sleep(0.3)
        assert httpx.get(f"http://{host}:{port}/health", timeout=10).status_code == 200


def test_a_storm_of_slow_connections_writes_a_line_not_a_flood(guarded_server, caplog):
    with caplog.at_level(logging.WARNING), guarded_server(header_timeout_s=0.3) as (host, port):
        with ExitStack() as held:
            for _ in range(40):
                held.enter_context(socket.create_connection((host, port))).sendall(b"GET /health HTTP/1.1\r\n")
            time.sleep(1.5)
        assert httpx.get(f"http://{host}:{port}/health", timeout=10).status_code == 200
    said = [r for r in caplog.records if "no complete request head" in r.getMessage()]
    assert 1 <= len(said) <= 2  # 40 closed, one line (per 10 s)


def test_rate_limited_log_passes_each_kind_once_per_interval_and_counts_the_rest():
    now = [0.0]
    limiter = RateLimitedLog(interval_s=10, clock=lambda: now[0])

    def record(msg: str, name: str = "asyncio") -> logging.LogRecord:
        return logging.LogRecord(name, logging.ERROR, __file__, 1, msg, None, None)

    assert limiter.filter(record("socket.accept() out of system resource"))
    assert not any(limiter.filter(record("socket.accept() out of system resource")) for _ in range(999))
    assert limiter.filter(record("another kind"))  # each kind has its own allowance
    assert limiter.filter(record("socket.accept() out of system resource", name="uvicorn.error"))
    now[0] = 11.0
    later = record("socket.accept() out of system resource")
    assert limiter.filter(later) and "[999 more like this in the last 11 s not logged]" in later.getMessage()
    now[0] = 12.0
    assert not limiter.filter(record("socket.accept() out of system resource"))


def test_connection_settings_are_checked():
    for name in ("max_connections", "header_timeout_s", "body_timeout_s"):
        with pytest.raises(ValueError, match=name):
            ServerSettings(model_name="tiny", **{name: 0}).validate()
