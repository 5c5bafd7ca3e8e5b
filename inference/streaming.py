"""Streamed answers: text pieces handed from `generate`'s thread to the reader, as they are decoded."""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator

import torch
from transformers.generation.streamers import BaseStreamer


class PieceStreamer(BaseStreamer):
    """Receives tokens from `generate` in its thread and queues the new text for the reader.

    The whole answer is decoded at every step and only the text past what was already sent is
    queued, held back while it ends in an incomplete character or in whitespace (which the end of the
    answer drops), so the pieces join to the decode of all tokens, stripped: the answer that
    `eardrum.common.decoding.answer_conversations` gives for the same prompt.
    """

    _END = object()

    class Stopped(Exception):
        """Raised inside `generate` to end it once the reader has stopped reading."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""
        self.pieces: queue.Queue = queue.Queue()
        self.prompt_seen = False
        self.stop = threading.Event()

    def put(self, value: torch.Tensor) -> None:
        if self.stop.is_set():
            raise self.Stopped
        if not self.prompt_seen:  # generate hands over the prompt first; it is not part of the answer
            self.prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        self._send(final=False)

    def end(self) -> None:
        self._send(final=True)

    def text(self) -> str:
        """The answer so far, stripped."""
        return self.tokenizer.decode(self.ids, skip_special_tokens=True).strip()

    def _send(self, final: bool) -> None:
        text = self.text()  # stripped: trailing whitespace waits for the text after it, or is dropped at the end
        if not final and text.endswith("\ufffd"):  # a character split across tokens: wait for the rest
            return
        if text.startswith(self.sent) and len(text) > len(self.sent):
            self.pieces.put(text[len(self.sent) :])
            self.sent = text

    def run(self, generate: Callable[[], object]) -> None:
        """Call `generate()` (in the worker thread); its error, if any, is handed to the reader."""
        try:
            generate()
        except BaseException as err:  # re-raised in the reading thread, which the caller sees
            self.pieces.put(err)
        finally:
            self.pieces.put(self._END)

    def read(self) -> Iterator[str]:
        """The pieces as they come (in the reader's thread), until generation ends; re-raises its error."""
        while (item := self.pieces.get()) is not self._END:
            if isinstance(item, BaseException):
                raise item
            yield item
