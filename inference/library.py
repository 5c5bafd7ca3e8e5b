"""A library of recordings: every recording cut into timestamped windows, their texts in a full-text index.

    library = AudioLibrary("meetings.eardrum-library")
    library.index(["recordings/"], describe, describer="runs/demo/final")   # new and changed files only
    library.search("budget decision", k=5)   # -> [Hit(path, start, end, text, score), ...]

The store is one SQLite file (no server; FTS5 ranks windows by BM25). Each file is indexed in one
transaction, so a killed run loses nothing already indexed and leaves no half-indexed file; a file is
known by its content hash, so a re-run skips the unchanged ones, re-indexes changed ones and drops the
windows of files that are gone. A file that cannot be read is named and skipped. What a window's text is
comes from `describe` (windows -> texts), e.g. the model's own transcript of each window. For a model that
reads Whisper's transcript beside the audio (`transcript_hint`), each window also keeps that transcript
(`model_hints`), so a question heard from the library does not decode it again (on a CPU that decoding
costs more than the rest of the question's prompt), and the search reads it beside the describer's text.

A library outgrowing one machine moves to a server-grade engine by exporting `windows` (path, start,
end, text) as rows: every column is plain data.
"""

from __future__ import annotations

import hashlib
import logging
import math
import os
import re
import sqlite3
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from eardrum.adapters.audio import SAMPLING_RATE, AudioError, load_audio
from eardrum.adapters.config import plan_windows, window_samples

logger = logging.getLogger(__name__)

# 2: words are stemmed (porter), so "beeping" finds "beep"; 3: each window keeps its hint; 4: the hint is searched too;
# 5: the vocabulary is kept unstemmed, for words that sound like a question's (`AudioLibrary.sounds_like`)
LIBRARY_VERSION = 5
AUDIO_SUFFIXES = (".wav", ".flac", ".ogg", ".oga", ".mp3", ".aiff", ".aif")  # what soundfile decodes
DEFAULT_WINDOW_S = 20.0
DEFAULT_OVERLAP_S = 5.0
STOPWORDS = frozenset(
    "a an and are as at be by did do does for from had has have how i in is it its of on or said says that "
    "the their there this to was were what when where which who why will with you your about any anyone "
    # the words a question about recordings is framed in, which no window's text needs to hold
    "can could would should we us our they them he she his her him hear heard listen recording recordings "
    "recorded audio say tell told mention mentioned talk talked speak spoke someone anything something".split()
)
# A window answers a question only if it holds at least this share of the question's words, each word weighted
# by how rare it is in the library (BM25's idf; a word no window holds weighs most): a question whose most
# telling word no window holds ("Who leads the volcano project?" in a library that never says "volcano") finds
# nothing, however many windows share its common words ("project", "lead").
MIN_COVERAGE = 0.6
# A word of the library stands in for a question's word it looks like (rapidfuzz's ratio, 0-1, at least this; words
# of MIN_SOUNDS_LIKE_LETTERS letters or more): speech recognition writes a name it has not heard as a word it knows
# ("altair" -> "altar", "alder" -> "older"), and a question asks with another form of a word ("lead" for "led"). A
# window holding such a word gets that share of the question word's weight, less when the word is common
# (`AudioLibrary._coverage`).
SOUNDS_LIKE = 0.8
MIN_SOUNDS_LIKE_LETTERS = 4
# ... and of about its length: a misheard word is written with about as many letters ("alder" -> "older", "lead" ->
# "led"), while a word inside a longer one is another word ("turn" in "saturn") or another form of it, which
# stemming already finds ("launching" for "launch")
MAX_LENGTH_CHANGE = 1
SEARCH_POOL = 50  # windows ranked by BM25 whose coverage is weighed, the k best of them kept

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS files (
    id INTEGER PRIMARY KEY, path TEXT UNIQUE NOT NULL, sha256 TEXT NOT NULL, seconds REAL NOT NULL,
    indexed_at REAL NOT NULL);
