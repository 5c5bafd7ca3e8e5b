"""`eardrum ask` and `eardrum chat`, run as real processes on a tiny random checkpoint."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest
import soundfile as sf
import torch

from eardrum.adapters.checkpoint import build_audio_llm
from eardrum.adapters.config import AudioLLMConfig
from eardrum.adapters.tiny import synth_sound
from eardrum.cli import chat as cli_chat
from eardrum.cli import main as cli
from eardrum.inference.chat import AudioChat, GenerationSettings

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "eardrum.cli", *args]
    return subprocess.run(command, capture_output=True, text=True, env=ENV, input=stdin, timeout=120)


@pytest.fixture(scope="module")
def files(model_dirs, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("cli_chat")
    torch.manual_seed(0)  # the same random model whichever tests ran before
    model, processor = build_audio_llm(AudioLLMConfig(encoder=model_dirs["whisper"], llm=model_dirs["llama"]))
    model.save_pretrained(root / "checkpoint", processor)
    sf.write(root / "low.wav", synth_sound(220.0, 1), 16000, subtype="PCM_16")
    sf.write(root / "high.wav", synth_sound(1760.0, 1, seconds=0.7), 16000, subtype="PCM_16")
    (root / "bad.wav").write_bytes(b"RIFF\x00\x00\x00\x00WAVEnot audio")
    return {"model": str(root / "checkpoint"), **{k: str(root / f"{k}.wav") for k in ("low", "high", "bad")}}


@pytest.fixture(scope="module")
def expected(files) -> AudioChat:
    """A chat on the same checkpoint in this process, to compute the answers the CLI must print."""
    return AudioChat.from_pretrained(files["model"], device="cpu", settings=GenerationSettings(max_new_tokens=6))


def test_ask_prints_the_answer_and_reads_a_dash_question_from_stdin(files, expected, capsys, monkeypatch):
    args = ["ask", "--model", files["model"], "--max-new-tokens", "6", "--audio", files["low"]]
    assert cli.main([*args, "hi"]) == 0
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n"))
    assert cli.main([*args, "-"]) == 0
    expected.reset()
    expected.add_recording(files["low"])
    answer = expected.ask("hi")
    assert capsys.readouterr().out == f"{answer}\n{answer}\n"


def test_ask_json_in_a_process(files, expected):
    names = ["--audio", f"a={files['low']}", "--audio", f"b={files['high']}", "--use", "b"]
    result = run("ask", "--model", files["model"], "--max-new-tokens", "6", *names, "--json", "what do you hear?")
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    expected.reset()
    expected.add_recording(files["low"], "a")
    expected.add_recording(files["high"], "b")
    assert report["answer"] == expected.ask("what do you hear?", recordings=["b"])
    assert report["model"] == files["model"] and report["seconds"] >= 0 and report["load_seconds"] >= 0
    assert report["recordings"] == [
        {"name": "a", "file": files["low"], "seconds": 1.0},
        {"name": "b", "file": files["high"], "seconds": 0.7},
    ]


def test_ask_user_error_is_one_line_exit_2_without_traceback(files):
    result = run("ask", "--model", files["model"], "--audio", files["bad"], "what do you hear?")
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("eardrum ask: error: ") and result.stderr.count("\n") == 1
    assert "bad.wav: could not decode" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--model", "{tmp}", "--audio", "{low}", "hi"],
            "is not an eardrum checkpoint: eardrum_config.json is missing",
        ),
        (["--model", "{model}", "--audio", "{tmp}/missing.wav", "hi"], "missing.wav: no such file"),
        (["--model", "{model}", "--audio", "{low}", "  "], "the question is empty"),
        (
            ["--model", "{model}", "--audio", "a={low}", "--use", "z", "hi"],
            "--use 'z': no such recording; recordings: 'a'",
        ),
        (["--model", "{model}", "--temperature", "-1", "--top-p", "0", "hi"], "temperature: expected a number >= 0"),
        (["--model", "{model}", "--audio", "a={low}", "--audio", "a={high}", "hi"], "the name 'a' is given twice"),
    ],
)
def test_ask_user_errors_in_process(files, tmp_path, capsys, args, message):
    fill = {**files, "tmp": str(tmp_path)}
    assert cli.main(["ask", *(a.format(**fill) for a in args)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("eardrum ask: error: ") and err.count("\n") == 1
    assert message in err


def test_chat_session_from_stdin(files, expected):
    lines = [f"/add {files['high']} the high one", "what do you hear?", "/add nope.wav", "/reset", "/list", "/quit"]
    result = run(
        "chat",
        "--model",
        files["model"],
        "--audio",
        files["low"],
        "--max-new-tokens",
        "6",
        stdin="\n".join(lines) + "\n",
    )
    assert result.returncode == 0, result.stderr
    expected.reset()
    expected.add_recording(files["low"])
    expected.add_recording(files["high"], "the high one")
    answer = expected.ask("what do you hear?")
    # split on newlines only: a random model's answer may hold a carriage return, which splitlines() splits on
    assert result.stdout.split("\n") == [
        f"chatting with {files['model']}: recording 1 (1.0 s). Ask a question, or /help.",
        'you> added "the high one" (0.7 s); it goes with your next question',
        f"you> assistant> {answer}",
        "you> you> conversation and recordings cleared",
        "you> no recordings",
        "you> ",
    ]
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "nope.wav: no such file" in errors[0]
    assert "Traceback" not in result.stderr


def test_chat_loop_ends_cleanly_at_end_of_input_and_on_ctrl_c(expected, capsys):
    def reader(lines: list[str], end: type[BaseException]):
        def read(prompt: str) -> str:
            if not lines:
                raise end
            return lines.pop(0)

        return read

    assert cli_chat.chat_loop(expected, reader(["/help", "/bogus", ""], EOFError)) == 0
    out, err = capsys.readouterr()
    assert "/add FILE [NAME]" in out and err == "error: unknown command '/bogus'; /help lists the commands\n"
    assert cli_chat.chat_loop(expected, reader([], KeyboardInterrupt)) == 0
