"""Weight sources: CTranslate2 Whisper conversion, GGUF and local LLM loading, quantisation, dispatch.

The CTranslate2 files are written here by `write_ct2_model` from a tiny random transformers Whisper, the
inverse of the conversion under test, so every check is a round trip with exact expected values.
"""

from __future__ import annotations

import json
import re
import struct
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Wav2Vec2Config,
    Wav2Vec2FeatureExtractor,
    Wav2Vec2Model,
    WhisperConfig,
    WhisperFeatureExtractor,
    WhisperForConditionalGeneration,
)

from eardrum.adapters import sources
from eardrum.adapters.ct2 import ct2_whisper_state_dict, read_ct2_model
from eardrum.adapters.sources import (
    CT2FormatError,
    SourceNotFoundError,
    UnknownQuantizationError,
    convert_ct2_whisper,
    describe_source,
    is_ct2_whisper_folder,
    load_causal_lm,
    load_speech_model,
)

torch.set_num_threads(1)

WORDS = (
    "the a an quick brown fox jumps over lazy dog hello world cat sat on mat and of to in is it was he she "
    "we they you i said that this with for not but be at by from up down left right yes no one two three"
).split()
# Whisper's special tokens in Whisper's order, after the words
SPECIALS = (
    "<|endoftext|> <|startoftranscript|> <|en|> <|translate|> <|transcribe|> <|startofprev|> <|nocaptions|> "
    "<|notimestamps|>"
).split()
EOT, SOT, NO_TIMESTAMPS = len(WORDS), len(WORDS) + 1, len(WORDS) + 7
SUPPRESS, SUPPRESS_BEGIN = [3, 5, 40], [EOT, 0]
CT2_TYPE_IDS = {"float32": 0, "int8": 1, "int16": 2, "int32": 3, "float16": 4}


# ---------------------------------------------------------------------------------------------- writers
def _ct2_string(text: str) -> bytes:
    data = text.encode() + b"\0"
    return struct.pack("<H", len(data)) + data


def write_ct2_model(
    path: Path,
    variables: dict[str, np.ndarray],
    aliases: dict[str, str],
    *,
    version: int = 6,
    bf16: frozenset[str] = frozenset(),
) -> None:
    """Writes a CTranslate2 model.bin; names in `bf16` hold the raw uint16 bits of bfloat16 values."""
    out = [struct.pack("<I", version), _ct2_string("WhisperSpec"), struct.pack("<II", 3, len(variables))]
    for name, value in variables.items():
        value = np.asarray(value)  # keeps scalars 0-d; tobytes() is C order
        type_id = 5 if name in bf16 else CT2_TYPE_IDS[value.dtype.name]
        out += [_ct2_string(name), struct.pack("<B", value.ndim)]
        out += [struct.pack("<I", dim) for dim in value.shape]
        out += [struct.pack("<BI", type_id, value.nbytes), value.tobytes()]
    out.append(struct.pack("<I", len(aliases)))
    out += [_ct2_string(alias) + _ct2_string(target) for alias, target in aliases.items()]
    path.write_bytes(b"".join(out))


