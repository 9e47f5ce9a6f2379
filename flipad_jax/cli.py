"""The ``flipad`` command line.

Subcommands:

* ``flipad convert``: a PyTorch generator → a verified head bundle (``converters``, needs torch).
* ``flipad sample``: N samples of a PyTorch generator as PNGs or ``.npy`` (needs torch).
* ``flipad invert``: FLIPAD features of images with a head bundle (pure JAX), saved as ``.npy``.
* ``flipad fit``: a FLIPAD / RawPAD / DCTPAD detector from G's samples and other samples.
* ``flipad score``: scores and verdicts of any number of images, streamed to CSV or JSONL,
  resumable after a kill (:mod:`flipad_jax.scoring`).
* ``flipad evaluate``: accuracy at each fitted fnr and AUC against other sources, as a table.
* ``flipad explain`` (and ``flipad score --report``): a per-image evidence report;
  ``flipad verify`` recomputes one and says whether each record matches
  (:mod:`flipad_jax.evidence`).
* ``flipad attribute`` (and ``flipad registry add``): which models of a registry claim each
  image, open-world, with every model's p-value (:mod:`flipad_jax.attribute`).

Every refused input prints ``flipad <command>: error: ...`` naming the file or value and what
was expected, and exits with status 1; a usage error exits with 2 (argparse's convention), an
unexpected error (a bug) with 3, its traceback shown under ``flipad --verbose``.

``convert`` and ``sample`` come from ``converters`` through the ``flipad.subcommands`` entry
points; torch is imported only when one of them runs, so ``flipad --help`` and ``flipad invert``
work without it.
"""

from __future__ import annotations

import argparse
import json
import sys

from flipad_jax import sminv as sminv_defaults
from flipad_jax._runtime import DEVICES, LOGGER, report, run_log, select_device, show_progress
from flipad_jax._argparse import (add_output_flags, float_pair, key_value, optional_float,
                                  optional_int, subparser)
from flipad_jax.deepsad import DeepSADConfig
from flipad_jax.features import DOWNSAMPLE_MODES, FeatureConfig
from flipad_jax.lasso import BY_STOP_RULE

# The CLI's defaults are the settings objects' (the paper's), read from one place.
_FEATURES, _TRAINING = FeatureConfig(), DeepSADConfig()

SRC_HELP = ("a folder of images, a glob pattern (quote it), an .npy array (B, C, H, W) of uint8 "
            "pixels or floats in the generator's output range, or, for a tabular head, a .csv "
            "of rows of numbers (header line optional)")

INVERT_EXAMPLES = """\
examples:
  # FLIPAD features (the lasso solutions) of a folder of PNGs, λ = 5e-4 as in the paper
  flipad invert bundles/dcgan data/dcgan/test --out feats.npy
  # the reference solver's settings (fixed step 0.025, no restart, batch-wide stop)
  flipad invert bundles/dcgan images.npy --mode paper --out feats.npy
"""


