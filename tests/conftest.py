"""Shared fixtures: tiny random models built from configs and a tokenizer trained locally.

Everything here is offline and seeded; nothing touches the hub.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest
import torch
import uvicorn

from eardrum.adapters.tiny import (  # noqa: F401  (re-exported for the tests)
    build_tokenizer,
    save_tiny_bases,
    tiny_llama,
    tiny_qwen2,
    tiny_w2v,
    tiny_whisper,
    w2v_feature_extractor,
    whisper_feature_extractor,
)
from eardrum.cli.serve import listen
from eardrum.inference.connections import FLOODED_LOGGERS, RateLimitedLog

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
torch.set_num_threads(1)


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run tests marked slow (real weights)")
    parser.addoption("--run-gpu", action="store_true", help="also run tests marked gpu (needs CUDA)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for marker, flag in (("slow", "--run-slow"), ("gpu", "--run-gpu")):
        if config.getoption(flag):
            continue
        skip = pytest.mark.skip(reason=f"marked {marker}; run with {flag}")
        for item in items:
            if marker in item.keywords:
                item.add_marker(skip)


@pytest.fixture(scope="session")
def chatml_tokenizer():
    return build_tokenizer("chatml")


@pytest.fixture(scope="session")
def llama3_tokenizer():
    return build_tokenizer("llama3")


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory):
    """Tiny random base models saved as local transformers folders (the way users name local sources)."""
    return save_tiny_bases(tmp_path_factory.mktemp("bases"))


# ---------------------------------------------------------------- servers in a thread (the server tests)
SERVE_HOST = "127.0.0.1"


@contextmanager
def _serve(app, config: uvicorn.Config | None = None) -> Iterator[str]:
    """Serve `app` (with `config`, e.g. `server.server_config`, else uvicorn's defaults) on a free loopback
    port; yields the base URL. Log filters the config installed are removed afterwards."""
    sock = listen(SERVE_HOST, 0)
    server = uvicorn.Server(config or uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        for _ in range(200):
            if server.started:
                break
            time.sleep(0.05)
        yield f"http://{SERVE_HOST}:{sock.getsockname()[1]}"
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


@contextmanager
def server_process(command: list[str], log, env: dict, base: str) -> Iterator[str]:
    """Run `command` (an `eardrum serve` / `eardrum web` listening at `base`) with its output in the file `log`
    (a file, not a pipe: a full pipe would stall the server); yield `base` once /health answers (a minute at
    most, else the test fails with the log); terminate it afterwards."""
    import subprocess

    import httpx

    with open(log, "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        for _ in range(240):
            if process.poll() is not None:
                pytest.fail(f"the server exited with {process.returncode}:\n{log.read_text()}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        else:
            pytest.fail(f"the server did not answer /health within a minute:\n{log.read_text()}")
        yield base
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)
