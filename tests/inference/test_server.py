"""`eardrum serve`: a real server process on loopback, driven by the official openai client.

Answers are compared with the same checkpoint called directly in this process (greedy, exact).
Every request has a timeout and every loop a count, so a hung server fails the test instead of
hanging it.
"""

from __future__ import annotations

import base64
import io
import json
import logging
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf
import torch
import uvicorn
from openai import OpenAI

from conftest import server_process
from eardrum.adapters.checkpoint import load_pretrained
from eardrum.adapters.tiny import TINY_SOUNDS, synth_sound
from eardrum.cli.serve import listen
from eardrum.common.decoding import generate_tokens, stop_token_ids
from eardrum.common.generation import GenerationSettings
from eardrum.demo.smoke import QUESTION, run_smoke
from eardrum.inference.batch_engine import Finished
from eardrum.inference.server import DrainingServer, ServerSettings, create_app

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
HOST = "127.0.0.1"
MODEL = "tiny-ears"
MAX_NEW_TOKENS = 12
MAX_AUDIO_SECONDS = 5
MAX_REQUEST_BYTES = 400_000
TIMEOUT = 60  # seconds, per request


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _serve(*args: str, timeout: int = 60) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "eardrum.cli", "serve", *args]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, timeout=timeout)


def _wav(seconds: float, sound: int = 0, variant: int = 0) -> bytes:
    freq, beeps = list(TINY_SOUNDS.values())[sound]
    buffer = io.BytesIO()
    sf.write(buffer, synth_sound(freq, beeps, seconds, phase=variant), 16000, format="WAV", subtype="PCM_16")
    return buffer.getvalue()


