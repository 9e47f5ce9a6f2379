"""``flipad convert`` and ``flipad sample``: argparse subcommands for ``flipad_jax.cli``.

This module imports no torch at import time (``flipad --help`` works without it); the work is
done by :func:`converters.convert.convert` and :func:`converters.sampling.sample`, imported
when a subcommand runs. Each subcommand's ``func(args)`` returns the exit code: 0 on success,
1 on a refused input (message on stderr; nothing is written).
"""

from __future__ import annotations

import argparse
import sys

from flipad_jax._argparse import add_output_flags, key_value, subparser

ARCH_NAMES = "dcgan, wgangp, ebgan, lsgan, medigan_dcgan, klwgan, sd_vae_last"

CONVERT_EXAMPLES = """\
examples:
  # weights of a reference architecture (state_dict via torch.load(weights_only=True))
  flipad convert netG_epoch_49.pth --arch dcgan --out bundles/dcgan
  # the Fashion-MNIST demo size: 1 channel, 32x32
  flipad convert g.safetensors --arch dcgan --arch-opt nc=1 --arch-opt image_size=32 --out b/
  # TorchScript or torch.export programs carry their architecture
  flipad convert generator.ts --latent-shape 100,1,1 --out bundles/g
  flipad convert generator.pt2 --out bundles/g --samples 5000 --seed 3
  # the reference's training-mode BatchNorm (use the same mode for `flipad sample`)
  flipad convert netG.pth --arch lsgan --bn-mode train --out bundles/lsgan
  # a Stable Diffusion VAE (pip install 'flipad-jax[diffusers]'): decoder.conv_out, local files
  flipad convert --diffusers sd-2-1-base/vae --out bundles/sd21 --downsample crop
"""

SAMPLE_EXAMPLES = """\
examples:
  # train / val / test sets from three seeds (disjoint latents), quantised PNGs
  flipad sample netG.pth --arch dcgan --n 10000 --seed 1 --out data/dcgan/train
  flipad sample netG.pth --arch dcgan --n 1000 --seed 2 --out data/dcgan/val
  flipad sample netG.pth --arch dcgan --n 1000 --seed 3 --out data/dcgan/test
  # full precision, any output shape (e.g. tabular): one samples.npy
  flipad sample klwgan.pth --arch klwgan --n 100000 --format npy --out data/klwgan/train
"""


def _ints(text: str) -> tuple:
    try:
        values = tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated ints, e.g. 100,1,1")
    return values


