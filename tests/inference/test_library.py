"""The library of recordings: timestamped windows, full-text search, incremental and kill-safe indexing."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from eardrum.inference.library import LIBRARY_VERSION, AudioLibrary, HintSource, LibraryError, search_terms

SR = 16000
WORDS = {440: "alarm ringing", 660: "budget approved by Maria", 880: "dog barking"}


def recording(path, seconds: float, events: dict[float, int]) -> None:
    """Quiet noise with a 2 s tone of frequency f starting at each second t of `events` {t: f}."""
    wave = 0.001 * np.random.default_rng(len(events)).standard_normal(int(seconds * SR)).astype(np.float32)
    for at, freq in events.items():
        t = np.arange(2 * SR) / SR
        wave[int(at * SR) : int(at * SR) + 2 * SR] += 0.5 * np.sin(2 * np.pi * freq * t).astype(np.float32)
    sf.write(path, wave, SR)


class Describer:
    """Names the tone heard in each window (the loudest frequency), as a model's text would; counts calls."""

    def __init__(self, fail_on_call: int | None = None) -> None:
        self.windows = 0
        self.calls = 0
        self.fail_on_call = fail_on_call

    def __call__(self, waves: list[np.ndarray]) -> list[str]:
        self.calls += 1
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise KeyboardInterrupt  # as a kill would stop the run mid-file
        self.windows += len(waves)
        texts = []
        for w in waves:
            if np.abs(w).max() < 0.1:
                texts.append("quiet room")
                continue
            freq = np.argmax(np.abs(np.fft.rfft(w))) * SR / len(w)
            texts.append(WORDS[min(WORDS, key=lambda f: abs(f - freq))])
        return texts


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "recordings"
    root.mkdir()
    recording(root / "meeting.wav", 65, {40: 660})
    recording(root / "street.wav", 30, {3: 880})
    recording(root / "night.flac", 25, {})
    return root


def test_windows_carry_their_times_and_search_finds_the_planted_one(tmp_path, folder):
    with AudioLibrary(tmp_path / "lib.sqlite", window_s=20, overlap_s=5) as lib:
        summary = lib.index([folder], Describer(), describer="test")
        assert summary["indexed"] == 3 and summary["skipped"] == [] and summary["audio_seconds"] == pytest.approx(120)
        spans = [(a, b) for a, b, _ in lib.windows(folder / "meeting.wav")]
        assert spans == [(0, 20), (15, 35), (30, 50), (45, 65)]  # 20 s windows overlapping by 5 s, none dropped
        hits = lib.search("What did Maria say about the budget?", k=3)
        assert (hits[0].path, hits[0].start, hits[0].end) == (str(folder / "meeting.wav"), 30, 50)
        assert lib.search("a dog?")[0].path == str(folder / "street.wav")
        assert lib.search("the of and") == [] and lib.search("violin") == []
        stats = lib.stats()
        assert stats["files"] == 3 and stats["windows"] == 4 + 2 + 2 and stats["describer"] == "test"
        assert stats["hours"] == pytest.approx(120 / 3600)


def test_rerun_indexes_only_new_and_changed_files_and_drops_gone_ones(tmp_path, folder):
    path = tmp_path / "lib.sqlite"
    with AudioLibrary(path) as lib:
        lib.index([folder], Describer(), describer="test")
    recording(folder / "street.wav", 30, {20: 440})  # changed: the dog is now an alarm
    (folder / "night.flac").unlink()
    recording(folder / "later.wav", 10, {2: 880})
    describer = Describer()
    with AudioLibrary(path) as lib:
        summary = lib.index([folder], describer, describer="test")
        assert (summary["indexed"], summary["unchanged"], summary["removed"]) == (2, 1, 1)
        assert describer.windows == 2 + 1  # street's 2 windows and later's 1; meeting untouched
        assert [p.rsplit("/", 1)[1] for p, _ in lib.files()] == ["later.wav", "meeting.wav", "street.wav"]
        assert lib.search("alarm")[0].path == str(folder / "street.wav")
        assert [h.path for h in lib.search("dog")] == [str(folder / "later.wav")]  # street's dog is gone