def _clip(i: int) -> bytes:
    """20 different clips: 4 sounds x 5 lengths and phases."""
    return _wav(0.5 + 0.1 * (i // 4), sound=i % 4, variant=i // 4)


def _audio_part(wav: bytes) -> dict:
    return {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}


def _messages(wav: bytes) -> list[dict]:
    return [{"role": "user", "content": [_audio_part(wav), {"type": "text", "text": QUESTION}]}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return Path(run_smoke(tmp_path_factory.mktemp("serve"), steps=120)["checkpoint"])


@pytest.fixture(scope="module")
def server(checkpoint, tmp_path_factory) -> Iterator[str]:
    port = _free_port()
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    options = (
        f"--model-name {MODEL} --host {HOST} --port {port} --log-level warning --max-batch 8 --batch-wait-ms 20 "
        f"--max-new-tokens {MAX_NEW_TOKENS} --max-audio-seconds {MAX_AUDIO_SECONDS} "
        f"--max-request-bytes {MAX_REQUEST_BYTES}"
    )
    command = [sys.executable, "-m", "eardrum.cli", "serve", "--model", str(checkpoint), *options.split()]
    with server_process(command, log, ENV, f"http://{HOST}:{port}") as base:
        yield base


@pytest.fixture(scope="module")
def client(server) -> OpenAI:
    return OpenAI(base_url=f"{server}/v1", api_key="x", timeout=TIMEOUT, max_retries=0)


@pytest.fixture(scope="module")
def direct(checkpoint):
    """Answer through the decoding path, one request alone: (text, prompt tokens, new tokens up to and with
    end of turn)."""
    model, processor = load_pretrained(checkpoint)
    stops = stop_token_ids(processor.tokenizer, model.llm.generation_config)

    def answer(wav: bytes, max_tokens: int = MAX_NEW_TOKENS) -> tuple[str, int, int]:
        content = [{"type": "audio", "audio": wav}, {"type": "text", "text": QUESTION}]
        conversation = [{"role": "user", "content": content}]
        batch = processor([conversation], add_generation_prompt=True)
        settings = GenerationSettings(max_new_tokens=max_tokens)
        ids = generate_tokens(model, processor.tokenizer, batch, settings)[0].tolist()
        used = next((k + 1 for k, i in enumerate(ids) if i in stops), len(ids))
        return processor.batch_decode([ids[:used]])[0].strip(), batch["input_ids"].shape[1], used

    answer.model, answer.processor = model, processor
    return answer


def _post(server: str, body: dict | bytes) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"content-type": "application/json"}
    return httpx.post(f"{server}/v1/chat/completions", content=content, headers=headers, timeout=TIMEOUT)


def test_health_and_models(server, client):
    health = httpx.get(f"{server}/health", timeout=TIMEOUT)
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert client.models.retrieve(MODEL).id == MODEL


def test_completion_is_the_direct_greedy_answer_with_usage(client, direct):
    wav = _clip(0)
    text, prompt_tokens, new_tokens = direct(wav)
    reply = client.chat.completions.create(model=MODEL, messages=_messages(wav), temperature=0)
    assert reply.choices[0].message.content == text == "a low tone"
    assert reply.choices[0].message.role == "assistant" and reply.choices[0].finish_reason == "stop"
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion" and reply.model == MODEL
    audio_tokens = direct.processor.clip_num_tokens(8000)
    assert reply.usage.prompt_tokens == prompt_tokens > audio_tokens  # the audio tokens are counted
    assert reply.usage.completion_tokens == new_tokens == 7
    assert reply.usage.total_tokens == prompt_tokens + new_tokens


def test_max_tokens_cuts_the_answer_with_finish_reason_length(client, direct):
    wav = _clip(1)
    reply = client.chat.completions.create(model=MODEL, messages=_messages(wav), temperature=0, max_tokens=3)
    assert reply.choices[0].message.content == direct(wav, 3)[0]
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3
    capped = client.chat.completions.create(model=MODEL, messages=_messages(wav), temperature=0, max_tokens=10**6)
    assert capped.choices[0].message.content == direct(wav)[0]  # capped at --max-new-tokens, not an error


def test_stream_deltas_join_to_the_same_text(client, direct):
    wav = _clip(3)
    chunks = list(
        client.chat.completions.create(
            model=MODEL, messages=_messages(wav), temperature=0, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.object for c in chunks} == {"chat.completion.chunk"} and len({c.id for c in chunks}) == 1
    joined = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    text, prompt_tokens, new_tokens = direct(wav)
    assert joined == text == "three beeps" and len(chunks) > 4
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == new_tokens
    assert chunks[-1].usage.prompt_tokens == prompt_tokens


def test_stream_ends_with_done(server):
    body = {"model": MODEL, "messages": _messages(_clip(2)), "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{server}/v1/chat/completions", json=body, timeout=TIMEOUT) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["choices"][0]["finish_reason"] == "stop"


def test_stop_string_cuts_before_it_streaming_or_not(client):
    kwargs = {"model": MODEL, "messages": _messages(_clip(0)), "temperature": 0, "stop": [" tone", "zzz"]}
    reply = client.chat.completions.create(**kwargs)
    assert reply.choices[0].message.content == "a low" and reply.choices[0].finish_reason == "stop"
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "a low"


def test_seeded_sampling_repeats(client):
    kwargs = {"model": MODEL, "messages": _messages(_clip(5)), "temperature": 2.0, "top_p": 0.9, "seed": 11}
    answers = {client.chat.completions.create(**kwargs).choices[0].message.content for _ in range(3)}
    assert len(answers) == 1


def test_vanishing_temperature_samples_the_greedy_answer(client, direct):
    wav = _clip(7)
    reply = client.chat.completions.create(model=MODEL, messages=_messages(wav), temperature=1e-300)
    assert reply.choices[0].message.content == direct(wav)[0]


def test_twenty_concurrent_requests_each_get_their_own_answer(server, client, direct):
    clips = [_clip(i) for i in range(20)]
    limits = [3 + i % 10 for i in range(20)]  # different lengths too, so rows of a batch end apart
    expected = [direct(wav, n)[0] for wav, n in zip(clips, limits)]

    def ask(i: int) -> str:
        messages = _messages(clips[i])
        reply = client.chat.completions.create(model=MODEL, messages=messages, temperature=0, max_tokens=limits[i])
        return reply.choices[0].message.content

    with ThreadPoolExecutor(max_workers=20) as pool:
        futures = [pool.submit(ask, i) for i in range(20)]
        answers = [f.result(timeout=TIMEOUT) for f in futures]
    assert answers == expected
    assert len(set(answers)) >= 8
    stats = httpx.get(f"{server}/health", timeout=TIMEOUT).json()
    assert stats["largest_batch"] > 1 and stats["waiting"] == 0  # requests did share a generate call


def _error(response: httpx.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    return error


def _user(*parts: dict) -> dict:
    return {"model": MODEL, "messages": [{"role": "user", "content": list(parts)}]}


TEXT = {"type": "text", "text": "hi"}
C0, C1 = "messages[0].content[0]", "messages[0].content[1]"
ASSISTANT_AUDIO = {"model": MODEL, "messages": [{"role": "assistant", "content": [_audio_part(_clip(0))]}]}
BAD_REQUESTS = {  # name: (body, param, a piece of the message); each gets a 400
    "malformed json": (b'{"model": "tiny-ears", "messages": [', None, "not valid JSON"),
    "not an object": (b"[1, 2]", None, "JSON object"),
    "deep json": (b"[" * 100_000, None, "too deeply"),
    "no model": ({"messages": [{"role": "user", "content": "hi"}]}, "model", "model"),
    "no messages": ({"model": MODEL}, "messages", "messages"),
    "bad role": ({"model": MODEL, "messages": [{"role": "robot", "content": "hi"}]}, "messages[0].role", "robot"),
    "content not text": ({"model": MODEL, "messages": [{"role": "user", "content": 5}]}, "messages[0].content", "list"),
    "file path part": (_user({"type": "audio", "audio": "/etc/passwd"}, TEXT), f"{C0}.type", "never opens paths"),
    "audio_url part": (
        _user({"type": "audio_url", "audio_url": {"url": "file:///etc/passwd"}}),
        f"{C0}.type",
        "refused",
    ),
    "file part": (_user(TEXT, {"type": "file", "file": {"file_id": "x"}}), f"{C1}.type", "refused"),
    "path as audio data": (
        _user({"type": "input_audio", "input_audio": {"data": "/etc/passwd"}}),
        f"{C0}.input_audio.data",
        "base64",
    ),
    "bad format": (
        _user({"type": "input_audio", "input_audio": {"data": "", "format": "aiff"}}),
        f"{C0}.input_audio.format",
        "aiff",
    ),
    "undecodable audio": (_user(TEXT, _audio_part(b"RIFF not really a wav file")), C1, f"{C1}: could not decode"),
    "empty audio": (_user(_audio_part(b"")), C0, "no data"),
    "audio too long": (
        _user(_audio_part(_wav(MAX_AUDIO_SECONDS + 1.0))),
        C0,
        "lasts 6.0 s; this server accepts at most 5 s",
    ),
    "too long together": (
        _user(_audio_part(_wav(3.0)), _audio_part(_wav(3.0))),
        C1,
        "after 3.0 s in the clips before it",
    ),
    "audio from the assistant": (ASSISTANT_AUDIO, C0, "user messages only"),
    "placeholder in text": (_user({"type": "text", "text": "<|audio|>"}), "messages", "placeholder"),
    "zero max_tokens": ({**_user(TEXT), "max_tokens": 0}, "max_tokens", ">= 1"),
    "text max_tokens": ({**_user(TEXT), "max_completion_tokens": "9"}, "max_completion_tokens", "integer"),
    "hot temperature": ({**_user(TEXT), "temperature": 3}, "temperature", "0 to 2"),
    "zero top_p": ({**_user(TEXT), "top_p": 0}, "top_p", "above 0"),
    "five stops": ({**_user(TEXT), "stop": ["a", "b", "c", "d", "e"]}, "stop", "1 to 4"),
    "several choices": ({**_user(TEXT), "n": 2}, "n", "not supported"),
    "tools": ({**_user(TEXT), "tools": [{"type": "function"}]}, "tools", "not supported"),
}


@pytest.mark.parametrize("name", list(BAD_REQUESTS))
def test_bad_request_gets_an_openai_400(server, name):
    body, param, piece = BAD_REQUESTS[name]
    error = _error(_post(server, body), 400)
    assert error["param"] == param and piece in error["message"] and error["type"] == "invalid_request_error"


def test_unknown_model_gets_404_model_not_found(server):
    error = _error(_post(server, {"model": "gpt-9", "messages": [{"role": "user", "content": "hi"}]}), 404)
    assert error["code"] == "model_not_found" and error["param"] == "model" and "gpt-9" in error["message"]


def test_oversize_request_gets_413(server):
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * MAX_REQUEST_BYTES}]}).encode()
    assert str(MAX_REQUEST_BYTES) in _error(_post(server, body), 413)["message"]

    def pieces():  # no content-length: the limit must hold while reading
        for _ in range(5):
            yield b"x" * 100_000

    json_type = {"content-type": "application/json"}
    chunked = httpx.post(f"{server}/v1/chat/completions", content=pieces(), headers=json_type, timeout=TIMEOUT)
    assert _error(chunked, 413)["code"] == "request_too_large"


