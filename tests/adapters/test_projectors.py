"""Projectors: token counts, padding invariance, gradients, config validation and the registry."""

from __future__ import annotations

import pytest
import torch
from torch import Tensor

from eardrum.adapters.projectors import (
    PROJECTORS,
    Projector,
    ProjectorConfig,
    ProjectorConfigError,
    build_projector,
    projector_num_tokens,
    register_projector,
    tokens_per_second,
)

D_ENC, D_LLM, HIDDEN = 16, 24, 32
LENGTHS = [*range(1, 71), 1500]  # every length to 70 (primes, non-multiples of k, stride, window) and 30 s
MIXED = [61, 1, 2, 3, 5, 7, 13, 15, 16, 29, 30, 31, 47]  # one batch: partial groups, windows and strides

# every built-in at its defaults, plus variants with other strides, odd/even kernels and windows
CONFIGS = {name: ProjectorConfig(name=name, hidden_dim=HIDDEN) for name in sorted(PROJECTORS)}
CONFIGS |= {
    "stack_k3": ProjectorConfig(name="stack", hidden_dim=HIDDEN, stack_factor=3),
    "stack_k3_context2": ProjectorConfig(name="stack", hidden_dim=HIDDEN, stack_factor=3, context_layers=2),
    "conv_k4_s3_l3": ProjectorConfig(name="conv", hidden_dim=HIDDEN, conv_layers=3, conv_kernel=4, conv_stride=3),
    "conv_k5_s2_l1": ProjectorConfig(name="conv", hidden_dim=HIDDEN, conv_layers=1, conv_kernel=5),
    "qformer_w7_q2": ProjectorConfig(name="qformer", hidden_dim=HIDDEN, window=7, queries=2, qformer_layers=1),
}


def _build(config: ProjectorConfig) -> Projector:
    torch.manual_seed(0)
    return build_projector(config, D_ENC, D_LLM).eval()


