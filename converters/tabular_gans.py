"""Train the tabular experiment's generators on the wine data (the paper's Table 5 / Table 15).

Data: :func:`flipad_jax.tabular.wine_splits` (the authors' preprocessing: shuffled, column-
permuted, whitened; red 1296 / white 3969 training rows). Every generator trains on the training
rows and samples in that whitened space.

* **KL-WGAN** (Song & Ermon 2020), as the authors' ``train_klwgan.py``: the ``klwgan`` generator
  of :mod:`converters.generators` (noise 10 → 300 → SN 300 → d); discriminator SN-Linear d→300,
  LeakyReLU(0.01), SN-Linear 300→300, LeakyReLU, SN-Linear 300→1; hinge loss; per batch 5
  discriminator steps on the same real batch with fresh noise each, then one generator step;
  RMSprop lr 2e-4 for both; 500 epochs of batches of 256 in the fixed (pre-shuffled) row order,
  the last batch partial. Shipped as weights: ``klwgan_<data>.safetensors``.
* **CTGAN, TVAE, CopulaGAN** from SDV (``pip install -e ".[tabular]"``), default settings but
  ``epochs=500``, as the authors' ``train_sdv_models.py``, and CopulaGAN's marginals truncated
  Gaussian, the default of the sdv they pin (``SDV_SETTINGS``). SDV saves models as pickles, so what
  ships is their samples, ``sdv_<data>.npz`` (float32 ``(n, d)`` arrays, read with
  ``allow_pickle=False``): only the sets the experiment uses, TVAE's training and test rows (the
  detectors' negative class) and CTGAN's and CopulaGAN's test rows (``SDV_SAMPLES``).

Each run writes a training record JSON beside its files (seeds, epochs, seconds, versions, the
SHA-256 of the wine CSV, the MMD of the samples to the test rows). Scripts that produced the
shipped files::

    python -m converters.tabular_gans klwgan --out converters/demo_weights/tabular --threads 1
    python -m converters.tabular_gans sdv --out converters/demo_weights/tabular --threads 1
    # CopulaGAN refitted with SDV_SETTINGS (session 13), the other models' samples kept:
    python -m converters.tabular_gans sdv --models copulagan --out converters/demo_weights/tabular \
        --threads 1

(One torch thread: on a busy 2-core machine two threads ran these tiny networks up to 35×
slower.) Measured wall times are in the records.
"""

from __future__ import annotations

import argparse
import json
import platform
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from tqdm.auto import tqdm

from converters.generators import build_generator
from flipad_jax._files import atomic_file
from flipad_jax.report import write_json
from flipad_jax.tabular import WINE_COLORS, WINE_SHA256, wine_splits

DATASETS = tuple(WINE_COLORS)  # ("redwine", "whitewine")
OUT_DIR = Path(__file__).parent / "demo_weights" / "tabular"
KLWGAN_RECORD = "klwgan_training.json"
SDV_RECORD = "sdv_training.json"
SEED = 0
EPOCHS = 500
KLWGAN_BATCH = 256
SDV_MODELS = ("tvae", "ctgan", "copulagan")
TABLE = "wine"  # SDV's table name (sdv 2 fits and samples {table: DataFrame})
# Rows sampled per SDV model and split: the paper's n_tr 100 000 and n_test 10 000, for the sets
# the experiment reads (TVAE is the negative training class; validation rows are G's only).
SDV_SAMPLES = {"tvae": {"train": 100_000, "test": 10_000}, "ctgan": {"test": 10_000},
               "copulagan": {"test": 10_000}}
# Settings where SDV's default moved since the authors' pin (sdv 0.18.0): its CopulaGAN fitted
# truncated Gaussian marginals by default ("truncated_gaussian" there, copulas'
# TruncatedGaussian, named "truncnorm" in sdv 2), sdv >= 1 fits beta ones. CopulaGAN is a test
# source (G′) of Table 5, so its marginals are part of what the detectors are tested against.
SDV_SETTINGS = {"copulagan": {"default_distribution": "truncnorm"}}


def klwgan_weights(out, dataset: str) -> Path:
    return Path(out) / f"klwgan_{dataset}.safetensors"


def sdv_samples_file(out, dataset: str) -> Path:
    return Path(out) / f"sdv_{dataset}.npz"


