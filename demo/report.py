"""The demo's table: one run's `results.json`, or several runs (seeds) side by side with their mean.

`eardrum demo` prints the table of its own run; `eardrum demo --report RUN [RUN ...] [--readme README.md]`
builds the table of several finished runs and, with `--readme`, writes it into the README between the
markers below, so the README's numbers are always those of the results files named in it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

README_START = "<!-- demo-results:start (written by `eardrum demo --report`; do not edit by hand) -->"
README_END = "<!-- demo-results:end -->"


class ReportError(ValueError):
    """A results file that cannot be read or reported, or a README without the table's markers."""


@dataclass(frozen=True)
class Measure:
    """One row of the table: how to read the value from a run's results, show it, and judge it."""

    label: str
    value: Callable[[dict], float | None]
    show: Callable[[float | None], str]
    target: str = ""
    met: Callable[[float], bool] | None = None  # whether the mean over the runs meets the target


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.1f} %"


def _ratio(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}"


def _minutes(v: float | None) -> str:
    return "n/a" if v is None else f"{v / 60:.1f} min"


def _get(*keys: str) -> Callable[[dict], float | None]:
    """`results[k1][k2]...`, or None where any key is missing (older results files lack newer measures)."""

    def read(results: dict) -> float | None:
        node = results
        for key in keys:
            if not isinstance(node, dict) or node.get(key) is None:
                return None
            node = node[key]
        return float(node)

    return read


def _quotient(top: Callable[[dict], float | None], bottom: Callable[[dict], float | None]):
    def read(results: dict) -> float | None:
        a, b = top(results), bottom(results)
        return None if a is None or not b else a / b

    return read


def _measures(runs: Sequence[dict]) -> list[Measure]:
    """Every row, in order: the fixed measures, then one row per held-out voice found in any run."""
    audio, text, shipped = _get("qa", "audio"), _get("qa", "text"), _get("qa", "text_shipped_llm")
    wer, whisper = _get("asr", "wer"), _get("asr", "whisper_wer")
    rows = [
        Measure("WER, held-out speech (numbers spelt out on both sides)", wer, _pct),
        Measure("WER, same clips, Whisper tiny.en's own decoder", whisper, _pct),
        Measure("WER / Whisper's WER", _quotient(wer, whisper), _ratio, "<= 1.2", lambda m: m <= 1.2),
        Measure("WER, the same speech in noise (5-15 dB SNR, a third reverberant)", _get("asr_noisy", "wer"), _pct),
        Measure("WER, speech in noise, Whisper tiny.en's own decoder", _get("asr_noisy", "whisper_wer"), _pct),
        Measure("spoken QA, contains the answer (audio)", audio, _pct),
        Measure("same questions as text, this model (the LLM with its LoRA)", text, _pct),
        Measure("same questions as text, the LLM as shipped", shipped, _pct),
        Measure("spoken QA audio / text of the LLM as shipped", _quotient(audio, shipped), _ratio, ">= 0.85",
                lambda m: m >= 0.85),
        Measure("same questions, Whisper's transcript read by the LLM as shipped (cascade)",
                _get("qa", "cascade_shipped_llm"), _pct),
        Measure("spoken QA audio / cascade", _quotient(audio, _get("qa", "cascade_shipped_llm")), _ratio),
        Measure("procedural sounds: number of events right", _get("captions", "procedural_count_accuracy"), _pct,
                ">= 80 %", lambda m: m >= 0.8),
        Measure("procedural sounds: order right", _get("captions", "procedural_order_accuracy"), _pct),
        Measure("animal sounds: right animal", _get("captions", "animal_accuracy"), _pct, ">= 90 %",
                lambda m: m >= 0.9),
        Measure("clips without speech: an invented transcript", _get("no_speech", "invented_rate"), _pct, "<= 5 %",
                lambda m: m <= 0.05),
        Measure("WER, held-out spoken questions asked to be transcribed", _get("questions_asr", "wer"), _pct),
        Measure("WER, real human speech (29 clips, 7 speakers; `eardrum.demo.real_speech`)",
                _get("real_speech", "wer"), _pct),
        Measure("WER, real human speech, Whisper tiny.en's own decoder", _get("real_speech", "whisper_wer"), _pct),
        Measure("real speech: WER / Whisper's WER", _get("real_speech", "wer_over_whisper"), _ratio, "<= 1.5",
                lambda m: m <= 1.5),
        Measure("real speech: asked to transcribe, no transcript given", _get("real_speech", "no_transcript_share"),
                _pct, "0 %", lambda m: m == 0),
    ]
    voices = sorted({v for r in runs for v in (r.get("asr_by_voice") or {})})
    rows += [Measure(f"WER, {v}", _get("asr_by_voice", v, "wer"), _pct) for v in voices]
    rows += [Measure(f"WER, {v}, Whisper's decoder", _get("asr_by_voice", v, "whisper_wer"), _pct) for v in voices]
    kinds = sorted({k for r in runs for k in (r.get("asr_by_kind") or {})})
    rows += [Measure(f"WER, {k} sentences", _get("asr_by_kind", k, "wer"), _pct) for k in kinds]
    rows += [Measure(f"WER, {k} sentences, Whisper's decoder", _get("asr_by_kind", k, "whisper_wer"), _pct)
             for k in kinds]
    voices = sorted({v for r in runs for v in (r.get("qa_by_voice") or {})})
    rows += [Measure(f"spoken QA, {v} (audio)", _get("qa_by_voice", v, "audio"), _pct) for v in voices]
    rows += [Measure(f"spoken QA, {v} (as text)", _get("qa_by_voice", v, "text"), _pct) for v in voices]
    whole = lambda r: None if r.get("resumed") else r.get("seconds")  # noqa: E731  a resumed run timed a part
    rows.append(Measure("whole run (data, both stages, evaluation)", whole, _minutes, "<= 35 min",
                        lambda m: m <= 35 * 60))
    return rows


