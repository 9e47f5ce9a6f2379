"""The `flipad` command line end to end: convert → sample → invert, and bad image input."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from flipad_jax.cli import main
from flipad_jax.images import load_images


@pytest.mark.slow
@pytest.mark.torch
def test_convert_sample_invert(tmp_path):
    torch = pytest.importorskip("torch")
    from converters.generators import build_generator

    torch.manual_seed(0)
    torch.save(build_generator("dcgan", size="small").state_dict(), tmp_path / "g.pth")
    arch = ["--arch", "dcgan", "--arch-opt", "nz=16", "--arch-opt", "ngf=4", "--arch-opt",
            "image_size=16", "--quiet"]
    assert main(["convert", str(tmp_path / "g.pth"), "--out", str(tmp_path / "bundle"),
                 "--samples", "64", *arch]) == 0
    assert main(["sample", str(tmp_path / "g.pth"), "--n", "5", "--out",
                 str(tmp_path / "pngs"), *arch]) == 0
    out = tmp_path / "feats.npy"
    assert main(["invert", str(tmp_path / "bundle"), str(tmp_path / "pngs"), "--out", str(out),
                 "--quiet"]) == 0
    import flipad_jax as fj
    head = fj.Head.load(tmp_path / "bundle")
    feats = np.load(out)
    assert feats.shape == (5,) + head.in_shape
    sidecar = json.loads(out.with_suffix(".json").read_text())
    diagnostics = sidecar["samples"]
    assert [d["index"] for d in diagnostics] == list(range(5))
    assert all(d["status"] == 0 for d in diagnostics)
    assert (sidecar["lasso"]["continuation"], sidecar["lasso"]["step_growth"]) == (0.2, 1.02)
    # Without the λ path, at the fixed step, or with another growth factor the certified solve
    # ends at the same objective, within the two gaps.
    for flag, field, text, value in (("--continuation", "continuation", "none", None),
                                     ("--step-growth", "step_growth", "None", None),
                                     ("--step-growth", "step_growth", "1.05", 1.05)):
        other = tmp_path / f"{field}_{text}.npy"
        assert main(["invert", str(tmp_path / "bundle"), str(tmp_path / "pngs"), "--out",
                     str(other), flag, text, "--quiet"]) == 0
        record = json.loads(other.with_suffix(".json").read_text())
        assert record["lasso"][field] == value
        for plain, d in zip(diagnostics, record["samples"]):
            assert d["status"] == 0
            assert abs(d["objective"] - plain["objective"]) <= d["gap"] + plain["gap"] + 1e-6
    assert main(["invert", str(tmp_path / "bundle"), str(tmp_path / "pngs"), "--out",
                 str(tmp_path / "x.npy"), "--continuation", "0.2", "--mode", "paper",
                 "--quiet"]) == 1
    # Images of another size are refused with both shapes named, and nothing is written.
    np.save(tmp_path / "small.npy", np.zeros((2,) + head.out_shape[:1] + (8, 8), np.float32))
    assert main(["invert", str(tmp_path / "bundle"), str(tmp_path / "small.npy"), "--out",
                 str(tmp_path / "bad.npy"), "--quiet"]) == 1
    assert not (tmp_path / "bad.npy").exists()
    # Batching does not change the solutions (every sample stops on its own).
    images = load_images(tmp_path / "pngs", head.output_range)
    one = head.invert_batches(images, batch_size=5)
    three = head.invert_batches(images, batch_size=2)
    np.testing.assert_allclose(one.z, three.z, atol=1e-6)
    with pytest.raises(ValueError, match="integer pixels need their scale"):
        head.target(np.zeros((1,) + head.out_shape, np.uint8))
    # The features reproduce the sampled PNGs through the generator's last layer.
    recon = np.asarray(head.forward(feats))
    assert np.abs(recon - images).mean() < 0.02


def test_invert_refuses_bad_images_naming_the_file(tmp_path, capsys):
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(folder / "a.png")
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(folder / "b.png")
    with pytest.raises(ValueError, match=r"b\.png.*mixed sizes or channel counts"):
        load_images(folder)
    (folder / "b.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ValueError, match=r"b\.png: unreadable or truncated"):
        load_images(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="no images"):
        load_images(empty)
    np.save(tmp_path / "nan.npy", np.full((1, 3, 8, 8), np.nan, np.float32))
    with pytest.raises(ValueError, match="NaN/inf"):
        load_images(tmp_path / "nan.npy")
    Image.fromarray(np.zeros((8, 8), np.uint8)).convert("P").save(folder / "b.png")
    with pytest.raises(ValueError, match=r"b\.png: image mode 'P'"):
        load_images(folder)
    assert main(["invert", str(tmp_path / "missing_bundle"), str(folder), "--out",
                 str(tmp_path / "f.npy")]) == 1
    assert "missing_bundle" in capsys.readouterr().err
    assert not (tmp_path / "f.npy").exists()


def test_help_works_without_importing_torch():
    code = ("import sys; from flipad_jax.cli import build_parser; build_parser(); "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
    out = subprocess.run([sys.executable, "-m", "flipad_jax.cli", "invert", "--help"],
                         capture_output=True, text=True, check=True)
    assert "examples:" in out.stdout
