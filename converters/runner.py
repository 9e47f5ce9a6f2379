"""A loaded generator made ready to run: device, BatchNorm mode, latents, head and probe.

Latents are reproducible per sample, independent of batch size and device: latent ``i`` of seed
``s`` is ``numpy.random.default_rng([s, i]).standard_normal(latent_shape, float32)``
(:func:`latents`). So z̄, samples and any train/val/test split are fixed by (seed, indices).
"""

from __future__ import annotations

import copy
from typing import Callable, NamedTuple, Optional

import numpy as np
import torch
from torch import nn

from converters.loading import Source, load_generator
from converters.trace import (HeadLayer, export_fixed_batch, run_chunked, trace_graph,
                              trace_module)

LATENT_SCHEME = "numpy.random.default_rng([seed, index]).standard_normal(latent_shape, float32)"
BN_MODES = ("eval", "train")


def latents(seed: int, start: int, count: int, latent_shape) -> torch.Tensor:
    """Latents ``start .. start+count−1`` of ``seed``: ``(count, *latent_shape)`` float32, N(0, I)."""
    return torch.from_numpy(np.stack([
        np.random.default_rng([seed, i]).standard_normal(tuple(latent_shape), np.float32)
        for i in range(start, start + count)]))


def pick_device(device=None) -> torch.device:
    """``device`` if given, else CUDA, then MPS, then CPU."""
    if device is not None:
        return torch.device(device)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class Prepared(NamedTuple):
    """A generator ready to run.

    Attributes:
      head: the found :class:`~converters.trace.HeadLayer` (None when not traced).
      probe: ``probe(z, outputs=True) -> (x, head_input)`` (None when not traced).
      generate: ``generate(z) -> x``.
      latent_shape: per-sample latent shape.
      bn_mode: "eval", "train" or "as_exported".
      device: where it runs.
      dtype: the generator's floating dtype (latents are cast to it).
      to_float64: ``() -> Prepared`` of the same generator in float64 (for the self-check).
    """

    head: Optional[HeadLayer]
    probe: Optional[Callable]
    generate: Callable
    latent_shape: tuple
    bn_mode: str
    device: torch.device
    dtype: torch.dtype
    to_float64: Callable


def _set_bn_mode(model: nn.Module, bn_mode: str) -> None:
    """All modules in eval mode, except BatchNorm in train mode (batch statistics) if asked."""
    model.eval()
    if bn_mode == "train":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()


def _resolve_latent_shape(source: Source, latent_shape) -> tuple:
    given = None if latent_shape is None else tuple(int(d) for d in latent_shape)
    if given is not None and (not given or min(given) < 1):
        raise ValueError(f"latent_shape={latent_shape!r}: expected positive ints")
    known = source.latent_shape
    if given is not None and known is not None and given != known:
        origin = f"arch {source.arch!r}" if source.arch else f"the {source.format} input"
        raise ValueError(f"latent_shape={given}: {origin} takes latents of shape {known}")
    shape = given or known
    if shape is None:
        raise ValueError(f"latent_shape is needed for a {source.format} generator: pass "
                         "--latent-shape (e.g. 100,1,1)")
    return shape


def prepare(source: Source, *, latent_shape=None, bn_mode: str = "eval", device=None,
            layer: Optional[str] = None, trace: bool = True, trace_seed: int = 0) -> Prepared:
    """Move the generator to ``device``, set its BatchNorm mode, and (if ``trace``) find its head.

    Modules are deep-copied first, so a module passed in Python is never changed.
    ``bn_mode="train"`` (the reference's batch statistics) needs an ``nn.Module`` generator;
    TorchScript and export programs run in the mode they were saved in ("as_exported"; TorchScript
    is put in eval mode).
    """
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode={bn_mode!r}: expected one of {BN_MODES}")
    shape = _resolve_latent_shape(source, latent_shape)
    device = pick_device(device)
    model = source.model
    if isinstance(model, nn.Module) and not isinstance(model, torch.jit.ScriptModule):
        model = copy.deepcopy(model).to(device)
        if device.type == "cpu":  # oneDNN convolutions: 1.6x faster for the DCGAN on 2 cores
            model = model.to(memory_format=torch.channels_last)
        _set_bn_mode(model, bn_mode)
        dtype = next(model.parameters()).dtype
        head, probe = None, None
        if trace:
            z = latents(trace_seed, 0, 4, shape).to(device, dtype)
            head, probe = trace_module(model, z, layer)

        def generate(z):
            with torch.no_grad():
                return model(z)

        def to_float64():
            return prepare(source._replace(model=copy.deepcopy(model).double()),
                           latent_shape=shape, bn_mode=bn_mode, device=device, layer=head.name,
                           trace=trace)

        return Prepared(head, probe, generate, shape, bn_mode, device, dtype, to_float64)

    if bn_mode == "train":
        raise ValueError(f"bn_mode='train': a {source.format} program fixes its BatchNorm mode "
                         "when it is saved; only nn.Module generators can switch it")
    if isinstance(model, torch.jit.ScriptModule):
        from torch._export.converter import TS2EPConverter
        model = copy.deepcopy(model).eval()
        example = latents(trace_seed, 0, 4, shape)
        try:
            program = TS2EPConverter(model, (example,)).convert()
        except Exception as e:
            raise ValueError(f"latent_shape={shape}: the TorchScript generator could not be "
                             f"run on latents of shape {tuple(example.shape)} "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''});"
                             " pass the right --latent-shape") from None
    else:
        program = model
    fixed = export_fixed_batch(program)
    gm = program.module().to(device)
    dtype = next(iter(gm.parameters()), torch.zeros(())).dtype
    head, probe = None, None
    if trace:
        z = latents(trace_seed, 0, fixed or 4, shape).to(device, dtype)
        head, probe = trace_graph(gm, z, layer, fixed_batch=fixed)

    def generate(z):
        return run_chunked(lambda c: (gm(c),), z, fixed)[0]

    def to_float64():
        raise ValueError(f"check_dtype='float64' needs an nn.Module generator; a {source.format} "
                         "program is checked in its own dtype (check_dtype='float32')")

    return Prepared(head, probe, generate, shape, "as_exported", device, dtype, to_float64)


def open_generator(model, *, arch: Optional[str] = None, arch_options: Optional[dict] = None,
                   trust_pickle: bool = False, trace=True, **prepare_kwargs
                   ) -> tuple[Source, Prepared]:
    """Load a generator (:func:`converters.loading.load_generator`) and :func:`prepare` it.

    ``trace`` is a bool, or a function of the loaded :class:`Source` that decides whether the
    head must be traced; ``prepare_kwargs`` go to :func:`prepare`.
    """
    source = load_generator(model, arch=arch, arch_options=arch_options,
                            trust_pickle=trust_pickle)
    return source, prepare(source, trace=trace(source) if callable(trace) else trace,
                           **prepare_kwargs)

