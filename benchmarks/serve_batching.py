"""Continuous against static batching in `eardrum serve`: many concurrent clients, mixed prompts and answers.

Each of `--clients` threads sends its share of one fixed list of requests, one after another: a clip of
1-10 s (uniform) with a question, or a text-only question, and `max_tokens` drawn log-uniformly from 8 to
256, sampled at temperature 1 with a seed per request. A seeded request decodes the same tokens in any
batch (`eardrum.inference.batch_engine`), so both servers produce the same answers and the same token
counts; only the order of work differs. The list is run against a fresh `eardrum serve --batching
continuous` and a fresh `--batching static`, in turns (`--repeats`, medians reported), on the same
machine in the same run. Reported per mode: output tokens per second (all completion tokens over the wall
time from the first request sent to the last answer), request latency p50/p99 (sent to answered) and the
ratios continuous / static.

    python -m benchmarks.serve_batching --out benchmarks/results/serve-batching-cpu-tiny.json

Without `--model`, a checkpoint of the tiny test bases with random weights is written first: its answers
seldom end before their max_tokens, so the answer lengths are the drawn ones. With a trained `--model` the
answers end where the model ends them.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from .report_io import emit, machine
from .server_soak import HOST, MODEL, _free_port, _percentiles, _post, _wait_healthy, _wav

MODES = ("continuous", "static")
QUESTIONS = (
    "What do you hear?",
    "Describe this recording in a few words.",
    "Is there speech in this clip? Answer and then say what else you hear in it, at length.",
)
TEXT_QUESTIONS = (
    "Tell me a story about a lighthouse.",
    "List some animals.",
    "What is a good name for a cat, and why?",
)
TARGETS = {"tokens_per_s_ratio": 1.5}  # continuous >= 1.5x static, with a lower p99 latency


def workload(requests: int, seed: int) -> list[dict]:
    """The requests both servers get, in order: {"clip_s": seconds or None, "text", "max_tokens", "seed"}."""
    rng = random.Random(seed)
    out = []
    for k in range(requests):
        spoken = rng.random() < 0.75
        out.append({
            "clip_s": round(rng.uniform(1.0, 10.0), 2) if spoken else None,
            "text": rng.choice(QUESTIONS if spoken else TEXT_QUESTIONS),
            "max_tokens": int(round(8 * (256 / 8) ** rng.random())),  # log-uniform in [8, 256]
            "seed": k,
        })
    return out


def _body(request: dict, clips: dict[float, str]) -> bytes:
    content = [{"type": "text", "text": request["text"]}]
    if request["clip_s"] is not None:
        clip = clips[request["clip_s"]]
        content.insert(0, {"type": "input_audio", "input_audio": {"data": clip, "format": "wav"}})
    return json.dumps({"model": MODEL, "messages": [{"role": "user", "content": content}], "temperature": 1.0,
                       "seed": request["seed"], "max_tokens": request["max_tokens"]}).encode()


def _drive(port: int, bodies: list[bytes], clients: int) -> dict:
    """Send `bodies` from `clients` threads (client c sends bodies c, c + clients, ...); returns the wall
    time, each request's latency and completion tokens, and the answers."""
    latency: dict[int, float] = {}
    tokens: dict[int, int] = {}
    answers: dict[int, str] = {}
    failures: list[str] = []

    def client(c: int) -> None:
        for k in range(c, len(bodies), clients):
            sent = time.perf_counter()
            status, raw = _post(port, bodies[k], timeout=600)
            latency[k] = time.perf_counter() - sent
            if status != 200:
                failures.append(f"request {k}: {status} {raw[:200]!r}")
                continue
            reply = json.loads(raw)
            tokens[k] = reply["usage"]["completion_tokens"]
            answers[k] = reply["choices"][0]["message"]["content"]

    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    start = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    if failures:
        raise RuntimeError(f"{len(failures)} requests failed, e.g. {failures[0]}")
    return {"wall_s": wall, "latency": latency, "tokens": tokens, "answers": answers}