def _table(header: list[str], body: list[list[str]]) -> str:
    widths = [max(len(row[k]) for row in [header, *body]) for k in range(len(header))]
    line = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([line(header), "|" + "|".join("-" * (w + 2) for w in widths) + "|", *map(line, body)])


def format_results(results: dict) -> str:
    """One run's results as a Markdown table: measure, value, target."""
    body = [[m.label, m.show(m.value(results)), m.target] for m in _measures([results])]
    return _table(["measure", "value", "target"], body)


def format_report(runs: Sequence[dict], names: Sequence[str]) -> str:
    """Several runs' results as one Markdown table: the mean of each measure, each run's value, the target
    and whether the mean meets it. `names` head the runs' columns (e.g. `seed 0`)."""
    if not runs or len(runs) != len(names):
        raise ReportError(f"expected one name per run, got {len(runs)} runs and {len(names)} names")
    body = []
    for m in _measures(runs):
        values = [m.value(r) for r in runs]
        known = [v for v in values if v is not None]
        mean = sum(known) / len(known) if len(known) == len(values) else None
        verdict = "" if m.met is None or mean is None else ("met" if m.met(mean) else "not met")
        body.append([m.label, m.show(mean), *map(m.show, values), m.target, verdict])
    return _table(["measure", "mean", *names, "target", ""], body)


def read_results(path: str | Path) -> dict:
    """A run's results: `path` is its `results.json` or the run folder holding it."""
    path = Path(path)
    file = path / "results.json" if path.is_dir() else path
    try:
        results = json.loads(file.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ReportError(f"{file}: cannot read the demo's results ({exc})") from exc
    if not isinstance(results, dict) or not isinstance(results.get("asr"), dict):
        raise ReportError(f"{file}: not a demo results file (expected a JSON object with an 'asr' entry)")
    return results


def run_name(results: dict, path: str | Path) -> str:
    """How a run heads its column: its seed where the results record one, else its file's name."""
    return f"seed {results['seed']}" if "seed" in results else Path(path).stem


def write_readme_table(readme: str | Path, table: str, sources: Sequence[str | Path]) -> None:
    """Replaces the block between the README's markers with `table`, naming the results files it came from."""
    readme = Path(readme)
    text = readme.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise ReportError(f"{readme}: expected the markers {README_START!r} and {README_END!r}, in that order")
    files = ", ".join(f"`{Path(s).as_posix()}`" for s in sources)
    block = f"{README_START}\n{table}\n\n(From {files}.)\n"
    readme.write_text(text[:start] + block + text[end:])


def report(paths: Sequence[str | Path], readme: str | Path | None = None) -> str:
    """The table of the runs at `paths` (results files or run folders); written into `readme` when given."""
    runs = [read_results(p) for p in paths]
    table = format_report(runs, [run_name(r, p) for r, p in zip(runs, paths)])
    if readme is not None:
        write_readme_table(readme, table, paths)
    return table
