"""PNG in, verdict out: FLIPAD on a paper-size DCGAN head, ours against the reference pipeline.

The generator is the paper-size DCGAN (nz 100, ngf 64, 64×64×3, tanh) trained on Fashion-MNIST
(``converters/demo_weights/paper_size``, :mod:`converters.paper_gan`); its head, the last layer
ConvTranspose2d 64→3 (k4 s2 p1, z 64×32×32), is converted like any generator's
(:func:`converters.convert.convert`, eval-mode BatchNorm). Into a work folder (kept between runs
and keyed by the settings, so a second run reuses the bundle, the PNGs and the detector):

* 8-bit PNGs of G's samples (seeded latents, :func:`converters.sampling.sample`) and of real
  Fashion-MNIST test images (bicubic 28→64, grey repeated to three channels), for fitting and
  for the timed test set (half G's, half real);
* a FLIPAD detector fitted with our API (:class:`flipad_jax.Detector`, the solver of ``--stop``
  and ``--tol``, a short DeepSAD training: the detector's quality is not what is measured here).

Then the test PNGs go through both pipelines, batch by batch, each stage timed:

====================  ===========================================  ===========================================
stage                 ours (flipad_jax)                            reference (PyTorch, the authors' pipeline)
====================  ===========================================  ===========================================
read                  ``images.read_images`` (Pillow, → [−1, 1])   Pillow → (x/255 − 0.5)/0.5 (ToTensor+Normalize)
sigma_inv             ``Head.target`` (clip 1e-4, atanh)           clamp to ±(1 − 1e-4), atanh
invert                ``Head.invert_batches`` as ``flipad score``  ``reference_fista.reference_fista``: step
                      (cache-sized solves; step 1/L, restart;      0.025, α = λ = 5e-4, ≤ 10000 iterations,
                      ``--stop``/``--tol``, default certified      batch-wide change ≤ 1e-5, δ₀ = z̄
                      gap 1e-3 per sample)
features              max-pool to 32 (none here) + standardise     the same with the same statistics
deepsad               ``deepsad.score`` (Flax)                     ``deepsad.torch_deepsad`` with our weights
threshold             score ≤ τ (fnr 0.05)                         the same τ
====================  ===========================================  ===========================================

Both run warm: every compiled shape of ours runs once first (the solver with ``max_iter=1``,
which is a traced value and does not recompile), the reference's loop three iterations. The
lasso objective ½‖A z − o‖² + λ‖z − z̄‖₁ of both solutions is evaluated per sample in float64
with PyTorch against the same targets (bar: ours ≤ the reference's). The torch DeepSAD gets our
trained weights, so the two score columns differ only through the features; its agreement with
ours on identical features is reported as a check of the copy.

    OMP_NUM_THREADS=1 XLA_FLAGS="--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1" \
        python benchmarks/pipeline.py --n-images 32 --batch 16 --device cpu \
        --out benchmarks/results/pipeline_cpu.json
    # our per-sample change rule at 1e-4: at our step 1/L (21× the reference's 0.025 on this
    # head) a tighter gradient mapping than the reference's 1e-5 stops at
    ... python benchmarks/pipeline.py --stop change --tol 1e-4 \
        --out benchmarks/results/pipeline_cpu_change.json

(one thread each: on the shared 2-core CPU PyTorch's two OpenMP threads collapsed, 62 ms against
1.7 ms for one ConvTranspose2d call). Threads and load average are recorded.

Writes the JSON record to ``--out`` (images/s, their ratio ours / reference, mean objectives,
per-stage seconds and shares, verdict agreement, load average, versions).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import NamedTuple, Optional

import jax
import numpy as np
import torch

from deepsad import torch_deepsad  # benchmarks/ is on the path when run as a script
from reference_fista import layer_maps, reference_fista

WEIGHTS = Path(__file__).resolve().parent.parent / "converters/demo_weights/paper_size/dcgan.safetensors"
LAM = 5e-4
CLIP = 1e-4
FNR = 0.05  # 20 validation samples suffice (the paper's 0.005 needs 200)
STAGES = ("read", "sigma_inv", "invert", "features", "deepsad", "threshold")


# -- data and detector (cached in the work folder) ---------------------------------------------

def _write_real_pngs(folder: Path, images: np.ndarray) -> None:
    """uint8 ``(n, 3, H, W)`` → ``folder/{i:06d}.png`` (RGB), atomically."""
    from PIL import Image

    from flipad_jax._files import atomic_dir

    with atomic_dir(folder) as tmp:
        for i, img in enumerate(images):
            Image.fromarray(img.transpose(1, 2, 0)).save(tmp / f"{i:06d}.png")


def prepare(work: Path, weights: Path, n_fit: int, n_val: int, n_test: int, zbar_samples: int):
    """Bundle and PNG folders under ``work`` (made once): fit/{g,real}, val/g, test/{g,real}."""
    from converters.convert import convert
    from converters.sampling import sample
    from flipad_jax.datasets import fashion_mnist

    if not (work / "bundle").exists():
        convert(weights, work / "bundle", arch="dcgan", samples=zbar_samples, seed=0,
                progress=False)
    for split, n, seed in (("fit", n_fit, 1), ("val", n_val, 2), ("test", n_test, 3)):
        if not (work / split / "g").exists():
            sample(weights, n, work / split / "g", arch="dcgan", seed=seed, progress=False)
    real = None
    for split, lo, n in (("fit", 0, n_fit), ("test", n_fit, n_test)):
        if not (work / split / "real").exists():
            if real is None:  # the test split, which G never saw
                real = np.repeat(fashion_mnist("test", 64)[:n_fit + n_test], 3, axis=1)
            _write_real_pngs(work / split / "real", real[lo:lo + n])


def fitted_detector(work: Path, head, n_fit: int, epochs: int, batch: int, lasso):
    """Our FLIPAD detector on fit/g (+1) vs fit/real (−1), thresholds on val/g, its features
    solved with ``lasso`` (a :class:`flipad_jax.LassoOptions`); saved in a folder named by the
    stop rule, tolerance and a hash of all the solver settings, or loaded when a previous run
    saved it."""
    import flipad_jax as fj
    from flipad_jax.images import list_images, read_images

    settings = hashlib.sha256(json.dumps(lasso.to_json(), sort_keys=True).encode()).hexdigest()
    path = work / (f"detector_{lasso.stop}_{lasso.tol_for(head.op, head.zbar.dtype):g}_"
                   f"{settings[:8]}")
    if path.exists():
        return fj.Detector.load(path, head=head, progress=False)
    read = lambda d: read_images(list_images(work / d), head.output_range)  # noqa: E731
    det = fj.Detector(fj.FeatureConfig("flipad", lam=LAM, invert_batch_size=batch, lasso=lasso),
                      training=fj.DeepSADConfig(epochs=epochs, batch_size=min(128, 2 * n_fit)),
                      head=head, fnrs=(FNR,),
                      progress=False)
    det.fit(read("fit/g"), read("fit/real"), read("val/g"))
    det.save(path)
    return det


# -- the two pipelines -------------------------------------------------------------------------

class Clock:
    """Seconds per stage, summed over batches; ``stage(name, fn)`` runs fn and blocks on it."""

    def __init__(self):
        self.seconds = dict.fromkeys(STAGES, 0.0)

    def stage(self, name, fn, *args):
        start = time.perf_counter()
        out = jax.block_until_ready(fn(*args))
        self.seconds[name] += time.perf_counter() - start
        return out


def ours_batch(clock: Clock, det, net, refs, lasso):
    """One batch through our pipeline → (verdicts, scores, z, iterations, converged)."""
    from flipad_jax.deepsad import score
    from flipad_jax.features import check_solved, downsample
    from flipad_jax.images import read_images
    from flipad_jax.metrics import made_by_g

    head, fc, state = det.head, det.feature_config, det.state_
    x = clock.stage("read", read_images, refs, head.output_range)
    # σ⁻¹ timed on its own for the stage table; the product's path below
    # (Detector.features_and_inversion: cache-sized solves on a CPU) applies it again inside,
    # which costs 1e-4 of the invert stage
    clock.stage("sigma_inv", head.target, x)
    res = clock.stage("invert", lambda: head.invert_batches(x, fc.lam, batch_size=len(refs),
                                                            options=lasso).lasso)

    def features():
        check_solved(res.status)
        return state.standardizer(downsample(res.z, fc.pool_to, fc.downsample))

    f = clock.stage("features", features)
    s = clock.stage("deepsad", score, net, state.model, f)
    verdict = clock.stage("threshold", made_by_g, s, det.threshold(FNR))
    return (np.asarray(verdict), np.asarray(s), np.asarray(res.z), np.asarray(res.iterations),
            np.asarray(res.converged))


class Layer(NamedTuple):
    """The head's last layer in PyTorch: float32 weight, bias (or None), z̄ and geometry."""
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    zbar: torch.Tensor
    geometry: dict


