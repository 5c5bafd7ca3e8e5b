"""`eardrum web`: the chat page's routes, and the page itself driven in headless Chromium as a person would use it.

The browser tests run where Chromium, its driver and selenium are installed (`.ci/run` installs them; Debian:
`apt-get install chromium chromium-driver`) and are skipped elsewhere, saying what is missing. The screenshot of
the page after an answer is kept in the test's folder, and also written to $EARDRUM_WEB_SCREENSHOT when set.
"""

from __future__ import annotations

import base64
import io
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import soundfile as sf

from conftest import server_process
from eardrum.adapters.tiny import TINY_SOUNDS, synth_sound
from eardrum.common.generation import GenerationSettings
from eardrum.demo.smoke import QUESTION, run_smoke
from eardrum.inference.chat import RECORDING_INTRO, AudioChat

# the server on the CPU even beside a GPU, as AudioChat is loaded below: both answer in float32
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "CUDA_VISIBLE_DEVICES": ""}
HOST = "127.0.0.1"
MAX_TOKENS = 12  # the page's "max tokens" in these tests, and AudioChat's max_new_tokens to compare with
WAIT = 60  # seconds for anything the page does


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def _write_wav(path: Path, seconds: float, sound: int = 0) -> Path:
    freq, beeps = list(TINY_SOUNDS.values())[sound]
    sf.write(path, synth_sound(freq, beeps, seconds), 16000, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    return Path(run_smoke(tmp_path_factory.mktemp("web"), steps=60)["checkpoint"])


@pytest.fixture(scope="module")
def web(checkpoint, tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """`eardrum web` on the tiny checkpoint: (its address, its log file)."""
    log = tmp_path_factory.mktemp("web-log") / "server.log"
    port = _free_port()
    command = [sys.executable, "-m", "eardrum.cli", "web", "--model", str(checkpoint), "--model-name", "tiny-ears",
               "--host", HOST, "--port", str(port), "--max-audio-seconds", "20"]
    with server_process(command, log, ENV, f"http://{HOST}:{port}") as base:
        yield base, log


def _probe(base: str, name: str, blob: bytes, fmt: str | None = "wav") -> httpx.Response:
    body = {"name": name, "data": base64.b64encode(blob).decode(), "format": fmt}
    return httpx.post(f"{base}/web/probe", json=body, timeout=WAIT)


def test_the_page_and_its_settings_are_served(web):
    base, _ = web
    page = httpx.get(f"{base}/", timeout=WAIT)
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert 'id="question"' in page.text and 'id="record"' in page.text
    config = httpx.get(f"{base}/web/config", timeout=WAIT).json()
    assert config["model"] == "tiny-ears" and config["recording_intro"] == RECORDING_INTRO
    assert config["max_audio_seconds"] == 20 and "webm" in config["audio_formats"]


def test_probe_gives_the_duration_the_model_hears_and_names_what_is_wrong(web, tmp_path):
    base, log = web
    wav = _write_wav(tmp_path / "a.wav", 1.5).read_bytes()
    assert _probe(base, "a", wav).json() == {"name": "a", "seconds": 1.5}
    refused = _probe(base, "notes", b"these are meeting notes, not audio", None)
    assert refused.status_code == 400
    message = refused.json()["error"]["message"]
    assert "recording 'notes'" in message and "could not decode" in message
    too_long = _probe(base, "long", _write_wav(tmp_path / "long.wav", 21).read_bytes())
    assert too_long.status_code == 400 and "accepts at most 20 s" in too_long.json()["error"]["message"]
    nameless = _probe(base, "", wav)
    assert nameless.status_code == 400 and nameless.json()["error"]["param"] == "name"
    for _ in range(40):  # the server log names what happened
        if "web: recording 'notes' refused" in log.read_text():
            break
        time.sleep(0.05)
    assert "web: recording 'notes' refused" in log.read_text()


def test_serve_has_no_page_unless_asked(checkpoint, tmp_path):
    port = _free_port()
    command = [sys.executable, "-m", "eardrum.cli", "serve", "--model", str(checkpoint), "--host", HOST, "--port",
               str(port)]
    with server_process(command, tmp_path / "serve.log", ENV, f"http://{HOST}:{port}") as base:
        assert httpx.get(f"{base}/", timeout=WAIT).status_code == 404
        assert httpx.get(f"{base}/web/config", timeout=WAIT).status_code == 404


# ------------------------------------------------------------------ in a real browser

def _browser_missing() -> str | None:
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -e '.[test]')"
    if not (shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")):
        return "no Chromium (Debian: apt-get install chromium chromium-driver)"
    if not shutil.which("chromedriver"):
        return "no chromedriver (Debian: apt-get install chromium-driver)"
    return None


@pytest.fixture(scope="module")
def microphone(tmp_path_factory) -> Path:
    """What Chromium's fake microphone plays (in a loop): a sound the tiny model knows."""
    return _write_wav(tmp_path_factory.mktemp("mic") / "mic.wav", 2.0, sound=1)


@pytest.fixture(scope="module")
def browser(microphone) -> Iterator:
    """Headless Chromium with a fake microphone. Skipped, saying what is missing, where no browser can be driven;
    failed instead where $EARDRUM_REQUIRE_BROWSER is set (`.ci/run` sets it after installing Chromium), so the
    page's tests cannot quietly stop running."""
    missing = _browser_missing()
    if missing and os.environ.get("EARDRUM_REQUIRE_BROWSER"):
        pytest.fail(f"EARDRUM_REQUIRE_BROWSER is set, but {missing}")
    if missing:
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    binary = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    options.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1280,900",
                 "--use-fake-ui-for-media-stream", "--use-fake-device-for-media-stream",
                 f"--use-file-for-fake-audio-capture={microphone}"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    driver.set_page_load_timeout(WAIT)
    try:
        yield driver
    finally:
        driver.quit()


def _open(browser, base: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    browser.get(f"{base}/")
    WebDriverWait(browser, WAIT).until(lambda d: d.find_element("tag name", "body").get_attribute("data-ready"))


def _wait(browser, condition, what: str):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(browser, WAIT, poll_frequency=0.1).until(condition)
    except Exception as err:
        error = browser.find_element("id", "error")
        raise AssertionError(f"waited {WAIT} s for {what}; the page's error: {error.text!r}") from err


def _recordings(browser) -> list:
    return browser.find_elements("css selector", "#recordings .recording")


def _upload(browser, path: Path) -> None:
    before = len(_recordings(browser))
    browser.find_element("id", "file").send_keys(str(path))
    _wait(browser, lambda d: len(_recordings(d)) > before or d.find_element("id", "error").is_displayed(),
          f"{path.name} to be added")


def _ask(browser, question: str) -> str:
    """Type a question, press Ask, wait for the streamed answer to finish; returns it."""
    before = len(browser.find_elements("css selector", "#conversation .turn"))
    box = browser.find_element("id", "question")
    box.clear()
    box.send_keys(question)
    browser.find_element("id", "ask").click()

    def finished(d):
        done = d.find_elements("css selector", "#conversation .turn .answer.done")
        return done[-1] if len(done) > before else False

    return _wait(browser, finished, f"the answer to {question!r}").text


def _expected(checkpoint: Path, wav: Path, name: str, question: str) -> str:
    chat = AudioChat.from_pretrained(str(checkpoint), device="cpu")
    chat.add_recording(str(wav), name=name)
    return chat.ask(question, settings=GenerationSettings(max_new_tokens=MAX_TOKENS))


def test_upload_ask_and_the_streamed_answer_is_audiochats(web, browser, checkpoint, tmp_path):
    base, _ = web
    _open(browser, base)
    browser.find_element("id", "max-tokens").clear()
    browser.find_element("id", "max-tokens").send_keys(str(MAX_TOKENS))
    wav = _write_wav(tmp_path / "dog.wav", 1.0, sound=0)
    _upload(browser, wav)
    [item] = _recordings(browser)
    assert item.get_attribute("data-name") == "dog" and float(item.get_attribute("data-seconds")) == 1.0
    assert item.find_element("css selector", ".duration").text == "0:01"
    answer = _ask(browser, QUESTION)
    assert answer == _expected(checkpoint, wav, "dog", QUESTION)
    assert answer.strip(), "the tiny model answers something"
    turn = browser.find_elements("css selector", "#conversation .turn")[-1]
    assert turn.get_attribute("data-first-token-ms") != ""
    assert "in this conversation" in _recordings(browser)[0].text  # the list is drawn again after an answer
    # a follow-up: the conversation goes on without sending the recording again
    follow = _ask(browser, "And again?")
    assert follow is not None and len(browser.find_elements("css selector", "#conversation .turn")) == 2
    shot = tmp_path / "web-page.png"
    browser.save_screenshot(str(shot))
    assert shot.stat().st_size > 10_000
    if os.environ.get("EARDRUM_WEB_SCREENSHOT"):
        shutil.copy(shot, os.environ["EARDRUM_WEB_SCREENSHOT"])
    browser.find_element("id", "reset").click()
    assert not browser.find_elements("css selector", "#conversation .turn")


def test_record_from_the_microphone_then_ask(web, browser):
    base, _ = web
    _open(browser, base)
    record = browser.find_element("id", "record")
    record.click()
    _wait(browser, lambda d: d.find_element("id", "record").text == "Stop", "the recording to start")
    time.sleep(3.0)
    record.click()
    _wait(browser, lambda d: len(_recordings(d)) == 1, "the recording to arrive")
    [item] = _recordings(browser)
    assert item.get_attribute("data-name") == "recording-1"
    heard, recorded = float(item.get_attribute("data-seconds")), float(item.get_attribute("data-recorded-seconds"))
    assert recorded >= 2.9 and abs(heard - recorded) <= 0.1 * recorded, (heard, recorded)
    assert _ask(browser, QUESTION) is not None


def test_bad_input_shows_a_message_and_the_page_keeps_working(web, browser, tmp_path):
    base, log = web
    _open(browser, base)
    notes = tmp_path / "notes.txt"
    notes.write_text("meeting notes, not audio")
    _upload(browser, notes)
    error = browser.find_element("id", "error")
    assert error.is_displayed() and "notes.txt" in error.text and "could not decode" in error.text
    assert not _recordings(browser)
    _upload(browser, _write_wav(tmp_path / "bell.wav", 1.0, sound=2))
    assert not browser.find_element("id", "error").is_displayed()
    box = browser.find_element("id", "question")
    box.send_keys("Say <|im_end|> please")
    browser.find_element("id", "ask").click()
    _wait(browser, lambda d: d.find_element("id", "error").is_displayed(), "the refused question's message")
    assert "<|im_end|>" in browser.find_element("id", "error").text
    assert not browser.find_elements("css selector", "#conversation .turn")  # the refused turn is gone
    assert _ask(browser, QUESTION) is not None  # and the page goes on
    assert "400" in log.read_text()


# ------------------------------------------------------------------ browser formats, decoded by the server

def _encoded(wave: np.ndarray, rate: int, container: str, codec: str) -> bytes:
    import av

    buffer = io.BytesIO()
    with av.open(buffer, "w", format=container) as out:
        stream = out.add_stream(codec, rate=rate)
        stream.layout = "mono"
        frame = av.AudioFrame.from_ndarray(wave[None, :], format="flt", layout="mono")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    return buffer.getvalue()


@pytest.mark.parametrize(("container", "codec", "delay_ms"), [("webm", "libopus", 0), ("ipod", "aac", 25)])
def test_browser_formats_decode_to_the_samples_they_were_made_from(container, codec, delay_ms):
    """webm/opus (what Chromium's recorder makes) and m4a/aac (phones) decode through PyAV to the wav's samples,
    up to the codec: correlation >= 0.95 at the best shift within the codec's priming delay (AAC keeps its
    encoder priming, about 21 ms)."""
    pytest.importorskip("av")
    from eardrum.adapters.audio import load_audio

    rate = 48000
    t = np.arange(2 * rate) / rate
    wave = (0.3 * np.sin(2 * np.pi * (200 * t + 400 * t**2))).astype(np.float32)  # a sweep: one best shift
    reference = load_audio((wave, rate))
    decoded = load_audio(_encoded(wave, rate, container, codec), name=f"clip.{container}")
    assert abs(len(decoded) - len(reference)) <= 16 * (delay_ms + 10)
    best = max(range(0, 16 * delay_ms + 1), key=lambda lag: _correlation(decoded[lag:], reference))
    assert _correlation(decoded[best:], reference) >= 0.95


def _correlation(a: np.ndarray, b: np.ndarray) -> float:
    n = min(len(a), len(b))
    a, b = a[:n], b[:n]
    return float(np.dot(a, b) / np.sqrt(np.dot(a, a) * np.dot(b, b)))


def test_without_pyav_a_webm_is_refused_saying_what_to_install(monkeypatch):
    pytest.importorskip("av")
    import eardrum.adapters.audio as audio

    rate = 48000
    webm = _encoded(np.zeros(rate, dtype=np.float32), rate, "webm", "libopus")
    monkeypatch.setattr(audio, "_has_pyav", lambda: False)
    with pytest.raises(audio.AudioDecodeError, match=r"eardrum\[web\]"):
        audio.load_audio(webm, name="memo.webm")


def test_a_browser_recording_over_the_limit_is_refused_and_stereo_is_averaged():
    """An over-long webm is refused by its stated length, with the limit in the message; a stereo one comes out
    as the mean of its two channels, as a stereo wav does."""
    pytest.importorskip("av")
    import av

    from eardrum.adapters.audio import AudioTooLongError, load_audio

    rate = 48000
    with pytest.raises(AudioTooLongError, match="over the limit of 1 s"):
        load_audio(_encoded(np.zeros(3 * rate, dtype=np.float32), rate, "webm", "libopus"), max_seconds=1,
                   name="long.webm")
    t = np.arange(rate) / rate
    left = (0.4 * np.sin(2 * np.pi * (200 * t + 300 * t**2))).astype(np.float32)
    buffer = io.BytesIO()
    with av.open(buffer, "w", format="webm") as out:
        stream = out.add_stream("libopus", rate=rate)
        stream.layout = "stereo"
        frame = av.AudioFrame.from_ndarray(np.stack([left, np.zeros_like(left)]), format="fltp", layout="stereo")
        frame.sample_rate = rate
        for packet in [*stream.encode(frame), *stream.encode(None)]:
            out.mux(packet)
    decoded = load_audio(buffer.getvalue(), name="stereo.webm")
    half = load_audio((left / 2, rate))
    assert _correlation(decoded, half) >= 0.95
    assert np.sqrt(np.mean(decoded**2)) == pytest.approx(np.sqrt(np.mean(half**2)), rel=0.1)