def test_a_killed_run_keeps_every_finished_file_and_the_next_run_goes_on(tmp_path, folder):
    path = tmp_path / "lib.sqlite"
    with AudioLibrary(path, window_s=20, overlap_s=5) as lib, pytest.raises(KeyboardInterrupt):
        lib.index([folder], Describer(fail_on_call=2), describer="test", batch_windows=16)  # dies in file 2
    with AudioLibrary(path) as lib:
        assert [p.rsplit("/", 1)[1] for p, _ in lib.files()] == ["meeting.wav"]  # whole, and nothing half-made
        assert len(lib.windows(folder / "meeting.wav")) == 4
        describer = Describer()
        summary = lib.index([folder], describer, describer="test")
        assert (summary["indexed"], summary["unchanged"]) == (2, 1) and describer.windows == 2 + 2


def test_an_unreadable_file_is_named_and_skipped(tmp_path, folder, caplog):
    (folder / "broken.wav").write_bytes(b"RIFF....WAVEnot really")
    with AudioLibrary(tmp_path / "lib.sqlite") as lib:
        summary = lib.index([folder], Describer(), describer="test")
    assert summary["indexed"] == 3 and [p.rsplit("/", 1)[1] for p, _ in summary["skipped"]] == ["broken.wav"]
    assert "broken.wav" in caplog.text


def test_bad_libraries_and_settings_are_named(tmp_path, folder):
    garbage = tmp_path / "garbage.sqlite"
    garbage.write_bytes(b"this is not a database at all" * 100)
    with pytest.raises(LibraryError, match="garbage.sqlite: not an eardrum library"):
        AudioLibrary(garbage)
    path = tmp_path / "lib.sqlite"
    with AudioLibrary(path, window_s=20, overlap_s=5) as lib:
        lib.index([folder / "street.wav"], Describer(), describer="model-a")
        with pytest.raises(LibraryError, match="described by model-a, not model-b"):
            lib.index([folder], Describer(), describer="model-b")
    with pytest.raises(LibraryError, match="window_s=20.0, not 30"):
        AudioLibrary(path, window_s=30)
    with pytest.raises(LibraryError, match="expected 0 <= overlap < window"):
        AudioLibrary(tmp_path / "other.sqlite", window_s=10, overlap_s=10)
    with AudioLibrary(path) as lib, pytest.raises(LibraryError, match="missing.wav: no such file or folder"):
        lib.index([folder / "missing.wav"], Describer(), describer="model-a")
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM files").fetchone()[0] == 1


def test_a_question_whose_telling_word_no_window_holds_finds_nothing(tmp_path, folder):
    """Sharing a common word is not enough: the windows must hold most of the question's words weighted by
    rarity (MIN_COVERAGE), and a word no window holds weighs most."""
    with AudioLibrary(tmp_path / "lib.sqlite", window_s=20, overlap_s=5) as lib:
        lib.index([folder], Describer(), describer="test")
        meeting = str(folder / "meeting.wav")
        assert lib.search("What did Oscar say about the budget?") == []  # no window says "Oscar"
        [found] = lib.search("What did Oscar say about the budget?", k=1, min_coverage=0)
        assert found.path == meeting and 0.3 < found.coverage < 0.6
        [hit] = lib.search("Who approved the budgets?", k=1)  # stemmed: "budgets" finds "budget"
        assert (hit.path, hit.start, hit.coverage) == (meeting, 30, 1.0)
        assert lib.search("Is an alarm ringing somewhere?") == []  # the tone was never called an alarm here


def test_search_terms_quote_each_word_and_drop_stopwords():
    assert search_terms('What did "Maria" say about the budget?') == '"maria" OR "budget"'
    assert search_terms("the of") == ""


