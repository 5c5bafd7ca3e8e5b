"""Exact resume after a real SIGKILL, and two-process DDP on CPU (gloo)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "assets" / "tiny_data"


def command(tmp: Path, out: str, *extra: str) -> list[str]:
    return ["-m", "eardrum.cli", "train", str(ROOT / "configs" / "tiny.yaml"), f"output_dir={tmp / out}",
            f"cache.dir={tmp / 'cache'}", f"data.train.0.path={DATA / 'caption.jsonl'}",
            f"data.train.1.path={DATA / 'qa.jsonl'}", "data.eval=[]", "train.epochs=3", "train.save_every=3",
            "train.keep_checkpoints=3", "train.log_examples=true", "lora.dropout=0.1",
            *extra]


def env(tmp: Path) -> dict:
    """CPU only, even beside a GPU (two ranks would otherwise both take CUDA device 0)."""
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "EARDRUM_CACHE": str(tmp / "ecache"),
            "CUDA_VISIBLE_DEVICES": ""}


def read(path: Path, key: str) -> dict[int, object]:
    return {r["step"]: r[key] for r in map(json.loads, path.read_text().splitlines()) if key in r}


STREAMED = [  # the same data read as streams: the killed epoch is read again and its trained batches skipped
    f"data.train=[{{path: {DATA / 'caption.jsonl'}, streaming: true}}, {{path: {DATA / 'qa.jsonl'}}}]",
    "cache.enabled=false", "train.max_steps=18", "data.shuffle_buffer=5", "data.group_buffer=12"]


@pytest.mark.parametrize("streamed", [False, True], ids=["in-memory", "streamed"])
def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path, streamed):
    # lora.dropout > 0 so that the random state must be restored too for the losses to match
    extra = STREAMED if streamed else []
    subprocess.run([sys.executable, *command(tmp_path, "full", *extra)], env=env(tmp_path), check=True,
                   capture_output=True, timeout=300)
    proc = subprocess.Popen([sys.executable, *command(tmp_path, "killed", *extra)], env=env(tmp_path),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    target = tmp_path / "killed" / "checkpoints" / "step-00000009"
    deadline = time.time() + 240
    while not target.is_dir() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    subprocess.run([sys.executable, *command(tmp_path, "killed", *extra, "train.resume_from=latest")],
                   env=env(tmp_path), check=True, capture_output=True, timeout=300)
    full, resumed = tmp_path / "full", tmp_path / "killed"
    full_losses, resumed_losses = read(full / "metrics.jsonl", "loss"), read(resumed / "metrics.jsonl", "loss")
    assert sorted(resumed_losses) == sorted(full_losses) == list(range(1, 19))
    for step, loss in full_losses.items():
        assert resumed_losses[step] == pytest.approx(loss, rel=1e-5, abs=1e-6), step
    full_seen = read(full / "examples-rank0.jsonl", "examples")
    resumed_seen = read(resumed / "examples-rank0.jsonl", "examples")
    assert resumed_seen == full_seen
    for epoch in range(3):  # every example exactly once per epoch
        seen = [w for step, ws in resumed_seen.items() if (step - 1) // 6 == epoch for w in ws]
        assert len(seen) == len(set(seen)) == 24


def test_the_fsdp_config_on_cpu_processes_stops_at_once_saying_why(tmp_path):
    """accelerate runs FSDP only on GPU processes: on CPU ones it refuses configs/accelerate/fsdp.yaml's
    fsdp_sync_module_states and, without it, quietly runs DDP. eardrum says so before any work."""
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "configs" / "accelerate" / "fsdp.yaml"), "--num_processes", "2", "--mixed_precision", "no"]
    result = subprocess.run([*launch, *command(tmp_path, "fsdp", "train.max_steps=2")], env=env(tmp_path),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "asks for FSDP, but there is no GPU" in result.stderr and "configs/accelerate/ddp.yaml" in result.stderr
    assert not (tmp_path / "fsdp" / "final").exists()


def test_two_processes_ddp_on_cpu(tmp_path):
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "configs" / "accelerate" / "ddp.yaml"), "--num_processes", "2"]
    result = subprocess.run([*launch, *command(tmp_path, "ddp", "train.max_steps=4")], env=env(tmp_path),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "ddp"
    rank0, rank1 = read(run / "examples-rank0.jsonl", "examples"), read(run / "examples-rank1.jsonl", "examples")
    assert sorted(rank0) == sorted(rank1) == [1, 2, 3, 4]
    for step in rank0:  # the two ranks see different data
        assert not set(rank0[step]) & set(rank1[step])
    logged = read(run / "metrics.jsonl", "loss")
    assert sorted(logged) == [1, 2, 3, 4]  # one log, written once, with the loss reduced across ranks
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step-00000003", "step-00000004"]
    assert sorted(p.name for p in (run / "checkpoints" / "step-00000004").glob("rng-rank*")) == [
        "rng-rank0.safetensors", "rng-rank1.safetensors"]
    assert (run / "final" / "eardrum_config.json").is_file()


def test_two_processes_share_the_feature_cache_and_the_transcripts_each_window_once(tmp_path):
    """With transcript hints, each rank encodes and decodes its own share of the windows before the first step,
    then reads the others': every window's transcript is decoded once in all, in whole lines of one file."""
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    result = subprocess.run([*launch, *command(tmp_path, "hinted", "train.max_steps=2", "model.transcript_hint=true")],
                            env=env(tmp_path), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    [transcripts] = (tmp_path / "cache" / "transcripts").glob("*.jsonl")
    rows = [json.loads(line) for line in transcripts.read_text().splitlines()]
    clips = {json.loads(line)["audio"] for name in ("caption.jsonl", "qa.jsonl")
             for line in (DATA / name).read_text().splitlines()}
    assert len(rows) == len({r["key"] for r in rows}) == len(clips)  # once each, none lost, none twice
    assert "2 process(es)" in result.stderr and (tmp_path / "hinted" / "final" / "eardrum_config.json").is_file()
    summary = json.loads((tmp_path / "hinted" / "summary.json").read_text())
    assert summary["examples"] == 2 * 2 * 4  # both ranks' examples: 2 steps of 4 per rank
