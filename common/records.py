"""Training data: where examples come from, the checks run before training, prompts and mixing.

A source is a JSONL manifest (one JSON object per line, blank lines skipped) or a `datasets`
dataset. A record has one of three shapes:

- transcription or captioning, ``{"audio": "clips/a.wav", "text": "..."}``: task "asr", or
  "caption" when the line (``"task": "caption"``) or its source says so; the text is the caption;
- question answering, ``{"audio": ..., "question": "...", "answer": "..."}``: task "qa";
- conversation, ``{"messages": [...]}`` in the processor's format: task "chat".

A record with one clip may also carry a ``transcript`` (what the clip says): text-teacher
distillation (`eardrum.training.distill`) asks the LLM the same conversation with the transcript in
the clip's place. Without a stated task the fields decide, and a record holding fields of two shapes is refused as
ambiguous; with a stated task (on the record or its source) fields of other shapes are ignored.
Relative audio paths resolve against the manifest's folder (a local dataset's folder; for a hub
dataset, the working directory). `load_records` checks everything before training starts, cheaply
(``soundfile.info``, once per file, no decoding), and reports every bad record at once, so a run
does not die hours in on one bad line. A mixing weight per source sets how often its records come
up in an epoch (see `mix_indices`, which lives with the batching code).
"""

from __future__ import annotations

import io
import itertools
import json
import logging
import math
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from numbers import Integral, Real
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import soundfile as sf

from eardrum.adapters.audio import SAMPLING_RATE
from eardrum.adapters.config import LABEL_MODES

from .batching import mix_indices, stable_hash  # noqa: F401  (mix_indices is part of this module's API)

logger = logging.getLogger(__name__)

TASKS = ("asr", "caption", "qa", "chat")
ROLES = ("system", "user", "assistant")
SHAPES = {  # the fields each task's records need
    "asr": ("audio", "text"),
    "caption": ("audio", "text"),
    "qa": ("audio", "question", "answer"),
    "chat": ("messages",),
}
KIND_FIELDS = ("audio", "text", "question", "answer", "messages")  # the fields that tell the kind of record
# what `DataSource.columns` may map; `transcript` (what a single clip says) is optional, for text-teacher distillation
FIELDS = (*KIND_FIELDS, "transcript", "task")
MAX_LISTED = 50  # problems spelled out in a DataError's message; all of them stay in `.problems`
_KINDS = "audio + text (asr, caption), audio + question + answer (qa) or messages (chat)"

DEFAULT_PROMPTS: dict[str, list[str]] = {
    "asr": [
        "Transcribe the audio.",
        "Write down exactly what is said in this recording.",
        "What is being said? Give a word-for-word transcript.",
        "Please transcribe this speech.",
        "Repeat the spoken words as text.",
    ],
    "caption": [
        "Describe the sound.",
        "What can you hear in this recording?",
        "Write a short caption for this audio.",
        "Describe what is happening in the audio.",
        "Give a one-sentence description of these sounds.",
    ],
}


@dataclass(frozen=True)
class DataSource:
    """One place examples come from: a JSONL manifest or a `datasets` dataset."""

    path: str | None = None  # a JSONL manifest
    dataset: str | None = None  # a hub name, a builder (audiofolder, parquet, ...), or a `save_to_disk` folder
    config: str | None = None  # the dataset's configuration (e.g. librispeech_asr "clean"), `load_dataset`'s name
    split: str = "train"  # dataset split; unused for manifests
    revision: str | None = None  # a branch, tag or commit of a hub dataset
    data_dir: str | None = None  # a builder's folder (audiofolder: audio files with a metadata.csv / .jsonl)
    data_files: str | list[str] | dict[str, Any] | None = None  # a builder's files (parquet: globs or a list)
    streaming: bool = False  # read as training goes, never all held: see `eardrum.training.stream`
    columns: dict[str, str] = field(default_factory=dict)  # our field -> dataset column (or manifest key)
    weight: float = 1.0  # examples per epoch = round(weight * size), see `mix_indices`
    task: str | None = None  # force a task; None = inferred per record from its fields
    name: str | None = None  # label in logs and problems; default: the file or dataset name
    question: str | None = None  # the instruction sent beside each clip that has no question of its own
    limit: int | None = None  # read only the first `limit` rows (an eval slice of a large split)

    @property
    def label(self) -> str:
        """`name`, else the manifest's file name, or the last path component of the dataset's data_dir or name."""
        return self.name or os.path.basename(os.path.normpath(self.path or self.data_dir or self.dataset or "?"))

    def problems(self) -> list[str]:
        """Every problem with these settings, each naming the field (empty when valid)."""
        out = []
        if (self.path is None) == (self.dataset is None):
            out.append(f"path / dataset: expected exactly one, got path={self.path!r}, dataset={self.dataset!r}")
        for key in ("path", "dataset", "name", "split", "config", "revision", "data_dir", "question"):
            value = getattr(self, key)
            if (value is not None or key == "split") and (not isinstance(value, str) or not value):
                out.append(f"{key}: expected a non-empty string, got {value!r}")
        if self.path is not None:
            given = [k for k in ("config", "revision", "data_dir", "data_files") if getattr(self, k) is not None]
            if given:
                out.append(f"{', '.join(given)}: only for a `dataset` source; a manifest (path) has none")
        if self.data_files is not None and not isinstance(self.data_files, (str, list, dict)):
            out.append(f"data_files: expected a path or glob, a list of them, or split -> files; "
                       f"got {self.data_files!r}")
        if self.limit is not None and (isinstance(self.limit, bool) or not isinstance(self.limit, int)
                                       or self.limit < 1):
            out.append(f"limit: expected a positive integer or null, got {self.limit!r}")
        if not isinstance(self.streaming, bool):
            out.append(f"streaming: expected true or false, got {self.streaming!r}")
        w = self.weight
        if isinstance(w, bool) or not isinstance(w, Real) or not math.isfinite(w) or w <= 0:
            out.append(f"weight: expected a positive number, got {w!r}")
        if self.task is not None and self.task not in TASKS:
            out.append(f"task: expected one of {', '.join(TASKS)} or null, got {self.task!r}")
        if not isinstance(self.columns, dict):
            out.append(f"columns: expected a mapping of our field -> column name, got {self.columns!r}")
        else:
            bad = {k: v for k, v in self.columns.items() if k not in FIELDS or not isinstance(v, str) or not v}
            if bad:
                out.append(f"columns: expected keys among {', '.join(FIELDS)} with column names as values, got {bad}")
        return out

    @classmethod
    def from_dict(cls, data: dict) -> DataSource:
        """Build from a dict (a YAML entry); unknown keys are a `DataError` naming them."""
        known = tuple(cls.__dataclass_fields__)
        if not isinstance(data, dict):
            raise _fail("data source", f"expected a mapping with keys among {known}, got {data!r}")
        unknown = sorted(set(data) - set(known))
        if unknown:
            raise _fail("data source", f"unknown keys {unknown}; known keys are {list(known)}")
        return cls(**data)


class DataProblem(NamedTuple):
    """A bad record or source: where it is ("train.jsonl line 12", "dataset foo[37]") and what is wrong."""

    where: str
    message: str


class DataError(ValueError):
    """Data that cannot be used. `problems` holds all of them; the message lists the first 50."""

    def __init__(self, problems: Sequence[DataProblem], message: str | None = None) -> None:
        self.problems = list(problems)
        lines = [message or f"{len(self.problems)} data problem(s):"]
        lines += [f"  - {p.where}: {p.message}" for p in self.problems[:MAX_LISTED]]
        if len(self.problems) > MAX_LISTED:
            lines.append(f"  ... and {len(self.problems) - MAX_LISTED} more")
        super().__init__("\n".join(lines))


@dataclass
class Record:
    """One checked example."""

    where: str  # "path/to/train.jsonl line 12" or "dataset foo[37]"
    source: str  # the DataSource's label
    task: str  # one of TASKS
    fields: dict  # audio (absolute path, or a datasets bytes/array dict), text, question, answer, messages
    num_samples: int  # audio samples at 16 kHz, summed over the record's clips
    clip_samples: tuple[int, ...] = ()  # the same per clip, in reading order: token counts are per clip


class InvalidRecord(Exception):
    """A record's problem; the message names the field."""