def test_unknown_route_and_method_get_openai_errors(server):
    _error(httpx.get(f"{server}/v1/nothing", timeout=TIMEOUT), 404)
    _error(httpx.get(f"{server}/v1/chat/completions", timeout=TIMEOUT), 405)


def test_still_serves_after_the_bad_requests(client, direct):
    wav = _clip(6)
    reply = client.chat.completions.create(model=MODEL, messages=_messages(wav), temperature=0)
    assert reply.choices[0].message.content == direct(wav)[0]


def test_model_failure_is_a_500_and_the_next_request_works(direct, serve_in_thread):
    class FailsOnce:
        def __init__(self, model) -> None:
            self.model, self.failed = model, False

        def __getattr__(self, name: str):
            return getattr(self.model, name)

        def decode_step(self, *args, **kwargs) -> torch.Tensor:
            if not self.failed:
                self.failed = True
                raise RuntimeError("out of memory, say")
            return self.model.decode_step(*args, **kwargs)

    app = create_app(FailsOnce(direct.model), direct.processor, ServerSettings(model_name=MODEL, max_new_tokens=12))
    body = {"model": MODEL, "messages": _messages(_clip(4)), "temperature": 0}
    with serve_in_thread(app) as base:
        error = _error(_post(base, body), 500)
        assert error["type"] == "server_error" and "out of memory" not in error["message"]
        ok = _post(base, body)
    assert ok.status_code == 200 and ok.json()["choices"][0]["message"]["content"] == direct(_clip(4))[0]