def _padded_batch(lengths: list[int]) -> tuple[Tensor, Tensor]:
    """Clips right-padded with large garbage and a NaN, so any leak from padding shows."""
    gen = torch.Generator().manual_seed(1)
    frames = 1000.0 * torch.randn(len(lengths), max(lengths), D_ENC, generator=gen)  # (B, T, D_enc)
    frames[:, -1, 0] = float("nan")
    for b, n in enumerate(lengths):
        frames[b, :n] = torch.randn(n, D_ENC, generator=gen)
    return frames, torch.tensor(lengths)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (ProjectorConfig(name="linear"), {1: 1, 7: 7, 1500: 1500}),
        (ProjectorConfig(name="mlp"), {1: 1, 7: 7, 1500: 1500}),
        (ProjectorConfig(name="stack"), {1: 1, 3: 1, 4: 1, 5: 2, 8: 2, 9: 3, 1500: 375}),
        (ProjectorConfig(name="stack", stack_factor=8), {1: 1, 8: 1, 9: 2, 1500: 188}),
        (ProjectorConfig(name="conv"), {1: 1, 2: 1, 3: 1, 4: 1, 5: 2, 8: 2, 9: 3, 1500: 375}),
        (ProjectorConfig(name="conv", conv_layers=1, conv_kernel=4), {1: 1, 2: 2, 4: 3, 5: 3, 1500: 751}),
        (ProjectorConfig(name="qformer"), {1: 4, 14: 4, 15: 4, 16: 8, 30: 8, 31: 12, 1500: 400}),
        (ProjectorConfig(name="qformer", window=10, queries=1), {1: 1, 10: 1, 11: 2, 1500: 150}),
    ],
    ids=lambda v: v.name if isinstance(v, ProjectorConfig) else "",
)
def test_num_tokens_matches_hand_computed_values(config: ProjectorConfig, expected: dict[int, int]) -> None:
    assert {t: projector_num_tokens(config, t) for t in expected} == expected


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_output_shape_and_token_lengths_follow_num_tokens(key: str) -> None:
    config = CONFIGS[key]
    projector = _build(config)
    with torch.no_grad():
        for t in LENGTHS:
            tokens, token_lengths = projector(torch.randn(1, t, D_ENC), torch.tensor([t]))
            n = projector_num_tokens(config, t)
            assert tokens.shape == (1, n, D_LLM), t
            assert token_lengths.tolist() == [n] == [projector.num_tokens(t)], t
        # all lengths at once, padded to the longest
        frames, lengths = _padded_batch(LENGTHS)
        _, token_lengths = projector(frames, lengths)
    assert token_lengths.dtype == torch.long
    assert token_lengths.tolist() == [projector_num_tokens(config, t) for t in LENGTHS]


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_batched_clip_tokens_equal_lone_clip_tokens(key: str) -> None:
    projector = _build(CONFIGS[key])
    frames, lengths = _padded_batch(MIXED)
    with torch.no_grad():
        tokens, token_lengths = projector(frames, lengths)
        for b, n in enumerate(MIXED):
            alone, alone_lengths = projector(frames[b : b + 1, :n], lengths[b : b + 1])
            assert alone.shape[1] == alone_lengths.item() == token_lengths[b].item()
            torch.testing.assert_close(tokens[b, : token_lengths[b]], alone[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_tokens_beyond_token_lengths_are_zero(key: str) -> None:
    projector = _build(CONFIGS[key])
    frames, lengths = _padded_batch(MIXED)
    with torch.no_grad():
        tokens, token_lengths = projector(frames, lengths)
    assert torch.isfinite(tokens).all()
    for b in range(len(MIXED)):
        assert torch.equal(tokens[b, token_lengths[b] :], torch.zeros_like(tokens[b, token_lengths[b] :]))
        assert tokens[b, : token_lengths[b]].abs().sum(dim=-1).gt(0).all()


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_gradients_reach_every_parameter(key: str) -> None:
    projector = _build(CONFIGS[key]).train()
    frames, lengths = _padded_batch(MIXED)
    tokens, token_lengths = projector(frames, lengths)
    valid = torch.arange(tokens.shape[1]) < token_lengths[:, None]  # (B, N)
    tokens[valid].square().mean().backward()
    for name, param in projector.named_parameters():
        assert param.grad is not None, name
        assert param.grad.abs().sum() > 0, name


def test_validate_reports_every_problem_at_once() -> None:
    config = ProjectorConfig(name="qformer", hidden_dim=30, stack_factor=0, conv_kernel=-1, window=2.5, dropout=1.0)
    with pytest.raises(ProjectorConfigError) as err:
        config.validate()
    message = str(err.value)
    for expected in (
        "stack_factor must be a positive int, got 0",
        "conv_kernel must be a positive int, got -1",
        "window must be a positive int, got 2.5",
        "dropout must be a float in [0, 1), got 1.0",
        "qformer_heads=4 must divide the inner width 30",
    ):
        assert expected in message
    assert config.stack_factor == 0  # reported, never rewritten


def test_context_layers_may_be_zero_but_not_negative_or_fractional() -> None:
    ProjectorConfig(name="stack", context_layers=0).validate()
    for bad in (-1, 0.0, 1.5, True):
        with pytest.raises(ProjectorConfigError, match=f"context_layers must be an int >= 0, got {bad!r}"):
            ProjectorConfig(name="stack", context_layers=bad).validate()
    with pytest.raises(ProjectorConfigError, match="context_layers=1 needs an even inner width .* got 33"):
        build_projector(ProjectorConfig(name="stack", hidden_dim=33, context_layers=1), D_ENC, D_LLM)


@pytest.mark.parametrize(("layers", "reaches"), [(0, False), (1, True)])
def test_stack_context_lets_a_token_see_the_rest_of_its_clip(layers: int, reaches: bool) -> None:
    projector = _build(ProjectorConfig(name="stack", hidden_dim=HIDDEN, stack_factor=4, context_layers=layers))
    frames = torch.randn(1, 40, D_ENC)
    changed = frames.clone()
    changed[0, :4] += 1.0  # only the first token's frames
    with torch.no_grad():
        before, _ = projector(frames, torch.tensor([40]))
        after, _ = projector(changed, torch.tensor([40]))
    assert not torch.equal(before[0, 0], after[0, 0])
    assert torch.equal(before[0, 1:], after[0, 1:]) is not reaches  # the later tokens move only with context


def test_stack_context_runs_under_bf16_autocast() -> None:
    projector = _build(CONFIGS["stack_k3_context2"])
    frames, lengths = _padded_batch(MIXED)
    with torch.no_grad():
        exact, _ = projector(frames, lengths)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            tokens, token_lengths = projector(frames, lengths)
    assert tokens.dtype == torch.bfloat16
    torch.testing.assert_close(tokens.float(), exact, rtol=0.05, atol=0.05)


def test_unknown_name_lists_the_registered_projectors() -> None:
    with pytest.raises(ProjectorConfigError, match="'transformer' is not a registered projector") as err:
        ProjectorConfig(name="transformer").validate()
    assert "['conv', 'linear', 'mlp', 'qformer', 'stack']" in str(err.value)


def test_build_checks_heads_against_llm_width_when_hidden_dim_is_none() -> None:
    with pytest.raises(ProjectorConfigError, match="qformer_heads=4 must divide the inner width 30"):
        build_projector(ProjectorConfig(name="qformer"), D_ENC, 30)
    with pytest.raises(ProjectorConfigError, match="input_dim must be a positive int, got 0"):
        build_projector(ProjectorConfig(name="mlp"), 0, D_LLM)


def test_from_dict_round_trips_and_rejects_unknown_keys() -> None:
    config = CONFIGS["qformer_w7_q2"]
    assert ProjectorConfig.from_dict(config.to_dict()) == config
    with pytest.raises(ProjectorConfigError, match=r"unknown ProjectorConfig keys \['stack_factr'\]"):
        ProjectorConfig.from_dict({"name": "stack", "stack_factr": 4})


def test_forward_rejects_lengths_outside_the_batch() -> None:
    projector = _build(CONFIGS["mlp"])
    with pytest.raises(ValueError, match=r"frame_lengths must lie in \[1, T=5\], got \[0, 6\]"):
        projector(torch.zeros(3, 5, D_ENC), torch.tensor([0, 5, 6]))
    with pytest.raises(ValueError, match="num_frames must be >= 1, got 0"):
        projector_num_tokens(CONFIGS["mlp"], 0)


def test_tokens_per_second_at_whisper_frame_rate() -> None:
    rates = {key: tokens_per_second(config, 50.0) for key, config in CONFIGS.items()}
    assert rates["linear"] == rates["mlp"] == 50.0
    assert rates["stack"] == 12.5
    assert tokens_per_second(ProjectorConfig(name="stack", stack_factor=8), 50.0) == 6.25
    assert rates["conv"] == 12.5
    assert rates["conv_k4_s3_l3"] == pytest.approx(50 / 27)
    assert rates["qformer"] == pytest.approx(40 / 3)


@pytest.mark.parametrize("key", sorted(CONFIGS))
def test_token_rate_is_the_long_run_token_count(key: str) -> None:
    config, frames = CONFIGS[key], 50 * 3600  # one hour at 50 frames/s
    assert projector_num_tokens(config, frames) / 3600 == pytest.approx(tokens_per_second(config, 50.0), rel=1e-3)


@pytest.fixture
def pool2_name():
    name = "test_pool2"
    yield name
    PROJECTORS.pop(name, None)  # leave the registry as the module built it


def test_user_registered_projector_builds_by_name(pool2_name: str) -> None:
    @register_projector(pool2_name)
    class Pool2(Projector):
        """Mean of frame pairs, then Linear(D_enc, D_llm)."""

        def __init__(self, config: ProjectorConfig, input_dim: int, output_dim: int) -> None:
            super().__init__(config, input_dim, output_dim)
            self.proj = torch.nn.Linear(input_dim, output_dim)

        @classmethod
        def count_tokens(cls, config: ProjectorConfig, num_frames: int) -> int:
            return (num_frames + 1) // 2

        @classmethod
        def tokens_per_frame(cls, config: ProjectorConfig) -> float:
            return 0.5

        def project(self, frames: Tensor, frame_lengths: Tensor) -> Tensor:
            frames = torch.nn.functional.pad(frames, (0, 0, 0, frames.shape[1] % 2))  # (B, 2N, D_enc)
            pairs = frames.reshape(frames.shape[0], -1, 2, frames.shape[2])  # (B, N, 2, D_enc)
            return self.proj(pairs.mean(dim=2))  # (B, N, D_llm)

    config = ProjectorConfig.from_dict({"name": pool2_name})
    projector = build_projector(config, D_ENC, D_LLM)
    tokens, token_lengths = projector(torch.randn(2, 7, D_ENC), torch.tensor([7, 2]))
    assert isinstance(projector, Pool2)
    assert tokens.shape == (2, 4, D_LLM)
    assert token_lengths.tolist() == [4, 1]
    assert tokens_per_second(config, 50.0) == 25.0
    with pytest.raises(ValueError, match="'test_pool2' is already registered to"):
        register_projector(pool2_name)(Pool2)
