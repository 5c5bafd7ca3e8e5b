"""Command-line options that mirror settings dataclasses: each default is read from its dataclass field.

The settings modules import nothing heavy, so building the parser stays quick and transformers is not
loaded before `main` has set its environment.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields

from eardrum.adapters.placement import AUTO, DTYPE_NAMES, QUANTIZATIONS, Placement
from eardrum.common.generation import MAX_SEED, GenerationSettings


def field_default(cls: type, name: str):
    """The default of dataclass `cls`'s field `name` (the one place each default is declared)."""
    for f in fields(cls):
        if f.name == name:
            if f.default is MISSING:
                raise ValueError(f"{cls.__name__}.{name} has no default")
            return f.default
    raise ValueError(f"{cls.__name__} has no field {name!r}")


def seed_type(maximum: int = MAX_SEED, shown: str = "2**64 - 1"):
    """argparse type of a --seed: an integer from 0 to `maximum` (argparse names the option in its error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = -1
        if not 0 <= value <= maximum:
            raise argparse.ArgumentTypeError(f"expected an integer from 0 to {shown}, got {text!r}")
        return value

    return parse


def add_generation_options(parser: argparse.ArgumentParser) -> None:
    """--max-new-tokens, --temperature, --top-p, --repetition-penalty, --seed, --stop-loops (`GenerationSettings`)."""
    group = parser.add_argument_group("generation")
    default = lambda name: field_default(GenerationSettings, name)  # noqa: E731
    group.add_argument("--max-new-tokens", type=int, default=default("max_new_tokens"), help="(default: %(default)s)")
    group.add_argument("--temperature", type=float, default=default("temperature"), help="0 = greedy (the default)")
    group.add_argument("--top-p", type=float, default=default("top_p"), help="nucleus sampling, with --temperature > 0")
    penalty = default("repetition_penalty")
    group.add_argument("--repetition-penalty", type=float, default=penalty, help="> 1 discourages repeats; 1 = off")
    group.add_argument("--seed", type=seed_type(), default=default("seed"), help="makes sampling reproducible")
    group.add_argument(
        "--stop-loops", type=int, default=default("stop_loops"), metavar="N",
        help="end an answer whose last tokens repeat one run (up to 16 tokens) N times; 0 = off (default: %(default)s)",
    )


def generation_settings(args: argparse.Namespace) -> GenerationSettings:
    """The `GenerationSettings` the options ask for (not yet validated: `validate()` lists every bad value)."""
    return GenerationSettings(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        repetition_penalty=args.repetition_penalty,
        seed=args.seed,
        stop_loops=args.stop_loops,
    )


def add_placement_options(parser: argparse.ArgumentParser) -> None:
    """--device, --dtype, --quantization, --trust-remote-code (`eardrum.adapters.placement.Placement`)."""
    group = parser.add_argument_group("placement")
    group.add_argument(
        "--device", default=field_default(Placement, "device"), help="auto (cuda if available, else cpu), cpu, cuda, "
        "cuda:N or mps (default: %(default)s)"
    )
    group.add_argument("--dtype", default=field_default(Placement, "dtype"), choices=[AUTO, *DTYPE_NAMES])
    group.add_argument(
        "--quantization",
        default=field_default(Placement, "quantization"),
        choices=[q for q in QUANTIZATIONS if q is not None],
        help="load the LLM quantized (bitsandbytes)",
    )
    group.add_argument(
        "--trust-remote-code", action="store_true",
        help="let the LLM's own Python code (an auto_map in its folder) run; off unless given here, whatever "
        "the checkpoint says",
    )


def placement(args: argparse.Namespace) -> Placement:
    """The `Placement` the options ask for, checked (a `PlacementError` names every bad value)."""
    chosen = Placement(device=args.device, dtype=args.dtype, quantization=args.quantization,
                       trust_remote_code=bool(getattr(args, "trust_remote_code", False)))
    chosen.validate()
    return chosen