def test_missing_model_folder_is_a_one_line_error(tmp_path):
    result = _serve("--model", str(tmp_path / "nope"), "--port", str(_free_port()))
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "no such folder" in result.stderr and "Traceback" not in result.stderr


def test_busy_port_is_a_one_line_error(checkpoint):
    with socket.socket() as taken:
        taken.bind((HOST, 0))
        taken.listen(1)
        result = _serve("--model", str(checkpoint), "--host", HOST, "--port", str(taken.getsockname()[1]))
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0
    assert "cannot listen on" in result.stderr and "Traceback" not in result.stderr


def test_the_body_must_be_declared_json(server):
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()
    url = f"{server}/v1/chat/completions"
    for declared in ("text/plain", "application/x-www-form-urlencoded", None):  # what a page may send cross-origin
        headers = {"content-type": declared} if declared else {}
        error = _error(httpx.post(url, content=body, headers=headers, timeout=TIMEOUT), 415)
        assert error["code"] == "unsupported_media_type" and "application/json" in error["message"]
    ok = httpx.post(url, content=body, headers={"content-type": "application/json; charset=utf-8"}, timeout=TIMEOUT)
    assert ok.status_code == 200


def test_no_cors_headers_unless_an_origin_is_named(server, direct, serve_in_thread):
    page = {"origin": "https://evil.example"}
    assert "access-control-allow-origin" not in httpx.get(f"{server}/v1/models", headers=page).headers
    preflight = httpx.options(f"{server}/v1/chat/completions", headers={
        **page, "access-control-request-method": "POST", "access-control-request-headers": "content-type"})
    assert "access-control-allow-origin" not in preflight.headers
    settings = ServerSettings(model_name=MODEL, max_new_tokens=4, cors_origins=("https://app.example",))
    with serve_in_thread(create_app(direct.model, direct.processor, settings)) as base:
        allowed = httpx.get(f"{base}/v1/models", headers={"origin": "https://app.example"})
        other = httpx.get(f"{base}/v1/models", headers=page)
    assert allowed.headers["access-control-allow-origin"] == "https://app.example"
    assert "access-control-allow-origin" not in other.headers


