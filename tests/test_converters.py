"""PyTorch generator → head bundle: every reference architecture, every input format, every
refusal. Truth comes from PyTorch itself (forward hooks on the real generator)."""

import json
import subprocess
import sys

import numpy as np
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn

import flipad_jax as fj  # noqa: E402
from converters.convert import convert  # noqa: E402
from converters.generators import ARCHS, build_generator  # noqa: E402
from converters.runner import latents  # noqa: E402
from converters.sampling import sample  # noqa: E402

pytestmark = pytest.mark.torch

HEAD_LAYER = {"dcgan": "main.6", "wgangp": "main.6", "ebgan": "conv_blocks.6",
              "lsgan": "conv_blocks.12", "medigan_dcgan": "main.9", "klwgan": "net.4",
              "sd_vae_last": "conv_out"}


def _small(arch, seed=0):
    # PyTorch's default init: outputs of order one, so the self-check is not trivially small.
    torch.manual_seed(seed)
    return build_generator(arch, size="small")


def _head_io(model, layer, z):
    """Input and output of ``layer`` and the generator's output, by a plain forward hook."""
    module = dict(model.named_modules())[layer]
    seen = {}
    handle = module.register_forward_hook(lambda m, i, o: seen.update(i=i[0], o=o))
    with torch.no_grad():
        x = model(z)
    handle.remove()
    return seen["i"], seen["o"], x


# lsgan, medigan_dcgan and sd_vae_last convert slowest: full suite only (the fast subset keeps
# the others)
@pytest.mark.parametrize("arch", [pytest.param(a, marks=pytest.mark.slow)
                                  if a in ("lsgan", "medigan_dcgan", "sd_vae_last") else a
                                  for a in sorted(ARCHS)])
def test_reference_architectures_convert_and_round_trip(arch, tmp_path, x64):
    g = _small(arch)
    torch.save(g.state_dict(), tmp_path / "g.pth")
    res = convert(tmp_path / "g.pth", tmp_path / "b", arch=arch, arch_options=ARCHS[arch].small,
                  samples=40, batch_size=16, check_samples=8, check_dtype="float64",
                  progress=False)
    meta = res.meta
    assert meta["layer"]["name"] == HEAD_LAYER[arch]
    assert meta["activation"] == ("identity" if arch in ("klwgan", "sd_vae_last") else "tanh")
    assert meta["self_check"]["max_abs_error"] <= 1e-5
    module = dict(g.named_modules())[HEAD_LAYER[arch]]
    head = fj.Head.load(tmp_path / "b", dtype="float64")
    np.testing.assert_array_equal(np.asarray(head.op.weight), module.weight.detach().double())
    if module.bias is not None:
        np.testing.assert_array_equal(np.asarray(head.bias), module.bias.detach().double())
    # Independent truth: the generator's own images from its own head input.
    g64 = g.double().eval()
    z = latents(5, 0, 3, g.latent_shape).double()
    head_in, pre, x = _head_io(g64, HEAD_LAYER[arch], z)
    np.testing.assert_allclose(head.forward(head_in.numpy()), x.numpy(), atol=1e-5)
    if meta["activation"] == "tanh":  # the target of an unsaturated image is the pre-activation
        ok = pre.abs().numpy() < 3
        np.testing.assert_allclose(np.asarray(head.target(x.numpy()))[ok], pre.numpy()[ok],
                                   atol=1e-6)
    # float32 round trip, from the module itself
    res32 = convert(g, tmp_path / "b32", samples=16, check_samples=8, progress=False)
    assert res32.meta["self_check"]["max_abs_error"] <= 1e-4
    assert res32.meta["source"]["format"] == "module"


