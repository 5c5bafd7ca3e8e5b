"""Asking across a library, measured: index a test set (`benchmarks/library_set.py`) with a model, then score
retrieval, answers, citations, invented answers and latency against two references on the same questions.

    python -m benchmarks.library_set --out /tmp/library-set
    python -m benchmarks.library_bench --set /tmp/library-set --model runs/demo/stage2/final \\
        --out benchmarks/results/library-cpu-demo.json
    python -m benchmarks.library_bench --set /tmp/library-set --library WORK/library.sqlite   # retrieval only

Measured (JSON out):
- index: audio hours indexed per hour of wall time, the library file's bytes per audio hour;
- retrieval: recall@1 and @5 of the right window (the one holding the middle of the planted fact or sound),
  for speech facts and for sounds;
- answers (speech facts): how often the answer from the library (`AudioChat.ask(question, library=...)`, which
  hears the top windows about as good as the best, `WINDOW_MARGIN`) contains an accepted answer, against the same
  hearing every one of the top LIBRARY_WINDOWS, the ceiling (the model hearing the right window alone) and a
  cascade (the same LLM reading the top windows' indexed text instead of hearing them); citation
  accuracy: among the right answers, how often the right window is among the cited sources;
- invented answers: questions about projects the library never mentions that get an answer instead of "I
  cannot find it";
- latency, question to first token (one new token generated), each question timed as the first about its
  windows (no hint decoded before, as in a new process): from the library at its full size and at each whole
  hour of it (the library cut to its first recordings), and from it without its stored hints (Whisper decoding
  each window's hint), against a question about one window given directly; the search alone in a library
  padded with synthetic windows to `--simulate-hours` hours.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import shutil
import sqlite3
import statistics
import sys
import time
from pathlib import Path

from .report_io import emit, machine

REFUSALS = ("cannot", "can't", "can not", "not mentioned", "no information", "does not say", "doesn't say",
            "no mention", "nothing in the library", "not in the recordings", "don't know", "do not know",
            "not find", "no answer", "not specified", "no speech")
COVERAGES = (0.5, 0.6, 0.7)  # retrieval is also measured at these `min_coverage` thresholds
HOP_WINDOWS_PER_HOUR = 240  # 20 s windows every 15 s (the defaults): how many windows an hour of audio makes


def is_refusal(answer: str) -> bool:
    """Whether an answer says it cannot answer (or found nothing) instead of answering."""
    low = answer.lower()
    return any(phrase in low for phrase in REFUSALS)


def right_window(row: dict, path: str, start: float, end: float) -> bool:
    """Whether the window (path, start, end) holds the middle of the planted span of `row`."""
    middle = (row["start"] + row["end"]) / 2
    return Path(path).name == Path(row["file"]).name and start <= middle <= end


@contextlib.contextmanager
def library_margin(margin: float):
    """Questions asked inside hear the windows within `margin` of the best one's coverage
    (`inference.library.WINDOW_MARGIN`; 1.0: every one of the top LIBRARY_WINDOWS)."""
    from eardrum.inference import library

    kept, library.WINDOW_MARGIN = library.WINDOW_MARGIN, margin
    try:
        yield
    finally:
        library.WINDOW_MARGIN = kept


def _median_ms(samples: list[float]) -> float:
    return round(1000 * statistics.median(samples), 1)


def cut_library(source: Path, target: Path, hours: float) -> float:
    """Copy the library at `source` to `target` keeping its first recordings (by path) up to `hours` of audio;
    returns the hours kept."""
    shutil.copyfile(source, target)
    db = sqlite3.connect(target)
    db.execute("PRAGMA foreign_keys = ON")
    kept, gone = 0.0, []
    for path, seconds in db.execute("SELECT path, seconds FROM files ORDER BY path").fetchall():
        if kept + seconds / 3600 <= hours + 1e-9:
            kept += seconds / 3600
        else:
            gone.append((path,))
    with db:
        db.executemany("DELETE FROM files WHERE path = ?", gone)
    db.execute("VACUUM")
    db.close()
    return kept


def _new_word(rng: random.Random) -> str:
    """A made-up word (5-9 letters): one per synthetic window, so that a padded library's vocabulary grows with
    its hours as a real one's does with new names (what `AudioLibrary.sounds_like` searches)."""
    return "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=rng.randint(5, 9)))


