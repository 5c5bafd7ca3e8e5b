"""Frozen-encoder feature cache: exact logits, no re-encoding, fingerprints, shards, precompute counts."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from conftest import build_tokenizer, tiny_llama, tiny_whisper, whisper_feature_extractor
from eardrum.adapters.config import AudioLLMConfig
from eardrum.adapters.encoders import AudioFeaturizer, build_speech_encoder
from eardrum.adapters.model import AudioLLM
from eardrum.adapters.processor import AudioProcessor
from eardrum.adapters.projectors import ProjectorConfig, build_projector
from eardrum.training.cache import FeatureCache, encode_windows, encoder_fingerprint, precompute, window_key

# 1 s windows, so a 2.3 s clip gives windows of 1.0, 1.0 and 0.3 s: many lengths from few seconds of audio.
WINDOW_SECONDS = 1.0


def assemble(layer="last", pad_to_30s=False, source="tiny-whisper", seed=0):
    torch.manual_seed(0)
    tok = build_tokenizer("chatml")
    llm = tiny_llama(vocab_size=len(tok))
    encoder = build_speech_encoder(tiny_whisper(seed=seed), layer, pad_to_30s)
    cfg = AudioLLMConfig(
        encoder=source,
        llm="tiny-llm",
        projector=ProjectorConfig(name="stack"),
        encoder_layer=layer,
        pad_to_30s=pad_to_30s,
        window_seconds=WINDOW_SECONDS,
    )
    proc = AudioProcessor(tok, AudioFeaturizer(whisper_feature_extractor(), encoder.spec, pad_to_30s), cfg)
    proj = build_projector(cfg.projector, encoder.hidden_size, llm.get_input_embeddings().embedding_dim)
    return AudioLLM(cfg, encoder, proj, llm, proc.placeholder_id), proc


def wave(seconds, seed=0):
    return (np.random.default_rng(seed).standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32)


def conv(seconds, seed):
    audio = [{"type": "audio", "audio": (wave(s, seed + k), 16000)} for k, s in enumerate(seconds)]
    return [
        {"role": "user", "content": [*audio, {"type": "text", "text": "what is said?"}]},
        {"role": "assistant", "content": "hello world"},
    ]


CONVERSATIONS = [conv([0.7, 2.3], 0), conv([1.1], 5), conv([0.03, 0.45], 9)]


@pytest.fixture(scope="module")
def tiny():
    return assemble()


@pytest.fixture
def encoder_calls(tiny):
    calls = []
    hook = tiny[0].encoder.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    yield calls
    hook.remove()


def logits_uncached(model, proc):
    with torch.no_grad():
        return model(**proc(CONVERSATIONS)).logits


def logits_cached(model, proc, cache):
    batch = proc(CONVERSATIONS, featurize=False)
    frames, frame_lengths = encode_windows(model, proc.featurizer, batch.pop("audio_windows"), cache)
    with torch.no_grad():
        return model(**batch, audio_frames=frames, frame_lengths=frame_lengths).logits


def test_windows_have_mixed_lengths(tiny):
    lengths = [len(w) for w in tiny[1](CONVERSATIONS, featurize=False)["audio_windows"]]
    assert lengths == [11200, 16000, 16000, 4800, 16000, 1600, 480, 7200]


def test_cached_frames_give_bit_identical_logits_computed_and_read_back(tiny, tmp_path):
    model, proc = tiny
    reference = logits_uncached(model, proc)
    fingerprint = encoder_fingerprint(model)
    first = FeatureCache(tmp_path, fingerprint)
    assert torch.equal(logits_cached(model, proc, first), reference)  # computed now
    first.flush()
    assert torch.equal(logits_cached(model, proc, FeatureCache(tmp_path, fingerprint)), reference)  # from disk


def test_second_pass_reads_the_cache_and_never_calls_the_encoder(tiny, tmp_path, encoder_calls):
    model, proc = tiny
    cache = FeatureCache(tmp_path, encoder_fingerprint(model))
    logits_cached(model, proc, cache)
    assert encoder_calls == [8]  # one batch of the eight distinct windows
    cache.flush()
    logits_cached(model, proc, FeatureCache(tmp_path, encoder_fingerprint(model)))
    assert encoder_calls == [8]


def test_smaller_encoding_batches_differ_only_by_float32_rounding(tiny):
    # CPU kernels round differently for different padded lengths, so only equal batches are bit-equal.
    model, proc = tiny
    windows = proc(CONVERSATIONS, featurize=False)["audio_windows"]
    one, lengths_one = encode_windows(model, proc.featurizer, windows, None, batch_size=16)
    two, lengths_two = encode_windows(model, proc.featurizer, windows, None, batch_size=2)
    assert torch.equal(lengths_one, lengths_two)
    assert torch.allclose(one, two, rtol=0, atol=1e-5)


def test_frames_are_zero_padded_in_window_order(tiny):
    model, proc = tiny
    windows = [wave(0.2, 1), wave(0.9, 2), wave(0.2, 1)]
    frames, lengths = encode_windows(model, proc.featurizer, windows, None)
    assert lengths.tolist() == [model.encoder.num_frames(len(w)) for w in windows] == [10, 45, 10]
    assert frames.shape == (3, 45, 32)
    assert torch.equal(frames[0], frames[2]) and not frames[0, 10:].any()


@pytest.mark.parametrize(
    "change",
    [{"layer": 1}, {"pad_to_30s": True}, {"source": "openai/whisper-base"}, {"seed": 1}],
    ids=["layer", "pad_to_30s", "source", "weights"],
)
def test_fingerprint_changes_with_what_changes_the_output(tiny, change):
    assert encoder_fingerprint(assemble(**change)[0]) != encoder_fingerprint(tiny[0])


def test_fingerprint_changes_when_one_weight_moves_by_one_ulp():
    model = assemble()[0]
    before = encoder_fingerprint(model)
    weight = model.encoder.network.layers[1].fc2.weight
    with torch.no_grad():
        weight[3, 7] = torch.nextafter(weight[3, 7], torch.tensor(1.0))
    assert encoder_fingerprint(model) != before


def test_fingerprint_is_stable_across_identical_builds_and_layer_spellings(tiny):
    fingerprint = encoder_fingerprint(tiny[0])
    assert encoder_fingerprint(assemble()[0]) == fingerprint
    assert encoder_fingerprint(assemble(layer=2)[0]) == fingerprint  # the last of 2 layers, by index
    assert len(fingerprint) == 64


def test_weighted_layer_is_not_cacheable():
    with pytest.raises(ValueError, match="'weighted'.*cannot be cached.*cache=None"):
        encoder_fingerprint(assemble(layer="weighted")[0])


def test_window_key_is_content_and_length():
    a = wave(0.5)
    assert window_key(a) == window_key(a.copy()) == window_key(a.astype(np.float64))
    assert window_key(a) != window_key(a[:-1]) != window_key(np.append(a, np.float32(0)))
    assert window_key(np.zeros(4, np.float32)) != window_key(np.zeros(5, np.float32))


def frames(n, seed):
    return torch.randn(n, 32, generator=torch.Generator().manual_seed(seed))


def test_two_writers_in_one_folder_are_both_visible_to_a_reader(tmp_path):
    rank0, rank1 = FeatureCache(tmp_path, "fp"), FeatureCache(tmp_path, "fp")
    rank0.put("a", frames(3, 0))
    rank1.put("b", frames(5, 1))
    rank1.flush()
    rank0.flush()
    reader = FeatureCache(tmp_path, "fp")
    assert len(reader) == 2 and len(list(reader.directory.iterdir())) == 2
    assert torch.equal(reader.get("a"), frames(3, 0)) and torch.equal(reader.get("b"), frames(5, 1))
    assert rank0.get("b") is None and rank0.refresh() == 1 and torch.equal(rank0.get("b"), frames(5, 1))


def test_truncated_shard_is_skipped_with_a_warning_naming_it(tmp_path, caplog):
    for key in ("good", "bad"):
        cache = FeatureCache(tmp_path, "fp")
        cache.put(key, frames(4, 0))
        cache.flush()
    bad = next(p for p in FeatureCache(tmp_path, "fp").directory.iterdir() if b'"bad"' in p.read_bytes()[:400])
    bad.write_bytes(bad.read_bytes()[:-7])  # a writer killed mid-file (without the atomic rename)
    with caplog.at_level(logging.WARNING, logger="eardrum.training.cache"):
        reader = FeatureCache(tmp_path, "fp")
    assert bad.name in caplog.text
    assert "bad" not in reader and torch.equal(reader.get("good"), frames(4, 0))


def test_shards_appear_only_whole_and_leave_no_temp_files(tmp_path):
    cache = FeatureCache(tmp_path, "fp", shard_entries=2)
    cache.put("a", frames(2, 0))
    assert list(cache.directory.iterdir()) == []  # pending only
    cache.put("b", frames(3, 1))  # the second entry writes a shard
    cache.put("c", frames(4, 2))
    names = [p.name for p in cache.directory.iterdir()]
    assert len(names) == 1 and names[0].startswith("shard-") and names[0].endswith(".safetensors")
    assert len(cache) == 3 and torch.equal(cache.get("c"), frames(4, 2))
    cache.flush()
    assert sorted(p.name.startswith("shard-") for p in cache.directory.iterdir()) == [True, True]
    assert len(FeatureCache(tmp_path, "fp")) == 3


def test_a_failed_write_leaves_no_file_and_keeps_the_frames_pending(tmp_path, monkeypatch):
    def disk_full(tensors, filename, metadata=None):
        with open(filename, "wb") as f:
            f.write(b"partial")
        raise OSError("No space left on device")

    cache = FeatureCache(tmp_path, "fp")
    cache.put("a", frames(3, 0))
    monkeypatch.setattr("eardrum.training.cache.save_file", disk_full)
    with pytest.raises(OSError, match="No space"):
        cache.flush()
    assert list(cache.directory.iterdir()) == [] and torch.equal(cache.get("a"), frames(3, 0))
    monkeypatch.undo()
    cache.flush()
    assert torch.equal(FeatureCache(tmp_path, "fp").get("a"), frames(3, 0))


def test_half_precision_cache_rounds_and_a_float32_cache_ignores_its_shards(tmp_path):
    half = FeatureCache(tmp_path, "fp", dtype=torch.float16)
    half.put("a", frames(3, 0))
    half.flush()
    assert torch.equal(FeatureCache(tmp_path, "fp", dtype=torch.float16).get("a"), frames(3, 0).half())
    assert "a" not in FeatureCache(tmp_path, "fp")  # rounded frames would not be exact in float32


def test_precompute_encodes_each_distinct_window_once_and_counts_exactly(tiny, tmp_path, encoder_calls):
    model, proc = tiny
    cache = FeatureCache(tmp_path, encoder_fingerprint(model))
    a, b, c = wave(0.3, 1), wave(0.6, 2), wave(0.45, 3)
    encode_windows(model, proc.featurizer, [a], cache)  # `a` is cached beforehand
    stats = precompute(model, proc.featurizer, [a, b, a, c, b, b.copy()], cache, batch_size=4, progress=False)
    assert {k: stats[k] for k in ("windows", "computed", "cached")} == {"windows": 6, "computed": 2, "cached": 4}
    assert encoder_calls == [1, 2]
    assert len(FeatureCache(tmp_path, encoder_fingerprint(model))) == 3
    again = precompute(model, proc.featurizer, iter([c, b]), cache, progress=False)
    assert (again["computed"], again["cached"], encoder_calls) == (0, 2, [1, 2])
