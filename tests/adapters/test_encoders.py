"""Encoders: exact frame counts, trimmed Whisper equals alone-encoding and the stock 30 s encoder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import tiny_w2v, tiny_whisper, w2v_feature_extractor, whisper_feature_extractor
from eardrum.adapters.encoders import (
    AudioFeaturizer,
    build_speech_encoder,
    frame_spec_from_config,
    num_frames,
)

TOL = 1e-5  # float32


def waves(lengths, seed=0):
    rng = np.random.default_rng(seed)
    return [(0.1 * rng.standard_normal(n)).astype(np.float32) for n in lengths]


@pytest.fixture(scope="module")
def whisper():
    model = tiny_whisper()
    return (
        model,
        build_speech_encoder(model),
        AudioFeaturizer(whisper_feature_extractor(), frame_spec_from_config(model.config)),
    )


def test_whisper_num_frames_hand_values(whisper):
    spec = whisper[1].spec
    assert [num_frames(spec, n) for n in (1, 400, 480, 16000, 16159, 16160, 80000, 480000)] == [
        1,
        1,
        2,
        50,
        50,
        51,
        250,
        1500,
    ]


@pytest.mark.parametrize("n", [1, 399, 401, 1601, 3203, 16000, 16161, 23457, 48000])
def test_whisper_num_frames_matches_module_output(whisper, n):
    _, enc, feat = whisper
    features, lengths = feat(waves([n]))
    frames, frame_lengths = enc(features, lengths)
    assert frames.shape[1] == frame_lengths.item() == num_frames(enc.spec, n)


@pytest.mark.parametrize("kind", ["wav2vec2", "hubert", "wavlm"])
def test_wav2vec2_family_num_frames_matches_module_output(kind):
    model = tiny_w2v(kind)
    enc = build_speech_encoder(model)
    feat = AudioFeaturizer(w2v_feature_extractor(), enc.spec)
    lengths_in = [1, 400, 401, 719, 720, 1601, 16000, 23457]
    features, lengths = feat(waves(lengths_in))
    frames, frame_lengths = enc(features, lengths)
    expected = [num_frames(enc.spec, n) for n in lengths_in]
    assert frame_lengths.tolist() == expected
    assert frames.shape[1] == max(expected)
    assert expected == [int(model._get_feat_extract_output_lengths(max(n, 400))) for n in lengths_in]


def test_whisper_mixed_batch_equals_each_clip_alone(whisper):
    _, enc, feat = whisper
    clips = waves([16000, 7001, 33333, 401])
    frames, frame_lengths = enc(*feat(clips))
    for i, clip in enumerate(clips):
        alone, alone_len = enc(*feat([clip]))
        n = alone_len.item()
        assert frame_lengths[i].item() == n == alone.shape[1]
        torch.testing.assert_close(frames[i, :n], alone[0], atol=TOL, rtol=0)


def test_whisper_full_30s_equals_stock_encoder(whisper):
    model, enc, feat = whisper
    clip = waves([480000])
    features, lengths = feat(clip)
    assert features.shape[-1] == 3000
    frames, _ = enc(features, lengths)
    with torch.no_grad():
        stock = model.get_encoder()(features).last_hidden_state
    torch.testing.assert_close(frames, stock, atol=TOL, rtol=0)


def test_pad_to_30s_reproduces_stock_on_padded_window(whisper):
    model, _, _ = whisper
    spec = frame_spec_from_config(model.config)
    enc = build_speech_encoder(model, pad_to_30s=True)
    feat = AudioFeaturizer(whisper_feature_extractor(), spec, pad_to_30s=True)
    clips = waves([16000, 40000])
    features, lengths = feat(clips)
    assert features.shape[-1] == 3000 and lengths.tolist() == [100, 250]
    frames, frame_lengths = enc(features, lengths)
    assert frame_lengths.tolist() == [num_frames(spec, 16000), num_frames(spec, 40000)]
    with torch.no_grad():
        stock = model.get_encoder()(features).last_hidden_state
    assert frames.shape[1] == 125
    torch.testing.assert_close(frames, stock[:, :125], atol=TOL, rtol=0)


def test_trimmed_differs_from_padded(whisper):
    """Whisper attends to its padding, so trimming changes the output: the projector must train on it."""
    model, enc, feat = whisper
    trimmed, n = enc(*feat(waves([16000])))
    padded = build_speech_encoder(model, pad_to_30s=True)
    spec = frame_spec_from_config(model.config)
    full, _ = padded(*AudioFeaturizer(whisper_feature_extractor(), spec, pad_to_30s=True)(waves([16000])))
    assert full.shape == trimmed.shape
    assert (full - trimmed).abs().max() > 1e-3


@pytest.mark.parametrize("layer", [0, 1, -2])
def test_layer_index_selects_hidden_state(whisper, layer):
    model, _, feat = whisper
    enc = build_speech_encoder(model, layer=layer)
    features, lengths = feat(waves([480000]))
    frames, _ = enc(features, lengths)
    with torch.no_grad():
        stock = model.get_encoder()(features, output_hidden_states=True).hidden_states
    torch.testing.assert_close(frames, stock[layer], atol=TOL, rtol=0)


def test_weighted_layers_train_and_encoder_stays_frozen(whisper):
    model, _, feat = whisper
    enc = build_speech_encoder(model, layer="weighted")
    enc.train()
    assert not enc.network.training
    trainable = [n for n, p in enc.named_parameters() if p.requires_grad]
    assert trainable == ["select.weights"]
    frames, _ = enc(*feat(waves([8000])))
    frames.sum().backward()
    assert enc.select.weights.grad is not None and enc.select.weights.grad.abs().sum() > 0


@pytest.mark.parametrize("bad", ["first", 3, -4, True])
def test_bad_layer_choice_is_a_clear_error(whisper, bad):
    with pytest.raises(ValueError, match="layer"):
        build_speech_encoder(whisper[0], layer=bad)


def test_clip_longer_than_window_is_an_error_not_a_cut(whisper):
    _, enc, feat = whisper
    with pytest.raises(ValueError, match="480001 samples"):
        feat(waves([480001]))
    with pytest.raises(ValueError, match="window"):
        num_frames(enc.spec, 480001)
