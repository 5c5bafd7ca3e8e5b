"""AudioLLM: merge by mask, count check, padding sides, loss, generate, LoRA and 4-bit LLMs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import build_tokenizer, tiny_llama, tiny_qwen2, tiny_whisper, whisper_feature_extractor
from eardrum.adapters.config import AudioLLMConfig
from eardrum.adapters.encoders import AudioFeaturizer, build_speech_encoder
from eardrum.adapters.merge import AudioTokenCountError
from eardrum.adapters.model import AudioLLM
from eardrum.adapters.processor import AudioProcessor
from eardrum.adapters.projectors import ProjectorConfig, build_projector


def assemble(llm=None, template="chatml", projector="stack"):
    torch.manual_seed(0)
    tok = build_tokenizer(template)
    vocab = len(tok)  # the placeholder id will be == vocab: no embedding row exists for it
    llm = llm if llm is not None else tiny_llama(vocab_size=vocab)
    whisper = tiny_whisper()
    encoder = build_speech_encoder(whisper)
    cfg = AudioLLMConfig(encoder="tiny-whisper", llm="tiny-llm", projector=ProjectorConfig(name=projector))
    proc = AudioProcessor(tok, AudioFeaturizer(whisper_feature_extractor(), encoder.spec), cfg)
    proj = build_projector(cfg.projector, encoder.hidden_size, llm.get_input_embeddings().embedding_dim)
    return AudioLLM(cfg, encoder, proj, llm, proc.placeholder_id), proc


def clip(seconds, seed=0):
    return (np.random.default_rng(seed).standard_normal(int(seconds * 16000)) * 0.1).astype(np.float32), 16000


def conv(seconds, question="what is said?", answer="hello world", seed=0):
    return [
        {
            "role": "user",
            "content": [{"type": "audio", "audio": clip(seconds, seed)}, {"type": "text", "text": question}],
        },
        {"role": "assistant", "content": answer},
    ]


@pytest.fixture(scope="module")
def tiny():
    return assemble()


def test_placeholder_id_has_no_embedding_row(tiny):
    model, proc = tiny
    assert proc.placeholder_id == model.llm.get_input_embeddings().num_embeddings


def test_merged_embeddings_are_audio_at_placeholders_and_text_elsewhere(tiny):
    model, proc = tiny
    batch = proc([conv(0.6), conv(1.3, seed=1)])
    with torch.no_grad():
        merged = model.embed(batch["input_ids"], batch["audio_features"], batch["audio_lengths"])
        tokens, lengths = model.encode_audio(batch["audio_features"], batch["audio_lengths"])
        text = model.llm.get_input_embeddings()(batch["input_ids"].clamp(max=proc.placeholder_id - 1))
    mask = batch["input_ids"] == proc.placeholder_id
    for b in range(2):
        assert torch.equal(merged[b][mask[b]], tokens[b, : lengths[b]])
        assert torch.equal(merged[b][~mask[b]], text[b][~mask[b]])


def test_count_mismatch_names_both_counts(tiny):
    model, proc = tiny
    batch = proc(conv(1.0))
    ids = batch["input_ids"].clone()
    ids[0, (ids[0] == proc.placeholder_id).nonzero()[0]] = 5  # drop one placeholder
    with pytest.raises(AudioTokenCountError, match="12 audio placeholder tokens but the audio yields 13"):
        model.embed(ids, batch["audio_features"], batch["audio_lengths"])
    with pytest.raises(ValueError, match="no audio_features"):
        model.embed(batch["input_ids"])


def test_left_and_right_padding_give_the_same_logits(tiny):
    model, proc = tiny
    convs = [conv(0.4), conv(1.7, question="a much longer question that needs padding", seed=2)]
    right = proc(convs, padding_side="right")
    left = proc(convs, padding_side="left")
    with torch.no_grad():
        lr = model(**{k: v for k, v in right.items() if k != "labels"}).logits
        ll = model(**{k: v for k, v in left.items() if k != "labels"}).logits
    for b in range(2):
        n = int(right["attention_mask"][b].sum())
        torch.testing.assert_close(lr[b, :n], ll[b, -n:], atol=1e-5, rtol=0)


def test_loss_is_cross_entropy_on_labelled_tokens_only(tiny):
    model, proc = tiny
    batch = proc([conv(0.5), conv(0.9, answer="one two three", seed=3)])
    with torch.no_grad():
        out = model(**batch)
    logits, labels = out.logits[:, :-1], batch["labels"][:, 1:]
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1))
    torch.testing.assert_close(out.loss, expected, atol=1e-6, rtol=0)


def test_a_forward_over_whole_sequences_keeps_no_kv_cache(tiny):
    """transformers' LLMs build a KV cache by default, in training too: a copy of every layer's keys and values."""
    model, proc = tiny
    batch = proc([conv(0.5), conv(0.9, answer="one two three", seed=3)])
    out = model(**batch)
    assert out.get("past_key_values") is None and out.get("cache") is None
    assert model(**batch, use_cache=True).get("past_key_values") is not None  # asked for, it is there


@pytest.mark.parametrize("llm", ["llama", "qwen2_lora"])
def test_labelled_logits_only_gives_the_same_loss_and_gradients(llm):
    from peft import LoraConfig, get_peft_model

    model, proc = assemble(tiny_qwen2(vocab_size=len(build_tokenizer("chatml")))) if llm != "llama" else assemble()
    if llm == "qwen2_lora":
        model.llm = get_peft_model(model.llm, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    batch = proc([conv(0.5), conv(1.7, answer="one two three four", seed=3), conv(0.9, answer="ok", seed=4)])
    results = []
    for only in (False, True):
        model.zero_grad()
        out = model(**batch, labelled_logits_only=only)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
        results.append((out, grads))
    (full, full_grads), (kept, kept_grads) = results
    torch.testing.assert_close(kept.loss, full.loss, atol=1e-6, rtol=1e-6)
    assert full_grads.keys() == kept_grads.keys() and any(n.startswith("projector.") for n in kept_grads)
    for name in full_grads:
        torch.testing.assert_close(kept_grads[name], full_grads[name], atol=1e-6, rtol=1e-5)
    positions = kept["logit_positions"]
    labelled = (batch["labels"][:, 1:] != -100).any(0)
    assert positions.tolist() == labelled.nonzero().squeeze(1).tolist() and len(positions) < labelled.numel()
    assert kept.logits.shape[:2] == (3, len(positions))
    torch.testing.assert_close(kept.logits, full.logits[:, positions], atol=1e-5, rtol=0)


def test_labelled_logits_only_falls_back_to_all_logits_without_logits_to_keep(tiny, monkeypatch):
    import eardrum.adapters.model as model_module

    model, proc = tiny
    batch = proc([conv(0.5), conv(0.9, answer="one two three", seed=3)])
    monkeypatch.setattr(model_module, "takes_logits_to_keep", lambda llm: False)
    with torch.no_grad():
        out, plain = model(**batch, labelled_logits_only=True), model(**batch)
    assert out["logit_positions"].tolist() == list(range(batch["labels"].shape[1]))
    torch.testing.assert_close(out.logits, plain.logits) and torch.testing.assert_close(out.loss, plain.loss)


def test_labelled_logits_only_with_nothing_labelled_is_a_zero_loss(tiny):
    model, proc = tiny
    batch = proc([conv(0.5)])
    out = model(**{**batch, "labels": torch.full_like(batch["labels"], -100)}, labelled_logits_only=True)
    assert out.loss.item() == 0.0 and out.logits.shape[1] == 0


def test_batched_left_padded_generation_equals_one_by_one(tiny):
    model, proc = tiny
    convs = [conv(0.5)[:1], conv(1.5, question="tell me more about this recording", seed=4)[:1]]
    batch = proc(convs, add_generation_prompt=True)
    out = model.generate(**batch, max_new_tokens=6, do_sample=False, pad_token_id=0)
    for b, c in enumerate(convs):
        alone = model.generate(
            **proc([c], add_generation_prompt=True), max_new_tokens=6, do_sample=False, pad_token_id=0
        )
        assert out[b].tolist() == alone[0].tolist()
    with pytest.raises(ValueError, match="left padding"):
        model.generate(**proc(convs, add_generation_prompt=True, padding_side="right"), max_new_tokens=2)


def test_gradients_reach_projector_only_when_llm_is_frozen(tiny):
    model, proc = tiny
    for p in model.llm.parameters():
        p.requires_grad_(False)
    model.zero_grad()
    model(**proc(conv(0.5))).loss.backward()
    assert all(p.grad is not None for p in model.projector.parameters())
    assert all(p.grad is None for p in model.encoder.parameters())


def test_lora_wrapped_llm_trains_adapters_and_projector():
    from peft import LoraConfig, get_peft_model

    model, proc = assemble(tiny_qwen2(vocab_size=len(build_tokenizer("chatml"))), template="chatml")
    model.llm = get_peft_model(model.llm, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model(**proc(conv(0.5))).loss.backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert any("lora_A" in n for n in trained) and any(n.startswith("projector.") for n in trained)
    assert not any("encoder." in n for n in trained)
    assert not any(n.endswith("q_proj.base_layer.weight") for n in trained)


@pytest.mark.parametrize("bits", ["4bit", "8bit"])
def test_quantized_llm_forward_and_generate(tmp_path, bits):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    # bitsandbytes' CPU 4-bit kernels need output widths that are multiples of 64
    tiny_llama(vocab_size=len(build_tokenizer("chatml")), hidden=64, kv_heads=4).save_pretrained(tmp_path)
    quant = (
        BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
        if bits == "4bit"
        else BitsAndBytesConfig(load_in_8bit=True)
    )
    llm = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=quant)
    model, proc = assemble(llm)
    out = model(**proc(conv(0.5)))
    assert torch.isfinite(out.loss)
    new = model.generate(
        **proc([conv(0.5)[0]], add_generation_prompt=True), max_new_tokens=3, do_sample=False, pad_token_id=0
    )
    assert new.shape == (1, 3)


def test_precomputed_encoder_frames_give_the_same_logits(tiny):
    model, proc = tiny
    batch = proc([conv(0.6), conv(1.1, seed=5)])
    with torch.no_grad():
        frames, frame_lengths = model.encoder(batch["audio_features"], batch["audio_lengths"])
        direct = model(**batch).logits
        rest = {k: v for k, v in batch.items() if not k.startswith("audio_")}
        cached = model(**rest, audio_frames=frames, frame_lengths=frame_lengths).logits
    assert torch.equal(direct, cached)
    with pytest.raises(ValueError, match="not both"):
        model(**batch, audio_frames=frames, frame_lengths=frame_lengths)


def test_windows_encoded_in_chunks_give_the_same_tokens(tiny):
    model, proc = tiny
    batch = proc([conv(0.3), conv(1.9, seed=1), conv(0.7, seed=2), conv(1.2, seed=3), conv(0.5, seed=4)])
    with torch.no_grad():
        whole, whole_lengths = model.encode_audio(batch["audio_features"], batch["audio_lengths"])
        model.windows_per_forward = 2
        try:
            chunked, chunked_lengths = model.encode_audio(batch["audio_features"], batch["audio_lengths"])
        finally:
            model.windows_per_forward = 8
    assert torch.equal(whole_lengths, chunked_lengths) and whole.shape == chunked.shape
    for i, n in enumerate(whole_lengths.tolist()):
        torch.testing.assert_close(chunked[i, :n], whole[i, :n], atol=1e-5, rtol=0)


def with_system(conversation, text="You are a careful listener who answers in a few words, and only from the audio."):
    return [{"role": "system", "content": text}, *conversation]


@pytest.mark.parametrize("llm", ["llama", "qwen2_lora"])
def test_a_shared_prefix_run_once_gives_the_same_loss_and_gradients(llm):
    from peft import LoraConfig, get_peft_model

    import eardrum.adapters.model as model_module

    model, proc = assemble(tiny_qwen2(vocab_size=len(build_tokenizer("chatml")))) if llm != "llama" else assemble()
    if llm == "qwen2_lora":
        model.llm = get_peft_model(model.llm, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    else:  # frozen LLM, as in stage 1: only the projector learns, through the rows after the prefix
        model.llm.requires_grad_(False)
    batch = proc([with_system(conv(0.5)), with_system(conv(1.7, answer="one two three four", seed=3)),
                  with_system(conv(0.9, question="and this?", answer="ok", seed=4))])
    prefix = model_module.shared_prefix_length(batch["input_ids"], batch["attention_mask"], batch["labels"],
                                               model.placeholder_id)
    assert prefix >= model_module.MIN_SHARED_PREFIX  # the system turn and the user turn's header
    lengths = []
    model.llm.register_forward_pre_hook(lambda _, args, kwargs: lengths.append(kwargs["inputs_embeds"].shape[:2]),
                                        with_kwargs=True)
    results = []
    for share in (False, True):
        model.zero_grad()
        out = model(**batch, labelled_logits_only=True, share_prefix=share)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}))
    (plain, plain_grads), (shared, shared_grads) = results
    rows, length = batch["input_ids"].shape
    assert lengths == [(rows, length), (1, prefix), (rows, length - prefix)]  # the prefix ran once, for one row
    torch.testing.assert_close(shared.loss, plain.loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(shared.logits, plain.logits, atol=1e-5, rtol=1e-5)
    assert shared["logit_positions"].tolist() == plain["logit_positions"].tolist()
    assert plain_grads.keys() == shared_grads.keys() and any(n.startswith("projector.") for n in plain_grads)
    assert (llm == "qwen2_lora") == any("lora_A" in n for n in plain_grads)
    for name in plain_grads:
        torch.testing.assert_close(shared_grads[name], plain_grads[name], atol=1e-6, rtol=1e-5)


def test_the_shared_prefix_stops_at_what_differs_and_before_the_first_label(tiny):
    from eardrum.adapters.model import MIN_SHARED_PREFIX, shared_prefix_length

    model, proc = tiny
    batch = proc([with_system(conv(0.5)), with_system(conv(0.9, seed=3))])
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
    prefix = shared_prefix_length(ids, mask, labels, model.placeholder_id)
    first_audio = int((ids[0] == model.placeholder_id).nonzero()[0])
    assert MIN_SHARED_PREFIX <= prefix <= first_audio  # audio is never shared: it differs from row to row
    early = labels.clone()
    early[1, prefix - 2] = 7  # a label inside the shared text: position prefix - 3 predicts it
    assert shared_prefix_length(ids, mask, early, model.placeholder_id) in (0, prefix - 3)
    other = proc([with_system(conv(0.5)), with_system(conv(0.9, seed=3), text="Be brief.")])
    assert shared_prefix_length(other["input_ids"], other["attention_mask"], other["labels"],
                                model.placeholder_id) < MIN_SHARED_PREFIX  # the system turns differ early on
    left = proc([with_system(conv(0.5)), with_system(conv(1.9, seed=3))], padding_side="left")
    assert shared_prefix_length(left["input_ids"], left["attention_mask"], left["labels"], model.placeholder_id) == 0
    one = proc([with_system(conv(0.5))])
    assert shared_prefix_length(one["input_ids"], one["attention_mask"], one["labels"], model.placeholder_id) == 0


def test_no_prefix_is_shared_under_gradient_checkpointing_or_given_positions(tiny):
    from eardrum.adapters.attention import PACKED_SDPA
    from eardrum.adapters.model import can_share_prefix

    model, _ = tiny
    assert can_share_prefix(model.llm, {})
    assert not can_share_prefix(model.llm, {"position_ids": torch.zeros(1, 4, dtype=torch.long)})
    config = model.llm.config
    config.sliding_window = 16  # a window: keys past it must not be seen, and the prefix is always seen
    try:
        assert not can_share_prefix(model.llm, {})
    finally:
        config.sliding_window = None
    config._attn_implementation = "eager"  # only eardrum's SDPA reads the prefix's keys and values
    try:
        assert not can_share_prefix(model.llm, {})
    finally:
        config._attn_implementation = PACKED_SDPA
    assert can_share_prefix(model.llm, {})
    attention = [m for m in model.llm.modules() if type(m).__name__.endswith("Attention")]
    kept = attention[0].layer_idx
    del attention[0].layer_idx  # an attention module that does not know its layer: its keys cannot be handed to it
    try:
        assert not can_share_prefix(model.llm, {})
    finally:
        attention[0].layer_idx = kept
    model.llm.gradient_checkpointing_enable()
    try:
        assert not can_share_prefix(model.llm, {})  # each checkpointed layer would be called without the cache
    finally:
        model.llm.gradient_checkpointing_disable()