def _add_invert_parser(subparsers):
    p = subparser(
        subparsers, "invert", INVERT_EXAMPLES,
        help="FLIPAD features of images with a head bundle (no torch needed)",
        description="Solve the final-layer lasso for every image; write the activations (.npy) "
                    "and per-sample diagnostics (.json beside it).")
    p.add_argument("bundle", help="head bundle folder written by `flipad convert`")
    p.add_argument("images", help=SRC_HELP)
    p.add_argument("--out", required=True, help="output .npy file (written atomically)")
    p.add_argument("--lam", type=float, default=_FEATURES.lam,
                   help=f"λ of the lasso (default {_FEATURES.lam:g})")
    p.add_argument("--mode", choices=["fast", "paper"], default="fast",
                   help="solver settings: ours (LassoOptions()) or the reference's "
                        "(LassoOptions.paper)")
    p.add_argument("--max-iter", type=int, default=None)
    p.add_argument("--tol", type=float, default=None)
    p.add_argument("--continuation", type=optional_float, default=BY_STOP_RULE,
                   metavar="ETA|none",
                   help="solve along a λ path shrinking by ETA per stage; none: at λ from the "
                        "start (fast mode; default: the stop rule's, 0.2 for the certified "
                        "stop; LassoOptions.continuation)")
    p.add_argument("--step-growth", type=optional_float, default=BY_STOP_RULE,
                   metavar="GAMMA|none",
                   help="backtracking with a step growing by GAMMA per accepted step; none: "
                        "the fixed step 1/L (fast mode; default: the stop rule's, 1.02 for the "
                        "certified stop; LassoOptions.step_growth)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--pool-to", type=optional_int, default=None, metavar="N|none",
                   help="max-pool the features to N×N as a FLIPAD detector does (default none: "
                        "the solutions as they are; the sidecar records it)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _add_float_input_flags(p)
    p.set_defaults(func=_run_invert)
    return p


def _run_invert(args) -> int:
    from pathlib import Path

    import numpy as np

    from flipad_jax.feature_files import write_feature_file
    from flipad_jax.features import max_pool_to
    from flipad_jax.head import Head
    from flipad_jax.images import load_images
    from flipad_jax.lasso import LassoOptions

    out = Path(args.out if args.out.endswith(".npy") else args.out + ".npy")
    head = Head.load(args.bundle)
    images = load_images(args.images, head.output_range, shape=head.out_shape,
                         shape_from="(the head's output)", **_float_inputs(args))
    options = LassoOptions.paper(head.op) if args.mode == "paper" else LassoOptions()
    changes = {k: v for k, v in (("max_iter", args.max_iter), ("tol", args.tol)) if v is not None}
    changes.update({k: v for k, v in (("continuation", args.continuation),
                                      ("step_growth", args.step_growth)) if v is not BY_STOP_RULE})
    options = options.replace(**changes)
    res = head.invert_batches(images, args.lam, batch_size=args.batch_size,
                              progress=args.progress, options=options)
    samples = [dict(index=i, iterations=int(res.iterations[i]),
                    objective=float(res.objective[i]), gap=float(res.gap[i]),
                    status=int(res.status[i]), clipped=int(res.clipped[i]))
               for i in range(len(images))]
    z = res.z if args.pool_to is None else max_pool_to(res.z, args.pool_to)
    write_feature_file(out, z, head=head, lam=args.lam, options=options,
                       pooled_to=args.pool_to, samples=samples)
    not_converged = int(np.sum(~res.converged))
    report(f"wrote {out} ({len(samples)} samples, {not_converged} not converged)")
    return 0


# -- shared helpers of fit / score / evaluate ----------------------------------------------------

METHOD_NAMES = {"flipad": "FLIPAD", "raw": "RawPAD", "dct": "DCTPAD", "sm_f": "SM-F",
                "sm_inv2": "SM-Inv₂"}


def _perturbation(text: str):
    from flipad_jax.perturbations import Perturbation

    try:
        return Perturbation.parse(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _add_perturb_flags(p) -> None:
    p.add_argument("--perturb", type=_perturbation, metavar="NAME=STRENGTH",
                   help="perturb every 8-bit input first (paper Table 3): blur=1|3, crop=60|55 "
                        "(of 64, scaled to the image size), noise=0.05|0.1, jpeg=90|80")
    p.add_argument("--perturb-seed", type=int, default=0, metavar="S",
                   help="seed of --perturb noise (each image's noise also depends on its name)")


def _add_float_input_flags(p) -> None:
    p.add_argument("--x-range", type=float_pair, metavar="LO,HI",
                   help="the scale of float array inputs, mapped onto the detector's image range "
                        "(e.g. 0,255); default: they are in it already, and values outside it "
                        "are refused. 8-bit pixels always map from 0-255")
    p.add_argument("--clip", action="store_true",
                   help="clip float inputs outside the image range into it on purpose instead "
                        "of refusing them")


def _float_inputs(args) -> dict:
    return dict(x_range=args.x_range, clip=args.clip)


def _float_input_note(args) -> str:
    """What fit did to float inputs, for its summary line: the detector itself stores nothing of
    it, as its inputs are always in its image range and the scale is a property of the files."""
    if args.x_range is not None:
        return f"; float inputs mapped from [{args.x_range[0]:g}, {args.x_range[1]:g}]"
    return "; float inputs clipped into the image range" if args.clip else ""


def _named_source(text: str) -> tuple:
    name, sep, source = text.partition("=")
    if not sep or not name or not source:
        raise argparse.ArgumentTypeError(f"{text!r}: expected NAME=SRC, e.g. real=data/real")
    return name, source


def _pixel_range(head):
    """The range 8-bit pixels are mapped to: the head's output range, else [-1, 1] (RawPAD and
    DCTPAD without a bundle; ``fit`` and ``score`` use the same mapping)."""
    return (-1.0, 1.0) if head is None else head.output_range


def _load_detector(path, bundle, generator=None):
    """(detector, pixel range) from a saved detector and, for FLIPAD, its head bundle (for
    SM-Inv₂, its generator bundle)."""
    from flipad_jax.detector import Detector
    from flipad_jax.detector_io import HeadMismatchError, embedded_bundle, read_meta
    from flipad_jax.head import Head
    from flipad_jax.sminv import SMInv2

    if SMInv2.is_saved(path):
        if generator is None:
            raise ValueError(f"{path}: an SM-Inv₂ detector: expected --generator DIR, the "
                             "generator bundle it was fitted with (flipad convert-generator)")
        gen = _load_generator(generator)
        return SMInv2.load(path, gen, progress=False), gen.output_range
    saved_head = read_meta(path)["head"]
    bundle = bundle or embedded_bundle(path)
    if saved_head is not None and bundle is None:
        raise ValueError(f"{path}: a FLIPAD detector, fitted with the head of "
                         f"{(saved_head.get('source') or {}).get('file') or 'a bundle'}: expected "
                         "--bundle DIR, the head bundle it was fitted with (it carries none)")
    head = None if bundle is None else Head.load(bundle)
    try:
        detector = Detector.load(path, head=head, progress=False)
    except HeadMismatchError as error:
        raise ValueError(f"--bundle {bundle} does not belong to the detector {path}: "
                         f"{error}") from None
    return detector, _pixel_range(head)


def _load_generator(path):
    from flipad_jax.generators import Generator

    gen = Generator.load(path)
    if gen.output_range is None:
        raise ValueError(f"--generator {path}: its images have no bounded range, so 8-bit "
                         "inputs cannot be mapped onto it")
    return gen


# -- fit -----------------------------------------------------------------------------------------

FIT_EXAMPLES = """\
examples:
  # FLIPAD on G's samples against real images; 10% of G's samples set the thresholds
  flipad fit --features flipad --bundle bundles/dcgan --model data/dcgan/train \\
             --other data/real/train --out detectors/dcgan-flipad
  # RawPAD with a separate validation set, other samples from two folders, quick settings
  flipad fit --features raw --model 'data/g/*.png' --val data/g_val --other data/real \\
             --other data/g2 --epochs 10 --fnr 0.05 --out det/
"""


def _add_fit_parser(subparsers):
    p = subparser(
        subparsers, "fit", FIT_EXAMPLES,
        help="fit a FLIPAD / RawPAD / DCTPAD / SM-F / SM-Inv₂ detector on G's samples",
        description="Train DeepSAD on features of G's samples (inliers) against other samples, "
                    "set the thresholds on G's validation samples, and save the detector.")
    p.add_argument("--features", choices=list(METHOD_NAMES), required=True,
                   help="flipad (needs --bundle), raw (RawPAD), dct (DCTPAD), sm_f (SM-F) or "
                        "sm_inv2 (SM-Inv₂, needs --generator; thresholds on --model itself)")
    p.add_argument("--bundle", help="head bundle of G (required for --features flipad)")
    p.add_argument("--generator", metavar="DIR",
                   help="generator bundle of G (flipad convert-generator; --features sm_inv2)")
    p.add_argument("--restarts", type=int, default=sminv_defaults.RESTARTS,
                   help=f"SM-Inv₂: Adam restarts per image (default {sminv_defaults.RESTARTS})")
    p.add_argument("--steps", type=int, default=sminv_defaults.STEPS,
                   help=f"SM-Inv₂: Adam steps per restart (default {sminv_defaults.STEPS})")
    p.add_argument("--model", action="append", required=True, metavar="SRC",
                   help=f"G's samples (repeatable): {SRC_HELP}")
    p.add_argument("--other", action="append", metavar="SRC",
                   help="samples not made by G: real images or another model's (repeatable)")
    val = p.add_mutually_exclusive_group()
    val.add_argument("--val", action="append", metavar="SRC",
                     help="G's validation samples for the thresholds (repeatable)")
    val.add_argument("--val-fraction", type=float, metavar="F",
                     help="without --val: the fraction of --model held out for validation by a "
                          "permutation seeded with --seed (default 0.1)")
    p.add_argument("--out", required=True, help="detector folder to write (atomically)")
    p.add_argument("--fnr", action="append", type=float, metavar="FNR",
                   help="false-negative rate to fit a threshold for (repeatable; default 0.005 "
                        "and 0.05)")
    p.add_argument("--epochs", type=int, default=_TRAINING.epochs)
    p.add_argument("--lr", type=float, default=_TRAINING.lr)
    p.add_argument("--batch-size", type=int, default=_TRAINING.batch_size,
                   help="DeepSAD batch size")
    p.add_argument("--lam", type=float, help=f"FLIPAD: λ of the lasso (default "
                                              f"{_FEATURES.lam:g})")
    p.add_argument("--max-iter", type=int, help="FLIPAD: solver iterations per image")
    p.add_argument("--pool-to", type=optional_int, default=argparse.SUPPRESS,
                   help="FLIPAD: reduce the activations to this size ('none': keep them; "
                        f"default the bundle's recorded size, else {_FEATURES.pool_to})")
    p.add_argument("--downsample", choices=DOWNSAMPLE_MODES,
                   help="FLIPAD: max-pool or centre-crop the activations (default the bundle's "
                        "recorded choice, e.g. crop for a --diffusers head, else maxpool)")
    p.add_argument("--size", type=optional_int, default=_FEATURES.size,
                   help="RawPAD: resize images to this size ('none': keep)")
    p.add_argument("--crop", type=optional_int, default=_FEATURES.crop,
                   help="DCTPAD: centre crop ('none': the whole image)")
    p.add_argument("--network", help="DeepSAD network (default: chosen from the feature shape)")
    p.add_argument("--network-opt", action="append", type=key_value, default=[],
                   metavar="KEY=VALUE", help="network option (repeatable), e.g. rep_dim=32, "
                                             "widths=[8,8,8]")
    p.add_argument("--top-k", type=int, help="keep the k most different channels")
    p.add_argument("--seed", type=int, default=_TRAINING.seed,
                   help="seed of the validation split, the network and the shuffling")
    _add_perturb_flags(p)
    _add_float_input_flags(p)
    p.add_argument("--features-from", action="store_true",
                   help="FLIPAD: --model/--other/--val are feature files of `flipad invert` "
                        "(their λ and solver settings become the detector's), not images")
    p.add_argument("--json", action="store_true",
                   help="print the result as one JSON object on stdout instead of text")
    add_output_flags(p)
    p.set_defaults(func=_run_fit)
    return p


def _run_fit(args) -> int:
    from flipad_jax._files import check_new_path
    from flipad_jax.detector import DEFAULT_FNRS, Detector
    from flipad_jax.head import Head
    from flipad_jax.images import list_images, read_images, split_validation
    from flipad_jax.metrics import check_fnr, min_validation_samples

    if args.features == "flipad" and args.bundle is None:
        raise ValueError("--features flipad: expected --bundle DIR, the head bundle of G")
    if args.features == "sm_inv2":
        return _fit_sm_inv2(args)
    if not args.other:
        raise ValueError(f"--features {args.features}: expected --other SRC, samples not made "
                         "by G")
    check_new_path(args.out, overwrite=args.overwrite)
    fnrs = sorted({check_fnr(f) for f in (args.fnr or DEFAULT_FNRS)})
    need = max(min_validation_samples(f) for f in fnrs)
    model_refs = list_images(args.model)
    model_src = " ".join(args.model)
    if args.val:
        val_refs = list_images(args.val)
        if len(val_refs) < need:
            raise ValueError(f"--val {' '.join(args.val)}: {len(val_refs)} images, expected at "
                             f"least {need} (⌈1/fnr⌉ for --fnr {min(fnrs)})")
    else:
        fraction = 0.1 if args.val_fraction is None else args.val_fraction
        model_refs, val_refs = split_validation(model_refs, fraction, need=need, seed=args.seed,
                                                what=f"--model {model_src}")
    head = None if args.bundle is None else Head.load(args.bundle)
    other_refs = list_images(args.other)
    lam = _FEATURES.lam if args.lam is None else args.lam
    lasso = _FEATURES.lasso.replace(**({} if args.max_iter is None else
                                       dict(max_iter=args.max_iter)))
    if args.features_from:
        from flipad_jax.feature_files import solve_settings

        if args.features != "flipad":
            raise ValueError(f"--features-from with --features {args.features}: expected "
                             "--features flipad (feature files hold FLIPAD features)")
        if args.perturb is not None or args.x_range is not None or args.clip:
            raise ValueError("--features-from: the features are computed already; expected no "
                             "--perturb, --x-range or --clip")
        if args.lam is not None or args.max_iter is not None:
            raise ValueError("--features-from with --lam/--max-iter: the features' own solve "
                             "(their sidecar) sets them; expected neither")
        _, lam, lasso = solve_settings(sorted({r.path for r in
                                               model_refs + val_refs + other_refs}))
    recorded = {} if head is None else head.meta.get("features", {})
    features = FeatureConfig(args.features, lam=lam,
                             pool_to=getattr(args, "pool_to", recorded.get("size",
                                                                           _FEATURES.pool_to)),
                             downsample=args.downsample or recorded.get("downsample", "maxpool"),
                             size=args.size, crop=args.crop, top_k=args.top_k, lasso=lasso)
    training = DeepSADConfig(network=args.network, network_kwargs=dict(args.network_opt),
                             epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                             seed=args.seed)
    detector = Detector(features, training=training, head=head, fnrs=fnrs,
                        progress=args.progress)
    if args.features_from:
        from flipad_jax.feature_files import read_feature_rows

        x_model, x_val, x_other = (read_feature_rows(refs, detector)
                                   for refs in (model_refs, val_refs, other_refs))
    else:
        pixels = _pixel_range(head)
        shape, shape_from = (None, "") if head is None else (
            head.out_shape, f"(the output of --bundle {args.bundle})")
        reading = dict(perturbation=args.perturb, seed=args.perturb_seed, **_float_inputs(args))
        x_model = read_images(model_refs, pixels, shape=shape, shape_from=shape_from,
                              progress=args.progress, **reading)
        like = dict(shape=x_model.shape[1:], shape_from=f"(the images of --model {model_src})",
                    progress=args.progress, **reading)
        x_val = read_images(val_refs, pixels, **like)
        x_other = read_images(other_refs, pixels, **like)
    detector.fit(x_model, x_other, x_val, precomputed=args.features_from)
    path = detector.save(args.out, overwrite=args.overwrite)
    _report_fit(args, path, detector.thresholds_, dict(
        features=args.features, n_model=len(x_model), n_other=len(x_other), n_val=len(x_val)),
        f"{args.features}: {len(x_model)} of G's images, {len(x_other)} others, "
        f"{len(x_val)} for validation{_float_input_note(args)}")
    return 0


def _report_fit(args, path, thresholds: dict, counts: dict, summary: str) -> None:
    """The fitted detector's path and thresholds: a JSON object with ``--json``, else lines."""
    if args.json:
        report(json.dumps({"path": str(path), **counts,
                           "thresholds": {f"{fnr:g}": tau for fnr, tau in sorted(
                               thresholds.items())}}))
        return
    report(f"wrote {path} ({summary})")
    for fnr, tau in sorted(thresholds.items()):
        report(f"  threshold at fnr={fnr:g}: {tau:.6g}")


def _fit_sm_inv2(args) -> int:
    """SM-Inv₂ fits no model: it inverts G's samples and sets τ on their scores (paper App. G)."""
    from flipad_jax._files import check_new_path
    from flipad_jax.detector import DEFAULT_FNRS
    from flipad_jax.images import list_images, read_images
    from flipad_jax.sminv import SMInv2

    if args.generator is None:
        raise ValueError("--features sm_inv2: expected --generator DIR, the generator bundle of "
                         "G (flipad convert-generator)")
    check_new_path(args.out, overwrite=args.overwrite)
    gen = _load_generator(args.generator)
    x = read_images(list_images(args.model), gen.output_range, shape=gen.out_shape,
                    shape_from=f"(the output of --generator {args.generator})",
                    progress=args.progress, perturbation=args.perturb, seed=args.perturb_seed,
                    **_float_inputs(args))
    det = SMInv2(gen, restarts=args.restarts, steps=args.steps, fnrs=args.fnr or DEFAULT_FNRS,
                 seed=args.seed, progress=args.progress).fit(x)
    det.save(args.out, overwrite=args.overwrite)
    _report_fit(args, args.out, det.thresholds_, dict(features="sm_inv2", n_model=len(x)),
                f"sm_inv2: thresholds on {len(x)} of G's images")
    return 0


# -- score ---------------------------------------------------------------------------------------

SCORE_EXAMPLES = """\
examples:
  # every PNG of a folder; rerun the same command after a kill to resume
  flipad score detectors/dcgan-flipad data/suspects --bundle bundles/dcgan --out scores.csv
  # arrays and globs, JSON lines; four hosts each score their part of the sorted inputs
  flipad score det/ x.npy 'more/*.png' --out part0.jsonl --shard 0/4
"""


def _add_score_parser(subparsers):
    p = subparser(
        subparsers, "score", SCORE_EXAMPLES,
        help="score images with a detector, streamed to CSV or JSONL (resumable)",
        description="Write one row per input image: its path (file.npy[i] for array rows), its "
                    "score (higher: less likely made by G) and the verdict 'made by G' at each "
                    "fitted fnr. Rows go to OUT.partial and it becomes OUT only when every input "
                    "is scored; a rerun after a kill resumes where it stopped.")
    p.add_argument("detector", help="detector folder written by `flipad fit`")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help=SRC_HELP)
    p.add_argument("--out", required=True, help="output FILE.csv or FILE.jsonl")
    p.add_argument("--bundle", help="head bundle (FLIPAD detectors; default: the one the "
                   "detector folder carries)")
    p.add_argument("--generator", metavar="DIR",
                   help="generator bundle (required for SM-Inv₂ detectors)")
    p.add_argument("--batch-size", type=int, default=256, help="images read and scored at once")
    p.add_argument("--shard", default="0/1", metavar="K/N",
                   help="score part K (from 0) of N contiguous parts of the sorted inputs")
    p.add_argument("--report", metavar="DIR",
                   help="also write an evidence report of these inputs to the new folder DIR "
                        "(scores them once more; see `flipad explain`)")
    _add_perturb_flags(p)
    _add_float_input_flags(p)
    p.add_argument("--features-from", action="store_true",
                   help="FLIPAD: the INPUTs are feature files of `flipad invert` (checked to be "
                        "the detector's head, λ and solver settings), not images")
    add_output_flags(p, "replace an existing OUT and --report DIR (and discard another run's "
                        "OUT.partial)")
    p.set_defaults(func=_run_score)
    return p


def _run_score(args) -> int:
    from pathlib import Path

    from flipad_jax import scoring
    from flipad_jax._files import check_new_path
    from flipad_jax.images import list_images

    out = scoring.check_output(args.out, overwrite=args.overwrite)
    k, n = scoring.parse_shard(args.shard)
    refs = scoring.shard(list_images(args.inputs), k, n)
    detector, pixels = _load_detector(args.detector, args.bundle, args.generator)
    if args.report is not None and args.features_from:
        raise ValueError("--report with --features-from: an evidence record is recomputed from "
                         "images; expected image inputs")
    if args.report is not None:  # refused before scoring, not after
        from flipad_jax.evidence import check_detector

        if args.x_range is not None or args.clip:
            raise ValueError("--report with --x-range/--clip: an evidence record is recomputed "
                             "from the input files as they are, so expected float inputs "
                             "already in the detector's image range (drop --report, or map the "
                             "arrays first)")
        _check_report_inputs(refs)
        check_new_path(args.report, overwrite=args.overwrite)
        check_detector(detector)
    sidecar = dict(detector=str(Path(args.detector).absolute()),
                   detector_sha256=scoring.detector_digest(args.detector), shard=f"{k}/{n}")
    path, resumed = scoring.write_scores(detector, refs, out, sidecar=sidecar,
                                         output_range=pixels, batch_size=args.batch_size,
                                         overwrite=args.overwrite, progress=args.progress,
                                         perturbation=args.perturb, seed=args.perturb_seed,
                                         features_from=args.features_from,
                                         **_float_inputs(args))
    report(f"wrote {path} ({len(refs)} rows" + (f", {resumed} of them resumed from an earlier run"
                                               if resumed else "") + ")")
    if args.report is not None:
        _write_report(args, detector, refs)
    return 0


# -- explain / verify: evidence reports (flipad_jax.evidence) ------------------------------------

EXPLAIN_EXAMPLES = """\
examples:
  flipad explain detectors/dcgan-flipad suspect.png --bundle bundles/dcgan --report evidence/
  flipad verify evidence/
"""


def _add_explain_parser(subparsers):
    p = subparser(
        subparsers, "explain", EXPLAIN_EXAMPLES,
        help="an evidence report: per image a checkable JSON record and one HTML page",
        description="Score images and write, per image, a JSON record a third party can check "
                    "with `flipad verify` (hashes of the image, bundle and detector, settings, "
                    "score, p-value, verdicts, the lasso's certificate, versions, command) and "
                    "one self-contained HTML page showing why.")
    p.add_argument("detector", help="detector folder written by `flipad fit`")
    p.add_argument("inputs", nargs="+", metavar="IMAGE", help=SRC_HELP)
    p.add_argument("--report", required=True, metavar="DIR", help="new report folder")
    p.add_argument("--bundle", help="head bundle (FLIPAD detectors; default: the one the "
                   "detector folder carries)")
    p.add_argument("--batch-size", type=int, default=256, help="images read and scored at once")
    _add_perturb_flags(p)
    add_output_flags(p, "replace an existing --report DIR")
    p.set_defaults(func=_run_explain)
    return p


def _check_report_inputs(refs) -> None:
    from flipad_jax.images import TABLE_SUFFIX

    tables = sorted({r.path for r in refs if r.path.lower().endswith(TABLE_SUFFIX)})
    if tables:
        raise ValueError(f"{tables[0]}: a {TABLE_SUFFIX} table: evidence reports record and show "
                         "images, expected image files or .npy arrays (score the rows without "
                         "--report)")


def _write_report(args, detector, refs):
    from flipad_jax.evidence import write_report

    from flipad_jax.detector_io import embedded_bundle

    bundle = args.bundle or embedded_bundle(args.detector)
    path, records = write_report(args.report, detector, refs, detector_path=args.detector,
                                 bundle_path=None if bundle is None else str(bundle),
                                 batch_size=args.batch_size,
                                 perturbation=args.perturb, seed=args.perturb_seed,
                                 overwrite=args.overwrite, command=args.argv,
                                 progress=args.progress)
    report(f"wrote {path} ({len(records)} records and index.html)")
    return records


def _run_explain(args) -> int:
    from flipad_jax._files import check_new_path
    from flipad_jax.images import list_images

    refs = list_images(args.inputs)
    _check_report_inputs(refs)
    check_new_path(args.report, overwrite=args.overwrite)
    detector, _ = _load_detector(args.detector, args.bundle)
    for rec in _write_report(args, detector, refs):
        verdicts = ", ".join(f"fnr {d['fnr']:g}: {'G' if d['made_by_g'] else 'not G'}"
                             for d in rec["decisions"])
        report(f"  {rec['image']['name']}: score {rec['score']:.6g}, p {rec['p_value']:.4g} "
              f"({verdicts})")
    return 0


def _add_verify_parser(subparsers):
    p = subparser(
        subparsers, "verify", EXPLAIN_EXAMPLES,
        help="recompute an evidence report from its inputs and say whether each record matches",
        description="Recompute every record of REPORT_DIR from the image, bundle and detector "
                    "paths it names and compare. Exit status 0: every record matches; 1: some "
                    "differ (listed) or cannot be recomputed.")
    p.add_argument("report", metavar="REPORT_DIR")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_run_verify)
    return p


