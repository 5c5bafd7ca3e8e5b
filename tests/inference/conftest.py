"""Shared by the server tests: an ASGI app served by uvicorn from a thread of this process, on loopback."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import uvicorn

from eardrum.cli.serve import listen
from eardrum.inference.connections import FLOODED_LOGGERS, RateLimitedLog

HOST = "127.0.0.1"


@contextmanager
def _serve(app, config: uvicorn.Config | None = None) -> Iterator[str]:
    """Serve `app` (with `config`, e.g. `server.server_config`, else uvicorn's defaults) on a free loopback
    port; yields the base URL. Log filters the config installed are removed afterwards."""
    sock = listen(HOST, 0)
    server = uvicorn.Server(config or uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        yield f"http://{HOST}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(timeout=15)
        sock.close()
        for name in FLOODED_LOGGERS:
            log = logging.getLogger(name)
            for f in [f for f in log.filters if isinstance(f, RateLimitedLog)]:
                log.removeFilter(f)


@pytest.fixture
def serve_in_thread() -> Callable:
    """`with serve_in_thread(app[, config]) as base_url: ...`"""
    return _serve