def _range(text: str) -> tuple:
    try:
        low, high = (float(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected low,high, e.g. -1,1")
    return low, high


def _model_arguments(p: argparse.ArgumentParser, model_help: str, model=None) -> None:
    """MODEL, --out, --arch and --arch-opt: how every converter subcommand names its input
    (MODEL is added to ``model``, a group, when given)."""
    (p if model is None else model).add_argument(
        "model", metavar="MODEL", help=model_help, **({} if model is None else {"nargs": "?"}))
    p.add_argument("--out", required=True, metavar="DIR", help="folder to create")
    p.add_argument("--arch", metavar="NAME", help=f"architecture of a weights file: {ARCH_NAMES}")
    p.add_argument("--arch-opt", action="append", type=key_value, default=[], metavar="KEY=VALUE",
                   help="architecture option (repeatable), e.g. nc=1, image_size=32, nz=100")


def _common(p: argparse.ArgumentParser, batch_size: str, model=None) -> None:
    _model_arguments(p, "state_dict (.pt/.pth) or .safetensors with --arch, TorchScript file, "
                        "or torch.export program (.pt2)", model)
    p.add_argument("--latent-shape", type=_ints, metavar="D,...",
                   help="per-sample latent shape, e.g. 100,1,1 (default: from the architecture)")
    p.add_argument("--seed", type=int, default=0, help="latent seed (default 0)")
    p.add_argument("--batch-size", type=int, help=f"latents per forward pass ({batch_size})")
    p.add_argument("--bn-mode", choices=("eval", "train"), default="eval",
                   help="BatchNorm statistics: eval = running (default), train = per batch "
                   "(the reference's behaviour)")
    p.add_argument("--device", help="torch device (default: cuda, then mps, then cpu)")
    p.add_argument("--output-range", type=_range, metavar="LOW,HIGH",
                   help="range of the images for heads without tanh/sigmoid, e.g. -1,1")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow a fully pickled module: this EXECUTES code from the file")
    add_output_flags(p)


def _fail(command: str, error: Exception) -> int:
    print(f"flipad {command}: error: {error}", file=sys.stderr)
    return 1


def _run_convert(args) -> int:
    if args.diffusers is not None:
        return _run_convert_diffusers(args)
    if args.downsample is not None or args.downsample_size is not None:
        return _fail("convert", ValueError("--downsample/--downsample-size: expected them only "
                                           "with --diffusers"))
    from converters.convert import convert
    try:
        result = convert(args.model, args.out, arch=args.arch, arch_options=dict(args.arch_opt),
                         latent_shape=args.latent_shape,
                         samples=10000 if args.samples is None else args.samples,
                         layer=args.layer,
                         seed=args.seed, batch_size=args.batch_size, bn_mode=args.bn_mode,
                         device=args.device, trust_pickle=args.trust_pickle,
                         output_range=args.output_range,
                         check_samples=64 if args.check_samples is None else args.check_samples,
                         check_dtype=args.check_dtype or "float32", overwrite=args.overwrite,
                         progress=args.progress)
    except ValueError as e:
        return _fail("convert", e)
    _report_conversion(result)
    return 0


def _run_convert_diffusers(args) -> int:
    ignored = [flag for flag, used in (
        ("--arch", args.arch), ("--arch-opt", args.arch_opt), ("--layer", args.layer),
        ("--trust-pickle", args.trust_pickle), ("--output-range", args.output_range),
        ("--bn-mode train", args.bn_mode != "eval")) if used]
    if ignored:
        return _fail("convert", ValueError(
            f"{', '.join(ignored)}: not used with --diffusers (the head is decoder.conv_out, "
            "identity, images in [-1, 1])"))
    from converters.diffusers_vae import convert_diffusers
    given = {k: v for k, v in (("samples", args.samples), ("batch_size", args.batch_size),
                               ("check_samples", args.check_samples),
                               ("check_dtype", args.check_dtype),
                               ("downsample", args.downsample),
                               ("downsample_size", args.downsample_size)) if v is not None}
    try:
        result = convert_diffusers(args.diffusers, args.out, latent_shape=args.latent_shape,
                                   seed=args.seed, device=args.device, overwrite=args.overwrite,
                                   progress=args.progress, **given)
    except ValueError as e:
        return _fail("convert", e)
    _report_conversion(result)
    return 0


def _report_conversion(result) -> None:
    meta = result.meta
    check = meta["self_check"]
    print(f"wrote {result.path}: layer {meta['layer']['name']!r} ({meta['layer']['kind']}, "
          f"{meta['in_shape']} -> {meta['out_shape']}), activation {meta['activation']}, "
          f"zbar from {meta['zbar']['n_samples']} latents, ||A||^2 = {meta['lipschitz']:.6g}; "
          f"self-check max abs error {check['max_abs_error']:.3g} ({check['dtype']}, "
          f"{check['n_samples']} samples, tolerance {check['tolerance']:g}); "
          f"{result.seconds:.1f} s")
    if "features" in meta:
        print(f"FLIPAD features: {meta['features']['downsample']} to "
              f"{meta['features']['size']} (flipad fit's default for this bundle)")


def _run_sample(args) -> int:
    from converters.sampling import sample
    try:
        out = sample(args.model, args.n, args.out, arch=args.arch,
                     arch_options=dict(args.arch_opt), latent_shape=args.latent_shape,
                     seed=args.seed, start=args.start,
                     batch_size=500 if args.batch_size is None else args.batch_size,
                     fmt=args.format, bn_mode=args.bn_mode, device=args.device,
                     trust_pickle=args.trust_pickle, output_range=args.output_range,
                     overwrite=args.overwrite, progress=args.progress)
    except ValueError as e:
        return _fail("sample", e)
    print(f"wrote {args.n} samples ({args.format}) to {out}")
    return 0


def add_convert_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``flipad convert`` on an argparse subparsers object."""
    p = subparser(
        subparsers, "convert", CONVERT_EXAMPLES, help="PyTorch generator -> verified head bundle",
        description="Find the generator's last linear layer and its activation by tracing a "
        "forward pass, compute the mean activation zbar, check that the JAX head reproduces the "
        "generator's images, and write the head bundle (head.safetensors + head.json). "
        "With --diffusers, the head is a diffusers AutoencoderKL's decoder.conv_out.")
    source = p.add_mutually_exclusive_group(required=True)
    _common(p, batch_size="default 128 with --bn-mode train, else 500; --diffusers: 8",
            model=source)
    source.add_argument("--diffusers", metavar="DIR",
                        help="a local diffusers AutoencoderKL folder (config.json + "
                             "diffusion_pytorch_model.safetensors; or a pipeline folder with "
                             "vae/): invert its decoder's conv_out (needs the diffusers extra)")
    p.add_argument("--downsample", choices=("crop", "maxpool"),
                   help="--diffusers: FLIPAD's reduction of the activations, recorded as flipad "
                        "fit's default (default crop, the reference's SD runs)")
    p.add_argument("--downsample-size", type=int, metavar="N",
                   help="--diffusers: the size it reduces to (default 128)")
    p.add_argument("--samples", type=int,
                   help="latents for zbar (default 10000; --diffusers: 5000)")
    p.add_argument("--layer", metavar="NAME",
                   help="layer to invert (default: the last Conv2d/ConvTranspose2d/Linear run)")
    p.add_argument("--check-samples", type=int,
                   help="latents for the self-check (default 64; --diffusers: 4)")
    p.add_argument("--check-dtype", choices=("float32", "float64"),
                   help="self-check precision: float32 (tolerance 1e-4, the default) or float64 "
                        "(1e-5, the default with --diffusers)")
    p.set_defaults(func=_run_convert)
    return p


def add_sample_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``flipad sample`` on an argparse subparsers object."""
    p = subparser(
        subparsers, "sample", SAMPLE_EXAMPLES, help="write N samples of a PyTorch generator",
        description="Write samples (latents START..START+N-1 of SEED, recorded in samples.json) "
        "as quantised PNGs ({index:06d}.png) or one full-precision samples.npy.")
    _common(p, batch_size="default 500, the reference's")
    p.add_argument("--n", type=int, required=True, help="number of samples")
    p.add_argument("--start", type=int, default=0, help="index of the first latent (default 0)")
    p.add_argument("--format", choices=("png", "npy"), default="png",
                   help="png (8-bit, as in the paper) or npy (float32)")
    p.set_defaults(func=_run_sample)
    return p


GENERATOR_EXAMPLES = """\
examples:
  # the whole generator for SM-Inv₂ (flipad fit --features sm_inv2 --generator gens/dcgan)
  flipad convert-generator netG.pth --arch dcgan --out gens/dcgan
"""


def _run_convert_generator(args) -> int:
    from converters.full_generator import convert_generator
    try:
        result = convert_generator(args.model, args.out, arch=args.arch,
                                   arch_options=dict(args.arch_opt),
                                   trust_pickle=args.trust_pickle,
                                   check_dtype=args.check_dtype, overwrite=args.overwrite)
    except ValueError as e:
        return _fail("convert-generator", e)
    check = result.meta["self_check"]
    print(f"wrote {result.path}: {result.meta['arch']} generator, "
          f"{result.meta['latent_shape']} -> {result.meta['out_shape']}; self-check max abs "
          f"error {check['max_abs_error']:.3g} ({check['dtype']}); {result.seconds:.1f} s")
    return 0


def add_convert_generator_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``flipad convert-generator`` on an argparse subparsers object."""
    p = subparser(
        subparsers, "convert-generator", GENERATOR_EXAMPLES,
        help="PyTorch generator -> verified whole-generator bundle (for SM-Inv₂)",
        description="Port every layer of the generator to JAX (eval-mode BatchNorm), check the "
        "JAX forward against torch's on seeded latents, and write generator.safetensors + "
        "generator.json. Needed by the SM-Inv₂ baseline, which inverts all of G.")
    _model_arguments(p, "state_dict (.pt/.pth) or .safetensors with --arch, or a pickled "
                        "module with --trust-pickle")
    p.add_argument("--check-dtype", choices=("float32", "float64"), default="float64",
                   help="self-check precision (default float64)")
    p.add_argument("--trust-pickle", action="store_true",
                   help="allow a fully pickled module: this EXECUTES code from the file")
    add_output_flags(p)
    p.set_defaults(func=_run_convert_generator)
    return p