def _run_verify(args) -> int:
    from flipad_jax.evidence import verify

    checks = verify(args.report, progress=args.progress)
    for check in checks:
        report(f"{'match' if check.ok else 'DIFFERS'}  {check.name}")
        for line in check.differences + [f"note: {n}" for n in check.notes]:
            report(f"    {line}")
    bad = sum(not c.ok for c in checks)
    report(f"{len(checks) - bad} of {len(checks)} records match")
    return 1 if bad else 0


# -- evaluate ------------------------------------------------------------------------------------

EVALUATE_EXAMPLES = """\
examples:
  flipad evaluate detectors/dcgan-flipad --bundle bundles/dcgan --model data/dcgan/test \\
                  --other real=data/real/test --other wgangp=data/wgangp/test --out reports/dcgan
"""


def _add_evaluate_parser(subparsers):
    p = subparser(
        subparsers, "evaluate", EVALUATE_EXAMPLES,
        help="accuracy and AUC of a detector against other sources (paper's table)",
        description="Score G's test samples and each other source; print accuracy at each "
                    "fitted fnr and the AUC per source G′ (flipad_jax.metrics.evaluate).")
    p.add_argument("detector", help="detector folder written by `flipad fit`")
    p.add_argument("--model", action="append", required=True, metavar="SRC",
                   help=f"G's test samples (repeatable): {SRC_HELP}")
    p.add_argument("--other", action="append", required=True, type=_named_source,
                   metavar="NAME=SRC", help="samples of another source G′ (repeatable)")
    p.add_argument("--bundle", help="head bundle (FLIPAD detectors; default: the one the "
                   "detector folder carries)")
    p.add_argument("--generator", metavar="DIR",
                   help="generator bundle (required for SM-Inv₂ detectors)")
    p.add_argument("--out", metavar="REPORT_DIR",
                   help="write table.md and records.json to this folder (atomically)")
    p.add_argument("--method-name", help="row label (default: FLIPAD, RawPAD or DCTPAD)")
    p.add_argument("--model-name", default="G", help="name of G in the table (default G)")
    p.add_argument("--batch-size", type=int, default=256, help="images read and scored at once")
    _add_perturb_flags(p)
    _add_float_input_flags(p)
    p.add_argument("--json", action="store_true",
                   help="print the result as one JSON object on stdout instead of text")
    add_output_flags(p)
    p.set_defaults(func=_run_evaluate)
    return p


