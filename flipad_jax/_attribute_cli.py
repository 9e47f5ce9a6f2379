"""``flipad attribute`` and ``flipad registry add`` (:mod:`flipad_jax.attribute`), registered by
:func:`flipad_jax.cli.build_parser`."""

from __future__ import annotations

from flipad_jax._argparse import add_output_flags, subparser
from flipad_jax._runtime import report
from flipad_jax.attribute import DEFAULT_ALPHA

ATTRIBUTE_EXAMPLES = """\
examples:
  # build a registry: one entry per generator (detector + its head bundle, copied in)
  flipad registry add models/ dcgan --detector detectors/dcgan-flipad --bundle bundles/dcgan
  flipad registry add models/ lsgan --detector detectors/lsgan-flipad --bundle bundles/lsgan
  # which registered models claim each upload; rerun the same command after a kill to resume
  flipad attribute --registry models/ uploads/ --out claims.jsonl
  # four hosts, each its part of the sorted inputs; a stricter level
  flipad attribute --registry models/ 'up/*.png' --out part1.csv --shard 1/4 --alpha 0.001
"""


def add_attribute_parser(subparsers):
    from flipad_jax.cli import SRC_HELP, _add_perturb_flags

    p = subparser(
        subparsers, "attribute", ATTRIBUTE_EXAMPLES,
        help="which registered models claim each image (p >= alpha), resumable",
        description="Score every input under every model of a registry and write one row per "
                    "input: the models that claim it (p-value >= --alpha: none, one or several) "
                    "and each model's score and p-value. Rows go to OUT.partial and it becomes "
                    "OUT only when every input is done; a rerun after a kill resumes.")
    p.add_argument("--registry", required=True, metavar="DIR",
                   help="registry folder: DIR/<name>/detector (and DIR/<name>/bundle)")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=SRC_HELP)
    p.add_argument("--out", required=True, help="output FILE.csv or FILE.jsonl")
    p.add_argument("--alpha", type=float, default=DEFAULT_ALPHA,
                   help=f"level: a model claims an image where its p-value >= alpha (default "
                        f"{DEFAULT_ALPHA:g}, the paper's fnr; a model's own images are then "
                        "refused with probability <= alpha)")
    p.add_argument("--batch-size", type=int, default=256, help="images read and scored at once")
    p.add_argument("--shard", default="0/1", metavar="K/N",
                   help="attribute part K (from 0) of N contiguous parts of the sorted inputs")
    p.add_argument("--stack", action="store_true", default=None,
                   help="invert FLIPAD heads of one geometry in one vmapped solve (default: on "
                        "accelerators, off on the CPU backend, where it measured 2.5-4x "
                        "slower than a loop)")
    p.add_argument("--no-stack", dest="stack", action="store_false",
                   help="invert each model's head on its own")
    _add_perturb_flags(p)
    add_output_flags(p, "replace an existing OUT (and discard another run's OUT.partial)")
    p.set_defaults(func=_run_attribute)
    return p


def _run_attribute(args) -> int:
    from pathlib import Path

    from flipad_jax import scoring
    from flipad_jax.attribute import Registry, check_alpha, write_attribution
    from flipad_jax.images import list_images

    out = scoring.check_output(args.out, overwrite=args.overwrite)
    alpha = check_alpha(args.alpha)
    k, n = scoring.parse_shard(args.shard)
    refs = scoring.shard(list_images(args.inputs), k, n)
    registry = Registry.load(args.registry)
    sidecar = dict(detector=str(Path(args.registry).absolute()),
                   detector_sha256=scoring.detector_digest(args.registry), shard=f"{k}/{n}")
    path, resumed = write_attribution(registry, refs, out, sidecar=sidecar, alpha=alpha,
                                      batch_size=args.batch_size, overwrite=args.overwrite,
                                      progress=args.progress, stack=args.stack,
                                      perturbation=args.perturb, seed=args.perturb_seed)
    report(f"wrote {path} ({len(refs)} rows, {len(registry.entries)} models" +
          (f", {resumed} rows resumed from an earlier run" if resumed else "") + ")")
    return 0


REGISTRY_EXAMPLES = """\
examples:
  flipad registry add models/ dcgan --detector detectors/dcgan-flipad --bundle bundles/dcgan
  flipad registry add models/ real-vs-raw --detector detectors/rawpad   # no head: no bundle
"""


def add_registry_parser(subparsers):
    p = subparser(subparsers, "registry", REGISTRY_EXAMPLES,
                  help="build a registry of models for `flipad attribute`",
                  description="Registry folders hold one entry per model, "
                              "DIR/<name>/{detector,bundle}.")
    actions = p.add_subparsers(dest="action", required=True)
    add = subparser(actions, "add", REGISTRY_EXAMPLES,
                    help="copy a detector (and its head bundle) into DIR/NAME, atomically",
                    description="Check that the bundle is the detector's head and that no entry "
                                "holds the same bundle, then copy both into DIR/NAME.")
    add.add_argument("registry", metavar="DIR")
    add.add_argument("name", metavar="NAME", help="the model's name in attribution outputs")
    add.add_argument("--detector", required=True, help="detector folder (flipad fit)")
    add.add_argument("--bundle", help="its head bundle (required for FLIPAD detectors)")
    add.add_argument("--overwrite", action="store_true", help="replace an existing entry NAME")
    add.set_defaults(func=_run_registry_add)
    return p


def _run_registry_add(args) -> int:
    from flipad_jax.attribute import add_entry

    path = add_entry(args.registry, args.name, detector=args.detector, bundle=args.bundle,
                     overwrite=args.overwrite)
    report(f"wrote {path}")
    return 0
