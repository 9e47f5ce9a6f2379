"""Where a DeepSAD train step's time goes on this CPU: ours (XLA's per-op trace) and PyTorch's
(``torch.profiler``), the same step of ``benchmarks/deepsad.py`` (lenet_cifar10, batch 128), in
one process, alternating, so that both see the same load.

    XLA_FLAGS=--xla_cpu_enable_xprof_traceme=true python benchmarks/deepsad_profile.py \\
        --out benchmarks/results/deepsad_cpu_profile.json

Reported: each step's wall time (median, unprofiled, alternating); ours: the time per step in
XLA ops that are or fuse a convolution (forward, input and weight gradients) and in all ops,
and the step less the other ops, which is the convolutions' time where the trace does not show
them (Eigen's convolutions, ``flipad_jax.cpu_convolutions``, run on its thread pool and appear
only as their dispatch);
PyTorch: the share of its profiled self time in convolution ops; and PyTorch's step time over
our convolutions' time, the ratio that ours could reach if everything but the convolutions cost
nothing.

The floor at the machine's peak: XLA's count of the step's floating-point operations
(``cost_analysis``) over the fastest float32 matrix product measured in the same process
(n × n by n for n of 1024, 2048 and 3072, XLA and PyTorch, median of 5, the best). An
implementation that does the step's arithmetic (direct convolutions, as XLA and PyTorch do) runs
it no faster than that, so PyTorch's step time over it bounds the train ratio such an
implementation could reach here. The same for scoring: PyTorch's eval forward of 1024 rows
(the reference's batch, as ``benchmarks/deepsad.py`` times it) against their operations at
that rate.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import os
import re
import tempfile
import time
from pathlib import Path

import numpy as np

# benchmarks/ is on the path when run as a script
from conv_variants import median_ms
from deepsad import torch_deepsad


def _ours_step(n=1024, batch=128):
    import jax
    import jax.numpy as jnp

    from flipad_jax.deepsad import _trainer, init_center
    from flipad_jax.networks import build_network

    net = build_network("lenet_cifar10")
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(n, 3, 32, 32)).astype(np.float32))
    y = jnp.asarray(np.where(np.arange(n) % 2 == 0, 1, -1).astype(np.int32))
    v = net.init(jax.random.key(0), x[:1])
    c = init_center(net, v, x)
    step, tx, _ = _trainer(net, 1.0, n // batch, 5e-4, (25, 50, 100), 0.1, 5e-7)
    state = [v["params"], v["batch_stats"], tx.init(v["params"])]
    idx = jnp.arange(batch)
    compiled = step.lower(*state, c, x, y, idx).compile()

    def run():
        p, b, o, loss = step(*state, c, x, y, idx)
        loss.block_until_ready()
        state[:] = [p, b, o]

    return run, compiled.as_text(), _flops(compiled)


def _flops(compiled) -> float:
    """XLA's count of a compiled function's floating-point operations."""
    cost = compiled.cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]


def peak_gflops(torch, sizes=(1024, 2048, 3072), repeats=5) -> dict:
    """Float32 matrix-product GFLOP/s, n × n by n, median of ``repeats`` per n, the best n:
    XLA's and PyTorch's."""
    import jax
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    dot = jax.jit(jnp.dot)
    out = {"xla": 0.0, "torch": 0.0}
    for n in sizes:
        a, b = (rng.normal(size=(n, n)).astype(np.float32) for _ in range(2))
        ja, jb = jnp.asarray(a), jnp.asarray(b)
        ta, tb = torch.from_numpy(a), torch.from_numpy(b)
        for name, ms in (("xla", median_ms(dot, ja, jb, repeats=repeats)),
                         ("torch", median_ms(torch.mm, ta, tb, repeats=repeats))):
            out[name] = max(out[name], 2 * n ** 3 / ms / 1e6)
    return out


def score_bound(torch, peak: float, rows: int = 1024, repeats: int = 5) -> dict:
    """Scoring at the machine's peak, as ``benchmarks/deepsad.py`` compares it: PyTorch's eval
    forward of ``rows`` rows at once (the reference's batch; median of ``repeats``) against the
    least time ``rows`` rows can take at ``peak`` GFLOP/s, by XLA's FLOP count of the eval chunk
    ours runs on a CPU (:data:`flipad_jax.deepsad.CPU_EVAL_ROWS` rows), scaled to ``rows``."""
    import jax
    import jax.numpy as jnp

    from flipad_jax.deepsad import CPU_EVAL_ROWS
    from flipad_jax.networks import build_network

    net = build_network("lenet_cifar10")
    x = np.random.default_rng(0).normal(size=(rows, 3, 32, 32)).astype(np.float32)
    chunk = jnp.asarray(x[:CPU_EVAL_ROWS])
    v = net.init(jax.random.key(0), chunk[:1])
    forward = jax.jit(lambda v, x: net.apply(v, x, train=False))
    flops = _flops(forward.lower(v, chunk).compile()) * rows / CPU_EVAL_ROWS
    tnet, tx = torch_deepsad(torch, (3, 32, 32), (32, 64, 128)).eval(), torch.from_numpy(x)
    with torch.no_grad():
        torch_ms = median_ms(tnet, tx, repeats=repeats)
    floor_ms = flops / peak / 1e6
    return {"score_rows": rows, "score_gflop": flops / 1e9, "torch_score_ms": torch_ms,
            "score_floor_ms_at_peak": floor_ms, "score_ratio_bound_at_peak": torch_ms / floor_ms}


def _conv_fusions(hlo: str) -> set:
    """Names of the entry computation's ops that are, or fuse, a convolution."""
    comps, name = {}, None
    for line in hlo.splitlines():
        m = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{$", line)
        if m:
            name = m.group(1)
            comps[name] = []
        elif name:
            comps[name].append(line)
    convs = set()
    for body in comps.values():
        for line in body:
            m = re.match(r"\s*(?:ROOT )?%?([\w.\-]+) = .*?(\w[\w-]*)\(", line)
            if not m:
                continue
            called = re.search(r"calls=%?([\w.\-]+)", line)
            if " convolution(" in line or (called and any(
                    " convolution(" in l for l in comps.get(called.group(1), []))):
                convs.add(m.group(1))
    return convs


def profile_ours(run, hlo, steps):
    import jax

    convs = _conv_fusions(hlo)
    run()
    with tempfile.TemporaryDirectory() as d:
        with jax.profiler.trace(d, create_perfetto_trace=True):
            for _ in range(steps):
                run()
        trace = next(Path(d).rglob("*.json.gz"))
        events = json.load(gzip.open(trace))
    events = events["traceEvents"] if isinstance(events, dict) else events
    per_op = collections.defaultdict(float)
    for e in events:
        if e.get("ph") == "X":
            per_op[e["name"]] += e["dur"] / 1e3 / steps
    conv = sum(t for k, t in per_op.items() if k in convs)
    ops = sum(t for k, t in per_op.items()
              if re.match(r"^[a-z_]+(\.\d+)?$", k) and not k.startswith("$"))
    return conv, ops


def profile_torch(torch, steps, n=1024, batch=128):
    net = torch_deepsad(torch, (3, 32, 32), (32, 64, 128))
    rng = np.random.default_rng(0)
    x = torch.from_numpy(rng.normal(size=(batch, 3, 32, 32)).astype(np.float32))
    y = torch.from_numpy(np.where(np.arange(batch) % 2 == 0, 1, -1).astype(np.int32))
    opt = torch.optim.Adam(net.parameters(), lr=5e-4, weight_decay=5e-7)
    c = torch.full((128,), 0.1)

    def run():
        net.train()
        opt.zero_grad(set_to_none=True)
        dist = torch.sum((net(x) - c) ** 2, dim=1)
        loss = torch.where(y == 0, dist, (dist + 1e-6) ** y.float()).mean()
        loss.backward()
        opt.step()
        float(loss.detach())

    run()
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            run()
    events = prof.key_averages()
    conv = sum(e.self_cpu_time_total for e in events if "conv" in e.key or "mkldnn" in e.key)
    return run, conv / sum(e.self_cpu_time_total for e in events)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--out")
    args = p.parse_args(argv)
    import jax
    import torch

    ours_run, hlo, flops = _ours_step()
    torch_run, torch_conv_share = profile_torch(torch, args.steps)
    ours_conv, ours_ops = profile_ours(ours_run, hlo, args.steps)
    t_ours, t_torch = [], []
    for _ in range(args.steps):
        for run, acc in ((ours_run, t_ours), (torch_run, t_torch)):
            start = time.perf_counter()
            run()
            acc.append(time.perf_counter() - start)
    res = {"load_average": os.getloadavg(), "torch_threads": torch.get_num_threads(),
           "versions": {"jax": jax.__version__, "torch": torch.__version__},
           "ours_step_ms": 1e3 * float(np.median(t_ours)),
           "torch_step_ms": 1e3 * float(np.median(t_torch)),
           "ours_conv_ms": ours_conv, "ours_all_ops_ms": ours_ops,
           "ours_conv_share": ours_conv / ours_ops, "torch_conv_share": torch_conv_share}
    res["ours_other_ops_ms"] = ours_ops - ours_conv
    res["ours_step_less_other_ops_ms"] = res["ours_step_ms"] - res["ours_other_ops_ms"]
    res["step_ratio"] = res["torch_step_ms"] / res["ours_step_ms"]
    res["ratio_bound_if_only_convs_remained"] = (res["torch_step_ms"]
                                                 / res["ours_step_less_other_ops_ms"])
    peak = peak_gflops(torch)
    res["step_gflop"] = flops / 1e9
    res["matmul_gflops"] = peak
    res["step_floor_ms_at_peak"] = flops / max(peak.values()) / 1e6
    res["ratio_bound_at_peak"] = res["torch_step_ms"] / res["step_floor_ms_at_peak"]
    res.update(score_bound(torch, max(peak.values())))
    print(json.dumps(res, indent=2))
    if args.out:
        from flipad_jax._files import atomic_file

        with atomic_file(args.out) as tmp:
            tmp.write_text(json.dumps(res, indent=2))


if __name__ == "__main__":
    main()
