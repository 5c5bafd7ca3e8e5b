"""`AudioLLM`: a frozen speech encoder, a trainable projector and any causal LLM.

Symbols: B batch, T_text text length, N_win encoder windows in the batch, T frames per window,
T_tok audio tokens per window, D_enc encoder width, D_llm LLM hidden size.

The model sees tensors only (the processor builds them): text ids whose audio placeholders are
already expanded to the exact audio-token count, and one row of features per encoder window.
"""

from __future__ import annotations

import functools
import inspect
import logging
from pathlib import Path

import torch
from torch import nn
from transformers import DynamicCache

from .attention import PACKED_SDPA, attention_modules, not_packed, shared_prefix, use_packed_attention
from .config import AudioLLMConfig, num_audio_tokens
from .encoders import SpeechEncoder
from .merge import merge_audio_tokens, text_ids_for_embedding
from .processor import AudioProcessor
from .projectors import Projector

logger = logging.getLogger(__name__)


class AudioLLM(nn.Module):
    """Encoder -> projector -> merge into the text embeddings -> causal LLM.

    The LLM may be a plain transformers model, a peft `PeftModel` (LoRA) or a 4/8-bit model; it is
    only reached through `get_input_embeddings()`, `forward(inputs_embeds=...)` and `generate`.
    """

    def __init__(
        self,
        config: AudioLLMConfig,
        encoder: SpeechEncoder,
        projector: Projector,
        llm: nn.Module,
        placeholder_id: int,
    ) -> None:
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.projector = projector
        self.llm = llm
        # packed training rows attend within each example without computing the masked-away pairs
        use_packed_attention(llm)
        self.placeholder_id = placeholder_id
        # Whisper's own decoder, when the config gives the LLM its transcripts (`transcript_hint`); it shares
        # the encoder's modules, and like them it is frozen. Set by `build_audio_llm`.
        self.transcriber: nn.Module | None = None
        # Windows encoded per encoder forward: bounds memory for hour-long recordings (120 windows of 30 s).
        self.windows_per_forward = 8

    def num_audio_tokens(self, num_samples: int) -> int:
        """Audio tokens one encoder window of `num_samples` samples yields."""
        return num_audio_tokens(num_samples, self.encoder.spec, self.config.projector)

    @property
    def device(self) -> torch.device:
        return self.llm.get_input_embeddings().weight.device

    def encode_audio(self, features: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """features (N_win, ...), lengths (N_win,) -> audio tokens (N_win, T_tok, D_llm), token lengths (N_win,).

        Windows go through the encoder `windows_per_forward` at a time, each chunk cut to its own
        longest window, so memory stays bounded however long the recording.
        """
        enc_param = next(self.encoder.network.parameters())
        outputs = []
        for start in range(0, features.shape[0], self.windows_per_forward):
            chunk_lengths = lengths[start : start + self.windows_per_forward]
            chunk = features[start : start + self.windows_per_forward, ..., : int(chunk_lengths.max())]
            frames, frame_lengths = self.encoder(chunk.to(enc_param.device), chunk_lengths.to(enc_param.device))
            outputs.append(self.project_frames(frames, frame_lengths))
        if len(outputs) == 1:
            return outputs[0]
        longest = max(t.shape[1] for t, _ in outputs)
        tokens = torch.cat([nn.functional.pad(t, (0, 0, 0, longest - t.shape[1])) for t, _ in outputs])
        return tokens, torch.cat([n for _, n in outputs])  # (N_win, T_tok, D_llm), (N_win,)

    def project_frames(self, frames: torch.Tensor, frame_lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder frames (N_win, T, D_enc), e.g. from a feature cache -> audio tokens, token lengths."""
        proj_param = next(self.projector.parameters())
        frames = frames.to(device=proj_param.device, dtype=proj_param.dtype)  # (N_win, T, D_enc)
        return self.projector(frames, frame_lengths.to(proj_param.device))

    def embed(
        self,
        input_ids: torch.Tensor,
        audio_features: torch.Tensor | None = None,
        audio_lengths: torch.Tensor | None = None,
        audio_frames: torch.Tensor | None = None,
        frame_lengths: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """input_ids (B, T_text) + audio -> inputs_embeds (B, T_text, D_llm) with audio tokens merged in.

        Audio comes as features for the encoder (audio_features, audio_lengths) or as encoder
        frames computed earlier (audio_frames (N_win, T, D_enc), frame_lengths), never both.
        """
        embedding = self.llm.get_input_embeddings()
        safe_ids = text_ids_for_embedding(input_ids, self.placeholder_id, substitute_id=0)
        embeds = embedding(safe_ids.to(embedding.weight.device))  # (B, T_text, D_llm)
        mask = input_ids == self.placeholder_id  # (B, T_text)
        if audio_features is not None and audio_frames is not None:
            raise ValueError("give audio_features or audio_frames, not both")
        if audio_features is None and audio_frames is None:
            if mask.any():
                raise ValueError(
                    f"input_ids hold {int(mask.sum())} audio placeholder tokens but no audio_features were given"
                )
            return embeds
        if audio_frames is not None:
            if frame_lengths is None:
                raise ValueError("audio_frames were given without frame_lengths")
            tokens, token_lengths = self.project_frames(audio_frames, frame_lengths)
        else:
            if audio_lengths is None:
                raise ValueError("audio_features were given without audio_lengths")
            tokens, token_lengths = self.encode_audio(audio_features, audio_lengths)
        return merge_audio_tokens(embeds, mask, tokens, token_lengths)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        audio_features: torch.Tensor | None = None,
        audio_lengths: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        audio_frames: torch.Tensor | None = None,
        frame_lengths: torch.Tensor | None = None,
        labelled_logits_only: bool = False,
        ctc: dict | None = None,
        share_prefix: bool = False,
        **llm_kwargs,
    ):
        """Run the LLM on merged embeddings; with labels (B, T_text) it returns the loss too.

        With `labelled_logits_only` (and labels), the LM head runs only at the positions that
        predict a labelled token in some row: `logits` is (B, K, V) for those K positions, listed in
        `output["logit_positions"]` (K,), instead of (B, T_text, V). The loss is the same mean
        next-token cross-entropy over the labelled tokens; prompts and audio no longer pay for
        vocabulary-sized logits (most of a step's memory for a large vocabulary). LLMs whose forward
        lacks transformers' `logits_to_keep` get the full logits and `logit_positions` = all.

        With `ctc` ({"rows" (R,), "targets", "target_lengths" (R,), "blank"}, as `Collator` makes it),
        `output["ctc_loss"]` is the CTC loss of those rows' audio tokens read through the LLM's input
        embeddings as a vocabulary (logits = audio token . embedding of each token; `blank` is a
        token id standing for "no token here"), per target token: it pulls each stretch of audio
        towards the embedding of the word said there. The embedding table gets no gradient from it.

        With `share_prefix` (and `labelled_logits_only`), the text every row begins with (the chat template's
        system prompt and turn header: `shared_prefix_length`) runs through the LLM once, for one row, and
        the rows go on from its keys and values: the same loss and gradients (up to float rounding), less
        work by (B - 1) x the prefix's tokens. Used only where that is exact (`can_share_prefix`).
        """
        if labels is not None and bool((labels == self.placeholder_id).any()):
            raise ValueError("labels contain the audio placeholder id; audio positions must be -100")
        embeds = self.embed(input_ids, audio_features, audio_lengths, audio_frames, frame_lengths)
        # a whole sequence at once: no KV cache (transformers would otherwise copy every layer's keys and values
        # into one, in training too)
        llm_kwargs.setdefault("use_cache", False)
        prefix = 0
        if share_prefix and labelled_logits_only and labels is not None and can_share_prefix(self.llm, llm_kwargs):
            prefix = shared_prefix_length(input_ids, attention_mask, labels, self.placeholder_id)
        output = self._lm_forward(embeds, attention_mask, labels, labelled_logits_only, prefix=prefix, **llm_kwargs)
        if ctc is not None:
            output["ctc_loss"] = self.ctc_loss(embeds, input_ids == self.placeholder_id, ctc)
        return output

    def _prefix_keys_values(self, prefix_embeds: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """prefix_embeds (1, P, D_llm) -> each layer's keys and values of them ((1, H_kv, P, D_head) each), for
        `attention.shared_prefix`. A small pass, run as written even where the layers are compiled
        (`train.compile`: a one-row graph beside the batch's would be one more to compile)."""
        cache = DynamicCache(config=base_model(self.llm).config)
        ones = torch.ones(prefix_embeds.shape[:2], dtype=torch.long, device=prefix_embeds.device)  # (1, P)
        kwargs = {cache_argument(self.llm): cache, "logits_to_keep": 1}
        with not_packed(), torch.compiler.set_stance("force_eager"):  # one row, one example
            self.llm(inputs_embeds=prefix_embeds, attention_mask=ones, use_cache=True, **kwargs)
        return [(layer.keys, layer.values) for layer in cache.layers]

    def ctc_loss(self, embeds: torch.Tensor, audio_mask: torch.Tensor, ctc: dict) -> torch.Tensor:
        """embeds (B, T_text, D_llm) with audio merged, audio_mask (B, T_text) -> the mean CTC loss per
        target token of `ctc["rows"]` (see `forward`)."""
        table = self.llm.get_input_embeddings().weight.detach()  # (V, D_llm): the audio moves, not the vocabulary
        rows = ctc["rows"].tolist()
        audio = [embeds[r][audio_mask[r].to(embeds.device)] for r in rows]  # R x (T_r, D_llm)
        longest = max(a.shape[0] for a in audio)
        padded = torch.stack([nn.functional.pad(a, (0, 0, 0, longest - a.shape[0])) for a in audio])  # (R, T, D)
        log_probs = (padded.float() @ table.float().T).log_softmax(-1).transpose(0, 1)  # (T, R, V)
        input_lengths = torch.tensor([a.shape[0] for a in audio])
        return nn.functional.ctc_loss(
            log_probs, ctc["targets"].to(log_probs.device), input_lengths, ctc["target_lengths"],
            blank=int(ctc["blank"]), reduction="mean", zero_infinity=True,
        )

    def _lm_forward(self, embeds, attention_mask, labels, labelled_logits_only, prefix: int = 0, **llm_kwargs):
        """The LLM on merged embeddings, with the loss (on labelled positions only, if asked); the first `prefix`
        positions, the same in every row, run once (`_prefix_keys_values`)."""
        if attention_mask is not None:
            attention_mask = attention_mask.to(embeds.device)
        if labels is not None:
            labels = labels.to(embeds.device)
        if labels is None or not labelled_logits_only:
            return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **llm_kwargs)
        if not takes_logits_to_keep(self.llm):
            output = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **llm_kwargs)
            output["logit_positions"] = torch.arange(labels.shape[1], device=labels.device)
            return output
        # Logits at position t predict token t + 1: keep every t whose next token is labelled in some row.
        positions = labelled_positions(labels)  # (K,)
        if prefix:  # every labelled position lies after the prefix (`shared_prefix_length`)
            rows, length = embeds.shape[:2]
            after = torch.arange(prefix, length, device=embeds.device)[None]  # (1, T_text - prefix)
            prefix_embeds = embeds[:1, :prefix]  # (1, P, D_llm): text only, so trained only with the embedding table
            if not self.llm.get_input_embeddings().weight.requires_grad:
                prefix_embeds = prefix_embeds.detach()  # a frozen LLM (stage 1) then runs the prefix without a graph
            with shared_prefix(self.llm, self._prefix_keys_values(prefix_embeds), rows):
                output = self.llm(inputs_embeds=embeds[:, prefix:], position_ids=after,
                                  attention_mask=None if attention_mask is None else attention_mask[:, prefix:],
                                  logits_to_keep=positions - prefix, **llm_kwargs)  # (B, T_text - prefix) computed
        else:
            output = self.llm(inputs_embeds=embeds, attention_mask=attention_mask, logits_to_keep=positions,
                              **llm_kwargs)
        logits = output.logits  # (B, K, V)
        targets = labels[:, positions + 1]  # (B, K)
        if positions.numel() == 0:
            loss = logits.sum() * 0.0
        else:
            loss = nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100
            )
        output["loss"] = loss
        output["logit_positions"] = positions
        return output

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        audio_features: torch.Tensor | None = None,
        audio_lengths: torch.Tensor | None = None,
        audio_frames: torch.Tensor | None = None,
        frame_lengths: torch.Tensor | None = None,
        fast: bool = False,
        inputs_embeds: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Generate from merged embeddings; returns only the new token ids (B, T_new).

        Batched prompts must be left-padded (the processor does so with add_generation_prompt).
        `inputs_embeds` (B, T, D_llm), left-padded, made by `embed` earlier (with `attention_mask`), replaces
        input_ids and audio: the server continues its rows this way (`eardrum.inference.batch_engine`).
        With `fast=True` the LLM decodes with a static KV cache in eardrum's own loop
        (`eardrum.adapters.fast_decode`), which reads the device back every few steps instead of every
        step; on CUDA its step is compiled (torch.compile with CUDA graphs): the first call of each batch
        size and length compiles (tens of seconds), later ones run far fewer kernel launches per token.
        Arguments that loop does not take (beams, transformers' own sampling) decode in transformers'
        `generate` with the static cache. The tokens are the same as without it, up to floating-point
        rounding.
        """
        if fast:
            chosen = generate_kwargs.setdefault("cache_implementation", "static")
            if chosen != "static":
                raise ValueError(f"fast=True decodes with cache_implementation='static', got {chosen!r}")
        if inputs_embeds is not None:
            if input_ids is not None or audio_features is not None or audio_frames is not None:
                raise ValueError("give inputs_embeds or input_ids (with audio), not both")
            embeds = inputs_embeds
        elif input_ids is None:
            raise ValueError("generate needs input_ids or inputs_embeds")
        else:
            embeds = self.embed(input_ids, audio_features, audio_lengths, audio_frames, frame_lengths)
        if attention_mask is None:
            attention_mask = torch.ones(embeds.shape[:2], dtype=torch.long)
        elif embeds.shape[0] > 1 and bool((attention_mask[:, -1] == 0).any()):
            raise ValueError("batched generation needs left padding; build inputs with padding_side='left'")
        if fast:
            from . import fast_decode  # it builds on this module's helpers

            if fast_decode.supports(generate_kwargs):
                return fast_decode.fast_generate(self.llm, embeds, attention_mask, **generate_kwargs)
        return self.llm.generate(
            inputs_embeds=embeds, attention_mask=attention_mask.to(embeds.device), **generate_kwargs
        )

    @torch.no_grad()
    def decode_step(
        self,
        cache,
        attention_mask: torch.Tensor,
        *,
        input_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """One LLM forward over the newest positions of left-padded rows; returns the next-token logits (B, V),
        float32, and extends `cache` (a transformers `Cache`) with those positions in place.

        attention_mask (B, T_cached + T_new): 1 where a position holds a real token of its row. input_ids
        (B, T_new) or inputs_embeds (B, T_new, D_llm). Each row's positions count its real tokens from its first,
        as `generate` counts them for left-padded prompts, so a row decodes as it would alone. The server's
        continuous batching runs on this (`eardrum.inference.batch_engine`).
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("decode_step takes input_ids or inputs_embeds, exactly one of them")
        new = (input_ids if input_ids is not None else inputs_embeds).shape[1]
        positions = attention_mask.long().cumsum(-1) - 1  # (B, T_cached + T_new)
        positions = positions.masked_fill(attention_mask == 0, 1)[:, -new:]  # (B, T_new)
        kwargs = {"logits_to_keep": 1} if takes_logits_to_keep(self.llm) else {}
        kwargs[cache_argument(self.llm)] = cache
        out = self.llm(input_ids=input_ids, inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                       position_ids=positions, use_cache=True, **kwargs)
        return out.logits[:, -1, :].float()  # (B, V)

    def save_pretrained(self, directory: str | Path, processor: AudioProcessor) -> Path:
        """Write a small checkpoint directory with `processor`'s files (see `eardrum.adapters.checkpoint`)."""
        from .checkpoint import save_pretrained

        return save_pretrained(self, directory, processor)

    @classmethod
    def from_pretrained(cls, directory: str | Path, **kwargs) -> AudioLLM:
        """Rebuild a saved model and return the model only.

        `eardrum.adapters.checkpoint.load_pretrained` takes the same arguments and returns (model, processor).
        """
        from .checkpoint import load_pretrained

        return load_pretrained(directory, **kwargs)[0]

    def trainable_summary(self) -> dict[str, int]:
        """Trainable and total parameter counts per part (for logs)."""
        out = {}
        for name in ("encoder", "projector", "llm"):
            params = list(getattr(self, name).parameters())
            out[f"{name}_trainable"] = sum(p.numel() for p in params if p.requires_grad)
            out[f"{name}_total"] = sum(p.numel() for p in params)
        return out


def labelled_positions(labels: torch.Tensor) -> torch.Tensor:
    """labels (B, T) -> (K,): the positions t whose logits predict a labelled token t + 1 in some row."""
    return (labels[:, 1:] != -100).any(0).nonzero().squeeze(1)


MIN_SHARED_PREFIX = 8  # fewer shared tokens than this are not worth a second LLM call


def shared_prefix_length(input_ids: torch.Tensor, attention_mask: torch.Tensor | None, labels: torch.Tensor,
                         placeholder_id: int) -> int:
    """input_ids, attention_mask, labels (B, T) -> P: how many leading positions every row shares (the same
    text token, attended, no audio) such that no label depends on them alone: labels[:, :P + 1] are all -100,
    so every logit the loss reads is at position >= P. 0 where P < MIN_SHARED_PREFIX or B < 2."""
    if input_ids.shape[0] < 2 or input_ids.shape[1] < 2:
        return 0
    same = (input_ids == input_ids[:1]).all(0) & (input_ids[0] != placeholder_id)  # (T,)
    if attention_mask is not None:
        same &= attention_mask.to(input_ids.device).bool().all(0)
    unlabelled = (labels.to(input_ids.device) == -100).all(0)  # (T,)
    shared = int(same.long().cumprod(0).sum())
    before_labels = int(unlabelled.long().cumprod(0).sum()) - 1  # position P's label must be -100 too
    prefix = min(shared, before_labels, input_ids.shape[1] - 1)
    return prefix if prefix >= MIN_SHARED_PREFIX else 0


def can_share_prefix(llm: nn.Module, llm_kwargs: dict) -> bool:
    """Whether `AudioLLM.forward(share_prefix=True)` can run the shared prefix once for this causal LM and these
    extra arguments: its attention is eardrum's SDPA (`attention.PACKED_SDPA`, which reads the prefix's keys and
    values) over full attention (no sliding window), its forward takes a KV cache and `logits_to_keep`, no
    gradient checkpointing (its backward would run the layers again after the prefix is gone), one attention
    module per layer that knows its index, no positions are given (packed rows: one row, nothing shared)."""
    base = base_model(llm)
    config = base.config
    sliding = getattr(config, "sliding_window", None) and getattr(config, "use_sliding_window", True)
    return (getattr(config, "_attn_implementation", None) == PACKED_SDPA and not sliding
            and takes_logits_to_keep(llm) and bool({"cache", "past_key_values"} & forward_parameters(llm))
            and not any(getattr(m, "gradient_checkpointing", False) is True for m in base.modules())
            and len(attention_modules(base)) == getattr(config, "num_hidden_layers", None)
            and "position_ids" not in llm_kwargs)


def base_model(llm: nn.Module) -> nn.Module:
    """The transformers causal LM under any peft wrapper (the LLM itself when it has none)."""
    return llm.get_base_model() if hasattr(llm, "get_base_model") else llm


def forward_parameters(llm: nn.Module) -> frozenset[str]:
    """The argument names of the forward of the causal LM under any peft wrapper (they differ by transformers
    version)."""
    return _forward_parameters(type(base_model(llm)))


@functools.cache
def _forward_parameters(cls: type) -> frozenset[str]:
    return frozenset(inspect.signature(cls.forward).parameters)


def takes_logits_to_keep(llm: nn.Module) -> bool:
    """Whether the causal LM under any peft wrapper accepts transformers' `logits_to_keep` argument."""
    return "logits_to_keep" in forward_parameters(llm)


def cache_argument(llm: nn.Module) -> str:
    """The name under which the causal LM under any peft wrapper takes its KV cache: `cache` in newer
    transformers, `past_key_values` before."""
    return "cache" if "cache" in forward_parameters(llm) else "past_key_values"