def test_zbar_equals_direct_computation(tmp_path):
    g = _small("lsgan")
    res = convert(g, tmp_path / "b", samples=50, batch_size=7, seed=11, progress=False)
    z = latents(11, 0, 50, g.latent_shape)
    head_in, _, _ = _head_io(g.eval(), "conv_blocks.12", z)
    direct = head_in.double().mean(0).numpy()
    np.testing.assert_allclose(fj.Head.load(res.path).zbar, direct, atol=1e-6)
    # z̄ does not depend on the batch size in eval mode, and is different for another seed.
    other = convert(g, tmp_path / "c", samples=50, batch_size=50, seed=11, progress=False)
    np.testing.assert_allclose(fj.Head.load(other.path).zbar, direct, atol=1e-6)
    assert res.meta["zbar"] == {**res.meta["zbar"], "n_samples": 50, "seed": 11, "batch_size": 7}


def test_train_mode_batchnorm_uses_batch_statistics(tmp_path):
    g = _small("dcgan")
    res = convert(g, tmp_path / "b", samples=32, batch_size=16, bn_mode="train", progress=False)
    direct = []
    g.train()
    for start in (0, 16):
        head_in, _, _ = _head_io(g, "main.6", latents(0, start, 16, g.latent_shape))
        direct.append(head_in.double().sum(0))
    np.testing.assert_allclose(fj.Head.load(res.path).zbar, (sum(direct) / 32).numpy(),
                               atol=1e-6)
    assert res.meta["zbar"]["bn_mode"] == "train"


def test_torchscript_and_export_programs_convert(tmp_path):
    g = _small("dcgan").eval()
    ref = convert(g, tmp_path / "ref", samples=24, progress=False)
    torch.jit.save(torch.jit.script(g), tmp_path / "g.ts")
    ts = convert(tmp_path / "g.ts", tmp_path / "ts", latent_shape=g.latent_shape, samples=24,
                 progress=False)
    batch = torch.export.Dim("batch")
    ep = torch.export.export(g, (latents(0, 0, 4, g.latent_shape),),
                             dynamic_shapes={"z": {0: batch}})
    torch.export.save(ep, tmp_path / "g.pt2")
    ex = convert(tmp_path / "g.pt2", tmp_path / "ex", samples=24, progress=False)
    # a program with a static batch of 5 runs in padded chunks
    torch.export.save(torch.export.export(g, (latents(0, 0, 5, g.latent_shape),)),
                      tmp_path / "s.pt2")
    st = convert(tmp_path / "s.pt2", tmp_path / "st", samples=24, progress=False)
    heads = [fj.Head.load(r.path) for r in (ref, ts, ex, st)]
    for r, h in zip((ts, ex, st), heads[1:]):
        assert r.meta["self_check"]["max_abs_error"] <= 1e-4
        assert r.meta["layer"]["kind"] == "conv_transpose2d" and r.meta["activation"] == "tanh"
        np.testing.assert_array_equal(np.asarray(h.op.weight), np.asarray(heads[0].op.weight))
        np.testing.assert_allclose(h.zbar, heads[0].zbar, atol=1e-5)
    assert ts.meta["source"]["format"] == "torchscript"
    assert ex.meta["zbar"]["bn_mode"] == "as_exported"


class _Shuffled(nn.Module):
    """Defines the output layer first and a decoy conv last; runs them in the other order."""

    def __init__(self):
        super().__init__()
        self.to_rgb = nn.Conv2d(6, 3, 3, padding=1)
        self.act = nn.Sigmoid()
        self.stem = nn.ConvTranspose2d(4, 6, 4, 1, 0)
        self.decoy = nn.Conv2d(6, 6, 1)
        self.latent_shape = (4, 1, 1)

    def forward(self, z):
        return self.act(self.to_rgb(torch.relu(self.stem(z))))


def test_head_found_by_execution_not_module_order(tmp_path):
    res = convert(_Shuffled(), tmp_path / "b", samples=8, progress=False)
    assert res.meta["layer"]["name"] == "to_rgb" and res.meta["activation"] == "sigmoid"
    assert res.meta["output_range"] == [0.0, 1.0]