def _tensor(a, device) -> torch.Tensor:
    return torch.from_numpy(np.array(a, np.float32)).to(device)


def layer(head, device) -> Layer:
    op, t = head.op, lambda a: _tensor(a, device)  # noqa: E731
    return Layer(t(op.weight), None if head.bias is None else t(head.bias), t(head.zbar),
                 dict(stride=tuple(op.stride), padding=tuple(op.padding)))


class Reference:
    """The reference pipeline in PyTorch, with our detector's weights, statistics and τ."""

    def __init__(self, det, device, max_iter):
        head, state = det.head, det.state_
        name, kwargs = state.network
        if name != "lenet_64channels" or kwargs.get("channels") is not None:
            raise SystemExit(f"network {name} {kwargs}: the torch copy covers lenet_64channels "
                             "on all channels")
        if tuple(det.feature_shape_) != tuple(head.in_shape):
            raise SystemExit(f"features {det.feature_shape_} from activations {head.in_shape}: "
                             "the torch side covers heads whose activations are not pooled")
        self.device, self.max_iter = torch.device(device), max_iter
        t = lambda a: _tensor(a, self.device)  # noqa: E731
        self.weight, self.bias, self.zbar, self.geometry = layer(head, self.device)
        self.mean, self.std = t(state.standardizer.mean), t(state.standardizer.std)
        self.eps, self.tau = state.standardizer.eps, det.threshold(FNR)
        self.center = t(state.model.center)
        self.net = copy_lenet(state.model.variables, tuple(det.feature_shape_)).to(self.device)

    def _read(self, refs):
        from PIL import Image

        pixels = np.stack([np.asarray(Image.open(r.path).convert("RGB")) for r in refs])
        x = torch.from_numpy(pixels).to(self.device).permute(0, 3, 1, 2).float() / 255.0
        return (x - 0.5) / 0.5

    def _invert(self, o, max_iter=None):
        return reference_fista("conv_transpose2d", self.weight, self.bias, o, self.zbar,
                               lr=0.025, alpha=LAM, max_iter=max_iter or self.max_iter,
                               tol=1e-5, **self.geometry)

    @torch.no_grad()
    def scores(self, f):
        return torch.sum((self.net(f) - self.center) ** 2, dim=1)

    def batch(self, clock: Clock, refs):
        """One batch → (verdicts, scores, z, iterations)."""
        sync = lambda v: (torch.cuda.synchronize() if v is not None  # noqa: E731
                          and self.device.type == "cuda" else None, v)[1]
        x = clock.stage("read", lambda: sync(self._read(refs)))
        o = clock.stage("sigma_inv", lambda: sync(torch.atanh(x.clamp(-1 + CLIP, 1 - CLIP))))
        z, iters = clock.stage("invert", lambda: sync(self._invert(o)))
        f = clock.stage("features", lambda: sync((z - self.mean) / (self.std + self.eps)))
        s = clock.stage("deepsad", lambda: sync(self.scores(f)))
        verdict = clock.stage("threshold", lambda: sync(s <= self.tau))
        return verdict.cpu().numpy(), s.cpu().numpy(), z.cpu().numpy(), iters, o.cpu().numpy()