def load_records(
    sources: Sequence[DataSource], *, max_audio_seconds: float | None = None, label_mode: str = "all_assistant"
) -> tuple[list[Record], list[DataProblem]]:
    """Read and check every source.

    Args:
        sources: where to read from; their labels must be distinct (set `name` where file names clash).
        max_audio_seconds: longer clips are problems; None accepts any length.
        label_mode: the processor's label mode; conversations it would leave without a labelled
            token are problems.

    Returns:
        The good records in source order, and one problem per bad record.

    Raises:
        DataError: a source is misconfigured or cannot be opened at all (all such sources listed).
        ValueError: `label_mode` or `max_audio_seconds` is invalid.
    """
    if label_mode not in LABEL_MODES:
        raise ValueError(f"label_mode: expected one of {', '.join(LABEL_MODES)}, got {label_mode!r}")
    if max_audio_seconds is not None and not (isinstance(max_audio_seconds, Real) and max_audio_seconds > 0):
        raise ValueError(f"max_audio_seconds: expected a positive number or None, got {max_audio_seconds!r}")
    opened = _open_all(sources)
    checker = RecordChecker(max_audio_seconds, label_mode)
    records: list[Record] = []
    problems: list[DataProblem] = []
    for source, rows in zip(sources, opened):
        good, bad = len(records), len(problems)
        for where, raw, base in rows:
            try:
                records.append(checker.record(raw, where, base, source))
            except InvalidRecord as err:
                problems.append(DataProblem(where, str(err)))
        logger.info("%s: %d records, %d problems", source.label, len(records) - good, len(problems) - bad)
    return records, problems


