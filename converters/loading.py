"""Read a PyTorch generator without trusting pickles.

Accepted inputs (:func:`load_generator`):

* a registered architecture (``arch``) plus a state_dict file: ``.pt``/``.pth`` read with
  ``torch.load(weights_only=True)``, or ``.safetensors``;
* a TorchScript file (``torch.jit.save``);
* a ``torch.export`` program (``torch.export.save``, usually ``.pt2``);
* an ``nn.Module`` passed in Python;
* a fully pickled module, only with ``trust_pickle=True`` (unpickling executes code).

The format is told from the file's content, not its name. Every refusal is a ``ValueError``
that says what was found and what to do instead.
"""

from __future__ import annotations

import hashlib
import pickle
import warnings
import zipfile
from pathlib import Path
from typing import NamedTuple, Optional, Union

import numpy as np
import torch
from torch import nn

from converters.generators import build_generator
from flipad_jax._files import sha256_file


class Source(NamedTuple):
    """A loaded generator and where it came from.

    Attributes:
      model: an ``nn.Module``, a TorchScript module, or a ``torch.export.ExportedProgram``.
      format: "state_dict", "safetensors", "torchscript", "export", "module" or "pickle".
      file: the file's name, or None for a module passed in Python.
      sha256: of the file's bytes, or of the module's state_dict (names, dtypes, shapes, bytes).
      arch, arch_options: the registered architecture used, if any.
      latent_shape: per-sample latent shape known from the source (arch or export program).
    """

    model: Union[nn.Module, torch.jit.ScriptModule, "torch.export.ExportedProgram"]
    format: str
    file: Optional[str]
    sha256: str
    arch: Optional[str]
    arch_options: dict
    latent_shape: Optional[tuple]


def state_dict_sha256(state_dict) -> str:
    """A content hash of a state_dict: sorted names with dtype, shape and bytes of each tensor."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        t = state_dict[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _sniff(path: Path) -> str:
    """'torchscript', 'export', 'torch_save', 'safetensors' or 'legacy' (non-zip torch.save)."""
    if zipfile.is_zipfile(path):
        try:
            names = zipfile.ZipFile(path).namelist()
        except zipfile.BadZipFile as e:
            raise ValueError(f"model={str(path)!r}: corrupt zip archive ({e})") from None
        if any("/code/__torch__" in n for n in names):
            return "torchscript"
        if any(n.endswith("archive_format") for n in names):
            return "export"
        return "torch_save"
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) == 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 1 << 27:
        return "safetensors"
    return "legacy"


def _check_state_dict(path, obj) -> dict:
    if not (isinstance(obj, dict) and obj and all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                                  for k, v in obj.items())):
        what = (f"a dict with keys {sorted(map(str, obj))[:8]}" if isinstance(obj, dict)
                else f"a {type(obj).__name__}")
        raise ValueError(f"model={str(path)!r} holds {what}: expected a state_dict (a mapping of "
                         "parameter names to tensors), e.g. torch.save(generator.state_dict(), "
                         "path)")
    return obj


def load_into(model: nn.Module, state_dict: dict, *, where: str = "state_dict") -> nn.Module:
    """``model.load_state_dict(state_dict, strict=True)`` with a message listing every missing,
    unexpected and mis-shaped key."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    extra = sorted(set(state_dict) - set(expected))
    shapes = [f"{k}: {tuple(state_dict[k].shape)} vs {tuple(expected[k].shape)}"
              for k in sorted(set(expected) & set(state_dict))
              if tuple(state_dict[k].shape) != tuple(expected[k].shape)]
    problems = []
    for label, items in (("missing keys", missing), ("unexpected keys", extra),
                         ("shape mismatches (file vs architecture)", shapes)):
        if items:
            more = f" ... and {len(items) - 10} more" if len(items) > 10 else ""
            problems.append(f"{label}: {', '.join(items[:10])}{more}")
    if problems:
        raise ValueError(f"{where} does not fit the architecture {type(model).__name__}: "
                         + "; ".join(problems)
                         + " (wrong --arch, or sizes that need --arch-opt, e.g. nc=1?)")
    model.load_state_dict(state_dict, strict=True)
    return model