def copy_lenet(variables, shape):
    """``benchmarks.deepsad.torch_deepsad`` holding our Flax LeNet's weights and running
    statistics, in eval mode (kernels HWIO → OIHW, dense (in, out) → (out, in))."""
    params, stats = variables["params"], variables["batch_stats"]
    widths = tuple(params[f"conv{i}"]["kernel"].shape[-1] for i in range(len(params) - 1))
    net = torch_deepsad(torch, shape, widths, rep_dim=params["fc"]["kernel"].shape[1])
    with torch.no_grad():
        for i, (conv, bn) in enumerate(zip(net.convs, net.bns)):
            conv.weight.copy_(torch.from_numpy(np.array(params[f"conv{i}"]["kernel"])
                                               .transpose(3, 2, 0, 1)))
            bn.running_mean.copy_(torch.from_numpy(np.array(stats[f"bn{i}"]["mean"])))
            bn.running_var.copy_(torch.from_numpy(np.array(stats[f"bn{i}"]["var"])))
        net.fc.weight.copy_(torch.from_numpy(np.array(params["fc"]["kernel"]).T))
    return net.eval()


def objective64(ref, o, z):
    """½‖A z + b − o‖² + λ‖z − z̄‖₁ per sample, float64, PyTorch on the CPU (the layer's
    weight, bias, geometry and z̄ read from ``ref``, a :class:`Reference` or a :class:`Layer`)."""
    w = ref.weight.cpu().double()
    forward, _ = layer_maps("conv_transpose2d", w, **ref.geometry)
    z = torch.from_numpy(np.asarray(z, np.float64))
    out = forward(z)
    if ref.bias is not None:
        out = out + ref.bias.cpu().double().view(1, -1, 1, 1)
    res = (out - torch.from_numpy(np.asarray(o, np.float64))).flatten(1)
    l1 = (z - ref.zbar.cpu().double()).abs().flatten(1).sum(1)
    return (0.5 * (res ** 2).sum(1) + LAM * l1).numpy()


