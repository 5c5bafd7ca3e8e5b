"""`AudioLLM.generate(fast=True)`: eardrum's static-cache loop (`eardrum.adapters.fast_decode`) gives the tokens
transformers' `generate` gives, row by row, however seldom the host looks."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList
from transformers.generation.streamers import BaseStreamer

from conftest import build_tokenizer, tiny_llama, tiny_whisper, whisper_feature_extractor
from eardrum.adapters import fast_decode
from eardrum.adapters.config import AudioLLMConfig
from eardrum.adapters.encoders import AudioFeaturizer, build_speech_encoder
from eardrum.adapters.model import AudioLLM
from eardrum.adapters.processor import AudioProcessor
from eardrum.adapters.projectors import ProjectorConfig, build_projector
from eardrum.common.decoding import generate_tokens
from eardrum.common.generation import GenerationSettings


@pytest.fixture(scope="module")
def tiny():
    """A tiny audio LLM and a left-padded batch of two prompts of different lengths."""
    torch.manual_seed(0)
    tok = build_tokenizer("chatml")
    whisper = tiny_whisper()
    encoder = build_speech_encoder(whisper)
    cfg = AudioLLMConfig(encoder="tiny-whisper", llm="tiny-llm", projector=ProjectorConfig(name="stack"))
    proc = AudioProcessor(tok, AudioFeaturizer(whisper_feature_extractor(), encoder.spec), cfg)
    model = AudioLLM(cfg, encoder, build_projector(cfg.projector, encoder.hidden_size, 48),
                     tiny_llama(vocab_size=len(tok)), proc.placeholder_id).eval()
    rng = np.random.default_rng(0)
    convs = []
    for n, text in ((16000, "hi"), (8000, "what do you hear in this short clip")):
        wave = (rng.standard_normal(n) * 0.1).astype(np.float32)
        convs.append([{"role": "user", "content": [{"type": "audio", "audio": (wave, 16000)},
                                                   {"type": "text", "text": text}]}])
    batch = proc(convs, add_generation_prompt=True)
    assert bool((batch["attention_mask"] == 0).any()), "the batch must be left-padded"
    return model, proc, batch


def _both(model, batch, **kwargs):
    """(transformers' generate with a dynamic cache, the fast loop) on the same arguments."""
    return model.generate(**batch, **kwargs), model.generate(**batch, fast=True, **kwargs)


def test_greedy_tokens_equal_generate_and_rows_end_at_their_own_stop_token(tiny):
    model, _, batch = tiny
    free = model.generate(**batch, max_new_tokens=14, do_sample=False, pad_token_id=0)  # (2, 14), no stop
    stop = int(free[0, 3])  # row 0 draws it at step 3: it ends there, row 1 goes on
    assert stop not in free[1, :6].tolist()
    for every in (1, 4, 8):
        ref = model.generate(**batch, max_new_tokens=14, do_sample=False, pad_token_id=0, eos_token_id=[stop])
        fast = fast_decode.fast_generate(model.llm, model.embed(batch["input_ids"], batch["audio_features"],
                                                                  batch["audio_lengths"]),
                                         batch["attention_mask"], max_new_tokens=14, pad_token_id=0,
                                         eos_token_id=[stop], check_every=every)
        assert fast.tolist() == ref.tolist(), every
        assert fast[0, 3] == stop and (fast[0, 4:] == 0).all()


def test_generate_fast_runs_the_loop_and_gives_the_same_tokens(tiny, monkeypatch):
    model, _, batch = tiny
    ran = []
    loop = fast_decode.fast_generate
    monkeypatch.setattr(fast_decode, "fast_generate", lambda *a, **k: ran.append(1) or loop(*a, **k))
    default, fast = _both(model, batch, max_new_tokens=9, do_sample=False, pad_token_id=0)
    assert ran and fast.tolist() == default.tolist()


def test_penalty_and_minimum_length_act_as_in_generate(tiny):
    model, _, batch = tiny
    free = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0)
    stop = int(free[1, 0])  # row 1's first token: min_new_tokens must hold it back
    default, fast = _both(model, batch, max_new_tokens=10, min_new_tokens=4, do_sample=False, pad_token_id=0,
                          eos_token_id=[stop], repetition_penalty=1.3)
    assert fast.tolist() == default.tolist()
    assert stop not in fast[:, :4].flatten().tolist()


class _EndsAt(StoppingCriteria):
    """Ends a row once its newest token is `token` (as the loop stop ends a row at the step a loop shows)."""

    def __init__(self, token: int) -> None:
        self.token = token

    def __call__(self, input_ids: torch.Tensor, scores) -> torch.Tensor:
        return input_ids[:, -1] == self.token


