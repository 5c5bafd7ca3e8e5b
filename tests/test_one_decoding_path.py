"""The same checkpoint and prompt give the same answer through every entry point that generates text.

Chat, batch generation, evaluation, training-time evaluation and self-distillation all decode through
`eardrum.common.decoding`, and the server decodes its continuous batches step by step with the same stop
rules; this checks that none of them drifts (another stop rule, another pad or strip) by asking each one
the same question about the same clip.
"""

from __future__ import annotations

import ast
import base64
import json
from pathlib import Path

import pytest
import soundfile as sf
import torch

from eardrum.adapters.checkpoint import build_audio_llm
from eardrum.adapters.config import AudioLLMConfig
from eardrum.adapters.tiny import synth_sound
from eardrum.common.decoding import answer_conversations
from eardrum.common.generation import GenerationSettings
from eardrum.common.records import DataSource, load_records
from eardrum.inference.chat import AudioChat
from eardrum.inference.evaluation import evaluate_manifest
from eardrum.inference.generate import generate_manifest
from eardrum.training.collate import Collator
from eardrum.training.distill import distill_manifest, text_prompt
from eardrum.training.evaluate import generate_answers

QUESTION = "how many beeps?"
TRANSCRIPT = "how many beeps are there?"
SETTINGS = GenerationSettings(max_new_tokens=8)


@pytest.fixture(scope="module")
def setup(model_dirs, tmp_path_factory):
    root = tmp_path_factory.mktemp("one_path")
    torch.manual_seed(0)
    model, processor = build_audio_llm(AudioLLMConfig(encoder=model_dirs["whisper"], llm=model_dirs["llama"]))
    model.eval()
    sf.write(root / "clip.wav", synth_sound(440.0, 2), 16000, subtype="PCM_16")
    line = {"audio": "clip.wav", "question": QUESTION, "answer": "two", "transcript": TRANSCRIPT}
    (root / "qa.jsonl").write_text(json.dumps(line) + "\n")
    conversation = [{"role": "user", "content": [{"type": "audio", "audio": str(root / "clip.wav")},
                                                 {"type": "text", "text": QUESTION}]}]
    reference = answer_conversations(model, processor, [conversation], SETTINGS)[0]
    assert reference, "the tiny model must say something for the comparison to mean anything"
    return model, processor, root, reference


def test_chat_answers_as_the_decoding_path(setup):
    model, processor, root, reference = setup
    assert AudioChat(model, processor, SETTINGS).answer(str(root / "clip.wav"), QUESTION) == reference


def test_generate_and_eval_answer_as_the_decoding_path(setup, tmp_path):
    model, processor, root, reference = setup
    generate_manifest((model, processor), root / "qa.jsonl", tmp_path / "out.jsonl", settings=SETTINGS, progress=False)
    assert json.loads((tmp_path / "out.jsonl").read_text())["output"] == reference
    evaluate_manifest((model, processor), root / "qa.jsonl", "qa", settings=SETTINGS, out_dir=tmp_path / "eval",
                      progress=False)
    assert json.loads((tmp_path / "eval" / "per_example.jsonl").read_text())["hypothesis"] == reference


def test_training_eval_answers_as_the_decoding_path(setup):
    model, processor, root, reference = setup
    records, problems = load_records([DataSource(path=str(root / "qa.jsonl"))])
    assert not problems
    collate = Collator(processor, records, {}, seed=0, featurize=True, skip_bad=True)
    assert generate_answers(model, collate, [0], SETTINGS, cache=None) == [reference]


def test_server_answers_as_the_decoding_path(setup):
    from starlette.testclient import TestClient

    from eardrum.inference.server import create_app
    from eardrum.inference.server_settings import ServerSettings

    model, processor, root, reference = setup
    audio = base64.b64encode((root / "clip.wav").read_bytes()).decode()
    clip = {"type": "input_audio", "input_audio": {"data": audio, "format": "wav"}}
    parts = [clip, {"type": "text", "text": QUESTION}]
    body = {"model": "m", "temperature": 0, "max_tokens": SETTINGS.max_new_tokens,
            "messages": [{"role": "user", "content": parts}]}
    with TestClient(create_app(model, processor, ServerSettings(model_name="m"))) as client:
        for stream in (False, True):
            response = client.post("/v1/chat/completions", json={**body, "stream": stream})
            assert response.status_code == 200, response.text
            if not stream:
                assert response.json()["choices"][0]["message"]["content"] == reference
                continue
            chunks = [json.loads(x[6:]) for x in response.text.splitlines() if x.startswith("data: {")]
            assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]) == reference


def test_distillation_targets_are_the_decoding_paths_answers_to_the_transcript(setup, tmp_path):
    model, processor, root, _ = setup
    distill_manifest(model, processor, root / "qa.jsonl", tmp_path / "distilled.jsonl",
                     max_new_tokens=SETTINGS.max_new_tokens)
    target = json.loads((tmp_path / "distilled.jsonl").read_text())["messages"][-1]["content"]
    item = {"audio": str(root / "clip.wav"), "question": QUESTION, "transcript": TRANSCRIPT}
    assert target == answer_conversations(model, processor, [text_prompt(item)], SETTINGS)[0]


# Calls of `.generate(...)` that are not an audio LLM answering: each with its reason.
OTHER_GENERATE_CALLS = {
    "adapters/model.py": "AudioLLM.generate hands the merged embeddings to the LLM's own generate",
    "common/decoding.py": "the one decoding path",
    "adapters/transcribe.py": "Whisper's own decoder: transcript hints, and the reference the demo compares against",
    "demo/make_sentences.py": "a one-off script sampling text from the plain LLM to write demo/sentences.txt",
}


def test_no_module_but_the_decoding_path_calls_generate():
    root = Path(__file__).resolve().parent.parent
    callers = []
    for folder in ("adapters", "common", "training", "inference", "cli", "demo"):
        for path in sorted((root / folder).glob("*.py")):
            nodes = ast.walk(ast.parse(path.read_text()))
            calls = [n for n in nodes if isinstance(n, ast.Call) and getattr(n.func, "attr", None) == "generate"]
            if calls and f"{folder}/{path.name}" not in OTHER_GENERATE_CALLS:
                callers.append(f"{folder}/{path.name} line {calls[0].lineno}")
    assert callers == [], f"these modules call generate themselves instead of eardrum.common.decoding: {callers}"
