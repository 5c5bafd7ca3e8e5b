"""`eardrum chat` and `eardrum ask`: talk to a checkpoint about recordings from the command line.

    eardrum chat --model DIR [--audio [NAME=]FILE ...]               interactive, answers streamed
    eardrum ask --model DIR --audio [NAME=]FILE [...] [--json] "question"   one answer, for scripts

Recordings without a NAME= are called "recording 1", "recording 2", ... User mistakes (a model
directory that is not a checkpoint, bad audio, an empty question, an unknown recording name, bad
generation flags) end with one line on stderr, `eardrum ask: error: ...`, and exit code 2; they are
all found before the model is loaded.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
import time
from collections.abc import Callable

from .options import add_generation_options, add_placement_options, generation_settings, placement

# Everything heavier than argparse is imported inside the handlers: this module is imported by every
# `eardrum` command, and the environment set in `main` must be in place before transformers loads.

HELP = """commands:
  /add FILE [NAME]   add a recording; it goes with your next question
  /list              the recordings added so far
  /reset             forget the conversation and the recordings
  /help              this help
  /quit              leave (so do Ctrl-D and Ctrl-C)
anything else is a question."""


def add_chat_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register the `chat` and `ask` subcommands (each sets `run` to its handler)."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--model", required=True, metavar="DIR",
                        help="checkpoint folder, or Hub id org/name[@revision]")
    common.add_argument(
        "--audio", action="append", default=[], metavar="[NAME=]FILE", help="a recording (repeat for more)"
    )
    common.add_argument(
        "--library", metavar="LIB", help="answer from a library of recordings (eardrum index): each question hears "
        "the windows a search finds, and the answer names them"
    )
    add_generation_options(common)
    add_placement_options(common)

    chat = subparsers.add_parser("chat", parents=[common], help="talk about recordings, answers streamed")
    chat.set_defaults(run=run_chat)
    ask = subparsers.add_parser("ask", parents=[common], help="answer one question about recordings")
    ask.add_argument("question", help='the question; "-" reads it from stdin')
    ask.add_argument("--use", action="append", metavar="NAME", help="attach only these recordings (repeat)")
    ask.add_argument(
        "--json",
        action="store_true",
        help='print {"answer", "model", "recordings", "seconds" (answering), "load_seconds"}',
    )
    ask.set_defaults(run=run_ask)


def _one_line(err: BaseException) -> str:
    return "; ".join(line.strip() for line in str(err).splitlines() if line.strip()) or type(err).__name__


def _fail(command: str, err: BaseException) -> int:
    print(f"eardrum {command}: error: {_one_line(err)}", file=sys.stderr)
    return 2


def _split_spec(spec: str) -> tuple[str | None, str]:
    """`NAME=FILE` -> (NAME, FILE); a path that exists as given is never split."""
    name, sep, path = spec.partition("=")
    if not sep or os.path.exists(spec):
        return None, spec
    if not name.strip() or not path:
        raise ValueError(f"--audio {spec!r}: expected FILE or NAME=FILE")
    return name.strip(), path


def _read_recordings(specs: list[str]) -> list[dict]:
    """Load every `--audio` now, so a bad file is reported in a moment, before torch and the model load."""
    from eardrum.adapters.audio import SAMPLING_RATE, load_audio

    loaded = []
    for spec in specs:
        name, path = _split_spec(spec)
        loaded.append((spec, name, path, load_audio(path)))
    from eardrum.inference.chat import default_recording_name

    recordings: list[dict] = []
    for spec, name, path, wave in loaded:
        taken = [r["name"] for r in recordings]
        name = name or default_recording_name(taken)
        if name in taken:
            raise ValueError(f"--audio {spec!r}: the name {name!r} is given twice")
        recordings.append({"name": name, "file": path, "seconds": round(len(wave) / SAMPLING_RATE, 3), "wave": wave})
    return recordings


def _load_chat(args: argparse.Namespace, settings, recordings: list[dict]):
    from eardrum.adapters.audio import SAMPLING_RATE
    from eardrum.adapters.checkpoint import read_checkpoint_meta
    from eardrum.inference.chat import AudioChat

    read_checkpoint_meta(args.model)  # a clear error for a directory that is not a checkpoint
    chosen = placement(args)
    chat = AudioChat.from_pretrained(
        args.model, device=chosen.device, dtype=chosen.dtype, quantization=chosen.quantization, settings=settings,
        trust_remote_code=chosen.trust_remote_code,
    )
    for rec in recordings:
        chat.add_recording((rec["wave"], SAMPLING_RATE), rec["name"])
    return chat


def _question(text: str) -> str:
    text = sys.stdin.read() if text == "-" else text
    if not text.strip():
        raise ValueError("the question is empty")
    return text.strip()


def run_ask(args: argparse.Namespace) -> int:
    """`eardrum ask`: print one answer (or a JSON object with --json)."""
    try:
        question = _question(args.question)
        recordings = _read_recordings(args.audio)
        names = [r["name"] for r in recordings]
        unknown = [n for n in args.use or [] if n not in names]
        if unknown:
            known = ", ".join(repr(n) for n in names) or "none given"
            raise ValueError(f"--use {', '.join(map(repr, unknown))}: no such recording; recordings: {known}")
        settings = generation_settings(args)
        settings.validate()
        _check_library(args)
        start = time.perf_counter()
        chat = _load_chat(args, settings, recordings)
        loaded = time.perf_counter()
        answer = chat.ask(question, recordings=args.use, library=args.library)
    except (ValueError, OSError) as err:
        return _fail("ask", err)
    if args.json:
        listed = [{k: v for k, v in r.items() if k != "wave"} for r in recordings]
        report = {
            "answer": answer,
            "model": args.model,
            "recordings": listed,
            "seconds": round(time.perf_counter() - loaded, 3),
            "load_seconds": round(loaded - start, 3),
        }
        if args.library:
            report["sources"] = [{"path": h.path, "start": h.start, "end": h.end} for h in chat.last_sources]
        print(json.dumps(report, ensure_ascii=False))
    else:
        print(answer)
    return 0


def run_chat(args: argparse.Namespace) -> int:
    """`eardrum chat`: a conversation on stdin/stdout; errors in it print one line and it goes on."""
    try:
        recordings = _read_recordings(args.audio)
        settings = generation_settings(args)
        settings.validate()
        _check_library(args)
        chat = _load_chat(args, settings, recordings)
    except (ValueError, OSError) as err:
        return _fail("chat", err)
    added = ", ".join(f"{r['name']} ({r['seconds']:.1f} s)" for r in recordings) or "no recordings yet"
    if args.library:
        added = f"the library {args.library}"
    print(f"chatting with {args.model}: {added}. Ask a question, or /help.", flush=True)
    return chat_loop(chat, input, library=args.library)


def _check_library(args: argparse.Namespace) -> None:
    """A --library that is not a library file is named before the model loads."""
    if args.library:
        from eardrum.inference.library import open_library

        open_library(args.library).close()


def chat_loop(chat, read: Callable[[str], str], library: str | None = None) -> int:
    """Read lines with `read(prompt)` until /quit, end of input or Ctrl-C; returns the exit code 0. With a
    `library`, each question is answered from it (whole, with its sources) instead of streamed."""
    while True:
        try:
            line = read("you> ").strip()
        except (EOFError, KeyboardInterrupt):
            print()
            return 0
        if not line:
            continue
        try:
            if line.startswith("/"):
                if not _command(chat, line):
                    return 0
            elif library:
                print(f"assistant> {chat.ask(line, library=library)}", flush=True)
            else:
                _answer(chat, line)
        except KeyboardInterrupt:
            print()
            return 0
        except (ValueError, OSError) as err:
            print(f"error: {_one_line(err)}", file=sys.stderr, flush=True)


def _answer(chat, question: str) -> None:
    pieces = chat.stream(question)  # checks the question before anything is printed
    print("assistant> ", end="", flush=True)
    try:
        for piece in pieces:
            print(piece, end="", flush=True)
    finally:
        pieces.close()  # on Ctrl-C: stop generating now
        print(flush=True)


def _command(chat, line: str) -> bool:
    """Run a /command; False means leave."""
    try:
        word, *rest = shlex.split(line)
    except ValueError as err:
        raise ValueError(f"cannot read {line!r}: {err}") from err
    if word in ("/quit", "/exit"):
        return False
    if word == "/add":
        if not rest:
            raise ValueError("usage: /add FILE [NAME]")
        name = chat.add_recording(rest[0], " ".join(rest[1:]) or None)
        print(f'added "{name}" ({chat.recordings[-1].seconds:.1f} s); it goes with your next question')
    elif word == "/list":
        for rec in chat.recordings:
            print(f'"{rec.name}" {rec.seconds:.1f} s')
        if not chat.recordings:
            print("no recordings")
    elif word == "/reset":
        chat.reset()
        print("conversation and recordings cleared")
    elif word == "/help":
        print(HELP)
    else:
        raise ValueError(f"unknown command {word!r}; /help lists the commands")
    return True