def test_a_row_ended_by_a_stopping_criterion_keeps_the_tokens_it_keeps_step_by_step(tiny):
    model, _, batch = tiny
    free = model.generate(**batch, max_new_tokens=20, do_sample=False, pad_token_id=0)
    rows = free.tolist()
    # row 1 ends at a step inside the loop's first stretch of 8, on a token row 0 never draws: row 0 goes on
    step = next(t for t in range(2, 7) if rows[1][t] not in rows[0] and rows[1][t] not in rows[1][:t])
    token = rows[1][step]
    default, fast = _both(model, batch, max_new_tokens=20, do_sample=False, pad_token_id=0,
                          stopping_criteria=StoppingCriteriaList([_EndsAt(token)]))
    assert fast.tolist() == default.tolist()
    assert fast[1, step] == token and (fast[1, step + 1 :] == 0).all() and fast.shape[1] == 20
    # now row 0 ends too, in the second stretch: the answer is as long as row 0's
    late = next(t for t in range(9, 15) if rows[0][t] not in rows[0][:t] and rows[0][t] not in rows[1][: step + 1])
    both = StoppingCriteriaList([_EndsAt(token), _EndsAt(rows[0][late])])
    default, fast = _both(model, batch, max_new_tokens=20, do_sample=False, pad_token_id=0, stopping_criteria=both)
    assert fast.tolist() == default.tolist() and fast.shape[1] == late + 1


def test_settings_with_seeded_sampling_give_the_same_answers(tiny):
    model, proc, batch = tiny
    for settings in (GenerationSettings(max_new_tokens=12, repetition_penalty=1.2),
                     GenerationSettings(max_new_tokens=24, temperature=0.8, top_p=0.9, seed=7)):
        plain = generate_tokens(model, proc.tokenizer, batch, settings)
        fast = generate_tokens(model, proc.tokenizer, batch, GenerationSettings(**{**settings.__dict__, "fast": True}))
        assert fast.tolist() == plain.tolist(), settings


class _Recorder(BaseStreamer):
    def __init__(self) -> None:
        self.puts: list[list[int]] = []
        self.ended = False

    def put(self, value: torch.Tensor) -> None:
        self.puts.append(value.reshape(-1).tolist())

    def end(self) -> None:
        self.ended = True


def test_the_streamer_gets_the_prompt_then_the_first_token_alone_then_the_rest(tiny):
    model, _, batch = tiny
    one = {k: v[:1] for k, v in batch.items()}
    streamer = _Recorder()
    ids = model.generate(**one, max_new_tokens=20, do_sample=False, pad_token_id=0, fast=True, streamer=streamer)
    assert streamer.puts[0] == [] and len(streamer.puts[1]) == 1 and streamer.ended
    assert sum(streamer.puts[1:], []) == ids[0].tolist()
    assert len(streamer.puts) < 1 + ids.shape[1]  # tokens come in stretches, not one read per step


def test_arguments_the_loop_does_not_take_go_to_generate_with_the_static_cache(tiny, monkeypatch):
    model, _, batch = tiny
    seen = {}
    original = model.llm.generate

    def spy(**kwargs):
        seen.update(kwargs)
        return original(**kwargs)

    monkeypatch.setattr(model.llm, "generate", spy)
    model.generate(**batch, max_new_tokens=3, num_beams=2, do_sample=False, pad_token_id=0, fast=True)
    assert seen["cache_implementation"] == "static" and seen["num_beams"] == 2
    with pytest.raises(ValueError, match="cache_implementation='static'"):
        model.generate(**batch, max_new_tokens=2, fast=True, cache_implementation="dynamic")


def test_the_static_cache_is_emptied_and_reused_for_prompts_of_the_same_size(tiny):
    model, _, batch = tiny
    first = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0, fast=True)
    (size, cache) = model.llm.__dict__["_eardrum_static_cache"]
    assert size == (2, fast_decode.CACHE_STEP)  # prompt and answer rounded up
    again = model.generate(**batch, max_new_tokens=9, do_sample=False, pad_token_id=0, fast=True)
    assert model.llm.__dict__["_eardrum_static_cache"][1] is cache  # emptied, not stale: the same answer
    assert again[:, :6].tolist() == first.tolist()
    one = {k: v[1:] for k, v in batch.items()}  # another batch size: a cache of its own
    alone = model.generate(**one, max_new_tokens=6, do_sample=False, pad_token_id=0, fast=True)
    assert model.llm.__dict__["_eardrum_static_cache"][0][0] == 1
    assert alone.tolist() == model.generate(**one, max_new_tokens=6, do_sample=False, pad_token_id=0).tolist()


def test_the_step_is_compiled_where_it_can_be_and_runs_uncompiled_when_compiling_fails(tiny, monkeypatch, caplog):
    model, _, batch = tiny
    plain = model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=0)
    compiled = []

    def compile_that_works(fn, **options):
        compiled.append(options)
        return fn

    def compile_that_fails(fn, **options):
        def run(**inputs):
            raise torch._dynamo.exc.TorchDynamoException("no compiler here")
        return run

    monkeypatch.setattr(fast_decode, "_can_compile", lambda llm: True)
    for compile_fn in (compile_that_works, compile_that_fails):
        monkeypatch.setattr(torch, "compile", compile_fn)
        monkeypatch.delitem(model.llm.__dict__, "_eardrum_step", raising=False)
        fast = model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=0, fast=True)
        assert fast.tolist() == plain.tolist()
    assert compiled == [{"mode": "reduce-overhead", "dynamic": False}]
    assert "could not be compiled" in caplog.text
    assert model.llm.__dict__["_eardrum_step"].compiled is None  # the failed one is not tried again