CREATE TABLE IF NOT EXISTS windows (
    id INTEGER PRIMARY KEY, file_id INTEGER NOT NULL REFERENCES files(id) ON DELETE CASCADE,
    start REAL NOT NULL, end REAL NOT NULL, text TEXT NOT NULL, hint TEXT);
CREATE INDEX IF NOT EXISTS windows_by_file ON windows(file_id);
"""
# Both the describer's text and the hint are searched: a model that reads Whisper's transcript beside the audio may
# describe a long window by its first sentence, while the hint holds every word Whisper heard in it. The same text
# is indexed a second time unstemmed (`windows_words`, no positions) for its vocabulary (`library_words`): the
# words a question's word may have been misheard as are looked up there (`AudioLibrary.sounds_like`).
TEXT_INDEX = """
CREATE VIRTUAL TABLE IF NOT EXISTS windows_text USING fts5(text, hint, content='windows', content_rowid='id',
    tokenize='porter unicode61');
CREATE VIRTUAL TABLE IF NOT EXISTS windows_words USING fts5(text, hint, content='windows', content_rowid='id',
    tokenize='unicode61', detail='none');
CREATE VIRTUAL TABLE IF NOT EXISTS library_words USING fts5vocab(windows_words, 'row');
INSERT OR IGNORE INTO meta VALUES ('windows_changed', '0');
INSERT OR IGNORE INTO meta VALUES ('library_id', lower(hex(randomblob(16))));
CREATE TRIGGER IF NOT EXISTS windows_added AFTER INSERT ON windows BEGIN
    INSERT INTO windows_text(rowid, text, hint) VALUES (new.id, new.text, new.hint);
    INSERT INTO windows_words(rowid, text, hint) VALUES (new.id, new.text, new.hint);
    UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'windows_changed'; END;
CREATE TRIGGER IF NOT EXISTS windows_removed AFTER DELETE ON windows BEGIN
    INSERT INTO windows_text(windows_text, rowid, text, hint) VALUES ('delete', old.id, old.text, old.hint);
    INSERT INTO windows_words(windows_words, rowid, text, hint) VALUES ('delete', old.id, old.text, old.hint);
    UPDATE meta SET value = CAST(value AS INTEGER) + 1 WHERE key = 'windows_changed'; END;
"""
# (library file, its library_id) -> (its windows_changed count when read, its words, {word: windows holding it}):
# read once per change of the library, however often it is opened (a server opens its library for every question);
# a library made anew at the same path has another id
_VOCABULARIES: dict[tuple[str, str], tuple[str, list[str], dict[str, int]]] = {}


class LibraryError(ValueError):
    """A library file that cannot be used, or settings that contradict the library's own."""


@dataclass(frozen=True)
class Hit:
    """A window found by a search: its recording, its span in seconds, its indexed text, its BM25 score
    (lower is better, as SQLite's bm25() gives it)."""

    path: str
    start: float
    end: float
    text: str
    score: float
    coverage: float = 1.0  # the idf-weighted share of the question's words this window holds (MIN_COVERAGE)
    hint: str | None = None  # Whisper's transcript of the window, kept when it was indexed (`model_hints`)


@dataclass(frozen=True)
class HintSource:
    """Where a library's stored hints come from: `transcribe(waves) -> texts`, the model's `hints_fingerprint`
    (so the hints are used only by a model that would write and read them the same) and its encoder window in
    samples (a library window longer than that is two windows to the model, and one stored hint cannot serve)."""

    transcribe: Callable[[list[np.ndarray]], list[str]]
    fingerprint: str
    window_samples: int


def _encoder_window(model) -> int:
    """The encoder window in samples of an `AudioLLM` or its `AudioProcessor`."""
    spec = model.featurizer.spec if hasattr(model, "featurizer") else model.encoder.spec
    return window_samples(model.config, spec)


