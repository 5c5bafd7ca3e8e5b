"""Checkpoints: a small directory, bit-identical round trip, processor without weights, merged export."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from eardrum.adapters.checkpoint import (
    CheckpointError,
    build_audio_llm,
    load_pretrained,
    load_processor,
    merge_lora,
    read_checkpoint_meta,
)
from eardrum.adapters.config import AudioLLMConfig, ConfigError
from eardrum.adapters.model import AudioLLM
from eardrum.adapters.processor import AudioProcessor
from eardrum.adapters.projectors import ProjectorConfig


def conversation(seconds=0.8, seed=0):
    wave = (np.random.default_rng(seed).standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32)
    return [
        {"role": "user", "content": [{"type": "audio", "audio": (wave, 16000)}, {"type": "text", "text": "what?"}]},
        {"role": "assistant", "content": "a dog"},
    ]


@pytest.fixture(scope="module")
def saved(model_dirs, tmp_path_factory):
    """A model with a trained-looking projector, learned layer weights and a non-zero LoRA, saved."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    cfg = AudioLLMConfig(
        encoder=model_dirs["whisper"], llm=model_dirs["llama"], projector=ProjectorConfig(name="conv"),
        encoder_layer="weighted", audio_begin="<a>", time_markers=True,
    )
    model, processor = build_audio_llm(cfg)
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    model.llm = get_peft_model(model.llm, lora)
    with torch.no_grad():
        model.encoder.select.weights.normal_()
    directory = model.save_pretrained(tmp_path_factory.mktemp("ckpt") / "model", processor)
    return model, processor, directory


def test_directory_holds_only_trained_parts_as_safetensors(saved):
    _, _, directory = saved
    files = {p.relative_to(directory).as_posix() for p in directory.rglob("*") if p.is_file()}
    assert {"eardrum_config.json", "projector.safetensors", "llm_adapter/adapter_model.safetensors",
            "llm_adapter/adapter_config.json", "tokenizer.json", "preprocessor_config.json"} <= files
    assert not [f for f in files if f.endswith((".bin", ".pt", ".pth", ".pkl", ".ckpt"))]
    assert "model.safetensors" not in files  # no frozen base weights
    meta = read_checkpoint_meta(directory)
    assert meta["config"]["encoder_layer"] == "weighted" and meta["has_lora"] is True
    assert set(meta["versions"]) == {"eardrum", "torch", "transformers", "peft"}


def test_round_trip_gives_bit_identical_logits(saved):
    model, processor, directory = saved
    batch = processor([conversation(), conversation(1.7, seed=1)])
    loaded = AudioLLM.from_pretrained(directory)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, loaded(**batch).logits)
    assert torch.equal(loaded.encoder.select.weights, model.encoder.select.weights)


def test_models_carry_no_processor_and_from_pretrained_returns_the_model_only(saved):
    model, _, directory = saved
    loaded, processor = load_pretrained(directory)
    assert isinstance(processor, AudioProcessor)
    assert not hasattr(model, "processor") and not hasattr(loaded, "processor")
    assert type(AudioLLM.from_pretrained(directory)) is AudioLLM


def test_processor_loads_without_model_weights_and_matches(saved):
    _, processor, directory = saved
    again = load_processor(directory)
    a, b = processor([conversation()]), again([conversation()])
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert again.placeholder_id == processor.placeholder_id


def test_merge_lora_exports_a_plain_llm_with_the_same_logits(saved, tmp_path):
    from transformers import AutoModelForCausalLM

    model, _, directory = saved
    out = merge_lora(directory, tmp_path / "merged")
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert not hasattr(plain, "peft_config")
    ids = torch.tensor([[5, 17, 42, 99, 3]])
    with torch.no_grad():
        torch.testing.assert_close(plain(ids).logits, model.llm(input_ids=ids).logits, atol=1e-5, rtol=0)
    assert (out / "tokenizer.json").is_file()