def mmd(x: np.ndarray, y: np.ndarray) -> float:
    """The authors' MMD between row sets: Gaussian kernel exp(−(‖a − b‖ / d)²), biased."""
    d = x.shape[1]

    def k(a, b):
        sq = (a * a).sum(1)[:, None] + (b * b).sum(1)[None, :] - 2.0 * a @ b.T
        return np.exp(-np.maximum(sq, 0.0) / d ** 2).mean()

    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    return float(k(x, x) + k(y, y) - 2.0 * k(x, y))


def klwgan_discriminator(data_dim: int, hidden: int = 300) -> nn.Module:
    """The authors' KL-WGAN critic: spectral norm on all three Linear layers."""
    sn = nn.utils.spectral_norm
    return nn.Sequential(sn(nn.Linear(data_dim, hidden)), nn.LeakyReLU(),
                         sn(nn.Linear(hidden, hidden)), nn.LeakyReLU(), sn(nn.Linear(hidden, 1)))


def train_klwgan(train: np.ndarray, *, seed: int = SEED, epochs: int = EPOCHS,
                 batch: int = KLWGAN_BATCH, progress: bool = True):
    """KL-WGAN (hinge loss) on rows ``(n, d)``; returns (generator in eval mode, record)."""
    data = torch.from_numpy(np.asarray(train, np.float32))
    if data.ndim != 2 or len(data) < 1:
        raise ValueError(f"train of shape {tuple(data.shape)}: expected (n, d) rows")
    torch.manual_seed(seed)
    gen = build_generator("klwgan", options={"data_dim": data.shape[1]}, seed=seed)
    disc = klwgan_discriminator(data.shape[1])
    opt_g = torch.optim.RMSprop(gen.parameters(), lr=2e-4)
    opt_d = torch.optim.RMSprop(disc.parameters(), lr=2e-4)
    noise = gen.latent_shape[0]
    losses, start = [], time.perf_counter()
    for epoch in tqdm(range(epochs), desc="klwgan", disable=not progress, leave=False):
        d_sum = g_sum = 0.0
        batches = torch.split(data, batch)
        for real in batches:
            for _ in range(5):
                with torch.no_grad():
                    fake = gen(torch.randn(len(real), noise))
                opt_d.zero_grad(set_to_none=True)
                d_loss = F.relu(1.0 - disc(real)).mean() + F.relu(1.0 + disc(fake)).mean()
                d_loss.backward()
                opt_d.step()
            opt_g.zero_grad(set_to_none=True)
            g_loss = -disc(gen(torch.randn(len(real), noise))).mean()
            g_loss.backward()
            opt_g.step()
            d_sum, g_sum = d_sum + d_loss.item(), g_sum + g_loss.item()
        if not (np.isfinite(d_sum) and np.isfinite(g_sum)):
            raise FloatingPointError(f"KL-WGAN training diverged at epoch {epoch + 1}")
        if epoch % 50 == 0 or epoch == epochs - 1:
            losses.append({"epoch": epoch + 1, "d": d_sum / len(batches),
                           "g": g_sum / len(batches)})
    seconds = time.perf_counter() - start
    gen.eval()
    return gen, {"seed": seed, "epochs": epochs, "batch_size": batch, "optimizer":
                 "RMSprop lr 2e-4 (G and D)", "loss": "hinge, 5 D steps per G step",
                 "losses_every_50_epochs": losses, "seconds": round(seconds, 1)}


def _data_record(dataset: str, splits) -> dict:
    return {"dataset": dataset, "wine_csv_sha256": WINE_SHA256,
            "preparation": "flipad_jax.tabular.wine_splits (seed 0): shuffle, permute columns, "
                           "whiten, split", "n_train": len(splits.train),
            "n_valid": len(splits.valid), "n_test": len(splits.test)}


def _versions() -> dict:
    return {"torch": torch.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "threads": torch.get_num_threads()}