def hints_fingerprint(model) -> str | None:
    """What a library's stored hints must have been made by for `model` (an `AudioLLM` or its `AudioProcessor`)
    to read them: its transcriber's fingerprint (weights, precision, settings) and its encoder window; None for
    a model that reads no hints (`AudioLLMConfig.transcript_hint` off). `find_windows` asks with it."""
    transcriber = getattr(model, "transcriber", None)
    if transcriber is None or not model.config.transcript_hint:
        return None
    return f"{transcriber.fingerprint()}/{_encoder_window(model)}"


def model_hints(model) -> HintSource | None:
    """The hints a model reads beside each window (its transcriber), for `AudioLibrary.index` to keep; None for
    a model without them."""
    fingerprint = hints_fingerprint(model)
    if fingerprint is None:
        return None
    return HintSource(model.transcriber, fingerprint, _encoder_window(model))


def file_sha256(path: Path) -> str:
    """sha256 (hex) of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def audio_files(sources: Iterable[str | os.PathLike]) -> Iterator[Path]:
    """Every audio file (by suffix, `AUDIO_SUFFIXES`) of `sources` (files and folders walked in name order),
    resolved; a source that does not exist raises LibraryError naming it."""
    for source in sources:
        path = Path(source).expanduser()
        if path.is_file():
            yield path.resolve()
        elif path.is_dir():
            for root, dirs, names in os.walk(path):
                dirs.sort()
                for name in sorted(names):
                    if name.lower().endswith(AUDIO_SUFFIXES):
                        yield (Path(root) / name).resolve()
        else:
            raise LibraryError(f"{source}: no such file or folder; expected recordings or folders holding them")


def question_words(question: str) -> list[str]:
    """The words of a question that a window's text should hold: lower case, stopwords dropped, each once."""
    return list(dict.fromkeys(w for w in re.findall(r"[\w']+", question.lower()) if w not in STOPWORDS))


def any_of(words: Iterable[str]) -> str:
    """An FTS5 query matching any of `words`, each quoted (once)."""
    return " OR ".join(f'"{w}"' for w in dict.fromkeys(words))


def search_terms(question: str) -> str:
    """An FTS5 query for a question: its words (`question_words`), each quoted, any of them matching."""
    return any_of(question_words(question))


DESCRIBE_MAX_TOKENS = 96  # a 20 s window of fast speech is about 70 words


def model_describer(model, processor, *, batch_size: int = 8, prompt: str | None = None,
                    max_new_tokens: int = DESCRIBE_MAX_TOKENS) -> Callable[[list[np.ndarray]], list[str]]:
    """`describe(waves) -> texts` for `AudioLibrary.index`: the model's own greedy answer to `prompt` (default:
    `chat.TRANSCRIBE_PROMPT`) for each window (its transcript; for a window without speech, the demo's models
    say what they hear instead)."""
    from eardrum.common.decoding import answer_conversations
    from eardrum.common.generation import GenerationSettings

    from .chat import TRANSCRIBE_PROMPT

    prompt = prompt or TRANSCRIBE_PROMPT
    settings = GenerationSettings(max_new_tokens=max_new_tokens)

    def describe(waves: list[np.ndarray]) -> list[str]:
        texts = []
        for first in range(0, len(waves), batch_size):
            conversations = [[{"role": "user", "content": [{"type": "audio", "audio": (w, SAMPLING_RATE)},
                                                           {"type": "text", "text": prompt}]}]
                             for w in waves[first : first + batch_size]]
            texts += answer_conversations(model, processor, conversations, settings)
        return texts

    return describe


LIBRARY_WINDOWS = 3  # windows a question about a library hears at most
# ... those whose coverage (`Hit.coverage`) is within this of the best window's: a window that holds fewer of the
# question's words than the best one is more likely to distract the model than to help it
WINDOW_MARGIN = 0.1
LIBRARY_INTRO = 'Recording "{name}" at {time}:'  # a window found in a library: its file and start (time_marker)
NOTHING_FOUND = "Nothing in the library matches this question, so I cannot answer it from the recordings."
FOLLOW_UP_WORDS = frozenset("it its that this these those they them their he him his she her and also".split())


