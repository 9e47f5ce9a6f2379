"""argparse pieces shared by every ``flipad`` subcommand, here and in ``converters``."""

from __future__ import annotations

import argparse
import json


def subparser(subparsers, name: str, examples: str, **kwargs):
    """A subcommand's parser with its examples printed verbatim after the options."""
    return subparsers.add_parser(name, epilog=examples,
                                 formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)


def add_output_flags(p, overwrite_help: str = "replace an existing --out") -> None:
    """The ``--overwrite`` and ``--quiet`` flags every writing subcommand ends with."""
    p.add_argument("--overwrite", action="store_true", help=overwrite_help)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    # flipad's main() sets args.progress (_runtime.show_progress); without it, no bars
    p.set_defaults(progress=False)


def key_value(text: str) -> tuple:
    """``KEY=VALUE`` with VALUE read as JSON where it parses (16, [8, 8], 0.5), else a string."""
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"{text!r}: expected KEY=VALUE, e.g. rep_dim=32")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def _optional(convert, expected: str):
    """An argparse type: ``convert(text)``, or None for 'none'."""
    def parse(text: str):
        if text.lower() == "none":
            return None
        try:
            return convert(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r}: expected {expected} or 'none'") from None

    parse.__name__ = f"optional_{convert.__name__}"  # argparse names the type in its errors
    return parse


optional_int = _optional(int, "an int")
optional_float = _optional(float, "a number")


def float_pair(text: str) -> tuple:
    """``LO,HI``: two numbers with LO < HI, e.g. ``0,255``."""
    parts = text.split(",")
    try:
        lo, hi = (float(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LO,HI, two numbers such as "
                                         "0,255") from None
    if not lo < hi:
        raise argparse.ArgumentTypeError(f"{text!r}: expected LO < HI")
    return lo, hi
