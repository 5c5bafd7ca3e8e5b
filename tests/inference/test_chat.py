"""`AudioChat` on a tiny random checkpoint: answers equal a direct processor + generate call."""

from __future__ import annotations

import numpy as np
import pytest
import soundfile as sf
import torch

from eardrum.adapters.audio import AudioDecodeError, AudioNotFoundError, EmptyAudioError, InvalidAudioError
from eardrum.adapters.checkpoint import build_audio_llm
from eardrum.adapters.config import AudioLLMConfig
from eardrum.adapters.tiny import synth_sound
from eardrum.inference.chat import (
    CAPTION_PROMPT,
    TRANSCRIBE_PROMPT,
    AudioChat,
    GenerationSettings,
    RecordingNotFoundError,
)

SETTINGS = GenerationSettings(max_new_tokens=8)
LOW = synth_sound(220.0, 1)
HIGH = synth_sound(1760.0, 1, seconds=0.7)


@pytest.fixture(scope="module")
def loaded(model_dirs, tmp_path_factory) -> AudioChat:
    torch.manual_seed(0)  # the projector is drawn at random: one draw, so every run asks the same model
    model, processor = build_audio_llm(AudioLLMConfig(encoder=model_dirs["whisper"], llm=model_dirs["llama"]))
    directory = model.save_pretrained(tmp_path_factory.mktemp("chat") / "checkpoint", processor)
    return AudioChat.from_pretrained(directory, device="cpu", settings=SETTINGS)


@pytest.fixture
def chat(loaded: AudioChat) -> AudioChat:
    """A fresh conversation on the module's model."""
    return AudioChat(loaded.model, loaded.processor, settings=SETTINGS)


def direct(chat: AudioChat, conversation: list[dict], max_new_tokens: int = 8) -> str:
    """The answer from the processor and `AudioLLM.generate` alone, greedy."""
    batch = chat.processor(conversation, add_generation_prompt=True)
    tok = chat.processor.tokenizer
    ids = chat.model.generate(
        **batch, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=[2]
    )
    return chat.processor.batch_decode(ids)[0]


def user(*parts) -> dict:
    content = []
    for part in parts:
        if isinstance(part, tuple):  # (name, wave)
            name, wave = part
            content += [{"type": "text", "text": f'Recording "{name}":'}, {"type": "audio", "audio": (wave, 16000)}]
        else:
            content.append({"type": "text", "text": part})
    return {"role": "user", "content": content}


@pytest.fixture
def spy(chat: AudioChat, monkeypatch):
    """Records the keyword arguments of every `generate` call of `chat.model`."""
    calls = []
    real = chat.model.generate

    def generate(**kwargs):
        ids = real(**kwargs)
        calls.append({**kwargs, "new_tokens": ids.shape[1]})
        return ids

    monkeypatch.setattr(chat.model, "generate", generate)
    return calls


def test_ask_equals_direct_processor_and_generate(chat):
    chat.add_recording((LOW, 16000), "beep")
    answer = chat.ask("what do you hear?")
    assert answer and answer == direct(chat, [user(("beep", LOW), "what do you hear?")])


def test_history_holds_turns_in_order_with_audio_parts(chat):
    name = chat.add_recording((LOW, 16000))
    first = chat.ask("what do you hear?")
    second = chat.ask("and then?")
    roles = [m["role"] for m in chat.history]
    assert roles == ["user", "assistant", "user", "assistant"]
    parts = chat.history[0]["content"]
    assert [p["type"] for p in parts] == ["text", "audio", "text"]
    assert name == "recording 1" and parts[0]["text"] == 'Recording "recording 1":'
    assert np.array_equal(parts[1]["audio"][0], LOW) and parts[1]["audio"][1] == 16000
    assert chat.history[2]["content"] == [{"type": "text", "text": "and then?"}]  # nothing new to attach
    assert chat.history[1]["content"] == first and chat.history[3]["content"] == second
    conversation = [user(("recording 1", LOW), "what do you hear?"), chat.history[1], user("and then?")]
    assert second == direct(chat, conversation)


def test_recordings_by_name_attach_the_right_clip(chat, spy):
    chat.add_recording((LOW, 16000), "low")
    chat.add_recording((HIGH, 16000), "high")
    chat.ask("which one is this?", recordings=["high"])
    features, lengths = chat.processor.featurizer([HIGH])
    assert torch.equal(spy[-1]["audio_features"], features) and torch.equal(spy[-1]["audio_lengths"], lengths)
    text = chat.processor.tokenizer.decode(spy[-1]["input_ids"][0])
    assert 'Recording "high":' in text and 'Recording "low":' not in text
    assert [p.get("text") for p in chat.history[0]["content"]] == ['Recording "high":', None, "which one is this?"]


def test_new_recordings_attach_to_the_next_question_in_order(chat, spy):
    chat.add_recording((HIGH, 16000), "b")
    chat.add_recording((LOW, 16000), "a")
    chat.ask("compare them")
    features, _ = chat.processor.featurizer([HIGH, LOW])
    assert torch.equal(spy[-1]["audio_features"], features)
    chat.ask("again, only the first", recordings="b")  # a single name is one name, not its letters
    features, _ = chat.processor.featurizer([HIGH, LOW, HIGH])  # the history's clips, then the new one
    assert torch.equal(spy[-1]["audio_features"], features)