def pad_library(source: Path, target: Path, hours: float, seed: int = 0) -> int:
    """Copy the library at `source` to `target` and add synthetic windows (texts drawn from the words of its own
    windows and one made-up word each, an hour-long synthetic file at a time) until it holds at least `hours` of
    audio; returns the windows added. A library that keeps hints gets a synthetic hint for each window too (the
    search reads both)."""
    shutil.copyfile(source, target)
    db = sqlite3.connect(target)
    words = " ".join(t for (t,) in db.execute("SELECT text FROM windows")).split() or ["silence"]
    have = db.execute("SELECT COALESCE(SUM(seconds), 0) FROM files").fetchone()[0] / 3600
    hinted = db.execute("SELECT COUNT(*) FROM windows WHERE hint IS NOT NULL").fetchone()[0] > 0
    rng = random.Random(seed)
    added, per_file = 0, HOP_WINDOWS_PER_HOUR  # one synthetic hour-long file at a time
    with db:
        for n in range(math.ceil(max(0.0, hours - have))):
            file_id = db.execute("INSERT INTO files (path, sha256, seconds, indexed_at) VALUES (?, ?, ?, ?)",
                                 (f"/synthetic/hour-{n:05d}.wav", "0" * 64, 3600.0, time.time())).lastrowid
            rows = [(file_id, 15.0 * k, 15.0 * k + 20.0, " ".join(rng.choices(words, k=44) + [_new_word(rng)]),
                     " ".join(rng.choices(words, k=45)) if hinted else None) for k in range(per_file)]
            db.executemany("INSERT INTO windows (file_id, start, end, text, hint) VALUES (?, ?, ?, ?, ?)", rows)
            added += len(rows)
    db.close()
    return added


def question_groups(rows: list[dict]) -> tuple[list[dict], list[dict], list[dict]]:
    """The set's questions about speech facts, about sounds, and about what no recording holds."""
    return ([r for r in rows if r["answers"]], [r for r in rows if r["file"] and not r["answers"]],
            [r for r in rows if not r["file"]])


def set_questions(set_dir: Path, recordings: int | None = None, limit: int | None = None) -> tuple[list, list]:
    """(recording files, question rows) of a set: its first `recordings` recordings (by name; all for None), the
    questions about them and every question about projects the set never mentions, the first `limit` of them."""
    rows = [json.loads(line) for line in (set_dir / "questions.jsonl").read_text().splitlines()]
    files = sorted((set_dir / "recordings").iterdir())[:recordings]
    kept = {f"recordings/{f.name}" for f in files}
    rows = [r for r in rows if not r["file"] or r["file"] in kept]
    return files, rows[:limit] if limit else rows


def measure_retrieval(library, rows: list[dict]) -> dict:
    """Recall@1/@5 of the right window for speech facts and sounds at the default coverage, and recall@5 with
    the share of unanswerable questions finding a window at each of COVERAGES (what the threshold trades)."""
    speech, sounds, unanswerable = question_groups(rows)
    recall: dict = {}
    for name, group in (("speech", speech), ("sounds", sounds)):
        ranks = []
        for row in group:
            hits = library.search(row["question"], k=5)
            ranks.append(next((k for k, h in enumerate(hits) if right_window(row, h.path, h.start, h.end)), None))
        recall[name] = {"questions": len(group),
                        "recall@1": round(sum(r == 0 for r in ranks) / max(1, len(group)), 3),
                        "recall@5": round(sum(r is not None for r in ranks) / max(1, len(group)), 3)}
    for coverage in COVERAGES:
        top = {id(r): library.search(r["question"], k=5, min_coverage=coverage) for r in rows}
        recall[f"min_coverage={coverage}"] = {
            **{f"{name}_recall@5": round(sum(any(right_window(r, h.path, h.start, h.end) for h in top[id(r)])
                                             for r in group) / max(1, len(group)), 3)
               for name, group in (("speech", speech), ("sounds", sounds))},
            "unanswerable_finding_a_window": round(sum(bool(top[id(r)]) for r in unanswerable)
                                                   / max(1, len(unanswerable)), 3)}
    return recall