def is_follow_up(question: str) -> bool:
    """Whether a question leans on the conversation before it ("And who decided it?"): it starts with "and" or
    "also", or refers back with a pronoun such as it, that, they, she."""
    words = re.findall(r"[\w']+", question.lower())
    return bool(words) and (words[0] in ("and", "also") or any(w in FOLLOW_UP_WORDS for w in words))


def user_question(message: dict) -> str | None:
    """The question a user message asks: its text (a string content) or its last part when that is text; None
    for other roles and for messages that end in audio."""
    if message.get("role") != "user":
        return None
    content = message["content"]
    if isinstance(content, str):
        return content
    return content[-1]["text"] if content and content[-1]["type"] == "text" else None


def find_windows(library: AudioLibrary | str | os.PathLike, question: str, earlier: Sequence[str] = (),
                 k: int = LIBRARY_WINDOWS, hints_for: str | None = None,
                 margin: float | None = None) -> list[Hit]:
    """At most `k` windows of `library` (an open library or its file) that best match `question`, only those whose
    coverage is within `margin` (default WINDOW_MARGIN) of the best one's; a follow-up (`is_follow_up`) whose own
    words find nothing is searched with the last two `earlier` questions instead. `hints_for`: the asking model's
    transcriber fingerprint (`AudioLibrary.search`)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"windows: expected a positive number of library windows, got {k!r}")
    margin = WINDOW_MARGIN if margin is None else margin
    opened = library if isinstance(library, AudioLibrary) else open_library(library)
    try:
        hits = opened.search(question, k, hints_for=hints_for)
        if not hits and earlier and is_follow_up(question):  # its own words found nothing: the topic is earlier
            hits = opened.search(" ".join(earlier[-2:]), k, hints_for=hints_for)
        return [h for h in hits if h.coverage >= hits[0].coverage - margin]  # best first (`AudioLibrary.search`)
    finally:
        if opened is not library:
            opened.close()


def window_parts(hits: Sequence[Hit]) -> list[dict]:
    """Content parts that let the model hear each window: its intro (file name and [mm:ss]) and its audio, with
    the hint kept for it (`Hit.hint`) where there is one."""
    from eardrum.adapters.processor import time_marker

    parts: list[dict] = []
    for hit in hits:
        intro = LIBRARY_INTRO.format(name=Path(hit.path).name, time=time_marker(hit.start))
        audio = {"type": "audio", "audio": (read_span(hit.path, hit.start, hit.end), SAMPLING_RATE)}
        if hit.hint is not None:
            audio["transcript"] = hit.hint
        parts += [{"type": "text", "text": intro}, audio]
    return parts


def sources_line(hits: Sequence[Hit]) -> str:
    """What an answer from a library ends with: "\n\nSources: meeting.wav 12:40; ..." ("" for no hits)."""
    from eardrum.adapters.processor import time_marker

    if not hits:
        return ""
    return "\n\nSources: " + "; ".join(f"{Path(h.path).name} {time_marker(h.start)[1:-1]}" for h in hits)


def read_span(path: str | os.PathLike, start: float, end: float) -> np.ndarray:
    """Seconds [start, end) of an audio file as a 16 kHz float32 wave (only that part is read)."""
    import soundfile as sf

    with sf.SoundFile(path) as f:
        f.seek(min(int(start * f.samplerate), f.frames))
        data = f.read(max(0, int(end * f.samplerate) - f.tell()), dtype="float32", always_2d=True)
        rate = f.samplerate
    return load_audio((data, rate), name=f"{path} [{start:g}-{end:g} s]")


def open_library(path: str | os.PathLike) -> AudioLibrary:
    """An existing library (LibraryError naming `path` where there is none: it is never created here)."""
    if not Path(path).is_file():
        raise LibraryError(f"{path}: no such library file; make one with eardrum index")
    return AudioLibrary(path)


class AudioLibrary:
    """One library file: its recordings, their windows and the windows' text (see the module)."""

    def __init__(self, path: str | os.PathLike, *, window_s: float | None = None,
                 overlap_s: float | None = None) -> None:
        """Open (or create) the library at `path`. `window_s` / `overlap_s` set a new library's windows
        (defaults DEFAULT_WINDOW_S / DEFAULT_OVERLAP_S); for an existing one they must match what it holds."""
        self.path = Path(path)
        try:
            self.db = sqlite3.connect(self.path)
            self.db.execute("PRAGMA foreign_keys = ON")
            self.db.executescript(SCHEMA)
            stored = dict(self.db.execute("SELECT key, value FROM meta").fetchall())
            if stored.get("version") in ("2", "3", "4"):
                self._upgrade(stored["version"])
                stored["version"] = str(LIBRARY_VERSION)
            self.db.executescript(TEXT_INDEX)
        except sqlite3.DatabaseError as err:
            raise LibraryError(f"{self.path}: not an eardrum library ({err})") from None
        wanted = {"version": str(LIBRARY_VERSION),
                  "window_s": str(float(window_s if window_s is not None else DEFAULT_WINDOW_S)),
                  "overlap_s": str(float(overlap_s if overlap_s is not None else DEFAULT_OVERLAP_S))}
        if not stored:
            if not 0 <= float(wanted["overlap_s"]) < float(wanted["window_s"]):
                raise LibraryError(f"window_s={wanted['window_s']}, overlap_s={wanted['overlap_s']}: expected "
                                   "0 <= overlap < window")
            with self.db:
                self.db.executemany("INSERT INTO meta VALUES (?, ?)", wanted.items())
            stored = wanted
        for key, asked in (("window_s", window_s), ("overlap_s", overlap_s)):
            if asked is not None and float(stored[key]) != float(asked):
                raise LibraryError(f"{self.path}: its windows use {key}={stored[key]}, not {asked}; index into a new "
                                   "library to change them")
        if stored.get("version") != str(LIBRARY_VERSION):
            raise LibraryError(f"{self.path}: library version {stored.get('version')}, this eardrum reads "
                               f"{LIBRARY_VERSION}; index the recordings into a new library")
        self.window_s, self.overlap_s = float(stored["window_s"]), float(stored["overlap_s"])

    def _upgrade(self, version: str) -> None:
        """Bring a library of `version` 2 (no hints), 3 (hints kept, not searched) or 4 (no unstemmed vocabulary)
        to LIBRARY_VERSION in one transaction: the windows keep their texts, a v2 library's windows get an empty
        hint, and the full-text indexes are rebuilt over text and hint."""
        self.db.executescript(
            "BEGIN;" + ("ALTER TABLE windows ADD COLUMN hint TEXT;" if version == "2" else "")
            + "DROP TRIGGER IF EXISTS windows_added; DROP TRIGGER IF EXISTS windows_removed;"
            "DROP TABLE IF EXISTS library_words; DROP TABLE IF EXISTS windows_words; DROP TABLE IF EXISTS windows_text;"
            + TEXT_INDEX
            + "INSERT INTO windows_text(windows_text) VALUES ('rebuild');"
            "INSERT INTO windows_words(windows_words) VALUES ('rebuild');"
            f"UPDATE meta SET value = '{LIBRARY_VERSION}' WHERE key = 'version'; COMMIT;")

    def close(self) -> None:
        """Close the database file."""
        self.db.close()

    def __enter__(self) -> AudioLibrary:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def meta(self, key: str) -> str | None:
        """A stored setting (e.g. "describer": what made the windows' text), or None."""
        row = self.db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def stats(self) -> dict:
        """{"files", "hours", "windows", "describer", "window_s", "overlap_s"} of what is indexed."""
        files, seconds = self.db.execute("SELECT COUNT(*), COALESCE(SUM(seconds), 0) FROM files").fetchone()
        windows = self.db.execute("SELECT COUNT(*) FROM windows").fetchone()[0]
        return {"files": files, "hours": seconds / 3600, "windows": windows, "describer": self.meta("describer"),
                "window_s": self.window_s, "overlap_s": self.overlap_s}

    def files(self) -> list[tuple[str, float]]:
        """(path, seconds) of every indexed recording, by path."""
        return self.db.execute("SELECT path, seconds FROM files ORDER BY path").fetchall()

    def windows(self, path: str | os.PathLike) -> list[tuple[float, float, str]]:
        """(start, end, text) of one indexed recording's windows, in time order."""
        return self.db.execute(
            "SELECT w.start, w.end, w.text FROM windows w JOIN files f ON f.id = w.file_id WHERE f.path = ? "
            "ORDER BY w.start", (str(Path(path).resolve()),)).fetchall()

    def index(
        self,
        sources: Sequence[str | os.PathLike],
        describe: Callable[[list[np.ndarray]], list[str]],
        *,
        describer: str,
        batch_windows: int = 16,
        progress: Callable[[str], None] | None = None,
        hints: HintSource | None = None,
    ) -> dict:
        """Index the audio files of `sources`: new and changed files (by content hash) get their windows and
        texts (`describe(waves) -> texts`, called on up to `batch_windows` windows at once); files of
        `sources` that are gone lose theirs. `describer` names what makes the texts (e.g. the model folder);
        a library holds the texts of one describer only. `hints` (`model_hints`) keeps each window's hint too.

        Returns {"files_seen", "indexed", "unchanged", "removed", "skipped": [(path, why)], "audio_seconds",
        "seconds"}; a file that cannot be read is skipped (logged, listed) and never stops the run."""
        known = self.meta("describer")
        if known is not None and known != describer:
            raise LibraryError(f"{self.path}: its windows were described by {known}, not {describer}; index into "
                               "a new library, or with the same model")
        if known is None:
            with self.db:
                self.db.execute("INSERT INTO meta VALUES ('describer', ?)", (describer,))
        if hints is not None and round(self.window_s * SAMPLING_RATE) > hints.window_samples:
            logger.warning("%s: its %g s windows are longer than the model's encoder window (%g s), so a window's "
                           "hint would stand for two; none are kept", self.path, self.window_s,
                           hints.window_samples / SAMPLING_RATE)
            hints = None
        if hints is not None:
            kept_by = self.meta("hints_by")
            if kept_by is None:
                with self.db:
                    self.db.execute("INSERT INTO meta VALUES ('hints_by', ?)", (hints.fingerprint,))
            elif kept_by != hints.fingerprint:  # one transcriber's hints per library; these windows go without
                logger.warning("%s: its hints come from another transcriber (weights, precision or settings); "
                               "the windows indexed now keep none", self.path)
                hints = None
        start_time = time.perf_counter()
        summary = {"files_seen": 0, "indexed": 0, "unchanged": 0, "removed": 0, "skipped": [], "audio_seconds": 0.0}
        seen: set[str] = set()
        roots = [Path(s).expanduser().resolve() for s in sources]
        for path in audio_files(sources):
            summary["files_seen"] += 1
            seen.add(str(path))
            try:
                digest = file_sha256(path)
                row = self.db.execute("SELECT sha256 FROM files WHERE path = ?", (str(path),)).fetchone()
                if row is not None and row[0] == digest:
                    summary["unchanged"] += 1
                    continue
                wave = load_audio(path, name=str(path))
            except (OSError, AudioError) as err:
                logger.warning("skipped %s: %s", path, err)
                summary["skipped"].append((str(path), str(err)))
                continue
            self._index_file(path, digest, wave, describe, batch_windows, hints)
            summary["indexed"] += 1
            summary["audio_seconds"] += len(wave) / SAMPLING_RATE
            if progress is not None:
                elapsed = time.perf_counter() - start_time
                rate = summary["audio_seconds"] / elapsed if elapsed > 0 else 0.0
                progress(f"indexed {path.name} ({len(wave) / SAMPLING_RATE:.0f} s); {summary['indexed']} files, "
                         f"{summary['audio_seconds'] / 3600:.2f} h of audio at {rate:.0f} audio hours per hour")
        summary["removed"] = self._remove_gone(roots, seen)
        summary["seconds"] = time.perf_counter() - start_time
        return summary

    def _index_file(self, path: Path, digest: str, wave: np.ndarray, describe, batch_windows: int,
                    hints: HintSource | None) -> None:
        spans = plan_windows(len(wave), int(self.window_s * SAMPLING_RATE), int(self.overlap_s * SAMPLING_RATE))
        texts: list[str] = []
        heard: list[str | None] = []
        for first in range(0, len(spans), batch_windows):
            waves = [wave[a:b] for a, b in spans[first : first + batch_windows]]
            texts += describe(waves)
            # the describer's model has just decoded these hints: its transcriber hands them back from memory
            heard += hints.transcribe(waves) if hints is not None else [None] * len(waves)
        if len(texts) != len(spans):
            raise LibraryError(f"describe returned {len(texts)} texts for {len(spans)} windows of {path}")
        with self.db:  # one transaction: the file is indexed whole or not at all
            self.db.execute("DELETE FROM files WHERE path = ?", (str(path),))
            file_id = self.db.execute(
                "INSERT INTO files (path, sha256, seconds, indexed_at) VALUES (?, ?, ?, ?)",
                (str(path), digest, len(wave) / SAMPLING_RATE, time.time())).lastrowid
            self.db.executemany(
                "INSERT INTO windows (file_id, start, end, text, hint) VALUES (?, ?, ?, ?, ?)",
                [(file_id, a / SAMPLING_RATE, b / SAMPLING_RATE, text, hint)
                 for (a, b), text, hint in zip(spans, texts, heard)])

    def _remove_gone(self, roots: list[Path], seen: set[str]) -> int:
        gone = [p for (p,) in self.db.execute("SELECT path FROM files") if p not in seen and any(
            Path(p) == root or root in Path(p).parents for root in roots)]
        with self.db:
            self.db.executemany("DELETE FROM files WHERE path = ?", [(p,) for p in gone])
        for p in gone:
            logger.info("removed %s from the library: the file is gone", p)
        return len(gone)

    def search(self, question: str, k: int = 5, min_coverage: float = MIN_COVERAGE,
               hints_for: str | None = None) -> list[Hit]:
        """The `k` windows that best match the words of `question`: among the SEARCH_POOL best by BM25 over the
        question's words and the library words that look like them (`sounds_like`), those holding at least
        `min_coverage` of its words weighted by rarity (`MIN_COVERAGE`; 0 keeps every match), most covered first
        (BM25 breaks ties); [] when no window does. The hits hold their stored hints only for the transcriber whose
        fingerprint is `hints_for` (`HintSource.fingerprint`) and whose hints these are."""
        alternatives = {word: self.sounds_like(word) for word in question_words(question)}
        terms = any_of(w for near in alternatives.values() for w in near)
        if not terms:
            return []
        rows = self.db.execute(
            "SELECT w.id, f.path, w.start, w.end, w.text, bm25(windows_text) AS score, w.hint FROM windows_text "
            "JOIN windows w ON w.id = windows_text.rowid JOIN files f ON f.id = w.file_id "
            "WHERE windows_text MATCH ? ORDER BY score LIMIT ?", (terms, max(k, SEARCH_POOL))).fetchall()
        if not rows:
            return []
        coverage = self._coverage(alternatives, [row[0] for row in rows])
        usable = hints_for is not None and hints_for == self.meta("hints_by")
        hits = [Hit(*row[1:6], coverage=round(coverage[row[0]], 4), hint=row[6] if usable else None) for row in rows]
        kept = sorted((h for h in hits if h.coverage >= min_coverage), key=lambda h: (-h.coverage, h.score))
        return kept[:k]

    def sounds_like(self, word: str, threshold: float = SOUNDS_LIKE) -> dict[str, float]:
        """{word: 1.0} and the library's words (unstemmed, lower case) that look like `word` (a word of
        MIN_SOUNDS_LIKE_LETTERS letters or more): {library word: similarity in [threshold, 1)}."""
        from rapidfuzz import fuzz, process

        near = {word: 1.0}
        if len(word) >= MIN_SOUNDS_LIKE_LETTERS and word.isalpha():
            for other, score, _ in process.extract(word, self._vocabulary()[0], scorer=fuzz.ratio,
                                                   score_cutoff=100 * threshold, limit=None):
                if abs(len(other) - len(word)) <= MAX_LENGTH_CHANGE:
                    near.setdefault(other, round(score / 100, 4))
        return near

    def _vocabulary(self) -> tuple[list[str], dict[str, int]]:
        """The library's alphabetic words, unstemmed, and how many windows hold each (see _VOCABULARIES)."""
        state = dict(self.db.execute("SELECT key, value FROM meta WHERE key IN ('library_id', 'windows_changed')"))
        key, changed = (str(self.path.resolve()), state["library_id"]), state["windows_changed"]
        if key not in _VOCABULARIES or _VOCABULARIES[key][0] != changed:
            counts = {w: n for w, n in self.db.execute("SELECT term, doc FROM library_words") if w.isalpha()}
            _VOCABULARIES[key] = (changed, list(counts), counts)
        return _VOCABULARIES[key][1:]

    def _coverage(self, alternatives: dict[str, dict[str, float]], ids: list[int]) -> dict[int, float]:
        """For each window id: the share of the question's words it holds, each word weighted by BM25's idf over
        the library (ln(1 + (N - n + 0.5) / (n + 0.5)) for a word n of N windows hold, as FTS5 tokenises both).
        `alternatives`: {question word: {word: similarity}} (`sounds_like`); a window holding only words that look
        like a question's word gets the best of their similarities times its weight, each similarity scaled by
        how rare that word is (its idf over that of a word one window holds: a common word that looks like a rare
        one says little)."""
        total = self.db.execute("SELECT COUNT(*) FROM windows").fetchone()[0]
        marks = ",".join("?" * len(ids))

        def idf(n: int) -> float:  # of a word n windows hold
            return math.log(1 + (total - n + 0.5) / (n + 0.5))

        held_by = self._vocabulary()[1]  # unstemmed, as `sounds_like` found the words
        whole, held = 0.0, dict.fromkeys(ids, 0.0)
        rarest = idf(1)
        for word, near in alternatives.items():
            weight = idf(self.db.execute("SELECT COUNT(*) FROM windows_text WHERE windows_text MATCH ?",
                                         (f'"{word}"',)).fetchone()[0])
            whole += weight
            credit = dict.fromkeys(ids, 0.0)
            for other, share in near.items():
                if other != word:  # a common word that looks like a rare one is weak evidence for it
                    share *= min(1.0, idf(held_by.get(other, 0)) / rarest)
                for (i,) in self.db.execute(f"SELECT rowid FROM windows_text WHERE windows_text MATCH ? AND rowid IN "
                                            f"({marks})", (f'"{other}"', *ids)):
                    credit[i] = max(credit[i], share)
            for i in ids:
                held[i] += weight * credit[i]
        return {i: (h / whole if whole else 0.0) for i, h in held.items()}
