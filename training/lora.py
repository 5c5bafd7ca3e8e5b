"""LoRA and QLoRA on the LLM (and optionally the encoder), through peft.

Targets default to the attention and MLP projections found by name in the LLM only, so an
adapter never lands on the speech encoder or the projector by accident.
"""

from __future__ import annotations

import logging

from torch import nn

from eardrum.adapters.model import AudioLLM

from .recipe import LoraSettings

logger = logging.getLogger(__name__)

# Attention and MLP projection names across common causal LMs (Llama, Qwen2, Mistral, Gemma, SmolLM,
# Phi-3 fused qkv/gate_up, GPT-2 style c_attn/c_fc, Falcon/GPT-NeoX style).
LLM_TARGETS = (
    "q_proj",
    "k_proj",
    "v_proj",
    "o_proj",
    "gate_proj",
    "up_proj",
    "down_proj",
    "qkv_proj",
    "gate_up_proj",
    "c_attn",
    "c_proj",
    "c_fc",
    "query_key_value",
    "dense_h_to_4h",
    "dense_4h_to_h",
)
ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


def _is_linear(module: nn.Module) -> bool:
    # bitsandbytes' Linear4bit / Linear8bitLt subclass nn.Linear; GPT-2's Conv1D is linear too
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def find_targets(network: nn.Module, candidates: tuple[str, ...]) -> list[str]:
    """The candidate names that are linear layers in `network`, sorted."""
    found = {name.rsplit(".", 1)[-1] for name, module in network.named_modules() if _is_linear(module)}
    return sorted(found & set(candidates))


def apply_llm_lora(model: AudioLLM, settings: LoraSettings, *, quantized: bool, gradient_checkpointing: bool) -> None:
    """Wrap `model.llm` in a peft LoRA model (after k-bit preparation for a quantized LLM)."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training

    llm = model.llm
    if quantized:
        llm = prepare_model_for_kbit_training(llm, use_gradient_checkpointing=gradient_checkpointing)
    targets = settings.target_modules or find_targets(llm, LLM_TARGETS)
    if not targets:
        raise ValueError(
            f"no known attention/MLP projection found in {type(llm).__name__}; set lora.target_modules to the names "
            "of its linear layers"
        )
    config = LoraConfig(
        r=settings.r,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        task_type="CAUSAL_LM",
    )
    model.llm = get_peft_model(llm, config)
    logger.info("LoRA r=%d on the LLM's %s", settings.r, ", ".join(targets))


def apply_encoder_lora(model: AudioLLM, settings: LoraSettings) -> None:
    """Inject LoRA layers into the frozen speech encoder (its base weights stay frozen)."""
    from peft import LoraConfig, inject_adapter_in_model

    network = model.encoder.network
    targets = settings.encoder_target_modules or find_targets(network, ENCODER_TARGETS)
    if not targets:
        raise ValueError("no attention projection found in the encoder; set lora.encoder_target_modules")
    config = LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout, target_modules=targets)
    inject_adapter_in_model(config, network)
    network.eval()  # the encoder runs in eval mode always (no dropout), its new LoRA layers included
    model.encoder.lora_config = config.to_dict()
    logger.info("LoRA r=%d on the encoder's %s", settings.r, ", ".join(targets))


def freeze_for_training(model: AudioLLM) -> None:
    """Projector trains; the LLM trains only through LoRA; the encoder only through LoRA or layer weights."""
    for name, param in model.llm.named_parameters():
        param.requires_grad_("lora_" in name)
    for name, param in model.encoder.named_parameters():
        param.requires_grad_("lora_" in name or name == "select.weights")
    for param in model.projector.parameters():
        param.requires_grad_(True)


def parameter_report(model: AudioLLM) -> str:
    """One line per part: trainable / total parameters."""
    counts = model.trainable_summary()
    total_train = sum(v for k, v in counts.items() if k.endswith("_trainable"))
    total = sum(v for k, v in counts.items() if k.endswith("_total"))
    parts = ", ".join(
        f"{p} {counts[p + '_trainable']:,}/{counts[p + '_total']:,}" for p in ("encoder", "projector", "llm")
    )
    return f"trainable parameters {total_train:,} of {total:,} ({100 * total_train / max(total, 1):.2f}%): {parts}"
