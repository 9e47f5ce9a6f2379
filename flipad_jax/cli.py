"""The ``flipad`` command line.

Subcommands:

* ``flipad convert``: a PyTorch generator → a verified head bundle (``converters``, needs torch).
* ``flipad sample``: N samples of a PyTorch generator as PNGs or ``.npy`` (needs torch).
* ``flipad invert``: FLIPAD features of images with a head bundle (pure JAX), saved as ``.npy``.

``convert`` and ``sample`` come from ``converters`` through the ``flipad.subcommands`` entry
points; torch is imported only when one of them runs, so ``flipad --help`` and ``flipad invert``
work without it.
"""

from __future__ import annotations

import argparse
import os
import sys

INVERT_EXAMPLES = """\
examples:
  # FLIPAD features (the lasso solutions) of a folder of PNGs, λ = 5e-4 as in the paper
  flipad invert bundles/dcgan data/dcgan/test --out feats.npy
  # the reference solver's settings (fixed step 0.025, no restart, batch-wide stop)
  flipad invert bundles/dcgan images.npy --mode paper --out feats.npy
"""


def _add_invert_parser(subparsers):
    p = subparsers.add_parser(
        "invert", help="FLIPAD features of images with a head bundle (no torch needed)",
        description="Solve the final-layer lasso for every image; write the activations (.npy) "
                    "and per-sample diagnostics (.json beside it).",
        epilog=INVERT_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("bundle", help="head bundle folder written by `flipad convert`")
    p.add_argument("images", help="a folder of PNGs, or an .npy array (B, C, H, W) in the "
                                  "generator's output range")
    p.add_argument("--out", required=True, help="output .npy file (written atomically)")
    p.add_argument("--lam", type=float, default=5e-4, help="λ of the lasso (default 5e-4)")
    p.add_argument("--mode", choices=["fast", "paper"], default="fast")
    p.add_argument("--max-iter", type=int, default=None)
    p.add_argument("--tol", type=float, default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_run_invert)
    return p


def _run_invert(args) -> int:
    import json
    import tempfile
    from pathlib import Path

    import numpy as np

    from flipad_jax.features import invert_in_batches
    from flipad_jax.head import Head
    from flipad_jax.images import load_images

    out = Path(args.out if args.out.endswith(".npy") else args.out + ".npy")
    try:
        head = Head.load(args.bundle)
        images = load_images(args.images, head.output_range)
        if images.shape[1:] != tuple(head.out_shape):
            raise ValueError(f"{args.images}: images of shape {images.shape[1:]}, expected "
                             f"{tuple(head.out_shape)} (the head's output)")
        res = invert_in_batches(head, images, lam=args.lam, batch_size=args.batch_size,
                                progress=not args.quiet, mode=args.mode,
                                max_iter=args.max_iter, tol=args.tol)
    except (ValueError, OSError) as error:
        print(f"flipad invert: {error}", file=sys.stderr)
        return 1
    samples = [dict(index=i, iterations=int(res["iterations"][i]),
                    objective=float(res["objective"][i]), gap=float(res["gap"][i]),
                    status=int(res["status"][i]), clipped=int(res["clipped"][i]))
               for i in range(len(images))]
    # Each file is written whole in a temporary folder beside it, then moved into place.
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent, prefix=f".{out.name}.") as tmp:
        np.save(Path(tmp) / out.name, res["z"])
        (Path(tmp) / out.with_suffix(".json").name).write_text(
            json.dumps(dict(lam=args.lam, mode=args.mode, samples=samples)))
        os.replace(Path(tmp) / out.with_suffix(".json").name, out.with_suffix(".json"))
        os.replace(Path(tmp) / out.name, out)
    not_converged = sum(d["status"] != 0 for d in samples)
    print(f"wrote {out} ({len(samples)} samples, {not_converged} not converged)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The parser, with subcommands that other packages register under the entry-point group
    ``flipad.subcommands`` (``converters`` adds convert and sample): flipad_jax never imports
    the torch side by name."""
    from importlib.metadata import entry_points

    parser = argparse.ArgumentParser(
        prog="flipad", description="Single-model attribution of generative models by "
                                   "final-layer inversion (FLIPAD), in JAX.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for entry in sorted(entry_points(group="flipad.subcommands"), key=lambda e: e.name):
        entry.load()(subparsers)
    _add_invert_parser(subparsers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
