"""Soak `eardrum serve`: a real server process on loopback under a bounded storm of mixed clients.

Client kinds, each a few threads looping until the time is up:
- normal: a short question about a 1 s clip, answered (200 with text): its latency is what is reported;
- streaming: the same with `stream: true`, read to `data: [DONE]`;
- longest: a prompt of the server's `--max-prompt-tokens` asking for `--max-new-tokens` (the longest request
  the server takes), so normal requests are measured while one runs;
- oversized: a body over `--max-request-bytes` (413) and a prompt over `--max-prompt-tokens` (400);
- disconnecting: half a body, then the socket closes;
- slow: a request head sent in pieces slower than `--header-timeout`, and a body slower than `--body-timeout`.
Reported: per kind, requests sent and those answered as they must be; normal latency p50/p99 in the storm and
with the normal clients alone; the server's RSS and open file descriptors after a warm-up storm and after the
measured one (each once idle; with `--rounds N` the measured storm runs N times, read after each, to see
whether memory levels off); its log's size in bytes. A connection flood is not one of the kinds: past
--max-connections it is answered 503.

    python -m benchmarks.server_soak --seconds 60 --out benchmarks/results/server-soak-cpu-tiny.json

Without `--model`, a tiny checkpoint is trained for a few steps first (`eardrum.demo.smoke`).
"""

from __future__ import annotations

import argparse
import base64
import http.client
import io
import json
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import soundfile as sf

from .report_io import emit, machine

HOST = "127.0.0.1"
MODEL = "soak"
# The server's defaults for prompt and answer lengths (the LLM's context, 512 new tokens), so "longest" is the
# longest request a default server takes; smaller body and time limits keep the storm's hostile kinds quick.
LIMITS = {"max_request_bytes": 200_000, "max_prompt_tokens": 2047, "max_new_tokens": 512, "header_timeout": 2.0,
          "body_timeout": 4.0}
HOSTILE_PAUSE_S = 0.05  # between an oversized or disconnecting client's requests: a bad client, not a flood
TARGETS = {"normal_failures": 0, "p99_over_p50": 10.0, "rss_growth": 0.10, "fd_growth": 0.10, "log_bytes": 1_000_000}


def _wav(seconds: float, freq: float = 440.0) -> str:
    t = np.arange(int(seconds * 16000)) / 16000
    buffer = io.BytesIO()
    sf.write(buffer, (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32), 16000, format="WAV", subtype="PCM_16")
    return base64.b64encode(buffer.getvalue()).decode()


def _body(text: str, clip: str | None, max_tokens: int, stream: bool = False) -> bytes:
    content = [{"type": "text", "text": text}]
    if clip is not None:
        content.insert(0, {"type": "input_audio", "input_audio": {"data": clip, "format": "wav"}})
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}], "max_tokens": max_tokens,
                       "temperature": 0, "stream": stream}).encode()


def _post(port: int, body: bytes, timeout: float = 60.0) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


