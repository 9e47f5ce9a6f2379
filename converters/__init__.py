"""PyTorch side of flipad-jax: read generators, write head bundles, sample (needs torch).

Python API (mirrors ``flipad convert`` / ``flipad sample``)::

    from converters import convert, sample, build_generator
    convert("netG.pth", "bundle/", arch="dcgan")          # or an nn.Module, TorchScript, .pt2
    sample("netG.pth", 1000, "samples/", arch="dcgan", seed=1)

Names are imported lazily so that ``import converters`` (e.g. by the CLI) does not import torch.
"""

_LAZY = {"convert": "converters.convert", "Conversion": "converters.convert",
         "sample": "converters.sampling", "build_generator": "converters.generators",
         "ARCHS": "converters.generators", "load_generator": "converters.loading"}

__all__ = sorted(_LAZY)


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'converters' has no attribute {name!r}")