def test_asking_a_library_hears_the_best_windows_and_names_them(tmp_path, folder, monkeypatch):
    from eardrum.adapters.checkpoint import build_audio_llm
    from eardrum.adapters.config import AudioLLMConfig
    from eardrum.inference.chat import NOTHING_FOUND, AudioChat, GenerationSettings
    from eardrum.inference.library import read_span

    path = tmp_path / "lib.sqlite"
    with AudioLibrary(path, window_s=20, overlap_s=5) as lib:
        lib.index([folder], Describer(), describer="test")
    chat = AudioChat(*build_audio_llm(AudioLLMConfig(encoder="tiny:whisper", llm="tiny:llama")),
                     settings=GenerationSettings(max_new_tokens=3))
    answer = chat.ask("What did Maria say about the budget?", library=path, windows=1)
    assert [(h.path, h.start, h.end) for h in chat.last_sources] == [(str(folder / "meeting.wav"), 30.0, 50.0)]
    assert answer.endswith("\n\nSources: meeting.wav 00:30")
    turn = chat.history[-2]["content"]
    assert [p["type"] for p in turn] == ["text", "audio", "text"] and turn[0]["text"] == (
        'Recording "meeting.wav" at [00:30]:')
    heard = turn[1]["audio"][0]
    assert len(heard) == 20 * SR and np.array_equal(heard, read_span(folder / "meeting.wav", 30, 50))
    chat.ask("And who else agreed then?", library=path, windows=1)  # no word of its own in the library
    assert chat.last_sources[0].path == str(folder / "meeting.wav")  # found through the earlier question
    monkeypatch.setattr(chat, "_generate", lambda *a: pytest.fail("the model is not asked without a match"))
    fresh = AudioChat(chat.model, chat.processor)
    monkeypatch.setattr(fresh, "_generate", lambda *a: pytest.fail("the model is not asked without a match"))
    assert fresh.ask("Is there a violin?", library=path) == NOTHING_FOUND and fresh.last_sources == []
    with pytest.raises(LibraryError, match="no such library file"):
        fresh.ask("anything?", library=tmp_path / "none.sqlite")
    assert not (tmp_path / "none.sqlite").exists()


def test_follow_ups_are_told_from_fresh_questions():
    from eardrum.inference.library import is_follow_up

    assert is_follow_up("And who decided it?") and is_follow_up("What did she say next?")
    assert not is_follow_up("Is there a violin?") and not is_follow_up("Who approved the budget?")


def test_the_server_answers_library_requests_from_its_windows_with_sources(tmp_path, folder, serve_in_thread):
    import json as jsonlib

    import httpx

    from eardrum.adapters.checkpoint import build_audio_llm
    from eardrum.adapters.config import AudioLLMConfig
    from eardrum.inference.library import NOTHING_FOUND
    from eardrum.inference.server import ServerSettings, create_app

    path = tmp_path / "lib.sqlite"
    with AudioLibrary(path, window_s=20, overlap_s=5) as lib:
        lib.index([folder], Describer(), describer="test")
    built = build_audio_llm(AudioLLMConfig(encoder="tiny:whisper", llm="tiny:llama"))

    def ask(base: str, question: str, **extra) -> httpx.Response:
        body = {"model": "tiny", "messages": [{"role": "user", "content": question}], "max_tokens": 2, **extra}
        return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=60)

    settings = ServerSettings(model_name="tiny", max_new_tokens=2, library=str(path))
    with serve_in_thread(create_app(*built, settings)) as base:
        reply = ask(base, "What did Maria say about the budget?", library=True).json()
        assert reply["sources"][0] == {"path": str(folder / "meeting.wav"), "start": 30.0, "end": 50.0}
        assert "\n\nSources: meeting.wav 00:30" in reply["choices"][0]["message"]["content"]
        assert reply["usage"]["prompt_tokens"] > 3 * 20 * 6  # the windows' audio tokens are in the prompt
        none = ask(base, "Is there a violin?", library=True).json()
        assert none["choices"][0]["message"]["content"] == NOTHING_FOUND and none["sources"] == []
        plain = ask(base, "What did Maria say about the budget?").json()
        assert "sources" not in plain and "Sources:" not in plain["choices"][0]["message"]["content"]
        with httpx.stream("POST", f"{base}/v1/chat/completions", timeout=60, json={
                "model": "tiny", "messages": [{"role": "user", "content": "the dog?"}], "max_tokens": 2,
                "stream": True, "library": True}) as streamed:
            events = [jsonlib.loads(line[6:]) for line in streamed.iter_lines()
                      if line.startswith("data: {")]
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
        assert text.endswith("\n\nSources: street.wav 00:00")
        assert events[-1]["sources"][0]["path"] == str(folder / "street.wav")
        assert ask(base, "budget?", library="yes").status_code == 400
    without = ServerSettings(model_name="tiny", max_new_tokens=2)
    with serve_in_thread(create_app(*built, without)) as base:
        refused = ask(base, "budget?", library=True)
        assert refused.status_code == 400 and refused.json()["error"]["code"] == "no_library"


def test_windows_keep_their_hints_and_a_library_question_does_not_decode_them_again(tmp_path, folder):
    """A model that reads Whisper's transcript beside the audio (transcript_hint) gets each window's hint from the
    library, kept when it was indexed: asking decodes nothing; a library whose hints another transcriber made, or
    one indexed without them, has its windows decoded as usual."""
    from eardrum.adapters.checkpoint import build_audio_llm
    from eardrum.adapters.config import AudioLLMConfig
    from eardrum.inference.chat import AudioChat, GenerationSettings
    from eardrum.inference.library import hints_fingerprint, model_hints

    model, processor = build_audio_llm(AudioLLMConfig(encoder="tiny:whisper", llm="tiny:llama", transcript_hint=True))
    hints = model_hints(model)
    window = processor.window  # the encoder window in samples
    assert hints is not None and hints.fingerprint == f"{model.transcriber.fingerprint()}/{window}"
    assert hints.window_samples == window and hints_fingerprint(processor) == hints.fingerprint  # the server's
    path = tmp_path / "lib.sqlite"
    with AudioLibrary(path, window_s=20, overlap_s=5) as lib:
        lib.index([folder], Describer(), describer="test", hints=hints)
        kept = dict(lib.db.execute("SELECT w.start, w.hint FROM windows w JOIN files f ON f.id = w.file_id "
                                   "WHERE f.path LIKE '%meeting.wav'").fetchall())
    decoded = []
    real = model.transcriber.forward
    model.transcriber.forward = lambda windows: decoded.append(len(windows)) or real(windows)  # counts decodes
    model.transcriber.forget()
    chat = AudioChat(model, processor, settings=GenerationSettings(max_new_tokens=2))
    chat.ask("What did Maria say about the budget?", library=path, windows=1)
    hit = chat.last_sources[0]
    assert (hit.start, hit.hint) == (30.0, kept[30.0]) and isinstance(hit.hint, str)
    assert chat.history[-2]["content"][1]["transcript"] == kept[30.0] and decoded == []  # read, not decoded
    with sqlite3.connect(path) as db:  # hints from another transcriber (other weights, precision or settings)
        db.execute("UPDATE meta SET value = 'another' WHERE key = 'hints_by'")
    model.transcriber.forget()
    chat.ask("What did Maria say about the budget?", library=path, windows=1)
    assert chat.last_sources[0].hint is None and "transcript" not in chat.history[-2]["content"][1]
    assert decoded == [1]  # decoded as for any recording
    model.transcriber.forward = real


def hints_from(word: str) -> HintSource:
    """Hints that hold `word` for every window with a tone, and nothing the describer says."""
    return HintSource(lambda waves: [word if np.abs(w).max() > 0.1 else "" for w in waves], "fake", 30 * SR)


def as_older_version(path, version: str) -> None:
    """Rewrite a library as `version` 2 (no hint column, text alone searched), 3 (hints kept, not searched) or 4
    (text and hint searched, no unstemmed vocabulary)."""
    columns = "text, hint" if version == "4" else "text"
    with sqlite3.connect(path) as db:
        db.executescript(
            "DROP TRIGGER windows_added; DROP TRIGGER windows_removed; DROP TABLE library_words;"
            "DROP TABLE windows_words; DROP TABLE windows_text;"
            + ("ALTER TABLE windows DROP COLUMN hint;" if version == "2" else "")
            + f"CREATE VIRTUAL TABLE windows_text USING fts5({columns}, content='windows', content_rowid='id', "
            "tokenize='porter unicode61'); INSERT INTO windows_text(windows_text) VALUES ('rebuild');"
            "CREATE TRIGGER windows_added AFTER INSERT ON windows BEGIN "
            f"INSERT INTO windows_text(rowid, {columns}) VALUES (new.id, new.{columns.replace(', ', ', new.')}); END;"
            "CREATE TRIGGER windows_removed AFTER DELETE ON windows BEGIN "
            f"INSERT INTO windows_text(windows_text, rowid, {columns}) VALUES ('delete', old.id, "
            f"old.{columns.replace(', ', ', old.')}); END;"
            f"UPDATE meta SET value = '{version}' WHERE key = 'version';")


