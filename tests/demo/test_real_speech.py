"""The real-speech set's parsers, archive reader, download check and scoring (no network)."""

from __future__ import annotations

import hashlib
import io
import json
import tarfile

import numpy as np
import pytest
import soundfile as sf

from eardrum.demo import real_speech


def test_sphinx_transcriptions_are_read_by_utterance_id():
    text = "<s> ten of clubs </s> (cards1)\n  four  queen of clubs (cards2)\nno id here\n"
    assert real_speech.parse_sphinx_transcription(text) == {"cards1": "ten of clubs", "cards2": "four queen of clubs"}


def test_stm_lines_give_speaker_times_and_words_and_skip_comments():
    text = ";; a comment line here\nsample 1 Diane 0.5 2.25 This is Diane in New Jersey.\nsample 1 short\n"
    assert real_speech.parse_stm(text) == [("Diane", 0.5, 2.25, "This is Diane in New Jersey.")]


def test_found_share_counts_reference_words_in_order_with_digits_spelt():
    assert real_speech.found_share("go forward ten meters", "Go forward 10 meters.") == 1.0
    assert real_speech.found_share("ten of clubs", "The answer to this question is 12.") == 0.0


def test_score_flags_replies_that_are_not_transcripts_and_splits_by_source():
    lines = [{"source": "a"}, {"source": "b"}]
    result = real_speech.score(["ten of clubs", "go forward ten meters"],
                               ["ten of clubs", "The answer is 11."], lines)
    assert result["no_transcript_share"] == 0.5
    assert result["wer_by_source"]["a"] == 0.0 and result["wer_by_source"]["b"] == 1.0
    assert [e["no_transcript"] for e in result["examples"]] == [False, True]


def test_archive_reads_members_below_the_top_folder_and_decodes_wavs(tmp_path):
    buffer = io.BytesIO()
    sf.write(buffer, np.zeros(800, dtype=np.float32), 16000, format="WAV", subtype="PCM_16")
    path = tmp_path / "pkg-1.0.tar.gz"
    with tarfile.open(path, "w:gz") as tar:
        for name, data in (("pkg-1.0/a/clip.wav", buffer.getvalue()), ("pkg-1.0/a/notes.txt", b"hello")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    archive = real_speech.Archive(path)
    assert archive.read("a/notes.txt") == b"hello"
    assert archive.wav("a/clip.wav").shape == (800,)
    with pytest.raises(KeyError):
        archive.read("a/missing.txt")


class _Response(io.BytesIO):
    def __enter__(self):
        return self

    def __exit__(self, *args):
        return False


def test_a_download_with_the_wrong_sha256_is_refused_and_not_kept(tmp_path, monkeypatch):
    sdist = real_speech.Sdist("pkg", "pkg-1.0.tar.gz", hashlib.sha256(b"the real bytes").hexdigest())
    listing = json.dumps({"files": [{"filename": "pkg-1.0.tar.gz", "url": "https://files.example/pkg-1.0.tar.gz"}]})

    def urlopen(request, timeout):
        url = getattr(request, "full_url", request)
        return _Response(listing.encode() if url.endswith("/pkg/") else b"tampered bytes")

    monkeypatch.setattr(real_speech.urllib.request, "urlopen", urlopen)
    with pytest.raises(RuntimeError, match=r"pkg-1\.0\.tar\.gz: SHA-256 [0-9a-f]{64}, expected"):
        real_speech.fetch_sdist(sdist, tmp_path)
    assert not (tmp_path / "pkg-1.0.tar.gz").exists()
    (tmp_path / "pkg-1.0.tar.gz").write_bytes(b"the real bytes")  # a cached, correct file needs no network
    monkeypatch.setattr(real_speech.urllib.request, "urlopen", None)
    assert real_speech.fetch_sdist(sdist, tmp_path) == tmp_path / "pkg-1.0.tar.gz"