def whisper_ct2_variables(model: WhisperForConditionalGeneration) -> dict[str, np.ndarray]:
    """The inverse of the conversion: transformers Whisper -> CTranslate2 names, float16 storage."""
    sd = {name: value.detach().numpy() for name, value in model.state_dict().items()}
    cfg = model.config
    v: dict[str, np.ndarray] = {}

    def linear(ct2: str, hf: str) -> None:
        v[f"{ct2}/weight"], v[f"{ct2}/bias"] = sd[f"{hf}.weight"], sd[f"{hf}.bias"]

    def norm(ct2: str, hf: str) -> None:
        v[f"{ct2}/gamma"], v[f"{ct2}/beta"] = sd[f"{hf}.weight"], sd[f"{hf}.bias"]

    def fused(ct2: str, hfs: list[str]) -> None:
        v[f"{ct2}/weight"] = np.concatenate([sd[f"{hf}.weight"] for hf in hfs])
        zeros = np.zeros(cfg.d_model, dtype=np.float32)  # the key projection has no bias
        v[f"{ct2}/bias"] = np.concatenate([sd.get(f"{hf}.bias", zeros) for hf in hfs])

    def block(ct2: str, hf: str, cross: bool) -> None:
        fused(f"{ct2}/self_attention/linear_0", [f"{hf}.self_attn.{p}_proj" for p in "qkv"])
        linear(f"{ct2}/self_attention/linear_1", f"{hf}.self_attn.out_proj")
        norm(f"{ct2}/self_attention/layer_norm", f"{hf}.self_attn_layer_norm")
        if cross:
            linear(f"{ct2}/attention/linear_0", f"{hf}.encoder_attn.q_proj")
            fused(f"{ct2}/attention/linear_1", [f"{hf}.encoder_attn.k_proj", f"{hf}.encoder_attn.v_proj"])
            linear(f"{ct2}/attention/linear_2", f"{hf}.encoder_attn.out_proj")
            norm(f"{ct2}/attention/layer_norm", f"{hf}.encoder_attn_layer_norm")
        linear(f"{ct2}/ffn/linear_0", f"{hf}.fc1")
        linear(f"{ct2}/ffn/linear_1", f"{hf}.fc2")
        norm(f"{ct2}/ffn/layer_norm", f"{hf}.final_layer_norm")

    linear("encoder/conv1", "model.encoder.conv1")
    linear("encoder/conv2", "model.encoder.conv2")
    v["encoder/position_encodings/encodings"] = sd["model.encoder.embed_positions.weight"]
    norm("encoder/layer_norm", "model.encoder.layer_norm")
    for i in range(cfg.encoder_layers):
        block(f"encoder/layer_{i}", f"model.encoder.layers.{i}", cross=False)
    v["decoder/embeddings/weight"] = sd["model.decoder.embed_tokens.weight"]
    v["decoder/position_encodings/encodings"] = sd["model.decoder.embed_positions.weight"]
    norm("decoder/layer_norm", "model.decoder.layer_norm")
    for i in range(cfg.decoder_layers):
        block(f"decoder/layer_{i}", f"model.decoder.layers.{i}", cross=True)
    v = {name: value.astype(np.float16) for name, value in v.items()}
    v |= {
        "encoder/num_heads": np.int16(cfg.encoder_attention_heads),
        "decoder/num_heads": np.int16(cfg.decoder_attention_heads),
    }
    v |= {"decoder/activation": np.int8(3), "decoder/pre_norm": np.int8(1), "decoder/alibi": np.int8(0)}
    v |= {"decoder/scale_embeddings": np.int8(0), "decoder/start_from_zero_embedding": np.int8(0)}
    v |= {"decoder/alignment_heads": np.int16(1), "decoder/alignment_layer": np.int16(-1)}
    return dict(sorted(v.items()))


def write_ct2_whisper_folder(folder: Path, model: WhisperForConditionalGeneration, **extra: np.ndarray) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    variables = whisper_ct2_variables(model) | extra
    write_ct2_model(folder / "model.bin", variables, {"decoder/projection/weight": "decoder/embeddings/weight"})
    ct2_config = {"alignment_heads": [[1, 0]], "suppress_ids": SUPPRESS, "suppress_ids_begin": SUPPRESS_BEGIN}
    (folder / "config.json").write_text(json.dumps(ct2_config))
    tokenizer = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS + SPECIALS)}, unk_token=SPECIALS[0]))
    tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer.add_special_tokens(SPECIALS)
    tokenizer.save(str(folder / "tokenizer.json"))
    return folder


# ---------------------------------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def whisper() -> WhisperForConditionalGeneration:
    torch.manual_seed(0)
    config = WhisperConfig(
        vocab_size=len(WORDS) + len(SPECIALS),  # Whisper reads every id past <|notimestamps|> as a time
        num_mel_bins=80,
        d_model=64,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=128,
        decoder_ffn_dim=128,
        max_source_positions=1500,
        max_target_positions=32,
        decoder_start_token_id=SOT,
        bos_token_id=EOT,
        eos_token_id=EOT,
        pad_token_id=EOT,
        init_std=0.2,  # large enough that greedy decoding does not repeat one token
    )
    model = WhisperForConditionalGeneration(config).eval()
    with torch.no_grad():  # random norms and biases, so that a swapped gamma/beta or bias cannot pass
        for name, param in model.named_parameters():
            if "layer_norm" in name or name.endswith("bias"):
                param.normal_(0.5 if name.endswith("weight") else 0.0, 0.2)
    return model


