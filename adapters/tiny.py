"""Tiny random base models and a locally trained tokenizer, for tests and smoke runs.

Nothing here downloads anything: the models are random, built from configs, and the tokenizer is
a byte-level BPE trained on a few sentences, with a ChatML or Llama-3 style chat template.
Use `save_tiny_bases(folder)` to get local folders that any eardrum source setting accepts.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from .audio import SAMPLING_RATE

# ---------------------------------------------------------------- tokenizers
CORPUS = [
    "the quick brown fox jumps over the lazy dog",
    "what is said in this recording? transcribe the audio please",
    "a cat and a cow and a dog make sounds in the farm yard",
    "hello world, how are you today? i am fine, thank you.",
    "numbers one two three four five six seven eight nine ten 0123456789",
    "system user assistant: you are a helpful assistant that listens",
    "[00:30] [01:00] [02:00] minute second hour time marker",
]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
LLAMA3 = (
    "{{ bos_token }}{% for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)
SPECIALS = [
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|begin_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]


def build_tokenizer(template: str):
    """A byte-level BPE tokenizer (vocab < 400) trained here on a few sentences, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=380,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS, trainer)
    if template == "chatml":
        kw = {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
    else:
        kw = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>", "pad_token": "<|endoftext|>"}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, **kw)
    fast.chat_template = CHATML if template == "chatml" else LLAMA3
    return fast


# ---------------------------------------------------------------- tiny models
def tiny_llama(vocab_size: int = 400, seed: int = 0, hidden: int = 48, kv_heads: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=1,
    )
    return LlamaForCausalLM(cfg).eval()


def tiny_qwen2(vocab_size: int = 400, seed: int = 0):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    cfg = Qwen2Config(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=2,
    )
    return Qwen2ForCausalLM(cfg).eval()


def tiny_whisper(seed: int = 0, max_source_positions: int = 1500):
    from transformers import WhisperConfig, WhisperForConditionalGeneration

    torch.manual_seed(seed)
    cfg = WhisperConfig(
        vocab_size=120,
        num_mel_bins=80,
        d_model=32,
        encoder_layers=2,
        decoder_layers=1,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_source_positions=max_source_positions,
        init_std=0.3,  # large enough that the input, not the positions, dominates the random encoder output
        max_target_positions=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=1,
    )
    return WhisperForConditionalGeneration(cfg).eval()


def tiny_w2v(kind: str = "wav2vec2", seed: int = 0):
    from transformers import HubertConfig, HubertModel, Wav2Vec2Config, Wav2Vec2Model, WavLMConfig, WavLMModel

    torch.manual_seed(seed)
    common = dict(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        conv_dim=(16, 16, 16, 16, 16, 16, 16),
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
        feat_extract_norm="layer",
        do_stable_layer_norm=True,
    )
    cls = {
        "wav2vec2": (Wav2Vec2Config, Wav2Vec2Model),
        "hubert": (HubertConfig, HubertModel),
        "wavlm": (WavLMConfig, WavLMModel),
    }[kind]
    return cls[1](cls[0](**common)).eval()


def whisper_feature_extractor():
    from transformers import WhisperFeatureExtractor

    return WhisperFeatureExtractor(feature_size=80)


def w2v_feature_extractor():
    from transformers import Wav2Vec2FeatureExtractor

    return Wav2Vec2FeatureExtractor(
        feature_size=1, sampling_rate=SAMPLING_RATE, do_normalize=True, return_attention_mask=True
    )


def _write_model(model, path: Path) -> None:
    """A transformers folder written by hand: `save_pretrained` writes nothing on ranks other than 0 when
    torch.distributed is up, and these folders are local files any process may need to create."""
    from safetensors.torch import save_model

    path.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(path)
    if model.can_generate():
        model.generation_config.save_pretrained(path)
    save_model(model, str(path / "model.safetensors"), metadata={"format": "pt"})


TINY_BASES = ("whisper", "wav2vec2", "llama", "qwen2")


def save_tiny_bases(root: str | Path, template: str = "chatml") -> dict[str, str]:
    """Write tiny random `whisper`, `wav2vec2`, `llama` and `qwen2` folders under `root`; return their paths."""
    with torch.random.fork_rng():  # seeded builders must not disturb the caller's random state
        return _save_tiny_bases(Path(root), template)


def _save_tiny_bases(root: Path, template: str) -> dict[str, str]:
    tokenizer = build_tokenizer(template)
    vocab = len(tokenizer) + 20  # room for tokens added later, such as the audio placeholder
    dirs = {}
    for name, model, extra in [
        ("llama", tiny_llama(vocab_size=vocab, hidden=64, kv_heads=4), tokenizer),  # bitsandbytes CPU needs 64s,
        ("qwen2", tiny_qwen2(vocab_size=vocab), tokenizer),
        ("whisper", tiny_whisper(), whisper_feature_extractor()),
        ("wav2vec2", tiny_w2v("wav2vec2"), w2v_feature_extractor()),
    ]:
        path = root / name
        _write_model(model, path)
        extra.save_pretrained(path)
        if name == "whisper":  # a tokenizer for its decoder (transcript hints); any ids it writes decode to text
            tokenizer.save_pretrained(path)
        dirs[name] = str(path)
    return dirs


# ---------------------------------------------------------------- tiny data
TINY_SOUNDS = {  # caption -> (frequency in Hz, number of beeps)
    "a low tone": (220.0, 1),
    "a high tone": (1760.0, 1),
    "two beeps": (880.0, 2),
    "three beeps": (660.0, 3),
}


def synth_sound(
    freq: float, beeps: int, seconds: float = 1.0, rate: int = SAMPLING_RATE, phase: float = 0.0
) -> np.ndarray:
    """`beeps` equal tone bursts of `freq` Hz separated by silence, (seconds * rate,) float32."""
    t = np.arange(int(seconds * rate)) / rate
    wave = 0.5 * np.sin(2 * np.pi * freq * t + phase)
    slot = len(t) // (2 * beeps)
    gate = np.zeros_like(t)
    for b in range(beeps):
        gate[2 * b * slot : (2 * b + 1) * slot] = 1.0
    return (wave * gate).astype(np.float32)


def write_tiny_dataset(folder: str | Path, variants: int = 3) -> dict[str, Path]:
    """Write synthetic tone clips and three manifests (caption, qa, chat shapes) plus an eval split.

    Returns the manifest paths: {"caption", "qa", "chat", "eval"}. Deterministic.
    """
    import soundfile as sf

    folder = Path(folder)
    (folder / "clips").mkdir(parents=True, exist_ok=True)
    lines: dict[str, list[dict]] = {"caption": [], "qa": [], "chat": [], "eval": []}
    for k, (caption, (freq, beeps)) in enumerate(TINY_SOUNDS.items()):
        for v in range(variants + 1):
            name = f"clips/sound{k}_v{v}.wav"
            sf.write(folder / name, synth_sound(freq, beeps, 0.5 + 0.1 * v, phase=v), SAMPLING_RATE, subtype="PCM_16")
            split = "eval" if v == variants else None
            lines[split or "caption"].append({"audio": name, "text": caption, "task": "caption"})
            if split is None:
                count = "one" if beeps == 1 else caption.split()[0]
                lines["qa"].append({"audio": name, "question": "how many beeps?", "answer": count})
                lines["chat"].append(
                    {
                        "messages": [
                            {
                                "role": "user",
                                "content": [{"type": "audio", "audio": name}, {"type": "text", "text": "hi"}],
                            },
                            {"role": "assistant", "content": caption},
                        ]
                    }
                )
    paths = {}
    for key, rows in lines.items():
        paths[key] = folder / f"{key}.jsonl"
        paths[key].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths
