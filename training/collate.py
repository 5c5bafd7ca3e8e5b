"""Batches for training and evaluation: records -> conversations -> processor tensors.

A bad example found only while batching (audio that decodes in the up-front check's header read
but not in full, say) is named by its manifest line; with `skip_bad` it is dropped and recorded,
otherwise the run stops with that name instead of a bare traceback.

With `teacher`, records that carry a `transcript` also get their conversation with the transcript in
the clip's place, tokenised under `batch["teacher"]`, for text-teacher distillation (`teacher_kl`).

With `ctc_blank` (a token id), records whose one clip has a known transcript (a `transcript` field, or
the `text` of an "asr" record) get that transcript's token ids under `batch["ctc"]`, for the CTC loss
that aligns the clip's audio tokens with the LLM's token embeddings (`AudioLLM.forward(ctc=...)`).
"""

from __future__ import annotations

import torch

from eardrum.adapters.model import AudioLLM
from eardrum.adapters.processor import AudioProcessor, text_in_place_of_audio
from eardrum.common.records import DataError, DataProblem, Record, build_conversation


class Collator:
    """Callable turning a list of record indices into a processor batch (plus `example_ids`)."""

    def __init__(
        self,
        processor: AudioProcessor,
        records: list[Record],
        prompts: dict[str, list[str]],
        seed: int,
        *,
        featurize: bool = True,
        skip_bad: bool = False,
        teacher: bool = False,
        ctc_blank: int | None = None,
        pack: bool = False,
    ) -> None:
        self.processor = processor
        self.records = records
        self.prompts = prompts
        self.seed = seed
        self.featurize = featurize
        self.skip_bad = skip_bad
        self.teacher = teacher
        self.ctc_blank = ctc_blank
        self.pack = pack

    def conversation(self, index: int) -> list[dict]:
        return build_conversation(self.records[index], self.prompts, self.seed)

    def __call__(self, indices: list[int]) -> dict:
        try:
            return self._batch(indices, [])
        except (ValueError, OSError):
            bad = []
            good = [i for i in indices if self._one_is_good(i, bad)]
            if not self.skip_bad:
                raise DataError(bad) from None
            return self._batch(good, bad) if good else {"example_ids": [], "bad": bad}

    def _batch(self, indices: list[int], bad: list[DataProblem]) -> dict:
        convs = [self.conversation(i) for i in indices]
        batch = self.processor(convs, featurize=self.featurize)
        batch["example_ids"] = list(indices)
        batch["bad"] = bad
        if self.teacher:
            # "" says nothing is spoken: the text teacher would read an empty message, so those rows have none
            rows = [k for k, i in enumerate(indices) if str(self.records[i].fields.get("transcript", "")).strip()]
            if rows:
                texts = [
                    text_in_place_of_audio(convs[k], self.records[indices[k]].fields["transcript"]) for k in rows
                ]
                batch["teacher"] = {**self.processor(texts, featurize=False), "rows": torch.tensor(rows)}
        if self.ctc_blank is not None:
            ctc = self._ctc_targets(indices)
            if ctc is not None:
                batch["ctc"] = ctc
        return pack_batch(batch) if self.pack else batch

    def _ctc_targets(self, indices: list[int]) -> dict | None:
        """{"rows" (R,), "targets" (sum of lengths,), "target_lengths" (R,), "blank"} for the rows of the
        batch whose one clip has a known transcript; None when no row has one."""
        rows, targets, lengths = [], [], []
        for k, i in enumerate(indices):
            record = self.records[i]
            said = record.fields.get("transcript")
            if said is None and record.task == "asr" and len(record.clip_samples) == 1:
                said = record.fields.get("text")
            if said is None:
                continue
            ids = self.processor.tokenizer(said, add_special_tokens=False)["input_ids"] if said.strip() else []
            rows.append(k)
            targets += ids
            lengths.append(len(ids))
        if not rows:
            return None
        return {"rows": torch.tensor(rows), "targets": torch.tensor(targets, dtype=torch.long),
                "target_lengths": torch.tensor(lengths), "blank": self.ctc_blank}

    def _one_is_good(self, index: int, bad: list[DataProblem]) -> bool:
        try:
            self.processor([self.conversation(index)], featurize=False)
            return True
        except (ValueError, OSError) as err:
            bad.append(DataProblem(self.records[index].where, str(err)))
            return False


def pack_batch(batch: dict) -> dict:
    """Pack a right-padded training batch into one row with no padding: each example's tokens follow the
    last one's, `position_ids` restart at 0 for each, and `attention_mask` is dropped (and the KV cache off),
    which tells transformers' attention (sdpa, eager, flash) to keep attention inside each example (it reads
    the restarts). The loss is the same: each example's first token carries no label, so no position predicts
    across a boundary.

    input_ids, labels (B, T) -> (1, sum of the lengths); position_ids (1, sum); the audio is untouched (its
    clips stay in the order their placeholders come). A batch with a text teacher or CTC targets, which
    name rows, is refused.
    """
    if "teacher" in batch or "ctc" in batch:
        raise ValueError("data.packing: packed rows cannot carry distill.kl_weight's teacher or "
                         "train.ctc_weight's targets (both refer to rows); turn one of them off")
    mask = batch.pop("attention_mask").bool()  # (B, T)
    lengths = mask.sum(1)
    if not bool((mask == (torch.arange(mask.shape[1]) < lengths[:, None])).all()):
        raise ValueError("pack_batch: expected a right-padded batch (the processor's training layout)")
    keep = mask.flatten()
    labels = batch["labels"].clone()
    labels[:, 0] = -100  # never a target across the boundary with the example before
    batch["input_ids"] = batch["input_ids"].flatten()[keep][None]
    batch["labels"] = labels.flatten()[keep][None]
    batch["position_ids"] = torch.cat([torch.arange(int(n)) for n in lengths])[None]
    batch["use_cache"] = False  # transformers reads the restarts only without a KV cache
    return batch


def model_inputs(batch: dict, model: AudioLLM, processor: AudioProcessor, cache, device=None) -> dict:
    """A collated batch as `AudioLLM` takes it: raw windows (cache mode) become encoder frames, read from
    or written to the feature cache, and tensors move to `device` (default: the model's)."""
    if "audio_windows" in batch:
        from .cache import encode_windows

        batch["audio_frames"], batch["frame_lengths"] = encode_windows(
            model, processor.featurizer, batch.pop("audio_windows"), cache
        )
    device = device if device is not None else model.device
    return {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}