def train_klwgans(out=OUT_DIR, *, datasets=DATASETS, epochs: int = EPOCHS, seed: int = SEED,
                  progress: bool = True, command: str = "train_klwgans()") -> Path:
    """Train KL-WGAN on each data set; write ``klwgan_<data>.safetensors`` and the record."""
    from safetensors.torch import save_file

    out = Path(out)
    # another data set's record in the same folder is kept with its weights
    record_path = out / KLWGAN_RECORD
    records = json.loads(record_path.read_text())["models"] if record_path.exists() else {}
    for dataset in datasets:
        splits = wine_splits(dataset)
        gen, record = train_klwgan(splits.train, seed=seed, epochs=epochs, progress=progress)
        with torch.no_grad():
            torch.manual_seed(seed + 1)
            check = gen(torch.randn(5000, gen.latent_shape[0])).numpy()
        record["mmd_to_test"] = {"samples": mmd(check, splits.test),
                                 "train_rows": mmd(splits.train, splits.test),
                                 "n_samples": len(check)}
        record["arch"], record["arch_options"] = "klwgan", {"data_dim": splits.train.shape[1]}
        records[dataset] = {**record, "data": _data_record(dataset, splits)}
        with atomic_file(klwgan_weights(out, dataset), suffix=".safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in gen.state_dict().items()}, str(tmp))
        records[dataset].update(command=command, versions=_versions())
        write_json(record_path, {"models": records})
    return out


def _sdv_synthesizer(model: str, columns, epochs: int):
    from sdv.metadata import Metadata
    from sdv.single_table import CopulaGANSynthesizer, CTGANSynthesizer, TVAESynthesizer

    metadata = Metadata.load_from_dict({"tables": {TABLE: {"columns": {
        c: {"sdtype": "numerical"} for c in columns}}}})
    cls = {"ctgan": CTGANSynthesizer, "tvae": TVAESynthesizer,
           "copulagan": CopulaGANSynthesizer}[model]
    return cls(metadata, epochs=epochs, **SDV_SETTINGS.get(model, {}))


def _seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_sdv(train: np.ndarray, model: str, *, seed: int = SEED, epochs: int = EPOCHS,
              samples=None):
    """Fit one SDV model on rows ``(n, d)``; returns ({split: float32 rows}, record).

    ``samples`` maps split → rows (default ``SDV_SAMPLES[model]``), drawn in that order after
    reseeding Python, numpy and torch with ``seed + 1``.
    """
    import pandas as pd

    if model not in SDV_MODELS:
        raise ValueError(f"model={model!r}: expected one of {SDV_MODELS}")
    columns = [f"x{j}" for j in range(train.shape[1])]
    synthesizer = _sdv_synthesizer(model, columns, epochs)
    _seed_all(seed)
    start = time.perf_counter()
    synthesizer.fit({TABLE: pd.DataFrame(np.asarray(train, np.float64), columns=columns)})
    fit_seconds = time.perf_counter() - start
    _seed_all(seed + 1)
    start = time.perf_counter()
    out = {}
    for split, n in (SDV_SAMPLES[model] if samples is None else samples).items():
        rows = synthesizer.sample(n)[TABLE][columns].to_numpy(np.float64)
        if rows.shape != (n, len(columns)) or not np.all(np.isfinite(rows)):
            raise ValueError(f"{model} sampled {rows.shape} rows with non-finite values or of "
                             f"the wrong shape: expected ({n}, {len(columns)}) finite")
        out[split] = rows.astype(np.float32)
    record = {"seed": seed, "epochs": epochs,
              "settings": {"sdv_defaults_but": {"epochs": epochs, **SDV_SETTINGS.get(model, {})}},
              "fit_seconds": round(fit_seconds, 1),
              "sample_seconds": round(time.perf_counter() - start, 1),
              "samples": {k: len(v) for k, v in out.items()}}
    return out, record


def train_sdv_models(out=OUT_DIR, *, datasets=DATASETS, models=SDV_MODELS, epochs: int = EPOCHS,
                     seed: int = SEED, command: str = "train_sdv_models()") -> Path:
    """Fit the SDV ``models`` on each data set; write ``sdv_<data>.npz`` and the record.

    Refitting a subset of the models replaces their samples and records in ``out`` and keeps the
    other models' (each model's record carries the command and versions that produced it).
    """
    unknown = sorted(set(models) - set(SDV_MODELS))
    if unknown:
        raise ValueError(f"models {unknown}: expected a subset of {SDV_MODELS}")
    import ctgan
    import copulas
    import rdt
    import sdv

    out = Path(out)
    versions = {**_versions(), "sdv": sdv.__version__, "ctgan": ctgan.__version__,
                "copulas": copulas.__version__, "rdt": rdt.__version__}
    record_path = out / SDV_RECORD
    records = json.loads(record_path.read_text())["models"] if record_path.exists() else {}
    for dataset in datasets:
        splits = wine_splits(dataset)
        path = sdv_samples_file(out, dataset)
        kept = set(SDV_MODELS) - set(models)
        data = _data_record(dataset, splits)
        if kept and not (path.is_file() and records.get(dataset, {}).get("data") == data):
            raise ValueError(f"models={list(models)} for {dataset}: the other models' samples "
                             f"and their record on the same data are needed in {out} (refit "
                             "all models there instead)")
        arrays = ({k: v for k, v in read_sdv_samples(path).items() if k.split("_")[0] in kept}
                  if kept else {})
        records[dataset] = {**{m: r for m, r in records.get(dataset, {}).items() if m in kept},
                            "data": data}
        for model in models:
            rows, record = train_sdv(splits.train, model, seed=seed, epochs=epochs)
            record["mmd_to_test"] = {"samples": mmd(rows["test"][:5000], splits.test),
                                     "train_rows": mmd(splits.train, splits.test)}
            records[dataset][model] = {**record, "command": command, "versions": versions}
            arrays.update({f"{model}_{split}": v for split, v in rows.items()})
            print(f"{dataset} {model}: fit {record['fit_seconds']} s, "
                  f"MMD {record['mmd_to_test']}", flush=True)
        with atomic_file(path, suffix=".npz") as tmp:
            np.savez_compressed(tmp, **arrays)
        # after each data set, so an interrupted run keeps what it finished
        write_json(record_path, {"models": records})
    return out


def read_sdv_samples(path, *, data_dim: int = 11) -> dict[str, np.ndarray]:
    """The SDV samples of one data set: ``{"<model>_<split>": float32 (n, data_dim)}``.

    Refuses (``ValueError``) a file that is not an npz of finite float32 row arrays or lacks a
    set of ``SDV_SAMPLES``; never unpickles.
    """
    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in npz.files}
    except (OSError, ValueError, EOFError) as e:
        raise ValueError(f"{path}: not a readable npz of arrays ({e})") from None
    expected = {f"{m}_{s}": n for m, splits in SDV_SAMPLES.items() for s, n in splits.items()}
    missing = sorted(set(expected) - set(arrays))
    if missing:
        raise ValueError(f"{path}: missing sample sets {missing}; it has {sorted(arrays)}")
    for key, n in expected.items():
        a = arrays[key]
        if a.dtype != np.float32 or a.shape != (n, data_dim) or not np.all(np.isfinite(a)):
            raise ValueError(f"{path}: {key} is {a.dtype} {a.shape}: expected finite float32 "
                             f"({n}, {data_dim})")
    return arrays


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Train the wine generators of the tabular demo.")
    p.add_argument("family", choices=("klwgan", "sdv"),
                   help="klwgan (weights) or sdv (CTGAN, TVAE, CopulaGAN samples; needs the "
                        "tabular extra)")
    p.add_argument("--out", default=str(OUT_DIR), help="folder to write into")
    p.add_argument("--datasets", nargs="+", choices=DATASETS, default=list(DATASETS))
    p.add_argument("--models", nargs="+", choices=SDV_MODELS, default=list(SDV_MODELS),
                   help="sdv: the models to (re)fit; the others' shipped samples are kept")
    p.add_argument("--epochs", type=int, default=EPOCHS)
    p.add_argument("--seed", type=int, default=SEED)
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    command = "python -m converters.tabular_gans " + " ".join(
        sys.argv[1:] if argv is None else argv)
    if args.family == "klwgan":
        train_klwgans(args.out, datasets=args.datasets, epochs=args.epochs, seed=args.seed,
                      progress=not args.quiet, command=command)
    else:
        train_sdv_models(args.out, datasets=args.datasets, models=args.models,
                         epochs=args.epochs, seed=args.seed, command=command)
    return 0


if __name__ == "__main__":
    sys.exit(main())
