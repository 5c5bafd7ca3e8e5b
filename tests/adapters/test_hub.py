"""Hub round trip: a checkpoint loads from a Hugging Face cache laid out as huggingface_hub lays it out (offline),
by id and by revision; `eardrum push` writes the card and the file list it would upload."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from eardrum.adapters import checkpoint, hub, sources
from eardrum.adapters.checkpoint import CheckpointError, build_audio_llm, load_pretrained
from eardrum.adapters.config import AudioLLMConfig
from eardrum.adapters.hub import plan_push, resolve_checkpoint, split_revision, stage_push
from eardrum.adapters.projectors import ProjectorConfig
from eardrum.adapters.summary import describe_checkpoint
from eardrum.inference.chat import AudioChat


def lay_out_hub_cache(cache: Path, repo_id: str, folder: Path, commit: str, refs: tuple[str, ...] = ("main",)) -> Path:
    """Put `folder` into `cache` as huggingface_hub stores a downloaded model snapshot: content-addressed blobs,
    a snapshot folder of links to them named by the commit, and refs naming the commit."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    for file in sorted(p for p in folder.rglob("*") if p.is_file()):
        data = file.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / file.relative_to(folder)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    for ref in refs:
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture(scope="module")
def two_versions(model_dirs, tmp_path_factory):
    """Two checkpoints of one config whose projectors differ, saved as folders."""
    cfg = AudioLLMConfig(encoder=model_dirs["whisper"], llm=model_dirs["llama"], projector=ProjectorConfig(name="mlp"))
    folders = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        model, processor = build_audio_llm(cfg)
        folders.append(model.save_pretrained(tmp_path_factory.mktemp(f"v{seed}") / "model", processor))
    return folders


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, two_versions):
    """An offline Hub cache holding org/tiny-ears: commit A tagged v1, commit B on main."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    lay_out_hub_cache(cache, "org/tiny-ears", two_versions[0], "a" * 40, refs=("v1",))
    lay_out_hub_cache(cache, "org/tiny-ears", two_versions[1], "b" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub, "_resolved", {})
    return cache


def projector_of(model) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.projector.parameters()])


def test_a_hub_id_loads_from_the_cache_by_branch_tag_and_commit(hub_cache, two_versions):
    main = load_pretrained("org/tiny-ears")[0]
    tagged = load_pretrained("org/tiny-ears@v1")[0]
    by_commit = load_pretrained("org/tiny-ears", revision="a" * 40)[0]
    local = [load_pretrained(folder)[0] for folder in two_versions]
    assert torch.equal(projector_of(main), projector_of(local[1]))
    assert torch.equal(projector_of(tagged), projector_of(local[0]))
    assert torch.equal(projector_of(by_commit), projector_of(local[0]))
    assert not torch.equal(projector_of(main), projector_of(tagged))
    assert resolve_checkpoint("org/tiny-ears@v1") == hub_cache / "models--org--tiny-ears" / "snapshots" / ("a" * 40)


def test_audio_chat_from_a_hub_id_answers_as_from_the_folder(hub_cache, two_versions):
    wave = (np.random.default_rng(0).standard_normal(8000) * 0.1).astype(np.float32)
    answers = []
    for ref in ("org/tiny-ears", str(two_versions[1])):
        chat = AudioChat.from_pretrained(ref, device="cpu")
        answers.append(chat.answer((wave, 16000), "what is this?"))
    assert answers[0] == answers[1]


def test_what_cannot_be_had_is_named(hub_cache, tmp_path):
    with pytest.raises(CheckpointError, match=r"org/missing.*not in the Hugging Face cache.*HF_HUB_OFFLINE"):
        load_pretrained("org/missing")
    with pytest.raises(CheckpointError, match=r"not in the Hugging Face cache"):
        load_pretrained("org/tiny-ears@no-such-branch")
    with pytest.raises(CheckpointError, match=r"no such folder.*Hub id 'org/name\[@revision\]'"):
        load_pretrained(str(tmp_path / "not" / "here"))
    with pytest.raises(CheckpointError, match=r"v1.*revision='v2' was given too"):
        resolve_checkpoint("org/tiny-ears@v1", revision="v2")
    (tmp_path / "folder").mkdir()
    with pytest.raises(CheckpointError, match="a local folder has no revision"):
        resolve_checkpoint(tmp_path / "folder", revision="v1")
    not_ours = tmp_path / "plain"
    not_ours.mkdir()
    (not_ours / "config.json").write_text("{}")
    lay_out_hub_cache(hub_cache, "org/plain-llm", not_ours, "c" * 40)
    with pytest.raises(CheckpointError, match="org/plain-llm holds no eardrum_config.json"):
        load_pretrained("org/plain-llm")


def test_a_folder_wins_over_a_hub_id_of_the_same_name(hub_cache, two_versions, tmp_path, monkeypatch):
    shutil.copytree(two_versions[0], tmp_path / "org" / "tiny-ears")
    monkeypatch.chdir(tmp_path)
    assert resolve_checkpoint("org/tiny-ears") == Path("org/tiny-ears")


def test_split_revision_and_light_import():
    assert split_revision("org/name@v1.2") == ("org/name", "v1.2")
    assert split_revision("org/name") == ("org/name", None)
    assert hub.CONFIG_NAME == checkpoint.CONFIG_NAME and hub.TINY_PREFIX == sources.TINY_PREFIX
    # the command line checks --model with this module before torch is imported
    code = "import sys, eardrum.adapters.hub; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0


def test_eardrum_info_reads_a_hub_id_through_the_environment(hub_cache, two_versions):
    env = {**os.environ, "HF_HUB_CACHE": str(hub_cache), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-m", "eardrum.cli", "info", "org/tiny-ears@v1", "--json"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["checkpoint"].endswith("a" * 40)
    done = subprocess.run([sys.executable, "-m", "eardrum.cli", "info", "org/absent"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and "org/absent" in done.stderr and "Traceback" not in done.stderr


# ------------------------------------------------------------------------------------------------ push
@pytest.fixture
def trained_run(model_dirs, tmp_path):
    """A run folder as `eardrum train` leaves it: recipe.yaml, summary.json, final/ with a LoRA checkpoint."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = AudioLLMConfig(encoder=model_dirs["whisper"], llm=model_dirs["llama"], projector=ProjectorConfig(name="mlp"))
    model, processor = build_audio_llm(cfg)
    model.llm = get_peft_model(model.llm, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    run = tmp_path / "run"
    final = model.save_pretrained(run / "final", processor)
    (run / "recipe.yaml").write_text("model:\n  projector: {name: mlp}\ntrain:\n  max_steps: 7\n")
    (run / "summary.json").write_text(json.dumps({"steps": 7, "examples": 56, "seconds": 12.5,
                                                  "eval": {"wer": 0.125, "caption_bleu4": 0.31}}))
    return final


def test_push_plan_refuses_local_bases_until_named_on_the_hub(trained_run, model_dirs):
    with pytest.raises(CheckpointError, match=r"the encoder is the local path .*--encoder ORG/NAME"):
        plan_push(trained_run, "me/ears")
    with pytest.raises(CheckpointError, match="the llm is the local path"):
        plan_push(trained_run, "me/ears", encoder="openai/whisper-tiny.en")
    with pytest.raises(CheckpointError, match="expected a Hub id 'org/name'"):
        plan_push(trained_run, "not a repo", encoder="openai/whisper-tiny.en", llm="org/llm")
    with pytest.raises(CheckpointError, match="--llm '/tmp/x'"):
        plan_push(trained_run, "me/ears", encoder="openai/whisper-tiny.en", llm="/tmp/x")
    plan = plan_push(trained_run, "me/ears", allow_local_bases=True)
    assert plan.config["config"]["encoder"] == model_dirs["whisper"]


def test_push_plan_card_and_files(trained_run, tmp_path):
    llm = "HuggingFaceTB/SmolLM2-135M-Instruct"
    plan = plan_push(trained_run, "me/ears", encoder="openai/whisper-tiny.en", llm=llm, license="apache-2.0")
    assert plan.files == sorted(["README.md", "eardrum_config.json", "projector.safetensors",
                                 "llm_adapter/adapter_config.json", "llm_adapter/adapter_model.safetensors",
                                 *[p.relative_to(trained_run).as_posix() for p in trained_run.glob("*")
                                   if p.is_file() and p.name not in ("eardrum_config.json", "projector.safetensors")]])
    card = plan.card
    assert card.startswith("---\nlibrary_name: eardrum\nlicense: apache-2.0\nbase_model:\n- openai/whisper-tiny.en\n"
                           "- HuggingFaceTB/SmolLM2-135M-Instruct\n")
    assert 'AudioChat.from_pretrained("me/ears")' in card
    assert "| speech encoder | `openai/whisper-tiny.en` |" in card and f"| LLM | `{llm}` |" in card
    assert "r=4, alpha=8" in card and "q_proj, v_proj" in card
    rate = describe_checkpoint(trained_run)["audio_tokens_per_second"]
    assert f"audio tokens per second of audio: {rate:g}\n" in card
    assert "| wer | 0.125 |" in card and "steps: 7" in card
    assert "max_steps: 7" in card  # the recipe
    assert "Trained on a local copy of the encoder" in card
    staged = stage_push(plan, tmp_path / "staged")
    assert sorted(p.relative_to(staged).as_posix() for p in staged.rglob("*") if p.is_file()) == plan.files
    pushed = json.loads((staged / "eardrum_config.json").read_text())
    assert pushed["config"]["encoder"] == "openai/whisper-tiny.en"
    assert pushed["config"]["llm"] == llm
    saved = json.loads((trained_run / "eardrum_config.json").read_text())
    assert pushed["config"]["projector"] == saved["config"]["projector"]


def test_push_refuses_a_pickled_file(trained_run):
    (trained_run / "llm_adapter" / "adapter_model.bin").write_bytes(b"\x80\x04")
    with pytest.raises(CheckpointError, match="pickled weights are refused"):
        plan_push(trained_run, "me/ears", allow_local_bases=True)


def test_eardrum_push_dry_run(trained_run):
    done = subprocess.run([sys.executable, "-m", "eardrum.cli", "push", str(trained_run), "me/ears", "--dry-run",
                           "--encoder", "openai/whisper-tiny.en", "--llm", "org/llm", "--revision", "v2"],
                          env={**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "files for me/ears@v2 (nothing uploaded):" in done.stdout and "  projector.safetensors" in done.stdout
    assert "library_name: eardrum" in done.stdout