def test_an_api_key_is_required_when_set(direct, serve_in_thread):
    settings = ServerSettings(model_name=MODEL, max_new_tokens=4, api_key="s3cret")
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    with serve_in_thread(create_app(direct.model, direct.processor, settings)) as base:
        url = f"{base}/v1/chat/completions"
        for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": "s3cret"}):
            error = _error(httpx.post(url, json=body, headers=headers, timeout=TIMEOUT), 401)
            assert error["code"] == "invalid_api_key" and "s3cret" not in error["message"]
        assert _error(httpx.get(f"{base}/v1/models"), 401)["code"] == "invalid_api_key"
        assert httpx.get(f"{base}/health").status_code == 200  # liveness stays open
        key = {"authorization": "Bearer s3cret"}
        assert httpx.post(url, json=body, headers=key, timeout=TIMEOUT).status_code == 200
        client = OpenAI(base_url=f"{base}/v1", api_key="s3cret", timeout=TIMEOUT, max_retries=0)
        assert client.models.list().data[0].id == MODEL


@pytest.mark.parametrize(("option", "named"), [(["--cors-origin", "app.example"], "--cors-origin"),
                                               (["--api-key", " "], "--api-key")])
def test_bad_cors_origin_or_empty_key_is_a_one_line_error(tmp_path, option, named):
    result = _serve("--model", str(tmp_path), "--port", str(_free_port()), *option)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert named in result.stderr and "Traceback" not in result.stderr


def test_a_client_leaving_during_its_upload_is_one_log_line(direct, caplog, serve_in_thread):
    app = create_app(direct.model, direct.processor, ServerSettings(model_name=MODEL, max_new_tokens=4))
    with caplog.at_level(logging.INFO), serve_in_thread(app) as base:
        host, port = base.removeprefix("http://").split(":")
        for _ in range(3):
            with socket.create_connection((host, int(port))) as sock:
                sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                             b"Content-Length: 100000\r\n\r\n" + b"{" * 1000)
                time.sleep(0.1)
        time.sleep(0.3)
        assert httpx.get(f"{base}/health").status_code == 200  # still serving
    said = [r for r in caplog.records if "disconnected while sending" in r.getMessage()]
    assert len(said) == 3 and not any(r.exc_info for r in caplog.records)
    assert "Traceback" not in caplog.text