@pytest.fixture(scope="module")
def whisper_fp16(whisper: WhisperForConditionalGeneration) -> WhisperForConditionalGeneration:
    """The original with every weight rounded through float16, as CTranslate2 stores it."""
    model = WhisperForConditionalGeneration(whisper.config).eval()
    model.load_state_dict({k: v.half().float() for k, v in whisper.state_dict().items()})
    return model


@pytest.fixture(scope="module")
def ct2_folder(tmp_path_factory: pytest.TempPathFactory, whisper: WhisperForConditionalGeneration) -> Path:
    return write_ct2_whisper_folder(tmp_path_factory.mktemp("ct2") / "tiny", whisper)


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory, ct2_folder: Path) -> Path:
    return convert_ct2_whisper(ct2_folder, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def features() -> torch.Tensor:
    return torch.randn(2, 80, 3000, generator=torch.Generator().manual_seed(1))  # (B, n_mels, frames)


# ---------------------------------------------------------------------------------------------- CTranslate2
def test_read_ct2_model_decodes_every_dtype_and_resolves_aliases(tmp_path: Path) -> None:
    bf16_bits = np.array([0x3F80, 0xC000], dtype=np.uint16)  # 1.0, -2.0
    variables = {
        "f32": np.array([[1.5, -2.0]], dtype=np.float32),
        "f16": np.array([0.5, 3.0], dtype=np.float16),
        "bf16": bf16_bits,
        "i8": np.array([-3, 4], dtype=np.int8),
        "i16": np.int16(6),
        "i32": np.array([70000], dtype=np.int32),
    }
    write_ct2_model(tmp_path / "model.bin", variables, {"same": "f16"}, bf16=frozenset({"bf16"}))
    read = read_ct2_model(tmp_path / "model.bin")
    assert sorted(read) == ["bf16", "f16", "f32", "i16", "i32", "i8", "same"]
    assert read["bf16"].dtype == np.float32 and read["bf16"].tolist() == [1.0, -2.0]
    for name in ("f32", "f16", "i8", "i16", "i32"):
        assert read[name].dtype == variables[name].dtype and np.array_equal(read[name], variables[name])
    assert read["same"] is read["f16"]


def test_conversion_keeps_every_parameter_to_fp16_rounding(
    converted: Path, whisper_fp16: WhisperForConditionalGeneration
) -> None:
    model, feature_extractor = load_speech_model(str(converted))
    assert isinstance(model, WhisperForConditionalGeneration) and not model.training
    expected = dict(whisper_fp16.named_parameters())
    got = dict(model.named_parameters())
    assert sorted(got) == sorted(expected)
    for name, value in got.items():
        assert value.dtype == torch.float32 and torch.equal(value, expected[name]), name
    assert model.proj_out.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    assert isinstance(feature_extractor, WhisperFeatureExtractor)
    assert (feature_extractor.feature_size, feature_extractor.nb_max_frames) == (80, 3000)


def test_converted_encoder_and_decoder_match_the_original(
    converted: Path, whisper_fp16: WhisperForConditionalGeneration, features: torch.Tensor
) -> None:
    model, _ = load_speech_model(str(converted))
    decoder_ids = torch.tensor([[SOT, NO_TIMESTAMPS, 7, 8]] * 2)
    with torch.no_grad():
        got = model(input_features=features, decoder_input_ids=decoder_ids)
        want = whisper_fp16(input_features=features, decoder_input_ids=decoder_ids)
    assert torch.equal(got.encoder_last_hidden_state, want.encoder_last_hidden_state)
    assert torch.equal(got.logits, want.logits)


def test_converted_generate_starts_from_the_whisper_prompt(
    converted: Path, whisper_fp16: WhisperForConditionalGeneration, features: torch.Tensor
) -> None:
    model, _ = load_speech_model(str(converted))
    config = model.generation_config
    assert (config.decoder_start_token_id, config.no_timestamps_token_id, config.eos_token_id) == (
        SOT,
        NO_TIMESTAMPS,
        EOT,
    )
    assert (config.suppress_tokens, config.begin_suppress_tokens, config.is_multilingual) == (
        SUPPRESS,
        SUPPRESS_BEGIN,
        False,
    )
    with torch.no_grad():
        generated = model.generate(features[:1], max_new_tokens=6)
        ids = [SOT, NO_TIMESTAMPS]  # greedy by hand: suppressed tokens never, begin-suppressed not first
        for step in range(6):
            logits = whisper_fp16(input_features=features[:1], decoder_input_ids=torch.tensor([ids])).logits[0, -1]
            logits[SUPPRESS + (SUPPRESS_BEGIN if step == 0 else [])] = -torch.inf
            ids.append(int(logits.argmax()))
            if ids[-1] == EOT:
                break
    assert generated[0].tolist() == ids[2:]


def test_second_conversion_reuses_the_cache(tmp_path: Path, ct2_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = convert_ct2_whisper(ct2_folder, cache_dir=tmp_path)
    assert [p.name for p in (tmp_path / "ct2-whisper").iterdir()] == [first.name]  # no staging left
    stamp = (first / "model.safetensors").stat().st_mtime_ns

    def must_not_run(path: object) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(sources, "read_ct2_model", must_not_run)
    assert convert_ct2_whisper(ct2_folder, cache_dir=tmp_path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp


def test_default_cache_is_eardrum_cache(tmp_path: Path, ct2_folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EARDRUM_CACHE", str(tmp_path))
    assert convert_ct2_whisper(ct2_folder).parent == tmp_path / "ct2-whisper"


def test_truncated_model_bin_names_the_file(tmp_path: Path, ct2_folder: Path) -> None:
    folder = tmp_path / "broken"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (folder / name).write_bytes((ct2_folder / name).read_bytes())
    data = (ct2_folder / "model.bin").read_bytes()
    (folder / "model.bin").write_bytes(data[: len(data) // 2])
    with pytest.raises(CT2FormatError, match=re.escape(f"{folder / 'model.bin'}: truncated CTranslate2 file")):
        convert_ct2_whisper(folder, cache_dir=tmp_path / "cache")
    assert not any((tmp_path / "cache" / "ct2-whisper").iterdir())


def test_wrong_format_version_names_the_file(tmp_path: Path) -> None:
    write_ct2_model(tmp_path / "model.bin", {"x": np.zeros(2, np.float32)}, {}, version=5)
    with pytest.raises(
        CT2FormatError, match=re.escape(str(tmp_path / "model.bin")) + r": .*format version 6 \(read 5\)"
    ):
        read_ct2_model(tmp_path / "model.bin")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"decoder/layer_0/self_attention/relative_position_keys": np.zeros((3, 16), np.float16)}, "unknown"),
        ({"decoder/activation": np.int8(1)}, "decoder/activation is 1; a Whisper model has 3"),
    ],
    ids=["unmapped-variable", "wrong-setting"],
)
def test_unknown_layout_is_refused_naming_the_variable(
    tmp_path: Path, whisper: WhisperForConditionalGeneration, extra: dict, message: str
) -> None:
    folder = write_ct2_whisper_folder(tmp_path / "odd", whisper, **extra)
    with pytest.raises(CT2FormatError, match=message) as caught:
        convert_ct2_whisper(folder, cache_dir=tmp_path / "cache")
    assert str(folder / "model.bin") in str(caught.value) and next(iter(extra)) in str(caught.value)
    assert not any((tmp_path / "cache" / "ct2-whisper").iterdir())


def test_int8_weights_are_dequantised(whisper: WhisperForConditionalGeneration) -> None:
    variables = whisper_ct2_variables(whisper)
    weight = variables["encoder/layer_1/ffn/linear_0/weight"].astype(np.float32)  # (F, D)
    scale = 127.0 / np.abs(weight).max(axis=1)
    variables["encoder/layer_1/ffn/linear_0/weight"] = np.round(weight * scale[:, None]).astype(np.int8)
    variables["encoder/layer_1/ffn/linear_0/weight_scale"] = scale.astype(np.float32)
    variables["decoder/projection/weight"] = variables["decoder/embeddings/weight"]
    state, _ = ct2_whisper_state_dict(variables)
    error = (state["model.encoder.layers.1.fc1.weight"] - torch.from_numpy(weight)).abs()
    assert bool((error <= torch.from_numpy(0.5 / scale)[:, None] + 1e-7).all())


# ---------------------------------------------------------------------------------------------- dispatch
def test_describe_source_tells_each_kind(tmp_path: Path, ct2_folder: Path, converted: Path) -> None:
    (tmp_path / "m.gguf").write_bytes(b"GGUF")
    assert describe_source(str(ct2_folder)) == "ct2_whisper"
    assert describe_source(str(converted)) == "local"
    assert describe_source(str(tmp_path / "m.gguf")) == "gguf"
    assert describe_source("openai/whisper-tiny") == "hub"
    assert is_ct2_whisper_folder(ct2_folder) and not is_ct2_whisper_folder(converted)


@pytest.mark.parametrize("source", ["./no/such/model", "/no/such/model.gguf", "~/no-such-eardrum-model"])
def test_missing_local_path_is_an_error_not_a_hub_lookup(source: str) -> None:
    with pytest.raises(SourceNotFoundError, match=re.escape(repr(source))):
        load_causal_lm(source)
    with pytest.raises(SourceNotFoundError, match=re.escape(repr(source))):
        describe_source(source)


def test_load_speech_model_uses_auto_model_for_wav2vec2(tmp_path: Path) -> None:
    torch.manual_seed(0)
    config = Wav2Vec2Config(
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16, 16),
        conv_stride=(5, 2),
        conv_kernel=(10, 3),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=2,
    )
    Wav2Vec2Model(config).save_pretrained(tmp_path)
    Wav2Vec2FeatureExtractor(return_attention_mask=True).save_pretrained(tmp_path)
    model, feature_extractor = load_speech_model(str(tmp_path))
    assert type(model) is Wav2Vec2Model and type(feature_extractor) is Wav2Vec2FeatureExtractor


# ---------------------------------------------------------------------------------------------- causal LMs
@pytest.fixture(scope="module")
def llama(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, LlamaForCausalLM, PreTrainedTokenizerFast]:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([" ".join(WORDS)] * 4, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    torch.manual_seed(0)
    # hidden 64: bitsandbytes' CPU 4-bit kernels need at least one 64-wide block per row
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        bos_token_id=0,
        eos_token_id=0,
    )
    model = LlamaForCausalLM(config).eval()
    folder = tmp_path_factory.mktemp("llama")
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder, model, fast


def _rope_interleave(weight: np.ndarray, heads: int) -> np.ndarray:
    """transformers rotates the two halves of each head; llama.cpp rotates adjacent pairs."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, -1).swapaxes(1, 2).reshape(weight.shape)


def write_llama_gguf(path: Path, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    cfg = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny")
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_freq_base(10000.0)
    writer.add_vocab_size(cfg.vocab_size)
    vocab = tokenizer.get_vocab()
    tokens = sorted(vocab, key=vocab.__getitem__)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token == "<|endoftext|>" else 1 for token in tokens])  # 3: control
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_token_merges([" ".join(pair) for pair in merges])
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    sd = {name: value.detach().numpy() for name, value in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        hf, blk = f"model.layers.{i}.", f"blk.{i}."
        q, k = sd[hf + "self_attn.q_proj.weight"], sd[hf + "self_attn.k_proj.weight"]
        writer.add_tensor(blk + "attn_norm.weight", sd[hf + "input_layernorm.weight"])
        writer.add_tensor(blk + "attn_q.weight", _rope_interleave(q, cfg.num_attention_heads))
        writer.add_tensor(blk + "attn_k.weight", _rope_interleave(k, cfg.num_key_value_heads))
        writer.add_tensor(blk + "attn_v.weight", sd[hf + "self_attn.v_proj.weight"])
        writer.add_tensor(blk + "attn_output.weight", sd[hf + "self_attn.o_proj.weight"])
        writer.add_tensor(blk + "ffn_norm.weight", sd[hf + "post_attention_layernorm.weight"])
        for part in ("gate", "up", "down"):
            writer.add_tensor(blk + f"ffn_{part}.weight", sd[hf + f"mlp.{part}_proj.weight"])
    writer.add_tensor("output_norm.weight", sd["model.norm.weight"])
    writer.add_tensor("output.weight", sd["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


TEXT = "hello world the lazy cat"


def _same_lm(loaded: tuple, model: LlamaForCausalLM, tokenizer: PreTrainedTokenizerFast) -> None:
    got_model, got_tokenizer = loaded
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    assert got_tokenizer(TEXT).input_ids == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(got_model(ids).logits, model(ids).logits)


def test_load_causal_lm_from_a_local_folder(llama: tuple) -> None:
    folder, model, tokenizer = llama
    assert describe_source(str(folder)) == "local"
    _same_lm(load_causal_lm(str(folder)), model, tokenizer)


def test_load_causal_lm_from_a_gguf_path(tmp_path: Path, llama: tuple, monkeypatch) -> None:
    monkeypatch.setenv("EARDRUM_CACHE", str(tmp_path / "cache"))
    _, model, tokenizer = llama
    write_llama_gguf(tmp_path / "tiny.gguf", model, tokenizer)
    _same_lm(load_causal_lm(str(tmp_path / "tiny.gguf")), model, tokenizer)
    converted = list((tmp_path / "cache" / "gguf").iterdir())
    assert len(converted) == 1 and (converted[0] / "model.safetensors").is_file()  # dequantised once, cached
    mtime = (converted[0] / "model.safetensors").stat().st_mtime_ns
    _same_lm(load_causal_lm(str(tmp_path), gguf_file="tiny.gguf"), model, tokenizer)
    assert (converted[0] / "model.safetensors").stat().st_mtime_ns == mtime


def test_a_gguf_file_loads_in_4bit_through_its_converted_folder(tmp_path: Path, llama: tuple, monkeypatch) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    monkeypatch.setenv("EARDRUM_CACHE", str(tmp_path / "cache"))
    _, model, tokenizer = llama
    write_llama_gguf(tmp_path / "tiny.gguf", model, tokenizer)
    quantized, _ = load_causal_lm(str(tmp_path / "tiny.gguf"), quantization="4bit")
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in quantized.modules())


def test_unknown_quantization_lists_the_allowed_values(llama: tuple) -> None:
    with pytest.raises(UnknownQuantizationError, match=r"quantization='3bit'; expected one of None, '4bit', '8bit'"):
        load_causal_lm(str(llama[0]), quantization="3bit")


def test_4bit_loading_on_cpu_quantises_every_block_linear(llama: tuple) -> None:
    bnb = pytest.importorskip("bitsandbytes")
    folder, model, tokenizer = llama
    quantised, _ = load_causal_lm(str(folder), quantization="4bit", device="cpu")  # CPU even beside a GPU
    linears = [m for m in quantised.modules() if isinstance(m, torch.nn.Linear)]
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in linears) == 7 * 2  # q k v o gate up down, 2 layers
    assert not isinstance(quantised.lm_head, bnb.nn.Linear4bit)
    ids = tokenizer(TEXT, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = quantised(ids).logits
    assert logits.shape == (1, ids.shape[1], model.config.vocab_size) and bool(logits.isfinite().all())


def test_a_quantized_llm_is_placed_where_asked_as_it_loads(llama: tuple, monkeypatch) -> None:
    """bitsandbytes places a quantized model itself (on the current GPU where there is one) and its weights
    cannot move later: `device` must reach `from_pretrained` as the device map; unquantized, it never does."""
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM

    seen, real = [], AutoModelForCausalLM.from_pretrained

    def spy(*args, **kwargs):
        seen.append(kwargs.get("device_map"))
        return real(*args, **kwargs)

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", spy)
    folder = str(llama[0])
    load_causal_lm(folder, quantization="4bit", device="cpu")
    load_causal_lm(folder, device="cpu")
    assert seen == [{"": torch.device("cpu")}, None]