class _Tail(nn.Module):
    def __init__(self, tail):
        super().__init__()
        self.conv = nn.ConvTranspose2d(4, 3, 4, 2, 1)
        self.tail = tail
        self.latent_shape = (4, 2, 2)

    def forward(self, z):
        return self.tail(self.conv(z), z)


class _Wrap(nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module

    def forward(self, y, z):
        return self.module(y)


@pytest.mark.parametrize("tail, message", [
    (_Wrap(nn.ReLU()), "ReLU .* not invertible"),
    (_Wrap(nn.Hardtanh()), "Hardtanh .* not invertible"),
    (lambda y, z: torch.relu(y), "ReLU of layer 'conv'"),
    (_Wrap(nn.GroupNorm(1, 3)), "GroupNorm \\('tail.module'\\) runs between"),
    (lambda y, z: torch.tanh(y + nn.functional.interpolate(z[:, :3], scale_factor=2)),
     "skip connection"),
])
def test_refused_outputs_name_the_problem(tail, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        convert(_Tail(tail), tmp_path / "b", samples=4, progress=False)
    assert not (tmp_path / "b").exists()


def test_functional_tanh_is_found(tmp_path):
    res = convert(_Tail(lambda y, z: torch.tanh(y)), tmp_path / "b", samples=4, progress=False)
    assert res.meta["activation"] == "tanh"


def test_bad_files_and_inputs(tmp_path):
    g = _small("dcgan")
    torch.save(g, tmp_path / "full.pt")
    with pytest.raises(ValueError, match="--trust-pickle"):
        convert(tmp_path / "full.pt", tmp_path / "o", samples=4, progress=False)
    with pytest.warns(UserWarning, match="executes code"):
        res = convert(tmp_path / "full.pt", tmp_path / "o", samples=4, trust_pickle=True,
                      progress=False)
    assert res.meta["source"]["format"] == "pickle"
    (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04 not really a zip")
    with pytest.raises(ValueError, match="model="):
        convert(tmp_path / "bad.pt", tmp_path / "x", arch="dcgan", progress=False)
    sd = g.state_dict()
    torch.save(sd, tmp_path / "g.pth")
    head = sd.pop("main.6.weight")
    torch.save({**sd, "extra.weight": head}, tmp_path / "keys.pth")
    with pytest.raises(ValueError, match="missing keys: main.6.weight; unexpected keys: "
                                         "extra.weight"):
        convert(tmp_path / "keys.pth", tmp_path / "x", arch="dcgan",
                arch_options=ARCHS["dcgan"].small, progress=False)
    with pytest.raises(ValueError, match="shape mismatches"):
        convert(tmp_path / "g.pth", tmp_path / "x", arch="dcgan", progress=False)  # paper size
    with pytest.raises(ValueError, match="pass --arch"):
        convert(tmp_path / "g.pth", tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match=r"latent_shape=\(7, 1, 1\)"):
        convert(tmp_path / "g.pth", tmp_path / "x", arch="dcgan",
                arch_options=ARCHS["dcgan"].small, latent_shape=(7, 1, 1), progress=False)
    torch.jit.save(torch.jit.script(g.eval()), tmp_path / "g.ts")
    with pytest.raises(ValueError, match="latent_shape is needed"):
        convert(tmp_path / "g.ts", tmp_path / "x", progress=False)
    with pytest.raises(ValueError, match="latent_shape=\\(9, 1, 1\\)"):
        convert(tmp_path / "g.ts", tmp_path / "x", latent_shape=(9, 1, 1), progress=False)
    with pytest.raises(ValueError, match="bn_mode='train'"):
        convert(tmp_path / "g.ts", tmp_path / "x", latent_shape=g.latent_shape, bn_mode="train",
                progress=False)
    with pytest.raises(ValueError, match="layer='nope'"):
        convert(g, tmp_path / "x", layer="nope", progress=False)
    assert not (tmp_path / "x").exists()


def test_safetensors_weights(tmp_path):
    from safetensors.torch import save_file
    g = _small("klwgan")
    save_file(g.state_dict(), tmp_path / "g.safetensors")
    res = convert(tmp_path / "g.safetensors", tmp_path / "b", arch="klwgan",
                  arch_options=ARCHS["klwgan"].small, samples=8, progress=False)
    assert res.meta["source"]["format"] == "safetensors"
    assert len(res.meta["source"]["sha256"]) == 64


def test_sampling_png_and_npy(tmp_path):
    g = _small("dcgan")
    torch.save(g.state_dict(), tmp_path / "g.pth")
    kw = dict(arch="dcgan", arch_options=ARCHS["dcgan"].small, seed=3, batch_size=4,
              progress=False)
    sample(tmp_path / "g.pth", 6, tmp_path / "npy", fmt="npy", **kw)
    sample(tmp_path / "g.pth", 6, tmp_path / "png", **kw)
    sample(tmp_path / "g.pth", 2, tmp_path / "tail", fmt="npy", start=4, **kw)
    x = np.load(tmp_path / "npy" / "samples.npy")
    with torch.no_grad():
        direct = g.eval()(latents(3, 0, 6, g.latent_shape)).numpy()
    np.testing.assert_allclose(x, direct, atol=1e-6)
    np.testing.assert_array_equal(np.load(tmp_path / "tail" / "samples.npy"), x[4:])
    from PIL import Image
    files = sorted((tmp_path / "png").glob("*.png"))
    assert [f.name for f in files] == [f"{i:06d}.png" for i in range(6)]
    pixels = np.stack([np.asarray(Image.open(f)) for f in files]).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(pixels, np.clip(np.rint((x.astype(np.float64) + 1) * 127.5),
                                                  0, 255))
    record = json.loads((tmp_path / "png" / "samples.json").read_text())
    assert record["seed"] == 3 and record["indices"] == [0, 6] and record["output_range"] == [-1, 1]
    with pytest.raises(ValueError, match="already exists"):
        sample(tmp_path / "g.pth", 6, tmp_path / "png", **kw)
    t = _small("klwgan")
    with pytest.raises(ValueError, match="output range"):
        sample(t, 2, tmp_path / "tab", progress=False)
    sample(t, 2, tmp_path / "tab", fmt="npy", progress=False)
    assert np.load(tmp_path / "tab" / "samples.npy").shape == (2, 11)


def test_cli(tmp_path):
    import argparse
    from converters.cli import ARCH_NAMES, add_convert_parser, add_sample_parser
    assert ARCH_NAMES.split(", ") == list(ARCHS)
    parser = argparse.ArgumentParser(prog="flipad")
    sub = parser.add_subparsers(required=True)
    for add in (add_convert_parser, add_sample_parser):
        assert "examples:" in add(sub).format_help()
    torch.save(_small("lsgan").state_dict(), tmp_path / "g.pth")
    common = ["--arch", "lsgan", "--arch-opt", "nz=16", "--arch-opt", "ngf=4",
              "--arch-opt", "image_size=16", "--quiet"]
    args = parser.parse_args(["convert", str(tmp_path / "g.pth"), "--out", str(tmp_path / "b"),
                              "--samples", "8", *common])
    assert args.func(args) == 0 and fj.Head.load(tmp_path / "b").in_shape == (4, 16, 16)
    args = parser.parse_args(["convert", str(tmp_path / "g.pth"), "--out", str(tmp_path / "c"),
                              "--latent-shape", "3", *common])
    assert args.func(args) == 1 and not (tmp_path / "c").exists()
    args = parser.parse_args(["sample", str(tmp_path / "g.pth"), "--n", "3", "--out",
                              str(tmp_path / "s"), *common])
    assert args.func(args) == 0 and len(list((tmp_path / "s").glob("*.png"))) == 3


def test_cli_module_does_not_import_torch():
    code = "import sys, converters.cli; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
