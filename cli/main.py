"""The `eardrum` command line.

    eardrum demo [--quick] [--assets DIR] [--seed N]  real weights: fetch, train, evaluate, answer spoken questions
    eardrum demo --report RUN [RUN ...] [--readme README.md]  the table of finished runs, mean and each
    eardrum train RECIPE.yaml [key.sub=value ...]   train (also under `accelerate launch`)
    eardrum info MODEL_DIR [--json]        what a checkpoint holds
    eardrum smoke [--out DIR] [--steps N]  a tiny end-to-end run on random tiny models
    eardrum merge-lora MODEL_DIR OUT_DIR   export the LLM with its LoRA merged in
    eardrum push MODEL_DIR ORG/NAME [--private] [--revision B] [--dry-run]   publish on the Hub with a model card
    eardrum chat --model DIR [--audio [NAME=]FILE ...]                      talk about recordings, answers streamed
    eardrum ask --model DIR --audio [NAME=]FILE [...] [--json] "question"   one answer, for scripts
    eardrum serve --model DIR [--host H] [--port N]   an OpenAI-compatible HTTP server (input_audio parts)
    eardrum web --model DIR [--port 7860]            the chat page in a browser: record or upload, ask, listen
    eardrum generate --model DIR --manifest IN.jsonl --out OUT.jsonl   batch answers, resumable
    eardrum eval --model DIR --manifest TEST.jsonl --task asr|qa|caption [--parity]   metrics
    eardrum index SOURCE [...] --model DIR --library LIB   recordings into timestamped, searchable windows
    eardrum library LIB [--search "words"]   what a library holds, what retrieval finds

User mistakes end with one line on stderr and exit code 2; nothing prints a traceback for them.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile


def _train(args: argparse.Namespace) -> int:
    from eardrum.training.recipe import load_recipe
    from eardrum.training.trainer import train

    recipe = load_recipe(args.recipe, args.overrides)
    if args.check:
        print(f"{args.recipe}: OK")
        return 0
    result = train(recipe)
    if "final" in result:
        print(f"trained {result['steps']} steps in {result['seconds']:.1f} s; model saved to {result['final']}")
        if result.get("eval"):
            print("eval: " + ", ".join(f"{k} {v:.4g}" for k, v in result["eval"].items()))
    return 0


def _demo(args: argparse.Namespace) -> int:
    if args.report:
        from eardrum.demo.report import report

        print(report(args.report, readme=args.readme))
        return 0
    if args.readme:
        raise ValueError("--readme writes the table of finished runs: give them with --report RUN [RUN ...]")
    from eardrum.demo.run import run_demo

    run_demo(args.out, quick=args.quick, assets_dir=args.assets, whisper=args.whisper, seed=args.seed,
             resume=args.resume, processes=args.processes)
    return 0


def _info(args: argparse.Namespace) -> int:
    from eardrum.adapters.summary import describe_checkpoint, format_summary

    summary = describe_checkpoint(args.model_dir)
    print(json.dumps(summary, indent=2) if args.json else format_summary(summary))
    return 0


def _smoke(args: argparse.Namespace) -> int:
    from eardrum.demo.smoke import run_smoke

    out = args.out or tempfile.mkdtemp(prefix="eardrum-smoke-")
    print(f"eardrum smoke: tiny random Whisper + Llama bases, stack projector + LoRA, {args.steps} steps, in {out}")
    result = run_smoke(out, steps=args.steps)
    print(f"loss {result['first_loss']:.3f} -> {result['last_loss']:.3f}")
    print(f"checkpoint {result['checkpoint']} (reload gives bit-identical logits: {result['reload_bit_identical']})")
    for caption, answer in result["answers"].items():
        print(f"  sound '{caption}': the model answers {answer.strip()!r}")
    print(f"{result['correct']}/{len(result['answers'])} sounds captioned right in {result['seconds']:.1f} s")
    ok = result["reload_bit_identical"] and result["last_loss"] < result["first_loss"]
    return 0 if ok else 1


def _merge_lora(args: argparse.Namespace) -> int:
    from eardrum.adapters.checkpoint import merge_lora

    print(f"merged LLM written to {merge_lora(args.model_dir, args.out_dir)}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from eardrum.adapters.hub import plan_push, push_checkpoint

    plan = plan_push(args.model_dir, args.repo_id, encoder=args.encoder, llm=args.llm, license=args.license,
                     allow_local_bases=args.allow_local_bases)
    if args.dry_run:
        print(plan.card)
        print(f"files for {plan.repo_id}{'@' + args.revision if args.revision else ''} (nothing uploaded):")
        for name in plan.files:
            print(f"  {name}")
        return 0
    url = push_checkpoint(plan, private=args.private, revision=args.revision, commit_message=args.message)
    print(f"pushed {len(plan.files)} files to {plan.repo_id}: {url}")
    print(f'load it with AudioChat.from_pretrained("{plan.repo_id}") or --model {plan.repo_id}')
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand."""
    from eardrum.adapters import __version__
    from eardrum.common.generation import MAX_TRAIN_SEED

    from .options import seed_type

    parser = argparse.ArgumentParser(prog="eardrum", description="Give a large language model ears.")
    parser.add_argument("--version", action="version", version=f"eardrum {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log what is loaded from where")
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser("train", help="train from a YAML recipe with key.sub=value overrides")
    train.add_argument("recipe")
    train.add_argument("overrides", nargs="*", help="e.g. output_dir=runs/x optim.lr=3e-4")
    train.add_argument("--check", action="store_true", help="only check the recipe and exit")
    train.set_defaults(run=_train)
    demo = sub.add_parser("demo", help="fetch real weights, train, evaluate and answer spoken questions")
    demo.add_argument("--quick", action="store_true", help="small data and few steps: a first look in minutes")
    demo.add_argument("--assets", help="a folder holding the weight packages already (no network needed)")
    demo.add_argument("--out", default="runs/demo", help="where the checkpoints and results go")
    demo.add_argument("--whisper", default="tiny.en", choices=["tiny.en", "base"])
    demo.add_argument("--seed", type=seed_type(MAX_TRAIN_SEED, "2**32 - 1"), default=0,
                      help="seeds the data and the training")
    demo.add_argument("--resume", action="store_true", help="go on with a run stopped in --out: finished stages "
                      "are kept, a stage with checkpoints resumes from its latest")
    demo.add_argument("--processes", type=int, default=None, metavar="N",
                      help="train each stage as N DDP processes on this machine (default: 2 on a CPU with at "
                           "least 2 cores, else 1)")
    demo.add_argument("--report", nargs="+", metavar="RUN",
                      help="train nothing: the table of finished runs (run folders or results.json), mean and each")
    demo.add_argument("--readme", metavar="README", help="with --report: write the table into this README")
    demo.set_defaults(run=_demo)
    info = sub.add_parser("info", help="print what a checkpoint directory holds")
    info.add_argument("model_dir", help="a checkpoint folder, or a Hub id org/name[@revision]")
    info.add_argument("--json", action="store_true", help="machine-readable output")
    info.set_defaults(run=_info)
    smoke = sub.add_parser("smoke", help="tiny end-to-end run: build, train, save, reload, answer")
    smoke.add_argument("--out", help="folder for the bases and the checkpoint (default: a new temp folder)")
    smoke.add_argument("--steps", type=int, default=120)
    smoke.set_defaults(run=_smoke)
    merge = sub.add_parser("merge-lora", help="export the checkpoint's LLM with LoRA merged, as a transformers folder")
    merge.add_argument("model_dir")
    merge.add_argument("out_dir")
    merge.set_defaults(run=_merge_lora)
    push = sub.add_parser("push", help="publish a checkpoint on the Hugging Face Hub with a generated model card")
    push.add_argument("model_dir", help="the checkpoint folder")
    push.add_argument("repo_id", help="the Hub repository, org/name (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--revision", metavar="BRANCH", help="upload to this branch (created if missing)")
    push.add_argument("--encoder", metavar="ORG/NAME",
                      help="the Hub id of the encoder's weights, for a checkpoint trained on a local copy of them")
    push.add_argument("--llm", metavar="ORG/NAME",
                      help="the Hub id of the LLM's weights, for a checkpoint trained on a local copy of them")
    push.add_argument("--allow-local-bases", action="store_true",
                      help="publish even though a base is a local path nobody else can load")
    push.add_argument("--license", help="the licence of the trained weights, for the card (e.g. apache-2.0)")
    push.add_argument("--message", help="the commit message")
    push.add_argument("--dry-run", action="store_true", help="print the card and the file list; upload nothing")
    push.set_defaults(run=_push)
    from eardrum.cli.batch import add_batch_parsers
    from eardrum.cli.chat import add_chat_parsers
    from eardrum.cli.library import add_library_parsers
    from eardrum.cli.serve import add_serve_parser

    add_chat_parsers(sub)
    add_library_parsers(sub)
    add_batch_parsers(sub)
    add_serve_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `eardrum` console script."""
    args = build_parser().parse_args(argv)
    quiet = not args.verbose and args.command not in ("train", "demo")
    logging.basicConfig(level=logging.WARNING if quiet else logging.INFO, format="%(levelname)s %(message)s")
    if not args.verbose:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    try:
        return args.run(args)
    except (ValueError, OSError) as err:
        print(f"eardrum {args.command}: error: {err}", file=sys.stderr)
        return 2
    except RuntimeError as err:
        if type(err).__name__ not in ("TrainingError", "AssetError"):
            raise
        print(f"eardrum {args.command}: stopped: {err}", file=sys.stderr)
        return 3