def test_a_prompt_over_the_limit_or_the_context_gets_400_before_any_generation(direct, monkeypatch, serve_in_thread):
    context = direct.model.llm.config.max_position_embeddings
    long_text = "hello " * (context + 10)
    calls = []
    real = direct.model.decode_step
    monkeypatch.setattr(direct.model, "decode_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    settings = ServerSettings(model_name=MODEL, max_new_tokens=2, max_prompt_tokens=30)
    with serve_in_thread(create_app(direct.model, direct.processor, settings)) as base:
        url = f"{base}/v1/chat/completions"
        body = {"model": MODEL, "messages": [{"role": "user", "content": "hello " * 40}], "max_tokens": 2}
        error = _error(httpx.post(url, json=body, timeout=TIMEOUT), 400)
        assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
        assert re.search(r"the prompt is \d+ tokens .* at most 30 tokens", error["message"]), error["message"]
        assert not calls
        short = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
        assert httpx.post(url, json=short, timeout=TIMEOUT).status_code == 200 and calls  # the spy sees steps
    settings = ServerSettings(model_name=MODEL, max_new_tokens=2)  # no flag: the LLM's own context
    with serve_in_thread(create_app(direct.model, direct.processor, settings)) as base:
        body = {"model": MODEL, "messages": [{"role": "user", "content": long_text}], "max_tokens": 2}
        error = _error(httpx.post(f"{base}/v1/chat/completions", json=body, timeout=TIMEOUT), 400)
        assert f"at most {context - 1} tokens" in error["message"]


def test_a_stop_signal_answers_waiting_requests_503_and_lets_the_running_one_finish(direct, monkeypatch):
    real = direct.model.decode_step
    monkeypatch.setattr(direct.model, "decode_step", lambda *a, **k: time.sleep(0.75) or real(*a, **k))
    settings = ServerSettings(model_name=MODEL, max_new_tokens=4, max_batch=1, batch_wait_ms=0)
    app = create_app(direct.model, direct.processor, settings)
    engine = app.state.engine
    sock = listen(HOST, 0)
    server = DrainingServer(uvicorn.Config(app, log_level="warning"), engine)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    url = f"http://{HOST}:{sock.getsockname()[1]}/v1/chat/completions"
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    replies: dict[int, httpx.Response] = {}

    def post(k: int) -> None:
        replies[k] = httpx.post(url, json=body, timeout=TIMEOUT)

    def until(condition) -> None:
        deadline = time.monotonic() + 30
        while not condition():
            assert time.monotonic() < deadline, engine.stats()
            time.sleep(0.01)

    try:
        until(lambda: server.started)
        posts = [threading.Thread(target=post, args=(0,))]
        posts[0].start()
        until(lambda: engine.stats()["requests"] == 1)  # the first runs (sleeping in each step)
        posts += [threading.Thread(target=post, args=(k,)) for k in (1, 2)]
        for p in posts[1:]:
            p.start()
        until(lambda: engine.stats()["waiting"] == 2)
        server.handle_exit(signal.SIGTERM, None)
        for p in posts:
            p.join(timeout=TIMEOUT)
        thread.join(timeout=30)
    finally:
        server.should_exit = True
        sock.close()
    assert replies[0].status_code == 200 and replies[0].json()["choices"][0]["finish_reason"]
    for k in (1, 2):
        error = _error(replies[k], 503)
        assert error["code"] == "shutting_down", error
    assert not thread.is_alive()


def test_sigterm_stops_a_real_server_with_exit_code_0(checkpoint, tmp_path):
    port = _free_port()
    command = [sys.executable, "-m", "eardrum.cli", "serve", "--model", str(checkpoint), "--host", HOST, "--port",
               str(port), "--model-name", MODEL]
    with open(tmp_path / "log", "wb") as out:
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=ENV)
    try:
        for _ in range(240):
            try:
                if httpx.get(f"http://{HOST}:{port}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.25)
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, (tmp_path / "log").read_text()
    finally:
        if process.poll() is None:
            process.kill()
    assert "draining" in (tmp_path / "log").read_text()


def test_a_server_row_that_loops_ends_with_finish_reason_stop_like_every_other_path(chatml_tokenizer):
    from types import SimpleNamespace

    from eardrum.common.generation import GenerationSettings
    from eardrum.inference.batch_engine import Finished, _Row

    events = []
    options = SimpleNamespace(max_tokens=100, stop=())
    for stream in (False, True):
        events.clear()
        job = SimpleNamespace(cancelled=False, options=options, stream=stream, emit=events.append)
        row = _Row(job, chatml_tokenizer, frozenset({0}))
        loop = chatml_tokenizer.encode(" no,", add_special_tokens=False)
        for token in chatml_tokenizer.encode("Please", add_special_tokens=False) + loop * 20:
            row.push(token)
        row.finish()
        done = events[-1]
        assert isinstance(done, Finished) and done.finish_reason == "stop"
        repeats = GenerationSettings().stop_loops
        assert done.text.count("no,") == repeats and done.completion_tokens == len(row.ids)
        if stream:
            assert "".join(e for e in events if isinstance(e, str)) == done.text



def test_a_long_answer_does_not_hold_back_a_short_request_and_goes_on_unchanged(direct, monkeypatch):
    """Continuous batching: a short request sent while a 200-token answer runs joins the running batch at
    once and is answered long before it ends; the long row goes on to the same tokens as alone."""
    from types import SimpleNamespace

    from eardrum.common import decoding
    from eardrum.inference import batch_engine
    from eardrum.inference.batch_engine import GenerationEngine
    from eardrum.inference.openai_schema import SamplingOptions

    # no end of turn and no loop stop: every row runs to its max_tokens (the only stop id is the audio
    # placeholder, which the model never writes)
    never = direct.model.placeholder_id
    monkeypatch.setattr(decoding, "stop_token_ids", lambda tokenizer, config=None: [never])
    monkeypatch.setattr(batch_engine, "LOOP_REPEATS", 0)
    rows: list = []  # every row the engine starts, in order
    real_start = GenerationEngine._start

    def start(self, jobs):
        rows.extend(new := real_start(self, jobs))
        return new

    monkeypatch.setattr(GenerationEngine, "_start", start)
    wave = np.asarray(synth_sound(440.0, 2), dtype=np.float32)
    content = [{"type": "audio", "audio": (wave, 16000)}, {"type": "text", "text": QUESTION}]

    def until(condition) -> None:
        deadline = time.monotonic() + 120
        while not condition():
            assert time.monotonic() < deadline
            time.sleep(0.005)

    def run(max_tokens: list[int]):
        """Submit one job per entry, each once the first has 2 tokens; returns {k: (Finished, the first job's
        tokens when job k finished)} and the engine's stats."""
        rows.clear()
        results: dict[int, tuple] = {}
        engine = GenerationEngine(direct.model, direct.processor, max_batch=4, batch_wait_s=0)
        engine.stop_ids = frozenset([never])
        engine.start()
        try:
            for k, n in enumerate(max_tokens):
                if k:
                    until(lambda: rows and rows[0].generated >= 2)
                emit = lambda event, k=k: results.__setitem__(k, (event, rows[0].generated))  # noqa: E731
                engine.submit(SimpleNamespace(conversation=[{"role": "user", "content": content}], stream=False,
                                              options=SamplingOptions(n, 0.0), cancelled=False, emit=emit))
            until(lambda: len(results) == len(max_tokens))
        finally:
            engine.close()
        return results, engine.stats()

    alone, _ = run([200])
    both, stats = run([200, 3])
    (short, long_tokens_then), (long, _) = both[1], both[0]
    assert short.finish_reason == "length" and short.completion_tokens == 3
    assert long_tokens_then < 40, long_tokens_then  # a few steps after it was sent, not after the long one's 200
    assert long.completion_tokens == 200 and stats["joined"] == 1 and stats["largest_batch"] == 2
    assert long == alone[0][0]  # decoded beside the short one: the same answer as alone


@pytest.mark.parametrize("mode", ["continuous", "continuous, rebuilt cache", "static"])
def test_mixed_requests_joining_and_leaving_a_running_batch_get_the_answers_they_get_alone(direct, monkeypatch, mode):
    """Requests of different prompts (clips of several lengths, text only), answer lengths and sampling join
    and leave batches as they come and go; each gets the tokens it gets when served alone. "rebuilt cache"
    is the path of models whose cache rows cannot be put side by side: a join prefills the batch again."""
    from types import SimpleNamespace

    from eardrum.common import decoding
    from eardrum.inference import batch_engine
    from eardrum.inference.batch_engine import GenerationEngine
    from eardrum.inference.openai_schema import SamplingOptions

    never = direct.model.placeholder_id  # no end of turn, no loop stop: every row runs to its max_tokens
    monkeypatch.setattr(decoding, "stop_token_ids", lambda tokenizer, config=None: [never])
    monkeypatch.setattr(batch_engine, "LOOP_REPEATS", 0)
    if mode == "continuous, rebuilt cache":
        monkeypatch.setattr(batch_engine, "_plain_layers", lambda cache: None)

    def conversation(k: int) -> list[dict]:
        if k % 4 == 3:
            return [{"role": "user", "content": f"say something about {k} beeps"}]
        freq, beeps = list(TINY_SOUNDS.values())[k % 4]
        wave = np.asarray(synth_sound(freq, beeps, 0.4 + 0.3 * k, phase=k), dtype=np.float32)
        return [{"role": "user", "content": [{"type": "audio", "audio": (wave, 16000)},
                                             {"type": "text", "text": QUESTION}]}]

    requests = [(conversation(k), SamplingOptions(max_tokens=3 + (k * 7) % 25, temperature=0.0 if k % 3 else 0.8,
                                                 top_p=1.0, seed=k)) for k in range(10)]

    def serve(batch: list[int], max_batch: int, continuous: bool = True) -> tuple[dict, dict]:
        """Submit the requests in `batch` in three waves, each once the engine has decoded a few more steps."""
        results: dict[int, Finished] = {}
        engine = GenerationEngine(direct.model, direct.processor, max_batch=max_batch, batch_wait_s=0,
                                  continuous=continuous)
        engine.stop_ids = frozenset([never])
        engine.start()
        deadline = time.monotonic() + 120
        try:
            for wave_start in range(0, len(batch), 4):
                steps = engine.stats()["steps"]
                while wave_start and engine.stats()["steps"] < steps + 3 and len(results) < wave_start:
                    assert time.monotonic() < deadline
                    time.sleep(0.001)
                for k in batch[wave_start : wave_start + 4]:
                    conv, options = requests[k]
                    engine.submit(SimpleNamespace(conversation=conv, stream=False, options=options, cancelled=False,
                                                  emit=lambda event, k=k: results.__setitem__(k, event)))
            while len(results) < len(batch):
                assert time.monotonic() < deadline, (engine.stats(), sorted(results))
                time.sleep(0.005)
        finally:
            engine.close()
        return results, engine.stats()

    alone = {k: serve([k], max_batch=1)[0][k] for k in range(len(requests))}
    together, stats = serve(list(range(len(requests))), max_batch=6, continuous=mode != "static")
    assert all(isinstance(r, Finished) for r in together.values()), together
    assert {k: (r.text, r.completion_tokens) for k, r in together.items()} == {
        k: (r.text, r.completion_tokens) for k, r in alone.items()}
    assert all(together[k].completion_tokens == requests[k][1].max_tokens for k in together)
    assert stats["largest_batch"] > 1 and stats["requests"] == len(requests)
    assert (stats["joined"] > 0) == (mode != "static"), stats
