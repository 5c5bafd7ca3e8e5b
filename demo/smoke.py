"""A tiny end-to-end run on random tiny models: build, train, save, reload, answer.

It exercises every part of the model core in well under a minute on a CPU, with nothing
downloaded: tiny random Whisper and Llama bases are written locally, a stack projector and a LoRA
adapter are trained to caption four synthetic sounds, the checkpoint is saved and reloaded, the
reloaded model must give bit-identical logits, and it answers the question for each sound.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from eardrum.adapters.audio import SAMPLING_RATE
from eardrum.adapters.checkpoint import build_audio_llm, load_pretrained
from eardrum.adapters.config import AudioLLMConfig
from eardrum.adapters.projectors import ProjectorConfig
from eardrum.adapters.tiny import TINY_SOUNDS, save_tiny_bases, synth_sound
from eardrum.common.decoding import answer_conversations
from eardrum.common.generation import GenerationSettings

logger = logging.getLogger(__name__)

QUESTION = "what do you hear?"
# The random LLM's output layer is tiny, so it gets an adapter too or the loss cannot go far down.
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]


def _conversation(caption: str | None, wave: np.ndarray) -> list[dict]:
    audio = {"type": "audio", "audio": (wave, SAMPLING_RATE)}
    user = {"role": "user", "content": [audio, {"type": "text", "text": QUESTION}]}
    return [user] if caption is None else [user, {"role": "assistant", "content": caption}]


def run_smoke(out_dir: str | Path, steps: int = 120, seed: int = 0) -> dict:
    """Run the smoke job in `out_dir`; returns losses, answers and the checkpoint path."""
    from peft import LoraConfig, get_peft_model

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    start = time.perf_counter()
    bases = save_tiny_bases(out_dir / "bases")
    config = AudioLLMConfig(encoder=bases["whisper"], llm=bases["llama"], projector=ProjectorConfig(name="stack"))
    model, processor = build_audio_llm(config)
    model.llm = get_peft_model(model.llm, LoraConfig(r=16, lora_alpha=32, target_modules=LORA_TARGETS))
    waves = {caption: synth_sound(freq, beeps) for caption, (freq, beeps) in TINY_SOUNDS.items()}
    batch = processor([_conversation(c, w) for c, w in waves.items()])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=3e-3)
    model.train()
    losses = []
    for _ in range(steps):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    model.eval()
    checkpoint = model.save_pretrained(out_dir / "checkpoint", processor)
    reloaded, _ = load_pretrained(checkpoint)
    with torch.no_grad():
        same = torch.equal(model(**batch).logits, reloaded(**batch).logits)
    prompts = [_conversation(None, w) for w in waves.values()]
    answers = dict(zip(waves, answer_conversations(reloaded, processor, prompts, GenerationSettings(max_new_tokens=8))))
    return {
        "checkpoint": str(checkpoint),
        "first_loss": losses[0],
        "last_loss": losses[-1],
        "reload_bit_identical": same,
        "answers": answers,
        "correct": sum(a == c for c, a in answers.items()),
        "seconds": time.perf_counter() - start,
        "trainable": model.trainable_summary(),
    }