def work_folder(args) -> Path:
    """The cache folder of these settings under ``args.work``, prepared (bundle and PNGs)."""
    from flipad_jax._files import sha256_file

    key = hashlib.sha256(json.dumps([sha256_file(args.weights),
                                     args.n_fit, args.n_val, args.n_images, args.epochs,
                                     args.batch, args.zbar_samples]).encode()).hexdigest()[:12]
    work = args.work / key
    prepare(work, args.weights, args.n_fit, args.n_val, args.n_images // 2, args.zbar_samples)
    return work


# -- the run -----------------------------------------------------------------------------------

def run(args) -> dict:
    from flipad_jax.head import Head
    from flipad_jax.images import list_images
    from flipad_jax.lasso import LassoOptions
    from flipad_jax.networks import build_network

    work = work_folder(args)
    head = Head.load(work / "bundle")
    start = time.perf_counter()
    det = fitted_detector(work, head, args.n_fit, args.epochs, args.batch,
                          LassoOptions(stop=args.stop, tol=args.tol))
    fit_s = time.perf_counter() - start
    net = build_network(det.network_[0], **det.network_[1])
    ref = Reference(det, args.device, args.ref_max_iter)
    lasso = det.feature_config.lasso

    refs = list_images(work / "test/g") + list_images(work / "test/real")
    labels = np.r_[np.ones(args.n_images // 2, bool), np.zeros(args.n_images // 2, bool)]
    batches = [refs[i:i + args.batch] for i in range(0, len(refs), args.batch)]

    # warm-up: ours runs every batch once (its solver compiles a program for each width it
    # sheds stopped samples to), the reference every batch shape
    for b in batches:
        ours_batch(Clock(), det, net, b, lasso)
    for size in sorted({len(b) for b in batches}):
        o = ref._read(batches[0][:size])
        z, _ = ref._invert(torch.atanh(o.clamp(-1 + CLIP, 1 - CLIP)), max_iter=3)
        ref.scores((z - ref.mean) / (ref.std + ref.eps))

    load_before = os.getloadavg()
    ours_clock = Clock()
    ours = [ours_batch(ours_clock, det, net, b, lasso) for b in batches]
    ref_clock = Clock()
    theirs = [ref.batch(ref_clock, b) for b in batches]
    load_after = os.getloadavg()

    o = np.concatenate([r[4] for r in theirs])
    cat = lambda parts, i: np.concatenate([p[i] for p in parts])  # noqa: E731
    obj = {"ours": objective64(ref, o, cat(ours, 2)), "reference": objective64(ref, o, cat(theirs, 2))}
    # the copy check: the torch network on our features scores as ours does
    f_ours = (torch.from_numpy(cat(ours, 2)).to(ref.device) - ref.mean) / (ref.std + ref.eps)
    torch_on_ours = ref.scores(f_ours).cpu().numpy()
    total = {k: sum(c.seconds.values()) for k, c in (("ours", ours_clock), ("reference", ref_clock))}
    rate = {k: len(refs) / v for k, v in total.items()}
    verdicts = {"ours": cat(ours, 0), "reference": cat(theirs, 0)}
    return {
        "images_per_s": rate,
        "ratio": rate["ours"] / rate["reference"],
        "objective": {k: float(v.mean()) for k, v in obj.items()},
        "objective_ours_le_reference": float(np.mean(obj["ours"] <= obj["reference"] * (1 + 1e-7))),
        "stages_s": {"ours": ours_clock.seconds, "reference": ref_clock.seconds},
        "stage_share": {k: {s: v / total[k] for s, v in c.seconds.items()}
                        for k, c in (("ours", ours_clock), ("reference", ref_clock))},
        "iterations": {"ours_mean": float(cat(ours, 3).mean()), "ours_max": int(cat(ours, 3).max()),
                       "ours_certified": float(cat(ours, 4).mean()),
                       "ours_per_batch": [int(r[3].max()) for r in ours],
                       "reference_per_batch": [int(r[3]) for r in theirs]},
        "accuracy": {k: float(np.mean(v == labels)) for k, v in verdicts.items()},
        "verdict_agreement": float(np.mean(verdicts["ours"] == verdicts["reference"])),
        "score_copy_max_rel_dev": float(np.max(np.abs(torch_on_ours - cat(ours, 1))
                                               / np.maximum(np.abs(cat(ours, 1)), 1e-12))),
        "n_images": len(refs), "batch": args.batch, "detector_fit_s": round(fit_s, 1),
        "detector": {"n_fit_per_class": args.n_fit, "n_val": args.n_val,
                     "deepsad_epochs": args.epochs, "fnr": FNR, "lam": LAM,
                     "lasso": lasso.to_json(), "lipschitz": float(head.lipschitz)},
        "device": (f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores; "
                   f"jax {jax.__version__} on {jax.devices()[0].device_kind}, torch "
                   f"{torch.__version__} on {args.device} ({torch.get_num_threads()} threads)"),
        "threads": {"torch": torch.get_num_threads(),
                    "XLA_FLAGS": os.environ.get("XLA_FLAGS", "")},
        "load_average": {"before": load_before, "after": load_after},
        "command": "python benchmarks/pipeline.py " + " ".join(sys.argv[1:]),
    }


def parser(description: str) -> argparse.ArgumentParser:
    """The options that pick the work folder and the reference (shared with
    ``pipeline_oracle.py``)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--n-images", type=int, default=32, help="timed test PNGs, half G's, half real")
    p.add_argument("--batch", type=int, default=16, help="images per solve, both pipelines")
    p.add_argument("--device", default="cpu", help="torch device of the reference (cpu, cuda)")
    p.add_argument("--out", type=Path, help="JSON record to write")
    p.add_argument("--weights", type=Path, default=WEIGHTS, help="paper-size DCGAN weights")
    p.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "flipad_pipeline",
                   help="cache folder (bundle, PNGs, detector), one subfolder per setting")
    p.add_argument("--n-fit", type=int, default=32, help="detector: G's and real PNGs each")
    p.add_argument("--n-val", type=int, default=20, help="detector: G's validation PNGs")
    p.add_argument("--epochs", type=int, default=10, help="detector: DeepSAD epochs")
    p.add_argument("--zbar-samples", type=int, default=2000, help="latents for the head's z̄")
    p.add_argument("--ref-max-iter", type=int, default=10000, help="reference FISTA cap")
    return p


def main(argv=None):
    p = parser(__doc__.split("\n")[0])
    p.add_argument("--stop", choices=("gap", "change"), default="gap",
                   help="our stop rule, per sample: certified duality gap (the default of "
                        "flipad fit/score) or the change of z")
    p.add_argument("--tol", type=float, default=None,
                   help="its tolerance (default: LassoOptions' — gap 1e-3 relative, change 1e-5)")
    args = p.parse_args(argv)
    check_sizes(args)
    return write_record(run(args), args.out)


def check_sizes(args) -> None:
    if args.n_images < 2 or args.n_images % 2:
        raise SystemExit(f"--n-images {args.n_images}: expected an even number >= 2")
    if args.n_val < 20:
        raise SystemExit(f"--n-val {args.n_val}: expected >= 20 for the threshold at fnr {FNR}")


def write_record(record: dict, out: Optional[Path]) -> dict:
    """Print the JSON record and write it atomically to ``out`` (if given)."""
    from flipad_jax.report import write_text

    text = json.dumps(record, indent=2) + "\n"
    if out:
        write_text(out, text)
    print(text)
    return record


if __name__ == "__main__":
    main()