def _read_state_dict(path: Path, kind: str, trust_pickle: bool):
    """A state_dict, or (with trust_pickle) possibly a whole pickled module."""
    if kind == "safetensors":
        from safetensors.torch import load_file
        try:
            return load_file(str(path))
        except Exception as e:  # safetensors' own error types
            raise ValueError(f"model={str(path)!r}: not a readable safetensors file ({e})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if not trust_pickle:
            raise ValueError(
                f"model={str(path)!r} is a pickled object that is not plain weights (PyTorch: "
                f"{str(e).splitlines()[0]}). Unpickling it would execute code from the file. "
                "Save a state_dict, a TorchScript file or a torch.export program instead, or, "
                "only if you trust the file, pass --trust-pickle (trust_pickle=True).") from None
        warnings.warn(f"unpickling {path} with trust_pickle=True: this executes code from the "
                      "file", stacklevel=3)
        try:
            return torch.load(path, map_location="cpu", weights_only=False)
        except Exception as e2:
            raise ValueError(f"model={str(path)!r}: unpickling failed ({e2})") from None
    except Exception as e:  # truncated or corrupt archives raise RuntimeError/EOFError/...
        raise ValueError(f"model={str(path)!r}: not a readable PyTorch file ({type(e).__name__}: "
                         f"{e})") from None


def load_generator(model, *, arch: Optional[str] = None, arch_options: Optional[dict] = None,
                   trust_pickle: bool = False) -> Source:
    """Load a generator from ``model`` (a path or an ``nn.Module``); see the module docstring.

    Args:
      model: path to a state_dict / safetensors / TorchScript / export file, an ``nn.Module``,
        or a :class:`Source` already loaded (returned as it is).
      arch: registered architecture (``converters.generators.ARCHS``) for state_dict files.
      arch_options: constructor overrides for ``arch`` (e.g. ``{"nc": 1, "image_size": 32}``).
      trust_pickle: allow a fully pickled module (executes code from the file).
    """
    if isinstance(model, Source):  # loaded by a format-specific reader (converters.diffusers_vae)
        return model
    arch_options = dict(arch_options or {})
    if arch_options and arch is None:
        raise ValueError(f"arch_options={arch_options!r}: given without arch")
    if isinstance(model, nn.Module) and not isinstance(model, torch.jit.ScriptModule):
        if arch is not None:
            raise ValueError(f"arch={arch!r}: the model is already an nn.Module; pass arch only "
                             "with a state_dict file")
        shape = getattr(model, "latent_shape", None)
        return Source(model, "module", None, state_dict_sha256(model.state_dict()), None, {},
                      None if shape is None else tuple(shape))
    if not isinstance(model, (str, Path)):
        raise ValueError(f"model={model!r}: expected a file path or a torch.nn.Module")
    path = Path(model)
    if not path.is_file():
        raise ValueError(f"model={str(path)!r}: no such file")
    kind = _sniff(path)
    sha = sha256_file(path)
    if kind in ("torchscript", "export"):
        if arch is not None:
            raise ValueError(f"arch={arch!r}: {path.name} is a {kind} program that carries its "
                             "own architecture; pass arch only with a state_dict file")
        try:
            if kind == "torchscript":
                loaded = torch.jit.load(str(path), map_location="cpu")
                return Source(loaded, "torchscript", path.name, sha, None, {}, None)
            loaded = torch.export.load(str(path))
        except Exception as e:
            raise ValueError(f"model={str(path)!r}: not a readable {kind} file "
                             f"({type(e).__name__}: {e})") from None
        return Source(loaded, "export", path.name, sha, None, {}, _export_latent_shape(loaded))
    obj = _read_state_dict(path, kind, trust_pickle)
    if isinstance(obj, nn.Module):
        if arch is not None:
            raise ValueError(f"arch={arch!r}: {path.name} holds a whole pickled module; pass arch "
                             "only with a state_dict file")
        shape = getattr(obj, "latent_shape", None)
        return Source(obj, "pickle", path.name, sha, None, {},
                      None if shape is None else tuple(shape))
    state_dict = _check_state_dict(path, obj)
    if arch is None:
        raise ValueError(f"model={str(path)!r} holds a state_dict (weights only): pass --arch "
                         "(arch=) to say which architecture they belong to")
    generator = build_generator(arch, options=arch_options)
    load_into(generator, state_dict, where=f"model={str(path)!r}")
    return Source(generator, "safetensors" if kind == "safetensors" else "state_dict", path.name,
                  sha, arch, arch_options, tuple(generator.latent_shape))


def _export_latent_shape(program) -> Optional[tuple]:
    """Per-sample shape of an export program's single user input, from its example metadata."""
    user_inputs = program.graph_signature.user_inputs
    placeholders = {n.name: n for n in program.graph.nodes if n.op == "placeholder"}
    if len(user_inputs) != 1:
        raise ValueError(f"the export program takes {len(user_inputs)} inputs {user_inputs}: "
                         "expected a generator of one latent tensor")
    val = placeholders[user_inputs[0]].meta.get("val")
    if val is None:
        return None
    dims = tuple(val.shape[1:])
    return tuple(int(d) for d in dims) if all(isinstance(d, (int, np.integer)) for d in dims) \
        else None