class Tally:
    """Per kind: requests sent and answered as they must be; the normal requests' latencies."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.kinds: dict[str, dict[str, int]] = {}
        self.latencies: list[float] = []
        self.surprises: list[str] = []

    def add(self, kind: str, ok: bool, note: str = "", latency: float | None = None) -> None:
        with self.lock:
            row = self.kinds.setdefault(kind, {"sent": 0, "as_expected": 0})
            row["sent"] += 1
            row["as_expected"] += ok
            if not ok and len(self.surprises) < 20:
                self.surprises.append(f"{kind}: {note}"[:300])
            if latency is not None and ok:
                self.latencies.append(latency)


def _normal(port: int, clip: str, tally: Tally, turn: int = 0) -> None:
    start = time.perf_counter()
    try:
        status, raw = _post(port, _body("What do you hear?", clip, 8))
        ok = status == 200 and isinstance(json.loads(raw)["choices"][0]["message"]["content"], str)
        tally.add("normal", ok, f"{status} {raw[:200]!r}", time.perf_counter() - start)
    except (OSError, ValueError, KeyError) as err:
        tally.add("normal", False, repr(err))


def _streaming(port: int, clip: str, tally: Tally, turn: int = 0) -> None:
    try:
        status, raw = _post(port, _body("What do you hear?", clip, 8, stream=True))
        tally.add("streaming", status == 200 and raw.rstrip().endswith(b"data: [DONE]"), f"{status} {raw[-200:]!r}")
    except OSError as err:
        tally.add("streaming", False, repr(err))


def _longest(port: int, prompt: str, tally: Tally, turn: int = 0) -> None:
    try:
        status, raw = _post(port, _body(prompt, None, LIMITS["max_new_tokens"]), timeout=120)
        tally.add("longest", status == 200, f"{status} {raw[:200]!r}")
    except OSError as err:
        tally.add("longest", False, repr(err))


def _oversized(port: int, too_long: str, tally: Tally, turn: int = 0) -> None:
    try:
        if turn % 2:
            status, raw = _post(port, b'{"model": "soak", "pad": "' + b"x" * LIMITS["max_request_bytes"] + b'"}')
            tally.add("oversized_body", status == 413, f"{status} {raw[:200]!r}")
        else:
            status, raw = _post(port, _body(too_long, None, 4))
            ok = status == 400 and json.loads(raw)["error"]["code"] == "context_length_exceeded"
            tally.add("oversized_prompt", ok, f"{status} {raw[:200]!r}")
    except (OSError, ValueError, KeyError) as err:
        tally.add("oversized", False, repr(err))


def _raw_head(body_length: int) -> bytes:
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {HOST}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {body_length}\r\n\r\n").encode()


def _disconnecting(port: int, clip: str, tally: Tally, turn: int = 0) -> None:
    body = _body("What do you hear?", clip, 8)
    try:
        with socket.create_connection((HOST, port), timeout=10) as sock:
            sock.sendall(_raw_head(len(body)) + body[: len(body) // 2])
        tally.add("disconnecting", True)
    except OSError as err:
        tally.add("disconnecting", False, repr(err))


def _slow(port: int, tally: Tally, turn: int = 0) -> None:
    """A head dripped slower than the head deadline (closed by the server), or a body slower than the body
    deadline (408)."""
    try:
        with socket.create_connection((HOST, port), timeout=LIMITS["body_timeout"] + 10) as sock:
            if turn % 2:
                head = _raw_head(100)
                for k in range(0, len(head), 8):
                    sock.sendall(head[k : k + 8])
                    time.sleep(LIMITS["header_timeout"] / 4)
                got = sock.recv(65536)
                tally.add("slow_head", got == b"", f"answered {got[:100]!r}")
            else:
                sock.sendall(_raw_head(100) + b'{"model": ')
                got = sock.recv(65536)
                tally.add("slow_body", got.startswith(b"HTTP/1.1 408"), f"answered {got[:100]!r}")
    except (BrokenPipeError, ConnectionResetError):
        tally.add("slow_head" if turn % 2 else "slow_body", bool(turn % 2), "reset")  # closed under the drip
    except OSError as err:
        tally.add("slow", False, repr(err))


def _longest_prompt(port: int, too_long: str) -> str:
    """The longest run of "word " the server still takes: its 400 to `too_long` says how many tokens that was."""
    status, raw = _post(port, _body(too_long, None, 4))
    message = json.loads(raw)["error"]["message"] if status == 400 else ""
    if "the prompt is " not in message:
        raise RuntimeError(f"an over-long prompt: expected 400 context_length_exceeded, got {status} {raw[:300]!r}")
    tokens = int(message.split("the prompt is ")[1].split()[0])
    words = int(too_long.count("word") * LIMITS["max_prompt_tokens"] / tokens)
    while words > 0:
        if _post(port, _body("word " * words, None, 1))[0] == 200:
            return "word " * words
        words = int(words * 0.97)
    raise RuntimeError("no prompt of words fits the server's --max-prompt-tokens")


def _loop(until: float, work, *args) -> None:
    turn = 0
    while time.perf_counter() < until:
        work(*args, turn)  # every worker takes its turn number; some alternate their kind of request
        if work in (_oversized, _disconnecting):
            time.sleep(HOSTILE_PAUSE_S)
        turn += 1


def _storm(port: int, seconds: float, clients: dict[str, int], clip: str, longest: str, too_long: str,
           tally: Tally) -> None:
    """`clients[kind]` threads of each kind, looping for `seconds`."""
    until = time.perf_counter() + seconds
    jobs = {"normal": (_normal, port, clip, tally), "streaming": (_streaming, port, clip, tally),
            "longest": (_longest, port, longest, tally), "oversized": (_oversized, port, too_long, tally),
            "disconnecting": (_disconnecting, port, clip, tally), "slow": (_slow, port, tally)}
    threads = [threading.Thread(target=_loop, args=(until, *jobs[kind]), daemon=True)
               for kind, count in clients.items() for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=seconds + 180)


def _proc(pid: int) -> dict:
    status = Path(f"/proc/{pid}/status").read_text()
    rss_kb = next(int(line.split()[1]) for line in status.splitlines() if line.startswith("VmRSS:"))
    return {"rss_mb": round(rss_kb / 1024, 1), "open_fds": len(os.listdir(f"/proc/{pid}/fd"))}


def _wait_healthy(port: int, process: subprocess.Popen, log: Path) -> None:
    for _ in range(480):
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            conn = http.client.HTTPConnection(HOST, port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.25)
    raise RuntimeError(f"the server did not answer /health within 2 minutes:\n{log.read_text()[-3000:]}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def soak(model_dir: Path, seconds: float, work: Path, clients: dict[str, int], warm_up_s: float = 10.0,
         rounds: int = 1) -> dict:
    """Run the storm against a fresh `eardrum serve` of `model_dir`, `rounds` times in a row (the server's RSS
    and fds read, idle, after each: whether memory levels off); returns the report."""
    port, log = _free_port(), work / "server.log"
    options = ["--model-name", MODEL, "--host", HOST, "--port", str(port), "--max-batch", "8",
               "--max-request-bytes", str(LIMITS["max_request_bytes"]),
               "--max-prompt-tokens", str(LIMITS["max_prompt_tokens"]),
               "--max-new-tokens", str(LIMITS["max_new_tokens"]), "--header-timeout", str(LIMITS["header_timeout"]),
               "--body-timeout", str(LIMITS["body_timeout"]), "--log-level", "info"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "eardrum.cli", "serve", "--model", str(model_dir),
                                    *options], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        _wait_healthy(port, process, log)
        clip = _wav(1.0)
        too_long = "word " * (2 * LIMITS["max_prompt_tokens"])
        longest = _longest_prompt(port, too_long)
        warm = Tally()
        for _ in range(3):
            _longest(port, longest, warm)
        if warm.kinds.get("longest", {}).get("as_expected", 0) < 3:
            raise RuntimeError(f"the longest request does not pass the warm-up: {warm.surprises}")
        # A first, shorter storm: the memory the server takes once under load (pool threads, their allocator
        # arenas, batch buffers) is in `before`, so before/after compares like with like.
        _storm(port, warm_up_s, clients, clip, longest, too_long, Tally())
        time.sleep(LIMITS["header_timeout"] + 2.0)
        alone = Tally()  # the same normal clients with nothing else running: the latency they get on their own
        _storm(port, min(10.0, seconds / 4), {"normal": clients["normal"]}, clip, longest, too_long, alone)
        before = _proc(process.pid)
        log_before = log.stat().st_size
        tally = Tally()
        after_rounds = []
        for _ in range(rounds):
            _storm(port, seconds, clients, clip, longest, too_long, tally)
            time.sleep(LIMITS["header_timeout"] + 2.0)  # idle again: the last slow connections are closed
            after_rounds.append(_proc(process.pid))
        after = after_rounds[-1]
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            exit_code = process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            exit_code = process.wait()
    p50, p99 = _percentiles(tally.latencies)
    alone_p50, alone_p99 = _percentiles(alone.latencies)
    normal = tally.kinds.get("normal", {"sent": 0, "as_expected": 0})
    report = {
        "seconds": seconds, "warm_up_seconds": warm_up_s, "clients": clients, "hostile_pause_s": HOSTILE_PAUSE_S,
        "limits": LIMITS, "kinds": tally.kinds, "surprises": tally.surprises,
        "normal_failures": normal["sent"] - normal["as_expected"],
        "normal_latency_ms": {"p50": p50 and round(1000 * p50, 1), "p99": p99 and round(1000 * p99, 1),
                              "count": len(tally.latencies)},
        "normal_latency_ms_alone": {"p50": alone_p50 and round(1000 * alone_p50, 1),
                                    "p99": alone_p99 and round(1000 * alone_p99, 1), "count": len(alone.latencies)},
        "rounds": rounds, "server_before": before, "server_after": after, "server_after_each_round": after_rounds,
        "log_bytes_during_storm": log.stat().st_size - log_before, "log_bytes": log.stat().st_size,
        "exit_code_on_sigterm": exit_code,
    }
    report["targets"] = {
        "normal_failures == 0": report["normal_failures"] == TARGETS["normal_failures"] and normal["sent"] > 0,
        "p99 < 10x p50": bool(p50 and p99 < TARGETS["p99_over_p50"] * p50),
        "RSS within 10 %": after["rss_mb"] <= (1 + TARGETS["rss_growth"]) * before["rss_mb"],
        "fds within 10 %": after["open_fds"] <= (1 + TARGETS["fd_growth"]) * before["open_fds"],
        "log under 1 MB": report["log_bytes"] < TARGETS["log_bytes"],
    }
    return report


def _percentiles(latencies: list[float]) -> tuple[float | None, float | None]:
    """(median, 99th percentile) of latencies in seconds; (None, None) for none."""
    ordered = sorted(latencies)
    if not ordered:
        return None, None
    return statistics.median(ordered), ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a checkpoint folder (default: a tiny one, trained first)")
    parser.add_argument("--seconds", type=float, default=60.0, help="how long the storm lasts (default: 60)")
    parser.add_argument("--warm-up", type=float, default=10.0, help="seconds of storm before the measured one "
                        "(default: 10)")
    parser.add_argument("--scale", type=int, default=1, help="client threads per kind, multiplied (default: 1)")
    parser.add_argument("--rounds", type=int, default=1, help="measured storms in a row, the server's RSS read "
                        "after each (default: 1)")
    parser.add_argument("--out", type=Path, help="write the report here as JSON")
    args = parser.parse_args()
    if args.rounds < 1:
        parser.error(f"--rounds: expected an integer >= 1, got {args.rounds}")
    clients = {kind: n * args.scale for kind, n in
               {"normal": 4, "streaming": 2, "longest": 1, "oversized": 2, "disconnecting": 2, "slow": 4}.items()}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        model = args.model
        if model is None:
            from eardrum.demo.smoke import run_smoke

            model = Path(run_smoke(work / "smoke", steps=20)["checkpoint"])
        report = soak(model, args.seconds, work, clients, args.warm_up, args.rounds)
    report.update(**machine(), model=str(args.model or "tiny smoke checkpoint (eardrum.demo.smoke, 20 steps)"))
    emit(report, args.out)


if __name__ == "__main__":
    main()