def test_stream_pieces_join_to_what_ask_returns(loaded):
    asked, streamed = (AudioChat(loaded.model, loaded.processor, settings=SETTINGS) for _ in range(2))
    for c in (asked, streamed):
        c.add_recording((LOW, 16000))
    answer = asked.ask("what do you hear?")
    pieces = list(streamed.stream("what do you hear?"))
    assert len(pieces) > 1 and "".join(pieces) == answer
    assert streamed.history[-1] == {"role": "assistant", "content": answer}
    assert len(streamed.history) == 2


def test_stream_closed_early_leaves_history_unchanged(chat):
    chat.add_recording((LOW, 16000))
    pieces = chat.stream("what do you hear?")
    next(pieces)
    pieces.close()
    assert chat.history == [] and chat.ask("what do you hear?")


def test_stream_checks_the_question_when_called(chat):
    with pytest.raises(RecordingNotFoundError):
        chat.stream("hi", recordings=["nope"])


def test_reset_clears_history_and_recordings(chat):
    chat.add_recording((LOW, 16000), "x")
    chat.ask("what do you hear?")
    chat.reset()
    assert chat.history == [] and chat.recordings == []
    assert chat.add_recording((LOW, 16000)) == "recording 1"


def _bad_sources(tmp_path):
    (tmp_path / "corrupt.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot audio at all")
    (tmp_path / "empty.wav").write_bytes(b"")
    sf.write(tmp_path / "zero.wav", np.zeros(0, dtype=np.float32), 16000)
    nan = LOW.copy()
    nan[100] = np.nan
    return [
        (str(tmp_path / "missing.wav"), AudioNotFoundError, "missing.wav"),
        (str(tmp_path / "corrupt.wav"), AudioDecodeError, "corrupt.wav"),
        (str(tmp_path / "empty.wav"), EmptyAudioError, "empty.wav"),
        (str(tmp_path / "zero.wav"), EmptyAudioError, "zero.wav"),
        ((nan, 16000), InvalidAudioError, "NaN"),
    ]


def test_bad_audio_raises_at_add_and_leaves_the_chat_usable(chat, tmp_path):
    chat.add_recording((LOW, 16000), "good")
    for source, error, words in _bad_sources(tmp_path):
        with pytest.raises(error, match=words):
            chat.add_recording(source)
    assert [r.name for r in chat.recordings] == ["good"]
    assert chat.ask("what do you hear?") == direct(chat, [user(("good", LOW), "what do you hear?")])


def test_unknown_or_duplicate_names_raise_and_leave_the_chat_usable(chat):
    chat.add_recording((LOW, 16000), "meeting")
    with pytest.raises(RecordingNotFoundError, match=r"no recording named 'call'; recordings: 'meeting'"):
        chat.ask("what was said?", recordings=["call"])
    with pytest.raises(ValueError, match="'meeting' already exists"):
        chat.add_recording((HIGH, 16000), "meeting")
    with pytest.raises(ValueError, match="non-empty"):
        chat.ask("   ")
    assert chat.history == []
    assert chat.ask("what was said?") == direct(chat, [user(("meeting", LOW), "what was said?")])


def test_silence_is_a_valid_recording(chat):
    silence = np.zeros(16000, dtype=np.float32)
    chat.add_recording((silence, 16000), "quiet")
    assert chat.ask("anything?") == direct(chat, [user(("quiet", silence), "anything?")])


def test_seeded_sampling_is_reproducible_and_leaves_global_rng_alone(chat):
    chat.add_recording((LOW, 16000), "x")
    state = torch.get_rng_state()
    sample = GenerationSettings(max_new_tokens=8, temperature=1.5, seed=7)
    first = chat.ask("what do you hear?", settings=sample)
    chat.reset()
    chat.add_recording((LOW, 16000), "x")
    assert chat.ask("what do you hear?", settings=sample) == first
    others = {chat.answer((LOW, 16000), "?", settings=GenerationSettings(8, 1.5, seed=s)) for s in range(4)}
    assert len(others) > 1
    assert torch.equal(torch.get_rng_state(), state)


def test_max_new_tokens_bounds_the_answer(chat, spy):
    chat.ask("say a lot", settings=GenerationSettings(max_new_tokens=3))
    assert spy[-1]["max_new_tokens"] == 3 and spy[-1]["new_tokens"] <= 3


def test_one_shot_helpers_use_their_prompts_and_leave_history_alone(chat):
    one = [{"type": "audio", "audio": (LOW, 16000)}]
    for got, prompt in [
        (chat.transcribe((LOW, 16000)), TRANSCRIBE_PROMPT),
        (chat.caption((LOW, 16000)), CAPTION_PROMPT),
        (chat.caption((LOW, 16000), prompt="What is it?"), "What is it?"),
        (chat.answer((LOW, 16000), "how many beeps?"), "how many beeps?"),
    ]:
        assert got == direct(chat, [{"role": "user", "content": [*one, {"type": "text", "text": prompt}]}])
    assert chat.history == [] and chat.recordings == []


def test_device_and_dtype_are_checked(loaded):
    with pytest.raises(ValueError, match="dtype='float64': expected one of auto, float32, bfloat16, float16"):
        AudioChat.from_pretrained(loaded.name, device="cpu", dtype="float64")
    assert loaded.model.device.type == "cpu"
    assert {p.dtype for p in loaded.model.parameters()} == {torch.float32}