def write_problems(problems: Sequence[DataProblem], path: str | os.PathLike, append: bool = False) -> None:
    """Write problems as JSONL, one ``{"where": ..., "message": ...}`` per line (after the file's lines with
    `append`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a" if append else "w", encoding="utf-8") as f:
        for p in problems:
            f.write(json.dumps({"where": p.where, "message": p.message}, ensure_ascii=False) + "\n")


def _location_key(where: str) -> str:
    """`where` without the folders of its manifest ("dir/a.jsonl line 3" -> "a.jsonl line 3"), so the prompt
    a record draws does not depend on where the data happens to live."""
    path, sep, line = where.rpartition(" line ")
    return f"{Path(path).name}{sep}{line}" if sep else where


def build_conversation(record: Record, prompts: dict[str, list[str]], seed: int) -> list[dict]:
    """The processor-format conversation of a record.

    asr / caption: the user sends the clip and a prompt from ``prompts[task]``, the assistant
    replies with the text; the prompt depends only on (seed, record.where without its folders), through a stable hash,
    so it is the same on every rank and every run (pass ``seed + epoch`` to vary it by epoch).
    qa: the user sends the clip and the question, the assistant answers. chat: the messages.
    """
    f = record.fields
    if record.task == "chat":
        return [
            {**m, "content": m["content"] if isinstance(m["content"], str) else [dict(p) for p in m["content"]]}
            for m in f["messages"]
        ]
    if record.task == "qa":
        ask, reply = f["question"], f["answer"]
    else:
        options = prompts.get(record.task)
        if not options:
            raise ValueError(f"prompts[{record.task!r}]: expected a non-empty list of prompts (for {record.where})")
        ask, reply = options[stable_hash(f"{seed}\0{_location_key(record.where)}") % len(options)], f["text"]
    user = [{"type": "audio", "audio": f["audio"]}, {"type": "text", "text": ask}]
    return [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]


def _kind(value: Any) -> str:
    return f"{type(value).__name__} {value!r:.60}"


# ------------------------------------------------------------------ reading sources
Rows = Iterator[tuple[str, Any, str]]  # (where, raw record or InvalidRecord, folder that relative paths start from)


def _open_all(sources: Sequence[DataSource]) -> list[Rows]:
    """Validate and open every source, raising one DataError for all that fail."""
    problems = [DataProblem(f"data source {i} ({s.label})", p) for i, s in enumerate(sources) for p in s.problems()]
    labels = [s.label for s in sources]
    problems += [
        DataProblem(f"data source {i} ({label})", "name: another source has the same label; set a distinct 'name'")
        for i, label in enumerate(labels)
        if labels.count(label) > 1
    ]
    if problems:
        raise DataError(problems)
    opened = []
    for source in sources:
        try:
            rows = _manifest_rows(source) if source.path is not None else _dataset_rows(source)
            opened.append(itertools.islice(rows, source.limit))
        except DataError as err:
            problems += err.problems
    if problems:
        raise DataError(problems)
    return opened


def _manifest_rows(source: DataSource) -> Rows:
    path = source.path
    if not os.path.isfile(path):
        why = "no such file" if not os.path.exists(path) else "not a file"
        raise _fail(path, f"cannot open the manifest: {why} ({os.path.abspath(path)})")
    base = os.path.dirname(os.path.abspath(path))

    def rows() -> Rows:
        with open(path, "rb") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path} line {number}"
                try:
                    raw = json.loads(line)
                except json.JSONDecodeError as err:
                    raw = InvalidRecord(f"not valid JSON ({err.msg} at character {err.pos}); expected one JSON object")
                except UnicodeDecodeError:
                    raw = InvalidRecord("not UTF-8 text; expected one JSON object per line, in UTF-8")
                yield where, _pick(raw, source.columns) if isinstance(raw, dict) else raw, base

    return rows()


def _dataset_rows(source: DataSource) -> Rows:
    ds, base = _open_dataset(source)
    where, names, taken = f"dataset {source.label}", ds.column_names, set(source.columns.values())
    if names is None:  # a stream whose features are not declared: the first row shows its columns
        try:
            names = list(next(iter(ds)))
        except StopIteration:
            names = []
        except Exception as err:  # noqa: BLE001 - whatever the reader raises, the source cannot be read
            raise _fail(where, f"cannot read its first row ({type(err).__name__}: {err})") from err
    missing = {f: c for f, c in source.columns.items() if c not in names}
    if missing:
        raise _fail(where, f"columns: {missing} not found; the dataset has columns {names}")
    mapping = {f: source.columns.get(f, f) for f in FIELDS if f in source.columns or f not in taken}
    mapping = {f: c for f, c in mapping.items() if c in names}
    if not mapping:
        raise _fail(where, f"columns: none of {names} is one of our fields ({', '.join(FIELDS)}); map some")
    ds = ds.select_columns(sorted(set(mapping.values())))

    def rows() -> Rows:
        if not hasattr(ds, "__len__"):  # a streamed (iterable) dataset: row by row, as it arrives
            for k, row in enumerate(ds):
                raw = {f: row.get(c) for f, c in mapping.items()}
                yield f"{where}[{k}]", {f: v for f, v in raw.items() if v is not None}, base
            return
        for start in range(0, len(ds), 512):
            block = ds[start : start + 512]  # column -> list: much faster than row by row
            for k in range(len(block[next(iter(mapping.values()))])):
                raw = {f: block[c][k] for f, c in mapping.items()}
                yield f"{where}[{start + k}]", {f: v for f, v in raw.items() if v is not None}, base

    return rows()


def open_rows(source: DataSource) -> Rows:
    """A fresh pass over one source's raw rows, `(where, raw, base)`, read lazily (a streamed dataset row by
    row as it arrives); check each with `RecordChecker.record`.

    Raises:
        DataError: the source is misconfigured or cannot be opened.
    """
    return _open_all([source])[0]


SAVED_DATASET_FILES = ("state.json", "dataset_dict.json")  # what `save_to_disk` leaves in its folder
AUDIOFOLDER = "audiofolder"
AUDIOFOLDER_METADATA = {"metadata.jsonl": "json", "metadata.csv": "csv", "metadata.parquet": "parquet"}


def _open_audiofolder(source: DataSource, datasets, where: str) -> tuple[Any, str]:
    """An audiofolder as `datasets` defines it for text data: audio files beside a metadata file (in
    `data_dir/SPLIT/` or `data_dir/`) whose `file_name` column names each file and whose other columns hold
    its text. Read through the metadata file alone: `datasets`' own audiofolder builder encodes every clip
    with torchcodec, which eardrum does not need (it decodes audio itself)."""
    if source.data_dir is None:
        raise _fail(where, "data_dir: an audiofolder source needs the folder that holds the audio and its metadata")
    found = [(os.path.join(folder, name), builder, folder)
             for folder in (os.path.join(source.data_dir, source.split), source.data_dir)
             for name, builder in AUDIOFOLDER_METADATA.items() if os.path.isfile(os.path.join(folder, name))]
    if not found:
        raise _fail(where, f"data_dir: no {', '.join(AUDIOFOLDER_METADATA)} in {source.data_dir} or its "
                           f"{source.split}/ folder; list each clip's file_name and its text columns in one")
    metadata, builder, folder = found[0]
    try:
        ds = datasets.load_dataset(builder, data_files=metadata, split="train", streaming=source.streaming)
    except Exception as err:  # noqa: BLE001 - datasets raises many unrelated types; all mean the same here
        raise _fail(where, f"{metadata}: cannot load it ({type(err).__name__}: {err})") from err
    names = ds.column_names or []
    if "file_name" not in names:
        raise _fail(where, f"{metadata}: no file_name column naming each clip; it has columns {names}")
    if source.columns.get("audio", "audio") in names:
        raise _fail(where, f"{metadata}: has both file_name and an audio column; map the one to read in columns")
    return ds.rename_column("file_name", source.columns.get("audio", "audio")), os.path.abspath(folder)


def _open_dataset(source: DataSource) -> tuple[Any, str]:
    """The split as a Dataset (an IterableDataset when streaming) with audio left undecoded, and the folder
    relative paths start from."""
    where = f"dataset {source.dataset}" + (f" ({source.config})" if source.config else "")
    try:
        import datasets
    except ImportError as err:
        raise _fail(where, "the 'datasets' package is missing; pip install 'eardrum[data]'") from err
    if source.dataset == AUDIOFOLDER:
        return _open_audiofolder(source, datasets, where)
    saved = os.path.isdir(source.dataset) and any(
        os.path.isfile(os.path.join(source.dataset, n)) for n in SAVED_DATASET_FILES)
    try:
        if saved:
            ds = datasets.load_from_disk(source.dataset)
        else:
            ds = datasets.load_dataset(source.dataset, source.config, split=source.split, revision=source.revision,
                                       data_dir=source.data_dir, data_files=source.data_files,
                                       streaming=source.streaming)
    except Exception as err:  # datasets raises many unrelated types for "not there"; all mean the same here
        raise _fail(where, f"cannot load it ({type(err).__name__}: {err})") from err
    if isinstance(ds, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        if source.split not in ds:
            raise _fail(where, f"split: no split {source.split!r}; it has {list(ds)}")
        ds = ds[source.split]
    if source.streaming and isinstance(ds, datasets.Dataset):
        ds = ds.to_iterable_dataset()
    for column, feature in (ds.features or {}).items():
        if isinstance(feature, datasets.Audio):  # our own load_audio decodes later; datasets must not
            ds = ds.cast_column(column, datasets.Audio(decode=False))
    if saved:
        base = os.path.abspath(source.dataset)
    elif source.data_dir is not None:
        base = os.path.abspath(source.data_dir)
    else:
        base = os.getcwd()
    return ds, base


def _fail(where: str, message: str) -> DataError:
    return DataError([DataProblem(where, message)])


def _pick(raw: dict, columns: dict[str, str]) -> dict:
    """Our fields from a manifest line: mapped keys, else same-named keys not mapped elsewhere."""
    taken = set(columns.values())
    out = {}
    for name in FIELDS:
        key = columns.get(name, name)
        if (name in columns or key not in taken) and raw.get(key) is not None:
            out[name] = raw[key]
    return out


# ------------------------------------------------------------------ checking records
def _task(got: dict, forced: str | None) -> str:
    stated = got.get("task")
    if stated is not None and stated not in TASKS:
        raise InvalidRecord(f"field 'task': unknown task {stated!r}; expected one of {', '.join(TASKS)}")
    if forced and stated and stated != forced:
        raise InvalidRecord(f"field 'task': {stated!r}, but the source forces task {forced!r}")
    if forced or stated:
        return forced or stated
    present = [n for n in KIND_FIELDS if n in got]
    task = "chat" if "messages" in got else "qa" if {"question", "answer"} & set(got) else "asr"
    if not present or present == ["audio"]:
        raise InvalidRecord(f"cannot tell the kind of record from its fields {present}; expected {_KINDS}")
    if set(present) - set(SHAPES[task]):
        raise InvalidRecord(
            f"fields {present} mix kinds of record; expected {_KINDS}, or set 'task' to say which fields count"
        )
    return task


def _text(message: dict) -> str:
    content = message["content"]
    return content if isinstance(content, str) else "".join(p.get("text", "") for p in content)


def _check_labels(messages: list[dict], mode: str, clips: list[int]) -> None:
    """Refuse a conversation whose labels would mask to nothing under `mode`."""
    if mode == "after_audio":
        if not clips:
            raise InvalidRecord("field 'messages': label_mode 'after_audio' needs an audio part; found none")
        return
    replies = [j for j, m in enumerate(messages) if m["role"] == "assistant"]
    if not replies:
        raise InvalidRecord("field 'messages': no assistant message, so no token would carry loss")
    if mode == "last_assistant" and not _text(messages[replies[-1]]).strip():
        raise InvalidRecord(
            f"field 'messages': the last assistant message (message {replies[-1]}) is empty; "
            "with label_mode 'last_assistant' no token would carry loss"
        )
    if not any(_text(messages[j]).strip() for j in replies):
        raise InvalidRecord("field 'messages': every assistant message is empty, so no token would carry loss")


def _sound_info(file: str | io.BytesIO, label: str) -> tuple[int, int] | str:
    """(frames, rate) from the header alone, or what is wrong."""
    if isinstance(file, str) and not os.path.isfile(file):
        return f"no such file {file}" if not os.path.exists(file) else f"{file} is not a file"
    try:
        info = sf.info(file)
    except sf.SoundFileError as err:
        reason = (getattr(err, "error_string", None) or str(err)).strip()
        return f"soundfile cannot open {label} ({reason}); expected a wav, flac, ogg or mp3 file"
    return info.frames, info.samplerate


def _array_info(value: dict) -> tuple[int, int] | str:
    """(frames, rate) of a datasets-style ``{"array", "sampling_rate"}`` dict, or what is wrong."""
    rate, shape = value.get("sampling_rate"), np.shape(value["array"])
    if isinstance(rate, bool) or not isinstance(rate, Integral) or rate <= 0 or len(shape) not in (1, 2):
        return f"expected a 1-D or 2-D 'array' and a positive integer 'sampling_rate', got {shape}, {rate!r}"
    return shape[0], int(rate)


class RecordChecker:
    """Checks raw records (manifest lines or dataset rows) and turns them into `Record`s; remembers each
    audio file's header, since manifests reuse files. Training data and `eardrum generate`/`eval` share it."""

    def __init__(self, max_seconds: float | None, label_mode: str) -> None:
        self.max_seconds = max_seconds
        self.label_mode = label_mode
        self._info: dict[str, tuple[int, int] | str] = {}

    def record(self, raw: Any, where: str, base: str, source: DataSource) -> Record:
        """The checked record, or `InvalidRecord` listing every problem of the line at `where`."""
        if isinstance(raw, InvalidRecord):
            raise raw
        if not isinstance(raw, dict):
            raise InvalidRecord(f"expected a JSON object, got {_kind(raw)}")
        if source.question is not None and raw.get("question") is None:  # spoken instructions: asked in the audio
            raw = {**raw, "question": source.question}
        task = _task(raw, source.task)
        errors, fields, clips = [], {}, []
        for name in SHAPES[task]:
            try:
                fields[name] = self._field(name, raw.get(name), task, base, clips)
            except InvalidRecord as err:
                errors.append(str(err))
        if raw.get("transcript") is not None:
            try:
                fields["transcript"] = self._transcript(raw["transcript"], clips)
            except InvalidRecord as err:
                errors.append(str(err))
        if errors:
            raise InvalidRecord("; ".join(errors))
        return Record(where, source.label, task, fields, sum(clips), tuple(clips))

    @staticmethod
    def _transcript(value: Any, clips: list[int]) -> str:
        """An optional transcript stands for the record's one clip (text-teacher distillation and the CTC
        loss read it); "" says the clip holds no speech."""
        if not isinstance(value, str):
            raise InvalidRecord(f"field 'transcript': expected text (\"\" for no speech), got {_kind(value)}")
        if len(clips) != 1:
            raise InvalidRecord(f"field 'transcript': the record has {len(clips)} clips; a transcript stands for one")
        return value

    def _field(self, name: str, value: Any, task: str, base: str, clips: list[int]) -> Any:
        if value is None:
            raise InvalidRecord(f"field '{name}' is missing; {task} records need {', '.join(SHAPES[task])}")
        if name == "audio":
            return self._audio(value, base, "field 'audio'", clips)
        if name == "messages":
            return self._messages(value, base, clips)
        if not isinstance(value, str) or not value.strip():
            raise InvalidRecord(f"field '{name}': expected non-empty text, got {_kind(value)}")
        return value

    def _messages(self, value: Any, base: str, clips: list[int]) -> list[dict]:
        if not isinstance(value, list) or not value:
            raise InvalidRecord(f"field 'messages': expected a non-empty list of messages, got {_kind(value)}")
        out = []
        for j, message in enumerate(value):
            at = f"field 'messages', message {j}"
            if not isinstance(message, dict):
                raise InvalidRecord(f"{at}: expected a dict with 'role' and 'content', got {_kind(message)}")
            if message.get("role") not in ROLES:
                raise InvalidRecord(f"{at}: role {message.get('role')!r}; expected one of {', '.join(ROLES)}")
            out.append({**message, "content": self._content(message.get("content"), at, base, clips)})
        _check_labels(out, self.label_mode, clips)
        return out

    def _content(self, content: Any, at: str, base: str, clips: list[int]) -> str | list[dict]:
        if isinstance(content, str):
            return content
        if not isinstance(content, list):
            raise InvalidRecord(f"{at}: content must be a string or a list of parts, got {_kind(content)}")
        parts = []
        for k, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append(dict(part))
            elif kind == "audio":
                source = part.get("audio", part.get("path"))  # the keys the processor reads from a file part
                parts.append({"type": "audio", "audio": self._audio(source, base, f"{at}, part {k}", clips)})
            else:
                raise InvalidRecord(
                    f"{at}, part {k}: expected {{'type': 'text', 'text': str}} or {{'type': 'audio', 'audio': ...}}"
                    f", got {part!r:.80}"
                )
        return parts

    def _audio(self, value: Any, base: str, at: str, clips: list[int]) -> str | dict:
        """The resolved source (an absolute path, or the dict as given); appends its 16 kHz length."""
        if isinstance(value, dict):
            if value.get("array") is not None:
                clips.append(self._samples(_array_info(value), at, "the audio array"))
                return value
            if isinstance(value.get("bytes"), bytes):
                clips.append(self._samples(_sound_info(io.BytesIO(value["bytes"]), "the bytes"), at, "the bytes"))
                return value
            value = value.get("path")
        if not isinstance(value, (str, os.PathLike)) or not os.fspath(value):
            raise InvalidRecord(
                f"{at}: expected a path or a dict with 'bytes', 'path' or 'array' + 'sampling_rate', got {_kind(value)}"
            )
        path = os.path.normpath(os.path.join(base, os.fspath(value)))
        if path not in self._info:
            self._info[path] = _sound_info(path, path)
        clips.append(self._samples(self._info[path], at, path))
        return path

    def _samples(self, info: tuple[int, int] | str, at: str, label: str) -> int:
        if isinstance(info, str):
            raise InvalidRecord(f"{at}: {info}")
        frames, rate = info
        if frames <= 0:
            raise InvalidRecord(f"{at}: {label} has zero length (0 samples); expected at least one sample")
        seconds = frames / rate
        if self.max_seconds is not None and seconds > self.max_seconds:
            raise InvalidRecord(f"{at}: {label} is {seconds:.2f} s long, over max_audio_seconds={self.max_seconds:g}")
        # Rounded half up: the length soxr gives when load_audio resamples to 16 kHz.
        samples = (frames * SAMPLING_RATE + rate // 2) // rate
        if samples == 0:
            raise InvalidRecord(f"{at}: {label} ({frames} samples at {rate} Hz) resamples to 0 samples at 16 kHz")
        return samples
