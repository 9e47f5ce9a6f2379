"""DeepSAD training and scoring throughput: flipad-jax (Flax + Optax) vs PyTorch, same spec.

Both sides train the same network (the reference's bias-free LeNet: conv k5 p2 → BatchNorm
(affine off, eps 1e-4) → leaky ReLU 0.01 → max-pool 2, then a bias-free Linear to 128) with the
same loss (DeepSAD, η = 1, labels ±1 half and half), the same optimiser (Adam, lr 5e-4, coupled
weight decay 5e-7), the same batch (128, shuffled per epoch, last partial batch dropped) on the
same synthetic data, the training set resident on the device. The PyTorch side is written here
to the reference's spec (``src/sad/optim/DeepSAD_trainer.py``), without a DataLoader, so that
both loops measure the train step and not input pipelines.

Reported: samples/s per epoch for training (median over the timed epochs of all rounds; the
first epoch of each round, which compiles or warms up, is excluded on both sides) and for
scoring (eval mode, batches of 1024, median over repeats after a warm-up), and the ratios
ours / PyTorch, overall and per round. Ours and PyTorch alternate for ``--rounds`` rounds, so
drifting machine load hits both alike. Both use the same number of threads (PyTorch's
``torch.get_num_threads()``, XLA's Eigen pool: one per core), recorded with the load average.

Loss curve: ours is also trained for as many epochs as ``--loss-baseline`` holds (key 0, the same
data) and its per-epoch mean losses are compared with those of the unchanged implementation
recorded there (``loss_max_rel_dev``; the bar is 1%).

    python benchmarks/deepsad.py --device cpu --out benchmarks/results/deepsad_cpu.json
    python benchmarks/deepsad.py --device cuda --networks lenet_cifar10 lenet_64channels \
        --n 8192 --epochs 4 --out deepsad_cuda.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import numpy as np

SPECS = {  # name → (architecture, input shape, conv widths)
    "lenet_cifar10": ("lenet_cifar10", (3, 32, 32), (32, 64, 128)),
    "lenet_64channels": ("lenet_64channels", (64, 32, 32), (128, 256, 128)),
    # FLIPAD's network at paper scale on the demo's features (32 channels pooled to 16×16): its
    # last block runs on 4×4 maps
    "flipad_demo_paper": ("lenet_64channels", (32, 16, 16), (128, 256, 128)),
}


def torch_deepsad(torch, shape, widths, rep_dim=128):
    nn, F = torch.nn, torch.nn.functional

    class LeNet(nn.Module):
        def __init__(self):
            super().__init__()
            chans = (shape[0],) + tuple(widths)
            self.convs = nn.ModuleList(nn.Conv2d(a, b, 5, padding=2, bias=False)
                                       for a, b in zip(chans[:-1], chans[1:]))
            self.bns = nn.ModuleList(nn.BatchNorm2d(b, eps=1e-4, affine=False) for b in widths)
            final = shape[1] // 2 ** len(widths)
            self.fc = nn.Linear(widths[-1] * final * final, rep_dim, bias=False)

        def forward(self, x):
            for conv, bn in zip(self.convs, self.bns):
                x = F.max_pool2d(F.leaky_relu(bn(conv(x))), 2, 2)
            return self.fc(x.flatten(1))

    return LeNet()


def sync(torch, device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def bench_torch(torch, device, shape, widths, x_np, y_np, batch, epochs, score_repeats):
    torch.manual_seed(0)
    net = torch_deepsad(torch, shape, widths).to(device)
    x = torch.from_numpy(x_np).to(device)
    y = torch.from_numpy(y_np).to(device)
    with torch.no_grad():
        net.eval()
        c = torch.cat([net(x[i:i + 1024]) for i in range(0, len(x), 1024)]).mean(0)
        c[(c.abs() < 0.1) & (c < 0)] = -0.1
        c[(c.abs() < 0.1) & (c > 0)] = 0.1
    opt = torch.optim.Adam(net.parameters(), lr=5e-4, weight_decay=5e-7)
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=(25, 50, 100), gamma=0.1)
    n_batches = len(x) // batch
    gen = torch.Generator(device="cpu").manual_seed(0)
    rates = []
    for _ in range(epochs + 1):
        net.train()
        perm = torch.randperm(len(x), generator=gen)[:n_batches * batch].to(device)
        sync(torch, device)
        start = time.perf_counter()
        total = 0.0
        for idx in perm.view(n_batches, batch):
            xb, yb = x[idx], y[idx]
            opt.zero_grad(set_to_none=True)
            dist = torch.sum((net(xb) - c) ** 2, dim=1)
            loss = torch.where(yb == 0, dist, (dist + 1e-6) ** yb.float()).mean()
            loss.backward()
            opt.step()
            total += loss.detach()
        float(total)  # sync, like ours reading the epoch loss
        sched.step()
        rates.append(n_batches * batch / (time.perf_counter() - start))
    net.eval()

    def score():
        with torch.no_grad():
            out = [torch.sum((net(x[i:i + 1024]) - c) ** 2, dim=1) for i in range(0, len(x), 1024)]
            return torch.cat(out).cpu().numpy()

    score()
    times = []
    for _ in range(score_repeats):
        sync(torch, device)
        start = time.perf_counter()
        score()
        times.append(time.perf_counter() - start)
    return {"train_samples_per_s": rates[1:], "score_samples_per_s": len(x) / np.median(times)}


def build_ours(name):
    from flipad_jax.networks import build_network

    arch, shape, widths = SPECS[name]
    return build_network(arch, in_channels=shape[0], input_size=shape[1], widths=widths)


def bench_ours(name, x_np, y_np, batch, epochs, score_repeats):
    import jax

    from flipad_jax.deepsad import score, train_deepsad

    net = build_ours(name)
    x = jax.device_put(x_np)
    model, log = train_deepsad(net, x, y_np, key=jax.random.key(0), epochs=epochs + 1,
                               batch_size=batch, progress=False)
    n_used = len(x_np) // batch * batch
    score(net, model, x, batch_size=1024)
    times = []
    for _ in range(score_repeats):
        start = time.perf_counter()
        score(net, model, x, batch_size=1024)
        times.append(time.perf_counter() - start)
    return {"train_samples_per_s": (n_used / log.seconds[1:]).tolist(),
            "score_samples_per_s": len(x_np) / np.median(times)}


def loss_curve(name, x_np, y_np, batch, epochs):
    """Ours: per-epoch mean training loss, key 0."""
    import jax

    from flipad_jax.deepsad import train_deepsad

    net = build_ours(name)
    _, log = train_deepsad(net, x_np, y_np, key=jax.random.key(0), epochs=epochs,
                           batch_size=batch, progress=False)
    return log.loss.tolist()


def _rounds():
    return {"train_samples_per_s": [], "score_samples_per_s": []}


def _merge(acc, one):
    acc["train_samples_per_s"] += list(one["train_samples_per_s"])
    acc["score_samples_per_s"].append(float(one["score_samples_per_s"]))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--networks", nargs="+", choices=sorted(SPECS), default=["lenet_cifar10"])
    p.add_argument("--n", type=int, default=1024, help="training samples (per epoch)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--epochs", type=int, default=2, help="timed epochs (after one warm-up)")
    p.add_argument("--score-repeats", type=int, default=3)
    p.add_argument("--rounds", type=int, default=2,
                   help="alternate ours and PyTorch this many times (evens out load drift)")
    p.add_argument("--loss-baseline", default=str(Path(__file__).parent / "results"
                                                     / "deepsad_loss_baseline.json"),
                   help="epoch losses of the unchanged implementation (JSON); '' to skip")
    p.add_argument("--out", help="write the results as JSON to this file")
    args = p.parse_args(argv)

    import jax
    import torch

    device = torch.device(args.device)
    backend = jax.default_backend()
    if (args.device == "cuda") != (backend == "gpu"):
        raise SystemExit(f"--device {args.device} but JAX's backend is {backend!r}: run both "
                         "frameworks on the same kind of device")
    results = {"device": args.device, "jax_devices": [str(d) for d in jax.devices()],
               "torch_device": str(torch.cuda.get_device_name(0) if args.device == "cuda"
                                   else platform.processor() or platform.machine()),
               "torch_threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
               "load_average_start": os.getloadavg(), "n": args.n, "batch": args.batch,
               "epochs_timed": args.epochs, "rounds": args.rounds, "versions": {"jax": jax.__version__,
                                                         "torch": torch.__version__},
               "networks": {}}
    baseline = (json.loads(Path(args.loss_baseline).read_text())["networks"]
                if args.loss_baseline else {})
    for name in args.networks:
        _, shape, widths = SPECS[name]
        rng = np.random.default_rng(0)  # per network: the loss baseline's data
        x = rng.normal(size=(args.n,) + shape).astype(np.float32)
        y = np.where(np.arange(args.n) % 2 == 0, 1, -1).astype(np.int32)
        ours, ref = _rounds(), _rounds()
        per_round = []
        for _ in range(args.rounds):
            one = bench_ours(name, x, y, args.batch, args.epochs, args.score_repeats)
            two = bench_torch(torch, device, shape, widths, x, y, args.batch, args.epochs,
                              args.score_repeats)
            per_round.append({
                "train_ratio": float(np.median(one["train_samples_per_s"])
                                     / np.median(two["train_samples_per_s"])),
                "score_ratio": float(one["score_samples_per_s"] / two["score_samples_per_s"])})
            _merge(ours, one)
            _merge(ref, two)
        ours["score_samples_per_s"] = float(np.median(ours["score_samples_per_s"]))
        ref["score_samples_per_s"] = float(np.median(ref["score_samples_per_s"]))
        row = {"ours": ours, "torch": ref,
               "train_ratio": float(np.median(ours["train_samples_per_s"])
                                    / np.median(ref["train_samples_per_s"])),
               "score_ratio": float(ours["score_samples_per_s"] / ref["score_samples_per_s"]),
               "per_round": per_round}
        base = baseline.get(name)
        if base and (base["n"], base["batch"]) == (args.n, args.batch):
            losses = loss_curve(name, x, y, args.batch, len(base["epoch_loss"]))
            dev = np.abs(np.array(losses) / np.array(base["epoch_loss"]) - 1)
            row.update(epoch_loss=losses, baseline_epoch_loss=base["epoch_loss"],
                       loss_max_rel_dev=float(dev.max()))
        results["networks"][name] = row
        print(f"{name}: train samples/s ours {np.median(ours['train_samples_per_s']):.1f} vs "
              f"torch {np.median(ref['train_samples_per_s']):.1f} (x{row['train_ratio']:.2f}); "
              f"score ours {ours['score_samples_per_s']:.1f} vs torch "
              f"{ref['score_samples_per_s']:.1f} (x{row['score_ratio']:.2f}); per round "
              + ", ".join(f"x{r['train_ratio']:.2f}/x{r['score_ratio']:.2f}" for r in per_round)
              + (f"; loss vs unchanged: max rel. dev. {row['loss_max_rel_dev']:.2e}"
                 if "loss_max_rel_dev" in row else ""), flush=True)
    results["load_average_end"] = os.getloadavg()
    if args.out:
        from flipad_jax._files import atomic_file

        with atomic_file(args.out) as tmp:
            tmp.write_text(json.dumps(results, indent=2))
    return results


if __name__ == "__main__":
    main()
