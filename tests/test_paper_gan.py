"""The shipped paper-size DCGAN (converters/demo_weights/paper_size): its weights load into the
reference architecture and its head converts as the paper's DCGAN last layer."""

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import flipad_jax as fj  # noqa: E402
from converters.convert import convert  # noqa: E402
from converters.paper_gan import OUT_DIR, paper_discriminator  # noqa: E402

pytestmark = pytest.mark.torch
WEIGHTS = OUT_DIR / "dcgan.safetensors"


def test_shipped_head_converts_as_the_papers_last_layer(tmp_path):
    from safetensors.torch import load_file

    convert(WEIGHTS, tmp_path / "b", arch="dcgan", samples=64, progress=False)
    head = fj.Head.load(tmp_path / "b")
    stored = load_file(str(WEIGHTS))["main.12.weight"]
    assert stored.dtype == torch.float16 and WEIGHTS.stat().st_size < 8 * 2 ** 20
    assert isinstance(head.op, fj.ConvTranspose2d) and head.bias is None
    assert (head.op.stride, head.op.padding) == ((2, 2), (1, 1))
    assert (head.in_shape, head.out_shape) == ((64, 32, 32), (3, 64, 64))
    assert head.activation.name == "tanh"
    np.testing.assert_array_equal(np.asarray(head.op.weight), stored.float().numpy())
    record = json.loads((OUT_DIR / "training.json").read_text())
    assert record["images_seen"] == record["steps"] * record["batch_size"]


def test_paper_discriminator_shapes():
    d = paper_discriminator().eval()
    with torch.no_grad():
        p = d(torch.zeros(2, 3, 64, 64))
    assert p.shape == (2, 1) and bool(((p > 0) & (p < 1)).all())
    convs = [m for m in d.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [m.out_channels for m in convs] == [64, 128, 256, 512, 1]