def test_the_hint_is_searched_as_well_as_the_describers_text(tmp_path, folder):
    """A describer may miss words Whisper heard (a long window told by its first sentence): a search finds the
    window by its hint too, and a window deleted from the library leaves the index with its hint."""
    path = tmp_path / "lib.sqlite"
    with AudioLibrary(path, window_s=20, overlap_s=5) as lib:
        lib.index([folder], Describer(), describer="test", hints=hints_from("zanzibar"))
        hits = lib.search("zanzibar", k=5)
        assert {Path(h.path).name for h in hits} == {"meeting.wav", "street.wav"}
        assert all("zanzibar" not in h.text and h.hint is None for h in hits)  # found by the hint alone
        (folder / "street.wav").unlink()
        lib.index([folder], Describer(), describer="test", hints=hints_from("zanzibar"))
        assert {Path(h.path).name for h in lib.search("zanzibar", k=5)} == {"meeting.wav"}


@pytest.mark.parametrize("version", ["2", "3", "4"])
def test_a_library_of_an_earlier_version_opens_searches_and_indexes(tmp_path, folder, version):
    path = tmp_path / "lib.sqlite"
    with AudioLibrary(path, window_s=20, overlap_s=5) as lib:
        lib.index([folder], Describer(), describer="test", hints=hints_from("zanzibar"))
    as_older_version(path, version)
    with AudioLibrary(path) as lib:
        assert lib.meta("version") == str(LIBRARY_VERSION)
        hits = lib.search("budget approved by Maria", k=1, hints_for="any")
        assert hits[0].path.endswith("meeting.wav") and hits[0].hint is None
        found = {Path(h.path).name for h in lib.search("zanzibar", k=5)}
        assert found == (set() if version == "2" else {"meeting.wav", "street.wav"})  # v3's hints now searched
        assert ("zanzibar" in lib.sounds_like("zanzibr")) == (version != "2")  # its words now kept unstemmed
        recording(folder / "late.wav", 10, {2: 880})
        lib.index([folder], Describer(), describer="test", hints=hints_from("zanzibar"))
        assert "late.wav" in {Path(h.path).name for h in lib.search("zanzibar", k=5)}


def test_windows_longer_than_the_models_encoder_window_keep_no_hint_and_are_asked_as_usual(tmp_path, folder):
    """A 20 s library window is two windows to a model that encodes 10 s at a time: one stored hint cannot stand
    for both, so none is kept, and a question decodes the windows' hints as for any recording."""
    from eardrum.adapters.checkpoint import build_audio_llm
    from eardrum.adapters.config import AudioLLMConfig
    from eardrum.inference.chat import AudioChat, GenerationSettings
    from eardrum.inference.library import model_hints

    model, processor = build_audio_llm(AudioLLMConfig(encoder="tiny:whisper", llm="tiny:llama", transcript_hint=True,
                                                      window_seconds=10))
    path = tmp_path / "lib.sqlite"
    with AudioLibrary(path, window_s=20, overlap_s=5) as lib:
        lib.index([folder], Describer(), describer="test", hints=model_hints(model))
        assert lib.meta("hints_by") is None
        assert lib.db.execute("SELECT COUNT(*) FROM windows WHERE hint IS NOT NULL").fetchone()[0] == 0
    chat = AudioChat(model, processor, settings=GenerationSettings(max_new_tokens=2))
    answer = chat.ask("What did Maria say about the budget?", library=path, windows=1)
    assert answer.endswith("Sources: meeting.wav 00:30") and "transcript" not in chat.history[-2]["content"][1]


