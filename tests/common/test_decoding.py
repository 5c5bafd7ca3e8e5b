"""The one decoding path: settings, stop tokens, sampling, and the same answer through every entry point."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import LogitsProcessor

from eardrum.common.decoding import (
    draw_tokens,
    generate_kwargs,
    generate_tokens,
    pad_token_id,
    seeded_generator,
    stop_token_ids,
)
from eardrum.common.generation import GenerationSettings, GenerationSettingsError, loop_period


def test_generation_settings_list_every_problem():
    with pytest.raises(GenerationSettingsError) as err:
        GenerationSettings(max_new_tokens=0, temperature=-1, top_p=0, repetition_penalty=0, seed=-3,
                           stop_loops=1).validate()
    for name in ("max_new_tokens", "temperature", "top_p", "repetition_penalty", "seed", "stop_loops"):
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


def test_loop_period_finds_the_shortest_run_repeated_at_the_end():
    phrase = [7, 8, 9]  # ", no," in tokens, say
    text = [1, 2, 3, 4]
    assert loop_period(text + phrase * 8, 8) == 3
    assert loop_period(text + phrase * 7, 8) == 0  # one repeat short
    assert loop_period(text + phrase * 8 + [5], 8) == 0  # the loop was left: not at the end
    assert loop_period(text + [5] * 16, 8) == 1
    assert loop_period(text + [5] * 15, 8) == 0  # 8 repeats, but shorter than LOOP_MIN_TOKENS: "1000000000"
    assert loop_period(text + list(range(20, 36)) * 3, 3) == 16
    assert loop_period(text + list(range(20, 37)) * 8, 8) == 0  # 17 tokens: longer than any loop looked for
    assert loop_period(phrase * 8, 0) == 0  # off


class _ForceTokens(LogitsProcessor):
    """Row b's i-th new token is plan[b][i] (its last token once the plan runs out)."""

    def __init__(self, plan: list[list[int]]) -> None:
        self.plan, self.step = plan, 0

    def __call__(self, input_ids, scores):
        forced = torch.full_like(scores, float("-inf"))
        for b, row in enumerate(self.plan):
            forced[b, row[min(self.step, len(row) - 1)]] = 0.0
        self.step += 1
        return forced


def test_generation_ends_rows_that_loop_where_the_loop_is_found(model_dirs, chatml_tokenizer):
    from eardrum.adapters.checkpoint import build_audio_llm
    from eardrum.adapters.config import AudioLLMConfig

    torch.manual_seed(0)
    model, processor = build_audio_llm(AudioLLMConfig(encoder=model_dirs["whisper"], llm=model_dirs["llama"]))
    model.eval()
    tok = processor.tokenizer
    end = stop_token_ids(tok)[0]
    loop = [40, 41, 42]
    plain = list(range(50, 70))  # 20 distinct tokens, then the end of the turn
    batch = processor([[{"role": "user", "content": "hi"}]] * 2, add_generation_prompt=True)

    def run(stop_loops: int) -> list[list[int]]:
        settings = GenerationSettings(max_new_tokens=60, stop_loops=stop_loops)
        ids = generate_tokens(model, tok, batch, settings, logits_processor=[_ForceTokens([loop * 30, plain + [end]])])
        return ids.tolist()

    looped, ended = run(8)
    assert looped == loop * 8  # ended at the 8th repeat; generation stops once no row goes on
    assert ended == plain + [end] + [pad_token_id(tok, stop_token_ids(tok))] * 3  # a row that does not loop
    looped, _ = run(0)
    assert len(looped) == 60 and looped == (loop * 30)[:60]  # off: the loop runs to max_new_tokens
