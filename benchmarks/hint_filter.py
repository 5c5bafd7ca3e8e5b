"""The demo's hint filter, timed in one process (all cores) and in N one-thread processes.

Before stage 1 the demo decodes Whisper's transcript of every spoken training clip to keep the lines whose text
the transcript comes close to (`eardrum.demo.run._hint_consistent`). This times that step on the demo's own
training manifest, each setting into a fresh transcript cache (nothing known beforehand), and counts the kept
lines in which a setting differs from the first (bf16 decoding on other thread counts may round apart):

    python -m benchmarks.hint_filter --seed 0 --processes 1 2 --out benchmarks/results/hint-filter-cpu.json

The demo data for `--seed` is made (or read from its cache) as `eardrum demo --seed` makes it. Each setting runs
once, in the order given; run it alone on the machine.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from .report_io import emit, machine


def time_hint_filter(whisper: Path, manifest: Path, processes: int, work: Path) -> dict:
    """Run the demo's hint filter on `manifest` with `processes` into a fresh cache under `work`; its seconds and
    what it kept."""
    from eardrum.demo.run import _hint_consistent

    work.mkdir(parents=True)
    start = time.perf_counter()
    out, summary = _hint_consistent(whisper, work / "features", manifest, work / "kept.jsonl", print, processes)
    seconds = time.perf_counter() - start
    return {"processes": processes, "seconds": round(seconds, 1), "summary": summary, "kept": out.read_text()}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=0, help="the demo data's seed (eardrum demo --seed)")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="settings, timed in this order")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)
    if any(p < 1 for p in args.processes):
        parser.error(f"--processes: every value must be at least 1, got {args.processes}")

    import torch

    from eardrum.adapters.sources import default_cache_dir
    from eardrum.demo.assets import fetch_assets
    from eardrum.demo.data import build_demo_data

    assets = fetch_assets(progress=lambda *a: None)
    data = build_demo_data(default_cache_dir() / "demo-data", assets, seed=args.seed)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for k, processes in enumerate(args.processes):
            runs.append(time_hint_filter(assets.whisper, data["asr_train"], processes, Path(tmp) / str(k)))
    first = set(runs[0]["kept"].splitlines())
    differing = [len(first.symmetric_difference(r["kept"].splitlines())) for r in runs]
    report = {
        "benchmark": "hint_filter",
        "manifest": str(data["asr_train"]),
        "seed": args.seed,
        "torch_threads_one_process": torch.get_num_threads(),
        "runs": [{k: v for k, v in r.items() if k != "kept"} for r in runs],
        "kept_lines_differing_from_the_first_setting": differing,  # decoding on other threads may round apart
        **machine(),
    }
    emit(report, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