def measure(set_dir: Path, model_dir: Path, work: Path, *, simulate_hours: float = 1000.0, repeats: int = 5,
            limit: int | None = None, recordings: int | None = None) -> dict:
    """Index `set_dir`'s recordings with the model in `model_dir` (into `work`) and measure (see the module).
    `recordings` keeps the set's first N recordings (by name), the questions about them and every question
    about projects the set never mentions."""
    from eardrum.adapters.placement import load_placed
    from eardrum.common.decoding import answer_conversations
    from eardrum.common.generation import GenerationSettings
    from eardrum.common.metrics import contains_answer
    from eardrum.inference.chat import AudioChat
    from eardrum.inference.library import (
        LIBRARY_WINDOWS,
        AudioLibrary,
        model_describer,
        model_hints,
        read_span,
    )

    files, rows = set_questions(set_dir, recordings, limit)
    model, processor = load_placed(model_dir)
    library_path = work / "library.sqlite"
    library = AudioLibrary(library_path)
    started = time.perf_counter()
    summary = library.index(files, model_describer(model, processor), describer=str(model_dir),
                            hints=model_hints(model))
    index_s = time.perf_counter() - started
    hours = library.stats()["hours"]
    report: dict = {"set": json.loads((set_dir / "meta.json").read_text()), "model": str(model_dir),
                    "recordings_indexed": len(files),
                    "index": {"audio_hours": round(hours, 3), "seconds": round(index_s, 1),
                              "audio_hours_per_hour": round(hours * 3600 / index_s, 2),
                              "bytes_per_audio_hour": round(library_path.stat().st_size / hours),
                              "windows": library.stats()["windows"], "skipped": summary["skipped"]}}

    def window_of(row: dict) -> tuple[str, float, float]:
        path = str((set_dir / row["file"]).resolve())
        for start, end, _ in library.windows(path):
            if right_window(row, path, start, end):
                return path, start, end
        raise ValueError(f"no window of {path} holds {row['start']}-{row['end']} s")

    speech, sounds, unanswerable = question_groups(rows)
    report["retrieval"] = measure_retrieval(library, rows)

    # answers: from the library, the right window alone (ceiling), the indexed text of the top windows (cascade)
    settings = GenerationSettings(max_new_tokens=48)
    from_library, every_top, cited, ceiling, cascade = [], [], [], [], []
    for row in speech:
        with library_margin(1.0):  # the top LIBRARY_WINDOWS windows, however much weaker than the best
            every_top.append(AudioChat(model, processor, settings).ask(row["question"], library=library))
        chat = AudioChat(model, processor, settings)
        from_library.append(chat.ask(row["question"], library=library))
        hits = chat.last_sources  # the windows that answer heard: the cascade reads their text instead
        cited.append(any(right_window(row, h.path, h.start, h.end) for h in hits))
        path, start, end = window_of(row)
        ceiling.append(chat.answer((read_span(path, start, end), 16000), row["question"]))
        notes = "\n".join(f"[{Path(h.path).name} {h.start:.0f}-{h.end:.0f} s] {h.text}" for h in hits)
        prompt = f"Transcripts of recordings:\n{notes}\n\nAnswer from the transcripts: {row['question']}"
        cascade.append(answer_conversations(model, processor, [[{"role": "user", "content": prompt}]], settings)[0]
                       if hits else "")
    answers = [r["answers"] for r in speech]
    right = [contains_answer([a], [ans]) == 1.0 for a, ans in zip(from_library, answers)]
    score = {name: round(contains_answer(texts, answers), 3) if speech else None
             for name, texts in (("library", from_library), ("library_every_top_window", every_top),
                                 ("ceiling_right_window", ceiling), ("cascade", cascade))}
    score["library_over_ceiling"] = (round(score["library"] / score["ceiling_right_window"], 3)
                                     if speech and score["ceiling_right_window"] else None)
    score["citation_accuracy_of_right_answers"] = (round(sum(c for c, r in zip(cited, right) if r) / sum(right), 3)
                                                   if any(right) else None)
    score["questions"] = len(speech)
    report["answers"] = score
    invented = []
    for row in unanswerable:
        answer = AudioChat(model, processor, settings).ask(row["question"], library=library)
        invented.append(not is_refusal(answer))
    report["unanswerable"] = {"questions": len(unanswerable),
                              "invented_rate": round(sum(invented) / len(invented), 3) if invented else None}
    report["examples"] = [{"question": r["question"], "answers": r["answers"], "library": a, "ceiling": c,
                           "cascade": k} for r, a, c, k in list(zip(speech, from_library, ceiling, cascade))[:8]]

    # latency to the first token
    first = GenerationSettings(max_new_tokens=1)
    # timed questions: those the search answers with windows (a question that finds none is answered at once,
    # without the model, and would time nothing), else the first ones
    asked = speech + sounds
    probe = ([row for row in asked if library.search(row["question"], k=1)] or asked)[: max(1, repeats)]

    def cold() -> None:
        """Forget the hints decoded so far, as a new process would not have them (each question is timed as
        the first one asked about its windows)."""
        if model.transcriber is not None:
            model.transcriber.forget()

    def library_latency(lib) -> float | None:
        """Median over the probe questions that find windows in `lib` (one that finds none is answered at
        once, without the model); None when none does."""
        times = []
        for row in probe:
            if not lib.search(row["question"], k=1):
                continue
            chat = AudioChat(model, processor, first)
            cold()
            t = time.perf_counter()
            chat.ask(row["question"], library=lib)
            times.append(time.perf_counter() - t)
        return _median_ms(times) if times else None

    single = []
    for row in probe:
        path, start, end = window_of(row)
        wave = read_span(path, start, end)
        cold()
        t = time.perf_counter()
        AudioChat(model, processor, first).answer((wave, 16000), row["question"])
        single.append(time.perf_counter() - t)
    unhinted = work / "library-without-hints.sqlite"  # the same library without its stored hints
    shutil.copyfile(library_path, unhinted)
    with sqlite3.connect(unhinted) as db:
        db.execute("DELETE FROM meta WHERE key = 'hints_by'")
    with AudioLibrary(unhinted) as lib:
        decoding_hints = library_latency(lib)
    growth = {}
    steps = max(1, min(5, int(hours)))  # whole hours for a set of hours, else the set itself
    for k in range(1, steps + 1):
        cut = work / f"library-{k}.sqlite"
        kept = cut_library(library_path, cut, hours * k / steps)
        with AudioLibrary(cut) as lib:
            growth[f"{kept:.2f} h"] = library_latency(lib)
    full = library_latency(library)
    padded = work / "library-padded.sqlite"
    added = pad_library(library_path, padded, simulate_hours)
    search_times = {}
    for name, path in (("indexed", library_path), ("padded", padded)):
        with AudioLibrary(path) as lib:
            times = []
            for row in rows[: 4 * repeats]:
                t = time.perf_counter()
                lib.search(row["question"], k=LIBRARY_WINDOWS)
                times.append(time.perf_counter() - t)
            search_times[name] = _median_ms(times)
    report["latency_ms"] = {
        "one_window_directly": _median_ms(single), "library": full,
        "library_over_one_window": full and round(full / _median_ms(single), 2), "library_by_size": growth,
        "library_decoding_its_hints": decoding_hints,  # the stored hints not used: Whisper decodes each window
        "search_alone": {f"{hours:.2f} h": search_times["indexed"],
                         f"{simulate_hours:g} h (synthetic windows)": search_times["padded"]},
        "synthetic_windows_added": added, "padded_library_bytes": padded.stat().st_size,
    }
    library.close()
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", type=Path, required=True, help="a folder made by benchmarks/library_set.py")
    parser.add_argument("--model", type=Path, help="a checkpoint folder (indexes the set and asks it)")
    parser.add_argument("--library", type=Path, help="instead of --model: measure only the retrieval of this "
                        "library, already indexed from the set (e.g. an earlier run's work/library.sqlite)")
    parser.add_argument("--work", type=Path, help="where the libraries go (default: a temporary folder)")
    parser.add_argument("--simulate-hours", type=float, default=1000.0)
    parser.add_argument("--repeats", type=int, default=5, help="questions timed per latency (median)")
    parser.add_argument("--limit", type=int, help="only the first N questions (a quick look)")
    parser.add_argument("--recordings", type=int, help="only the set's first N recordings and their questions")
    parser.add_argument("--out", type=Path, help="write the report here as JSON")
    args = parser.parse_args()
    if not (args.set / "questions.jsonl").is_file():
        parser.error(f"--set {args.set}: no questions.jsonl there; make the set with benchmarks/library_set.py")
    if (args.model is None) == (args.library is None):
        parser.error("give --model (index and ask) or --library (retrieval of an indexed library), one of them")
    if args.library is not None:
        from eardrum.inference.library import AudioLibrary

        _, rows = set_questions(args.set, args.recordings, args.limit)
        with AudioLibrary(args.library) as library:
            report = {"set": json.loads((args.set / "meta.json").read_text()), "library": str(args.library),
                      "indexed": library.stats(), "retrieval": measure_retrieval(library, rows)}
        emit({**report, **machine(), "command": " ".join(sys.argv)}, args.out)
        return
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for stale in work.glob("library*.sqlite"):
            stale.unlink()
        report = measure(args.set, args.model, work, simulate_hours=args.simulate_hours, repeats=args.repeats,
                         limit=args.limit, recordings=args.recordings)
    report.update(**machine(), torch_threads=__import__("torch").get_num_threads(), command=" ".join(sys.argv))
    emit(report, args.out)


if __name__ == "__main__":
    main()
