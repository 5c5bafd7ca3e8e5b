"""Write audio tokens into the placeholder positions of text embeddings.

The processor has already expanded each clip's placeholder to exactly as many placeholder ids as
the clip yields audio tokens, so the merge needs no knowledge of padding side or prompt layout:
it takes the placeholder mask in reading order (row by row, left to right) and fills it with the
clips' valid audio tokens in the same order.
"""

from __future__ import annotations

import torch


class AudioTokenCountError(ValueError):
    """The text holds a different number of audio placeholders than the audio yields tokens."""


def text_ids_for_embedding(input_ids: torch.Tensor, placeholder_id: int, substitute_id: int) -> torch.Tensor:
    """Replace placeholder ids by a harmless id so the placeholder needs no embedding row.

    input_ids (B, T_text) -> (B, T_text). The substituted rows are overwritten by the merge.
    """
    return input_ids.masked_fill(input_ids == placeholder_id, substitute_id)


def merge_audio_tokens(
    text_embeds: torch.Tensor,
    placeholder_mask: torch.Tensor,
    audio_tokens: torch.Tensor,
    token_lengths: torch.Tensor,
) -> torch.Tensor:
    """Scatter audio tokens into the placeholder positions.

    Args:
        text_embeds: (B, T_text, D_llm) embeddings of the text.
        placeholder_mask: (B, T_text) bool, True where an audio token goes.
        audio_tokens: (N_win, T_tok, D_llm) projector output, one row per encoder window, in the
            order the windows' placeholders appear in the batch.
        token_lengths: (N_win,) valid tokens per row; the rest is padding and is dropped.

    Returns:
        (B, T_text, D_llm) embeddings with audio tokens at the placeholder positions.
    """
    valid = torch.arange(audio_tokens.shape[1], device=audio_tokens.device)[None, :] < token_lengths[:, None]
    flat = audio_tokens[valid]  # (N_win, T_tok, D) -> (sum(token_lengths), D), windows in order
    slots = int(placeholder_mask.sum())
    if slots != flat.shape[0]:
        raise AudioTokenCountError(
            f"the text has {slots} audio placeholder tokens but the audio yields {flat.shape[0]} audio tokens; "
            "build inputs with the processor of this model so each clip is expanded to its exact token count"
        )
    flat = flat.to(device=text_embeds.device, dtype=text_embeds.dtype)
    mask = placeholder_mask.to(text_embeds.device)[..., None].expand_as(text_embeds)  # (B, T_text, D)
    return text_embeds.masked_scatter(mask, flat)
