"""`eardrum index` and `eardrum library`: a library of recordings, indexed in timestamped windows.

    eardrum index SOURCE [SOURCE ...] --model DIR --library LIB [--window 20] [--overlap 5]
    eardrum library LIB [--search "words"] [-k 5] [--json]

`index` cuts each recording of the SOURCES (files, folders walked) into windows and stores the model's
own transcript of each window in LIB (one SQLite file, `eardrum.inference.library`); re-running it
indexes only new and changed files and drops the windows of files that are gone. `library` says what LIB
holds and, with --search, which windows match, with their times.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from .options import add_placement_options, placement


def add_library_parsers(subparsers: argparse._SubParsersAction) -> None:
    """Register the `index` and `library` subcommands."""
    index = subparsers.add_parser("index", help="index recordings into a library of timestamped windows")
    index.add_argument("sources", nargs="+", metavar="SOURCE", help="recordings and folders of recordings")
    index.add_argument("--model", required=True, metavar="DIR",
                       help="the checkpoint (folder or Hub id org/name[@rev]) that transcribes each window")
    index.add_argument("--library", required=True, metavar="LIB", help="the library file (created if new)")
    index.add_argument("--window", type=float, help="window length in seconds, for a new library (default: 20)")
    index.add_argument("--overlap", type=float, help="overlap of windows in seconds, for a new library (default: 5)")
    add_placement_options(index)
    index.set_defaults(run=run_index)
    library = subparsers.add_parser("library", help="what a library holds; --search shows what retrieval finds")
    library.add_argument("library", metavar="LIB", help="the library file")
    library.add_argument("--search", metavar="WORDS", help="the windows that best match these words")
    library.add_argument("-k", type=int, default=5, help="how many windows --search shows (default: 5)")
    library.add_argument("--json", action="store_true", help="print JSON")
    library.set_defaults(run=run_library)


def _fail(command: str, err: BaseException) -> int:
    print(f"eardrum {command}: error: {'; '.join(str(err).split(chr(10)))}", file=sys.stderr)
    return 2


def _clock(seconds: float) -> str:
    from eardrum.adapters.processor import time_marker

    return time_marker(seconds)[1:-1]  # the same mm:ss (h:mm:ss) the model reads in long recordings


def run_index(args: argparse.Namespace) -> int:
    """`eardrum index`: index the sources; prints a summary line, each skipped file on stderr."""
    from eardrum.inference.library import AudioLibrary, LibraryError, audio_files

    try:
        list(audio_files(args.sources))  # a missing source is named before the model loads
        library = AudioLibrary(args.library, window_s=args.window, overlap_s=args.overlap)
        from eardrum.adapters.checkpoint import checkpoint_folder, read_checkpoint_meta
        from eardrum.adapters.placement import load_placed
        from eardrum.inference.library import model_describer, model_hints

        folder = checkpoint_folder(args.model)  # a Hub id is fetched into the Hugging Face cache
        read_checkpoint_meta(folder)
        model, processor = load_placed(folder, placement(args))
        with library:
            summary = library.index(args.sources, model_describer(model, processor),
                                    describer=str(folder.resolve()), progress=print, hints=model_hints(model))
    except (LibraryError, ValueError, OSError) as err:
        return _fail("index", err)
    for path, why in summary["skipped"]:
        print(f"skipped {path}: {why}", file=sys.stderr)
    rate = summary["audio_seconds"] / summary["seconds"] if summary["seconds"] else 0.0
    print(f"{summary['files_seen']} files: {summary['indexed']} indexed, {summary['unchanged']} unchanged, "
          f"{summary['removed']} removed, {len(summary['skipped'])} skipped; {summary['audio_seconds'] / 3600:.2f} h "
          f"of audio in {summary['seconds']:.0f} s ({rate:.0f} audio hours per hour)")
    return 0


def run_library(args: argparse.Namespace) -> int:
    """`eardrum library`: the library's contents, or the windows a search finds."""
    from eardrum.inference.library import LibraryError, open_library

    try:
        if args.k < 1:
            raise ValueError(f"-k {args.k}: expected a positive number of windows")
        with open_library(args.library) as library:
            stats = library.stats()
            hits = library.search(args.search, args.k) if args.search else None
    except (LibraryError, ValueError, OSError) as err:
        return _fail("library", err)
    if args.json:
        out = {**stats, **({"hits": [dataclasses.asdict(h) for h in hits]} if hits is not None else {})}
        print(json.dumps(out, indent=2))
        return 0
    print(f"{args.library}: {stats['files']} files, {stats['hours']:.2f} h, {stats['windows']} windows of "
          f"{stats['window_s']:g} s (overlap {stats['overlap_s']:g} s), texts by {stats['describer']}")
    for hit in hits or []:
        print(f"{Path(hit.path).name} {_clock(hit.start)}-{_clock(hit.end)} (holds {hit.coverage:.0%} of the "
              f"words by weight): {hit.text}")
    if hits == []:
        print("no window holds enough of those words (a question about this finds nothing)")
    return 0