def test_missing_or_broken_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="eardrum_config.json is missing"):
        load_pretrained(tmp_path)
    (tmp_path / "eardrum_config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_checkpoint_meta(tmp_path)


def test_config_reports_every_problem_at_once():
    bad = AudioLLMConfig(encoder="", llm="x", encoder_layer="first", window_seconds=-1, label_mode="everything",
                         projector=ProjectorConfig(name="nope"))
    with pytest.raises(ConfigError) as err:
        bad.validate()
    text = str(err.value)
    for field in ("encoder:", "encoder_layer:", "window_seconds:", "label_mode:", "projector:"):
        assert field in text
    with pytest.raises(ConfigError, match="unknown audio LLM config keys \\['colour'\\]"):
        AudioLLMConfig.from_dict({"encoder": "a", "llm": "b", "colour": 1})


def test_projector_weights_that_do_not_fit_the_config_are_refused(saved, tmp_path):
    import shutil

    _, _, directory = saved
    copy = tmp_path / "copy"
    shutil.copytree(directory, copy)
    meta = json.loads((copy / "eardrum_config.json").read_text())
    meta["config"]["projector"]["name"] = "mlp"
    (copy / "eardrum_config.json").write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="projector weights do not match"):
        load_pretrained(copy)


def _copy(saved, tmp_path, name="copy"):
    import shutil

    copy = tmp_path / name
    shutil.copytree(saved[2], copy)
    return copy


def test_a_checkpoint_cannot_switch_on_remote_code(saved, model_dirs, tmp_path, monkeypatch, caplog):
    """A config saying trust_remote_code=true with an LLM folder that has an auto_map: the folder's Python
    runs only when the caller asks for it."""
    import logging
    import shutil

    llm = tmp_path / "llm"
    shutil.copytree(model_dirs["llama"], llm)
    marker = tmp_path / "remote-code-ran"
    (llm / "evil.py").write_text(
        "import os, pathlib\npathlib.Path(os.environ['EARDRUM_TEST_MARKER']).write_text('ran')\n"
        "from transformers import LlamaForCausalLM\n\n\nclass EvilModel(LlamaForCausalLM):\n    pass\n"
    )
    config = json.loads((llm / "config.json").read_text())
    (llm / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoModelForCausalLM": "evil.EvilModel"}}))
    copy = _copy(saved, tmp_path)
    meta = json.loads((copy / "eardrum_config.json").read_text())
    meta["config"].update(llm=str(llm), trust_remote_code=True)
    (copy / "eardrum_config.json").write_text(json.dumps(meta))
    monkeypatch.setenv("EARDRUM_TEST_MARKER", str(marker))
    with caplog.at_level(logging.WARNING, logger="eardrum.adapters.checkpoint"):
        model, _ = load_pretrained(copy)
    assert not marker.exists()
    assert "says trust_remote_code=true; ignored" in caplog.text
    assert model.config.trust_remote_code is False
    load_pretrained(copy, trust_remote_code=True)  # asked for by the caller: now it runs
    assert marker.read_text() == "ran"


@pytest.mark.parametrize("damage,message", [
    (lambda d: (d / "projector.safetensors").write_bytes((d / "projector.safetensors").read_bytes()[:100]),
     r"projector\.safetensors: not a readable safetensors file"),
    (lambda d: (d / "projector.safetensors").write_bytes(b""), r"projector\.safetensors: not a readable safetensors"),
    (lambda d: (d / "llm_adapter" / "adapter_model.safetensors").write_bytes(b"\x00garbage" * 50),
     r"adapter_model\.safetensors: not a readable safetensors file"),
    (lambda d: (d / "llm_adapter" / "adapter_model.bin").write_bytes(b"pickle"),
     r"adapter_model\.bin: pickled weights are refused"),
    (lambda d: (d / "eardrum_config.json").write_text("[1, 2]"),
     r"eardrum_config\.json: expected a JSON object, got a list"),
    (lambda d: (d / "eardrum_config.json").write_text('{"config": 3}'),
     r"eardrum_config\.json: missing or malformed \['config', 'frame_spec', 'placeholder_id'\]"),
])
def test_a_damaged_checkpoint_names_the_file_in_load_and_info(saved, tmp_path, damage, message):
    from eardrum.adapters.summary import describe_checkpoint

    copy = _copy(saved, tmp_path)
    damage(copy)
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(copy)
    with pytest.raises(CheckpointError, match=message):
        describe_checkpoint(copy)


def test_merge_lora_refuses_an_existing_file_as_its_output(saved, tmp_path):
    target = tmp_path / "existing.wav"
    target.write_bytes(b"RIFF")
    with pytest.raises(CheckpointError, match=r"existing\.wav: exists and is not a folder"):
        merge_lora(saved[2], target)
    assert target.read_bytes() == b"RIFF"