def _serve(model_dir: Path, mode: str, max_batch: int, log: Path) -> tuple[subprocess.Popen, int]:
    port = _free_port()
    command = [sys.executable, "-m", "eardrum.cli", "serve", "--model", str(model_dir), "--model-name", MODEL,
               "--host", HOST, "--port", str(port), "--batching", mode, "--max-batch", str(max_batch),
               "--log-level", "warning"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    process = subprocess.Popen(command, stdout=log.open("a"), stderr=subprocess.STDOUT, env=env)
    _wait_healthy(port, process, log)
    return process, port


def compare(model_dir: Path, work: Path, *, requests: int, clients: int, max_batch: int, repeats: int,
            seed: int = 0) -> dict:
    """Run the workload against each mode `repeats` times, in turns; returns the report."""
    plan = workload(requests, seed)
    clips = {r["clip_s"]: _wav(r["clip_s"], freq=200 + 40 * r["clip_s"]) for r in plan if r["clip_s"] is not None}
    bodies = [_body(r, clips) for r in plan]
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for turn in range(repeats):
        for mode in MODES:
            process, port = _serve(model_dir, mode, max_batch, work / f"server-{mode}.log")
            try:
                _drive(port, bodies[: 2 * clients], clients)  # warm-up, not counted
                result = _drive(port, bodies, clients)
            finally:
                process.terminate()
                process.wait(timeout=60)
            total = sum(result["tokens"].values())
            p50, p99 = _percentiles(list(result["latency"].values()))
            runs[mode].append({"wall_s": round(result["wall_s"], 2), "completion_tokens": total,
                               "tokens_per_s": round(total / result["wall_s"], 1),
                               "latency_p50_s": round(p50, 3), "latency_p99_s": round(p99, 3),
                               "answers": result["answers"], "tokens": result["tokens"]})
            print(f"turn {turn + 1}/{repeats} {mode}: {runs[mode][-1]['tokens_per_s']} tokens/s, "
                  f"p50 {p50:.2f} s, p99 {p99:.2f} s", flush=True)
    same = all(run["answers"] == runs["continuous"][0]["answers"] for mode in MODES for run in runs[mode])
    summary = {mode: {key: statistics.median(run[key] for run in runs[mode])
                      for key in ("tokens_per_s", "latency_p50_s", "latency_p99_s", "wall_s")} for mode in MODES}
    c, s = summary["continuous"], summary["static"]
    ratios = {"tokens_per_s": round(c["tokens_per_s"] / s["tokens_per_s"], 2),
              "latency_p50": round(c["latency_p50_s"] / s["latency_p50_s"], 2),
              "latency_p99": round(c["latency_p99_s"] / s["latency_p99_s"], 2)}
    answered = runs["continuous"][0]["tokens"]
    return {
        "workload": {"requests": requests, "clients": clients, "max_batch": max_batch, "seed": seed,
                     "clip_seconds": "uniform 1-10 s on 3 of 4 requests, the rest text only",
                     "max_tokens": "log-uniform 8-256", "sampling": "temperature 1, a seed per request",
                     "completion_tokens": sum(answered.values()),
                     "ended_before_max_tokens": sum(answered[k] < plan[k]["max_tokens"] for k in answered)},
        "median": summary,
        "ratio_continuous_over_static": ratios,
        "same_answers_in_both_modes": same,
        "runs": {mode: [{k: v for k, v in run.items() if k not in ("answers", "tokens")} for run in runs[mode]]
                 for mode in MODES},
        "targets": {"tokens/s >= 1.5x static": ratios["tokens_per_s"] >= TARGETS["tokens_per_s_ratio"],
                    "p99 below static": ratios["latency_p99"] < 1.0},
        "machine": machine(),
    }


def random_checkpoint(folder: Path) -> Path:
    """A checkpoint of the tiny test bases (`eardrum.adapters.tiny`) with a `stack` projector, all weights random."""
    import torch

    from eardrum.adapters.checkpoint import build_audio_llm
    from eardrum.adapters.config import AudioLLMConfig
    from eardrum.adapters.projectors import ProjectorConfig
    from eardrum.adapters.tiny import save_tiny_bases

    torch.manual_seed(0)
    bases = save_tiny_bases(folder / "bases")
    config = AudioLLMConfig(encoder=bases["whisper"], llm=bases["llama"], projector=ProjectorConfig(name="stack"))
    model, processor = build_audio_llm(config)
    return model.save_pretrained(folder / "checkpoint", processor)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a checkpoint folder (default: a tiny one with random weights)")
    parser.add_argument("--requests", type=int, default=128, help="requests per run (default: 128)")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients (default: 32)")
    parser.add_argument("--max-batch", type=int, default=8, help="the servers' --max-batch (default: 8)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per mode, in turns (default: 3)")
    parser.add_argument("--seed", type=int, default=0, help="draws the workload (default: 0)")
    parser.add_argument("--out", type=Path, help="write the report here as JSON")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="eardrum-batching-") as tmp:
        work = Path(tmp)
        model_dir = args.model
        if model_dir is None:
            model_dir = random_checkpoint(work / "random")
        report = compare(model_dir, work, requests=args.requests, clients=args.clients, max_batch=args.max_batch,
                         repeats=args.repeats, seed=args.seed)
    report["model"] = str(args.model) if args.model else "the tiny test bases, random weights (random_checkpoint)"
    emit(report, args.out)


if __name__ == "__main__":
    main()
