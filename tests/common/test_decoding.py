"""The one decoding path: settings, stop tokens, sampling, and the same answer through every entry point."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from eardrum.common.decoding import draw_tokens, generate_kwargs, seeded_generator, stop_token_ids
from eardrum.common.generation import GenerationSettings, GenerationSettingsError


def test_generation_settings_list_every_problem():
    with pytest.raises(GenerationSettingsError) as err:
        GenerationSettings(max_new_tokens=0, temperature=-1, top_p=0, repetition_penalty=0, seed=-3).validate()
    for name in ("max_new_tokens", "temperature", "top_p", "repetition_penalty", "seed"):
        assert name in str(err.value)
    kwargs = generate_kwargs(GenerationSettings(), build_tokenizer_with_eos("<|endoftext|>"))
    assert kwargs["do_sample"] is False and "logits_processor" not in kwargs


def build_tokenizer_with_eos(eos: str):
    from eardrum.adapters.tiny import build_tokenizer

    tok = build_tokenizer("chatml")
    tok.eos_token = eos
    return tok


def test_stop_ids_include_the_templates_end_of_turn(llama3_tokenizer):
    tok = build_tokenizer_with_eos("<|endoftext|>")  # eos is not ChatML's end of turn here
    ids = stop_token_ids(tok)
    assert ids == [tok.convert_tokens_to_ids("<|endoftext|>"), tok.convert_tokens_to_ids("<|im_end|>")]
    eot = llama3_tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert stop_token_ids(llama3_tokenizer, SimpleNamespace(eos_token_id=[5, eot])) == [eot, 5]


def test_draw_tokens_keeps_one_token_per_row_within_top_p_and_falls_back_to_argmax_on_overflow():
    scores = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 3.0, 2.9, -5.0]])
    # top_p 0.6: row 0 keeps only its likeliest token (p = 0.64), row 1 its two likeliest (0.51, 0.46)
    seen = set()
    generator = seeded_generator(torch.device("cpu"), 0)
    for _ in range(200):
        out = draw_tokens(scores, 1.0, 0.6, generator)
        assert out.shape == scores.shape and ((out == 0).sum(dim=-1) == 1).all()
        assert torch.isinf(out).sum() == 2 * 3
        seen.add(tuple(out.argmax(dim=-1).tolist()))
    assert {row0 for row0, _ in seen} == {0} and {row1 for _, row1 in seen} == {1, 2}
    # a temperature so small that the scaled scores overflow: the argmax, not an error
    assert draw_tokens(scores, 1e-45, 1.0, generator).argmax(dim=-1).tolist() == [0, 1]
    # the same seed draws the same tokens
    first = [draw_tokens(scores, 1.0, 1.0, g) for g in (seeded_generator(torch.device("cpu"), 7),) for _ in range(5)]
    again = [draw_tokens(scores, 1.0, 1.0, g) for g in (seeded_generator(torch.device("cpu"), 7),) for _ in range(5)]
    assert all(torch.equal(a, b) for a, b in zip(first, again))
