"""Find a generator's head by running it: the last linear layer executed and its activation.

The head is the last Conv2d / ConvTranspose2d / Linear that *executes* in a forward call (module
order does not matter), or the layer named by ``layer=``. Everything that runs after it must be
one supported activation (tanh, sigmoid, or nothing): ReLU, Hardtanh and other non-invertible
maps are refused because FLIPAD needs σ_L invertible (o = σ⁻¹(x), METHOD.md §2); any other
operation between the layer and the output (a skip connection, a normalisation) is refused with
its name. The activation is then verified numerically: the generator's output must equal
σ(layer output), which also catches functional code (``x + skip``, ``torch.tanh``) that no module
hook sees.

Two kinds of generators are traced:

* ``nn.Module``: forward hooks record the execution order and capture the head's input;
* graphs (``torch.export`` programs, and TorchScript converted to one): nodes of the FX graph in
  execution order, run with an interpreter that keeps the head's input.

Both give a probe: ``probe(z, outputs=True) -> (x, head_input)`` for a batch of latents
(``outputs=False`` may skip computing x and return None for it).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import torch
from torch import nn

KINDS = {nn.Conv2d: "conv2d", nn.ConvTranspose2d: "conv_transpose2d", nn.Linear: "linear"}
_LINEAR_LIKE = (nn.modules.conv._ConvNd, nn.Linear, nn.Bilinear)

# What may follow the head, by module class name or ATen op name.
_ACTIVATIONS = {"Tanh": "tanh", "Sigmoid": "sigmoid", "Identity": "identity",
                "aten.tanh.default": "tanh", "aten.sigmoid.default": "sigmoid",
                "aten.clone.default": "identity", "aten.alias.default": "identity",
                "aten.detach.default": "identity"}
_NON_INVERTIBLE = {"ReLU", "ReLU6", "Hardtanh", "Hardsigmoid", "Hardswish", "Threshold",
                   "aten.relu.default", "aten.relu_.default", "aten.relu6.default",
                   "aten.hardtanh.default", "aten.hardtanh_.default", "aten.clamp.default",
                   "aten.clamp_min.default", "aten.clamp_max.default",
                   "aten.hardsigmoid.default", "aten.threshold.default"}
_FORWARD = {"identity": lambda y: y, "tanh": torch.tanh, "sigmoid": torch.sigmoid}
_REFUSED_NUMERIC = {"ReLU": torch.relu, "Hardtanh": lambda y: torch.clamp(y, -1, 1)}

_ASSUMPTION = ("FLIPAD inverts the final activation to get the layer's output back from an image "
               "(o = σ⁻¹(x), METHOD.md §2), so σ must be invertible: tanh, sigmoid or none")


class HeadLayer(NamedTuple):
    """The found head, in PyTorch terms.

    Attributes:
      name: the layer's name (module path, or graph node).
      kind: "conv2d", "conv_transpose2d" or "linear".
      weight, bias: tensors in PyTorch layout (bias None if absent).
      geometry: stride, padding, dilation (pairs), groups (int) and, for conv_transpose2d,
        output_padding; empty for linear.
      activation: "tanh", "sigmoid" or "identity".
      in_shape, out_shape: per-sample shapes of the layer's input and output.
    """

    name: str
    kind: str
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    geometry: dict
    activation: str
    in_shape: tuple
    out_shape: tuple


Probe = Callable[..., tuple]


class _StopForward(Exception):
    """Raised by a probe's hook to end a forward pass once the head's input is captured."""


# -- shared checks ------------------------------------------------------------------------------
def _pair(v) -> list:
    v = list(v) if isinstance(v, (list, tuple)) else [v]
    return [int(e) for e in (v * 2 if len(v) == 1 else v)]


def _same_padding(weight, dilation, name) -> list:
    pads = []
    for k, d in zip(weight.shape[2:], dilation):
        total = d * (k - 1)
        if total % 2:
            raise ValueError(f"layer {name!r} uses padding='same' with an even effective kernel, "
                             "which PyTorch pads asymmetrically: not supported (expected "
                             "symmetric zero padding)")
        pads.append(total // 2)
    return pads


def _classify_after(after: list, head: str) -> Optional[str]:
    """The activation named by what ran after the head (None if nothing did); refuses others."""
    found = []
    for name, what in after:
        if what in _NON_INVERTIBLE:
            raise ValueError(f"the output activation {what} ({name!r}) after layer {head!r} is not "
                             f"invertible: {_ASSUMPTION}")
        if what not in _ACTIVATIONS:
            raise ValueError(f"{what} ({name!r}) runs between the head layer {head!r} and the "
                             "generator's output (a skip connection or a normalisation?): only one "
                             "of tanh, sigmoid or nothing may follow the inverted layer; pick "
                             "another layer with --layer only if it is the last linear step")
        if _ACTIVATIONS[what] != "identity":
            found.append((name, _ACTIVATIONS[what]))
    if len(found) > 1:
        raise ValueError(f"several activations follow layer {head!r}: {found}; expected one")
    return found[0][1] if found else None


def _matches(x, y) -> bool:
    if x.shape != y.shape:
        return False
    tol = 16 * torch.finfo(x.dtype).eps * max(1.0, float(x.abs().max()))
    return bool((x - y).abs().max() <= tol)


def identify_activation(after: list, head: str, y: torch.Tensor, x: torch.Tensor) -> str:
    """The final activation: from the structure, verified on numbers (x must equal σ(y))."""
    declared = _classify_after(after, head)
    candidates = [declared] if declared else ["identity", "tanh", "sigmoid"]
    for act in candidates:
        if _matches(x, _FORWARD[act](y)):
            return act
    for what, fn in _REFUSED_NUMERIC.items():
        if _matches(x, fn(y)):
            raise ValueError(f"the generator's output is {what} of layer {head!r}'s output, which "
                             f"is not invertible: {_ASSUMPTION}")
    shape = "" if x.shape == y.shape else f" (shapes {tuple(y.shape)} → {tuple(x.shape)})"
    raise ValueError(f"the generator's output is not {declared or 'tanh, sigmoid or identity'} "
                     f"of layer {head!r}'s output{shape}: something between them is not a "
                     "supported activation (a skip connection, a normalisation or other "
                     "functional code in forward)")


def _check_in_shape(kind, name, head_in):
    if kind == "linear" and head_in.dim() != 2:
        raise ValueError(f"linear layer {name!r} gets inputs of shape {tuple(head_in.shape)}: "
                         "expected (B, features)")
    if kind != "linear" and head_in.dim() != 4:
        raise ValueError(f"layer {name!r} gets inputs of shape {tuple(head_in.shape)}: "
                         "expected (B, C, H, W)")


def _call(model, z, latent_shape):
    try:
        return model(z)
    except Exception as e:
        raise ValueError(f"latent_shape={tuple(latent_shape)}: the generator's forward failed on "
                         f"latents of shape {tuple(z.shape)} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0] if str(e) else ''}); pass the right "
                         "--latent-shape") from None


def _single_tensor(out, name="the generator"):
    if isinstance(out, (list, tuple)) and len(out) == 1:
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise ValueError(f"{name} returned a {type(out).__name__}: expected one tensor")
    return out


# -- nn.Module ----------------------------------------------------------------------------------
def _module_geometry(module, name) -> dict:
    if isinstance(module, nn.Linear):
        return {}
    if module.padding_mode != "zeros":
        raise ValueError(f"layer {name!r} pads with mode {module.padding_mode!r}: expected "
                         "'zeros' (the operator's adjoint assumes zero padding)")
    dilation = _pair(module.dilation)
    if isinstance(module.padding, str):
        padding = [0, 0] if module.padding == "valid" else \
            _same_padding(module.weight, dilation, name)
    else:
        padding = _pair(module.padding)
    geometry = dict(stride=_pair(module.stride), padding=padding, dilation=dilation,
                    groups=int(module.groups))
    if isinstance(module, nn.ConvTranspose2d):
        geometry["output_padding"] = _pair(module.output_padding)
    return geometry


def trace_module(model: nn.Module, z: torch.Tensor, layer: Optional[str] = None):
    """Find the head of an ``nn.Module`` generator by one forward call on latents ``z``.

    Returns ``(HeadLayer, probe)``.
    """
    names = {m: n for n, m in model.named_modules()}
    order, calls, io = [], {}, {}

    def after_hook(module, inputs, output):
        name = names[module]
        order.append(name)
        calls[name] = calls.get(name, 0) + 1
        if isinstance(module, _LINEAR_LIKE):
            io[name] = (inputs[0].detach().clone(), output.detach().clone())

    leaves = [m for m in model.modules() if not list(m.children()) or isinstance(m, _LINEAR_LIKE)]
    handles = [m.register_forward_hook(after_hook) for m in leaves]
    try:
        with torch.no_grad():
            x = _single_tensor(_call(model, z, z.shape[1:])).detach()
    finally:
        for h in handles:
            h.remove()
    modules = dict(model.named_modules())
    if layer is None:
        executed = [n for n in order if isinstance(modules[n], _LINEAR_LIKE)]
        if not executed:
            raise ValueError("no Conv2d, ConvTranspose2d or Linear layer ran in the generator's "
                             "forward pass: nothing to invert")
        name = executed[-1]
    else:
        if layer not in modules:
            candidates = [n for n, m in modules.items() if isinstance(m, tuple(KINDS))]
            raise ValueError(f"layer={layer!r}: no such module; linear layers: {candidates}")
        if layer not in calls:
            raise ValueError(f"layer={layer!r} did not run in the generator's forward pass")
        name = layer
    module = modules[name]
    if type(module) not in KINDS:
        raise ValueError(f"the head layer {name!r} is a {type(module).__name__}: expected one of "
                         f"{[k.__name__ for k in KINDS]}")
    if calls[name] != 1:
        raise ValueError(f"layer {name!r} runs {calls[name]} times in one forward pass: expected "
                         "once (a shared layer cannot be inverted as the last step)")
    last = len(order) - 1 - order[::-1].index(name)
    after = [(n, type(modules[n]).__name__) for n in order[last + 1:]
             if not list(modules[n].children())]
    head_in, y = io[name]
    kind = KINDS[type(module)]
    _check_in_shape(kind, name, head_in)
    activation = identify_activation(after, name, y, x)
    head = HeadLayer(name, kind, module.weight.detach().clone(),
                     None if module.bias is None else module.bias.detach().clone(),
                     _module_geometry(module, name), activation, tuple(head_in.shape[1:]),
                     tuple(y.shape[1:]))

    def probe(z, outputs=True):
        captured = []

        def grab(m, inputs):
            captured.append(inputs[0])
            if not outputs:  # the head input is all that is needed: skip the rest
                raise _StopForward

        handle = module.register_forward_pre_hook(grab)
        try:
            with torch.no_grad():
                out = _single_tensor(model(z))
        except _StopForward:
            out = None
        finally:
            handle.remove()
        return out, captured[-1]

    return head, probe


# -- graphs (torch.export, TorchScript) --------------------------------------------------------
_CONV_OPS = {"aten.conv2d.default", "aten.conv2d.padding", "aten.conv_transpose2d.input",
             "aten.convolution.default"}
_LINEAR_OPS = {"aten.linear.default"}
_OTHER_LINEAR = {"aten.conv1d.default", "aten.conv3d.default", "aten.conv_transpose1d.default",
                 "aten.conv_transpose3d.input", "aten.addmm.default", "aten.mm.default",
                 "aten.matmul.default", "aten.bmm.default"}


class _Capture(torch.fx.Interpreter):
    """Runs a GraphModule and keeps the values of the nodes in ``keep``."""

    def __init__(self, gm, keep):
        super().__init__(gm)
        self.keep, self.values = set(keep), {}

    def run_node(self, n):
        out = super().run_node(n)
        if n in self.keep:
            self.values[n] = out
        return out


def _node_name(node) -> str:
    weight = node.args[1] if len(node.args) > 1 else None
    if isinstance(weight, torch.fx.Node) and weight.op == "get_attr" and \
            weight.target.endswith(".weight"):
        return weight.target[:-len(".weight")]
    stack = node.meta.get("nn_module_stack")
    if stack:
        return list(stack.values())[-1][0]
    return node.name


def _graph_head(node, values) -> tuple:
    """kind, weight node, bias node, geometry of a conv/linear node (args normalised)."""
    op = str(node.target)
    from torch.fx.operator_schemas import normalize_function
    kw = normalize_function(node.target, node.args, node.kwargs,
                            normalize_to_only_use_kwargs=True).kwargs
    if op in _LINEAR_OPS:
        return "linear", kw["weight"], kw.get("bias"), {}
    transposed = op == "aten.conv_transpose2d.input" or (op == "aten.convolution.default"
                                                         and kw["transposed"])
    geometry = dict(stride=_pair(kw["stride"]), dilation=_pair(kw["dilation"]),
                    groups=int(kw["groups"]))
    if isinstance(kw["padding"], str):
        weight = values[kw["weight"]]
        geometry["padding"] = [0, 0] if kw["padding"] == "valid" else \
            _same_padding(weight, geometry["dilation"], _node_name(node))
    else:
        geometry["padding"] = _pair(kw["padding"])
    if transposed:
        geometry["output_padding"] = _pair(kw.get("output_padding", 0))
    elif any(_pair(kw.get("output_padding", 0))):
        raise ValueError(f"convolution {_node_name(node)!r} has output_padding without transposed")
    return ("conv_transpose2d" if transposed else "conv2d"), kw["weight"], kw.get("bias"), geometry


def _descendants(node) -> list:
    seen, stack = {}, [node]
    while stack:
        for user in stack.pop().users:
            if user not in seen:
                seen[user] = None
                stack.append(user)
    return [n for n in node.graph.nodes if n in seen]


def trace_graph(gm: torch.fx.GraphModule, z: torch.Tensor, layer: Optional[str] = None,
                fixed_batch: Optional[int] = None):
    """Find the head of an FX graph generator (``ExportedProgram.module()``).

    ``fixed_batch``: the program's static batch size, if any; probes then run in padded chunks.
    Returns ``(HeadLayer, probe)``.
    """
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    linear_like = [n for n in nodes if str(n.target) in _CONV_OPS | _LINEAR_OPS | _OTHER_LINEAR]
    if layer is None:
        if not linear_like:
            raise ValueError("no convolution or linear op runs in the program: nothing to invert")
        node = linear_like[-1]
    else:
        matching = [n for n in linear_like if layer in (_node_name(n), n.name)]
        if len(matching) != 1:
            raise ValueError(f"layer={layer!r}: {len(matching)} matching linear ops; linear ops: "
                             f"{[_node_name(n) for n in linear_like]}")
        node = matching[0]
    name = _node_name(node)
    if str(node.target) in _OTHER_LINEAR:
        raise ValueError(f"the head op {name!r} is {node.target}: expected a 2-d convolution, "
                         "transposed convolution or linear layer")
    kw_nodes = [a for a in node.args if isinstance(a, torch.fx.Node)]
    capture = _Capture(gm, [node, *kw_nodes])
    x = _single_tensor(_call(capture.run, z, z.shape[1:]), "the program").detach()
    kind, weight, bias, geometry = _graph_head(node, capture.values)
    weight_t = capture.values[weight]
    if kind != "linear" and weight_t.dim() != 4:
        raise ValueError(f"the head op {name!r} has a {weight_t.dim()}-d weight: expected a 2-d "
                         "convolution (4-d weight)")
    input_node = node.args[0]
    head_in, y = capture.values[input_node], capture.values[node]
    _check_in_shape(kind, name, head_in)
    after = [(_node_name(n) if n.meta.get("nn_module_stack") else n.name, str(n.target))
             for n in _descendants(node) if n.op != "output"]
    activation = identify_activation(after, name, y, x)
    head = HeadLayer(name, kind, weight_t.detach().clone(),
                     None if bias is None else capture.values[bias].detach().clone(), geometry,
                     activation, tuple(head_in.shape[1:]), tuple(y.shape[1:]))

    def run(chunk):
        interp = _Capture(gm, [input_node])
        out = _single_tensor(interp.run(chunk), "the program")
        return out, interp.values[input_node]

    def probe(z, outputs=True):
        return run_chunked(run, z, fixed_batch)

    return head, probe


def run_chunked(fn, z, fixed_batch: Optional[int]) -> tuple:
    """``fn(z)`` (a tuple of batch-first tensors) for a program with a static batch size: z is
    cut into chunks of ``fixed_batch``, the last one padded with zero latents (harmless in eval
    mode, where samples do not interact), and the results are concatenated and cut back."""
    with torch.no_grad():
        if fixed_batch is None:
            return fn(z)
        parts = []
        for start in range(0, z.shape[0], fixed_batch):
            chunk = z[start:start + fixed_batch]
            n = chunk.shape[0]
            if n < fixed_batch:
                chunk = torch.cat([chunk, chunk.new_zeros((fixed_batch - n, *chunk.shape[1:]))])
            parts.append([t[:n] for t in fn(chunk)])
        return tuple(torch.cat(ts) for ts in zip(*parts))


def export_fixed_batch(program) -> Optional[int]:
    """The static batch size of an export program's input, or None if it is dynamic."""
    name = program.graph_signature.user_inputs[0]
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == name)
    val = node.meta.get("val")
    if val is None:
        return None
    b = val.shape[0]
    return int(b) if isinstance(b, int) else None

