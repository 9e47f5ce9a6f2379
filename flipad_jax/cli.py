"""The ``flipad`` command line.

Subcommands:

* ``flipad convert``: a PyTorch generator → a verified head bundle (``converters``, needs torch).
* ``flipad sample``: N samples of a PyTorch generator as PNGs or ``.npy`` (needs torch).
* ``flipad invert``: FLIPAD features of images with a head bundle (pure JAX), saved as ``.npy``.

Torch is imported only when a subcommand that needs it runs, so ``flipad --help`` and
``flipad invert`` work without it.
"""

from __future__ import annotations

import argparse
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
    import os

    import numpy as np
    from tqdm import tqdm

    from flipad_jax.head import Head
    from flipad_jax.images import load_images

    try:
        head = Head.load(args.bundle)
        images = load_images(args.images, head.output_range)
    except (ValueError, OSError) as error:
        print(f"flipad invert: {error}", file=sys.stderr)
        return 1
    if args.batch_size < 1:
        print(f"flipad invert: --batch-size {args.batch_size}: expected >= 1", file=sys.stderr)
        return 1
    feats, diagnostics = [], []
    starts = range(0, len(images), args.batch_size)
    for start in tqdm(starts, disable=args.quiet, desc="inverting", unit="batch"):
        res = head.invert(images[start:start + args.batch_size], lam=args.lam, mode=args.mode,
                          max_iter=args.max_iter, tol=args.tol)
        feats.append(np.asarray(res.z))
        for i in range(len(res.z)):
            diagnostics.append(dict(index=start + i, iterations=int(res.iterations[i]),
                                    objective=float(res.objective[i]), gap=float(res.gap[i]),
                                    status=int(res.status[i]), clipped=int(res.clipped[i])))
    out = args.out if args.out.endswith(".npy") else args.out + ".npy"
    tmp = out + ".tmp.npy"
    np.save(tmp, np.concatenate(feats))
    with open(tmp + ".json", "w") as fh:
        json.dump(dict(lam=args.lam, mode=args.mode, samples=diagnostics), fh)
    os.replace(tmp + ".json", out[:-4] + ".json")
    os.replace(tmp, out)
    not_converged = sum(d["status"] != 0 for d in diagnostics)
    print(f"wrote {out} ({len(diagnostics)} samples, {not_converged} not converged)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from converters.cli import add_convert_parser, add_sample_parser

    parser = argparse.ArgumentParser(
        prog="flipad", description="Single-model attribution of generative models by "
                                   "final-layer inversion (FLIPAD), in JAX.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_convert_parser(subparsers)
    add_sample_parser(subparsers)
    _add_invert_parser(subparsers)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
