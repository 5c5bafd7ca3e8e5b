"""`eardrum generate` and `eardrum eval`: answer or score a whole manifest.

    eardrum generate --model DIR --manifest in.jsonl --out out.jsonl [--batch-size N] [--max-new-tokens N]
    eardrum eval --model DIR --manifest test.jsonl --task asr|qa|caption [--out DIR] [--parity | --text-only]

`add_batch_parsers(subparsers)` registers both on the `eardrum` parser. User mistakes end with one
line on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from eardrum.common.generation import BATCH_SIZE

from .options import add_generation_options, add_placement_options, generation_settings, placement

EXIT_INTERRUPTED = 130  # the shell's code for Ctrl-C


def _one_line(err: BaseException) -> ValueError:
    """The error as a ValueError with a one-line message (a manifest problem may list several lines)."""
    return ValueError("; ".join(line.strip() for line in str(err).splitlines() if line.strip()))


def _generate(args: argparse.Namespace) -> int:
    from eardrum.inference.generate import format_generate_summary, generate_manifest

    try:
        summary = generate_manifest(
            args.model,
            args.manifest,
            args.out,
            batch_size=args.batch_size,
            settings=generation_settings(args),
            task=args.task,
            prompt=args.prompt,
            placement=placement(args),
            progress=not args.no_progress,
        )
    except (ValueError, OSError) as err:
        raise _one_line(err) from None
    except KeyboardInterrupt:
        # Every answer so far is on disk: the same command picks up from there.
        print(f"eardrum generate: interrupted; run the same command again to resume into {args.out}", file=sys.stderr)
        return EXIT_INTERRUPTED
    print(format_generate_summary(summary))
    if summary["done"] + summary["skipped"] == 0:
        raise ValueError(f"no line of {args.manifest} was answered ({summary['lines']} lines, {summary['errors']} "
                         f"errors{', none of task ' + args.task if args.task else ''}); each error is in {args.out}")
    return 0


def _eval(args: argparse.Namespace) -> int:
    from eardrum.inference.evaluation import evaluate_manifest, format_table

    out = args.out or f"eval-{Path(args.manifest).stem}"
    try:
        summary = evaluate_manifest(
            args.model,
            args.manifest,
            args.task,
            out_dir=out,
            parity=args.parity,
            text_only=args.text_only,
            batch_size=args.batch_size,
            settings=generation_settings(args),
            prompt=args.prompt,
            placement=placement(args),
            progress=not args.no_progress,
        )
    except (ValueError, OSError) as err:
        raise _one_line(err) from None
    print(format_table(summary))
    print(f"per-example results and summary written to {out}/ ({summary['seconds']:.1f} s)")
    if not summary["scored"]:
        raise ValueError(f"nothing in {args.manifest} was scored as {args.task} ({summary['lines']} lines, "
                         f"{summary['errors']} errors; each line's error is in {out}/per_example.jsonl)")
    return 0


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="checkpoint folder, or Hub id org/name[@revision]")
    parser.add_argument("--manifest", required=True, help="JSONL manifest (asr/caption, qa or chat lines)")
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help="prompts per call (default: %(default)s)")
    parser.add_argument("--prompt", help="the prompt for asr / caption lines (default: the task's default prompt)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_generation_options(parser)
    add_placement_options(parser)


def add_batch_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register `generate` and `eval` (with their handlers, as `run`) on the `eardrum` subparsers."""
    gen = subparsers.add_parser("generate", help="answer every line of a manifest into a JSONL file (resumable)")
    _common(gen)
    gen.add_argument("--out", required=True, help="output JSONL; lines already in it are skipped")
    gen.add_argument("--task", choices=("asr", "caption", "qa", "chat"), help="read every line as this task")
    gen.set_defaults(run=_generate)
    ev = subparsers.add_parser("eval", help="score a checkpoint on a manifest: WER/CER, QA accuracy, BLEU/CIDEr")
    _common(ev)
    ev.add_argument("--task", required=True, choices=("asr", "qa", "caption"))
    ev.add_argument("--out", help="folder for per_example.jsonl and summary.json (default: ./eval-MANIFEST_NAME)")
    ev.add_argument(
        "--parity", action="store_true", help="also ask with each line's 'transcript' in place of its audio"
    )
    ev.add_argument(
        "--text-only",
        action="store_true",
        help="answer with each line's 'transcript' only: the LLM's own accuracy on the questions as text",
    )
    ev.set_defaults(run=_eval)