class Sentences:
    """Describes the i-th window indexed with the i-th of `texts` (the same recording in order)."""

    def __init__(self, texts: list[str]) -> None:
        self.texts = list(texts)

    def __call__(self, waves: list[np.ndarray]) -> list[str]:
        taken, self.texts = self.texts[: len(waves)], self.texts[len(waves) :]
        return taken


def test_a_misheard_name_is_found_by_the_word_it_was_heard_as_and_a_common_lookalike_is_not_enough(tmp_path):
    """Speech recognition writes a name it has not heard as a word it knows ("altair" -> "altar") and the speaker
    may say "led" where the question asks "lead": the window is found by the words that look like the question's,
    with less than full coverage; a word held by many windows ("come") is weak evidence for a rare one ("comet")."""
    texts = ["The altar project will be led by Sophie Novak.", "I will come home soon.",
             "They come and go.", "Come what may.", "The budget for the sanfron project is thirty thousand dollars."]
    texts += [f"Filler sentence number {n} about the weather." for n in range(8)]  # 13 windows of 200 s
    recording(tmp_path / "talk.wav", 200, {})
    with AudioLibrary(tmp_path / "lib.sqlite", window_s=20, overlap_s=5) as lib:
        lib.index([tmp_path / "talk.wav"], Sentences(texts), describer="test")
        assert lib.sounds_like("altair") == {"altair": 1.0, "altar": pytest.approx(0.909, abs=1e-3)}
        [hit] = lib.search("Who will lead the altair project?", k=3)
        assert hit.start == 0 and 0.6 <= hit.coverage < 1
        assert lib.search("Who will lead the altair project?", k=3, min_coverage=0.99) == []
        assert "come" in lib.sounds_like("comet") and lib.search("Where is the comet?") == []
        assert lib.search("What is the budget for the saffron project?", k=1)[0].start == 4 * 15  # "sanfron"
        assert lib.search("Who will lead the maple project?") == []
        assert "saturn" not in lib.sounds_like("saturday")  # about the length of the word, not inside it
        recording(tmp_path / "late.wav", 10, {})  # a new word: every opening of the library knows it
        lib.index([tmp_path / "late.wav"], Sentences(["The marple project will be led by Ann."]), describer="test")
        with AudioLibrary(tmp_path / "lib.sqlite") as again:
            assert "marple" in lib.sounds_like("maple") and "marple" in again.sounds_like("maple")
    (tmp_path / "lib.sqlite").unlink()  # a new library at the same path, as many window changes, other words
    with AudioLibrary(tmp_path / "lib.sqlite", window_s=20, overlap_s=5) as lib:
        lib.index([tmp_path / "talk.wav"], Sentences([t.replace("altar", "altoir") for t in texts]), describer="test")
        lib.index([tmp_path / "late.wav"], Sentences(["The marple project will be led by Ann."]), describer="test")
        assert "altoir" in lib.sounds_like("altair") and "altar" not in lib.sounds_like("altair")


def test_a_question_hears_only_the_windows_about_as_good_as_the_best(tmp_path):
    """A window holding two of the question's three words would be heard beside the one holding all three only
    if it were within WINDOW_MARGIN of it: a weaker window distracts more than it helps."""
    from eardrum.inference.library import WINDOW_MARGIN, find_windows

    texts = ["The budget for the harbor project is ten thousand dollars.", "The project budget grew last year.",
             "The harbor is busy today."] + [f"Filler sentence number {n} about the weather." for n in range(5)]
    recording(tmp_path / "talk.wav", 125, {})
    with AudioLibrary(tmp_path / "lib.sqlite", window_s=20, overlap_s=5) as lib:
        lib.index([tmp_path / "talk.wav"], Sentences(texts), describer="test")
        question = "What is the budget for the harbor project?"
        best, weaker = lib.search(question, k=3)  # "The harbor is busy" holds too few of its words
        assert (best.start, best.coverage, weaker.start) == (0, 1.0, 15) and weaker.coverage < 1 - WINDOW_MARGIN
        assert [h.start for h in find_windows(lib, question, k=3)] == [0]
        assert [h.start for h in find_windows(lib, question, k=3, margin=1.0)] == [0, 15]