def _run_evaluate(args) -> int:
    from flipad_jax import scoring
    from flipad_jax._files import check_new_path
    from flipad_jax.images import list_images
    from flipad_jax.metrics import evaluate

    names = [name for name, _ in args.other]
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:
        raise ValueError(f"--other {repeated[0]}=...: given twice, expected one source per name")
    if args.model_name in names:
        raise ValueError(f"--other {args.model_name}=...: the name of --model-name, expected "
                         "another name")
    if args.out is not None:
        check_new_path(args.out, overwrite=args.overwrite)
    detector, pixels = _load_detector(args.detector, args.bundle, args.generator)
    sources = {args.model_name: list_images(args.model)}
    sources.update((name, list_images(src)) for name, src in args.other)
    scores = {name: scoring.score_all(detector, refs, output_range=pixels,
                                      batch_size=args.batch_size, progress=args.progress,
                                      desc=f"scoring {name}", perturbation=args.perturb,
                                      seed=args.perturb_seed, **_float_inputs(args))
              for name, refs in sources.items()}
    s_model = scores.pop(args.model_name)
    method = args.method_name or METHOD_NAMES[detector.kind]
    records = [dict(rec, method=method, model=args.model_name)
               for rec in evaluate(s_model, scores, detector.thresholds_)]
    from flipad_jax.report import evaluation_report

    table, written = evaluation_report(
        records, detector.thresholds_, out=args.out, overwrite=args.overwrite,
        title=f"{method} detector of {args.model_name}",
        meta=dict(detector=str(args.detector), method=method, model=args.model_name,
                  perturb=None if args.perturb is None else str(args.perturb),
                  **_float_inputs(args),
                  sources=dict([(args.model_name, args.model)] + list(args.other)),
                  counts={name: len(refs) for name, refs in sources.items()}))
    if args.json:
        report(json.dumps({"records": records, "out": None if not written else str(args.out)}))
    else:
        report(table)
        if written:
            report(f"wrote {args.out}/table.md and records.json")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The parser, with subcommands that other packages register under the entry-point group
    ``flipad.subcommands`` (``converters`` adds convert and sample): flipad_jax never imports
    the torch side by name."""
    from importlib.metadata import entry_points

    from flipad_jax import __version__

    parser = argparse.ArgumentParser(
        prog="flipad", description="Single-model attribution of generative models by "
                                   "final-layer inversion (FLIPAD), in JAX.",
        epilog="@FILE reads further arguments from FILE, one per line.",
        fromfile_prefix_chars="@")
    parser.add_argument("--version", action="version", version=f"flipad-jax {__version__}")
    parser.add_argument("--verbose", action="store_true",
                        help="show the run's log messages on stderr and the traceback of an "
                             "unexpected error")
    parser.add_argument("--device", dest="jax_device", choices=DEVICES,
                        help="JAX platform to run on (default: JAX's choice, the accelerator if "
                             "one is installed; on GPUs XLA_PYTHON_CLIENT_PREALLOCATE=false "
                             "stops JAX from reserving most of the memory up front)")
    parser.add_argument("--log", metavar="FILE",
                        help="append the run's record (command, versions, device, results, exit "
                             "status) to FILE")
    parser.add_argument("--progress", dest="force_progress", action="store_true",
                        help="draw progress bars even when stderr is not a terminal")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for entry in sorted(entry_points(group="flipad.subcommands"), key=lambda e: e.name):
        entry.load()(subparsers)
    from flipad_jax._attribute_cli import add_attribute_parser, add_registry_parser

    for add in (_add_invert_parser, _add_fit_parser, _add_score_parser, _add_evaluate_parser,
                _add_explain_parser, _add_verify_parser, add_attribute_parser,
                add_registry_parser):
        add(subparsers)
    return parser


def main(argv=None) -> int:
    """Run a subcommand. Exit status: 0 done, 1 refused input (ValueError, OSError: the message
    names the value and what was expected), 2 usage error (argparse's convention), 3 an
    unexpected error, which is a bug (its traceback with ``--verbose``)."""
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv) if argv is None else ["flipad", *argv]  # recorded in evidence
    args.progress = show_progress(args)
    try:
        return _run_logged(args)
    except ValueError as error:  # the run log itself could not be set up
        print(f"flipad {args.command}: error: {error}", file=sys.stderr)
        return 1


def _run_logged(args) -> int:
    with run_log(args) as outcome:
        try:
            if args.jax_device is not None:  # convert/sample have their own torch --device
                LOGGER.info("device: %s", select_device(args.jax_device))
            outcome["status"] = args.func(args)
        except (ValueError, OSError) as error:
            print(f"flipad {args.command}: error: {error}", file=sys.stderr)
            outcome.update(status=1, error=str(error))
        except Exception as error:  # noqa: BLE001 - anything else is a bug, reported as one
            if args.verbose:
                import traceback
                traceback.print_exc()
            print(f"flipad {args.command}: internal error (a bug; please report it with the "
                  f"output of --verbose): {type(error).__name__}: {error}", file=sys.stderr)
            outcome.update(status=3, error=f"{type(error).__name__}: {error}")
    return outcome["status"]


if __name__ == "__main__":
    sys.exit(main())
