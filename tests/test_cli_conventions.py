"""CLI conventions: --json output, the --log run record, @argsfile, --device, progress bars only
on a terminal."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from flipad_jax.cli import build_parser, main
from flipad_jax.detector import Detector
from tests.test_cli_score import TINY, _images

pytestmark = pytest.mark.slow  # end-to-end CLI runs: the full suite (CI) runs them


@pytest.fixture(scope="module")
def arrays(tmp_path_factory):
    d = tmp_path_factory.mktemp("conventions")
    rng = np.random.default_rng(0)
    for name, mean, n in (("model", 0.5, 96), ("other", 0.0, 96), ("test", 0.0, 30)):
        np.save(d / f"{name}.npy", _images(rng, n, mean))
    return d


def _fit_args(d, out, *extra):
    return ["fit", "--features", "raw", "--size", "none", "--model", str(d / "model.npy"),
            "--other", str(d / "other.npy"), "--val-fraction", "0.25", "--out", str(out),
            *TINY, *extra]


def test_fit_and_evaluate_print_one_json_object_with_json(arrays, tmp_path, capsys):
    assert main(_fit_args(arrays, tmp_path / "det", "--json")) == 0
    fitted = json.loads(capsys.readouterr().out)
    det = Detector.load(tmp_path / "det", progress=False)
    assert fitted["path"] == str((tmp_path / "det").absolute())
    assert (fitted["n_model"], fitted["n_other"], fitted["n_val"]) == (72, 96, 24)
    assert fitted["thresholds"] == {"0.05": det.thresholds_[0.05]}
    assert main(["evaluate", str(tmp_path / "det"), "--model", str(arrays / "model.npy"),
                 "--other", f"test={arrays / 'test.npy'}", "--json", "--quiet"]) == 0
    evaluated = json.loads(capsys.readouterr().out)
    (record,) = evaluated["records"]
    assert record["other"] == "test" and 0 <= record["auc"] <= 1


def test_log_records_command_results_and_exit_status(arrays, tmp_path, capsys):
    log = tmp_path / "run.log"
    assert main(["--log", str(log), *_fit_args(arrays, tmp_path / "det")]) == 0
    text = log.read_text()
    assert f"command: flipad --log {log} fit" in text
    assert "'jax':" in text and "threshold at fnr=0.05" in text
    assert "exit status 0" in text
    # a refused input is logged with its message, appended to the same file
    assert main(["--log", str(log), *_fit_args(arrays, tmp_path / "det")]) == 1
    assert "exit status 1" in log.read_text() and "already exists" in log.read_text()
    assert "device: " in log.read_text()
    capsys.readouterr()
    # a log that cannot be opened is refused input, not a crash
    assert main(["--log", str(tmp_path / "no" / "such" / "dir.log"),
                 *_fit_args(arrays, tmp_path / "det2")]) == 1
    assert "cannot append to it" in capsys.readouterr().err


def test_arguments_from_a_file_equal_the_same_arguments_inline(arrays, tmp_path, capsys):
    argsfile = tmp_path / "fit.args"
    argsfile.write_text("\n".join(_fit_args(arrays, tmp_path / "from_file")) + "\n")
    assert main([f"@{argsfile}"]) == 0
    assert main(_fit_args(arrays, tmp_path / "inline")) == 0
    x = np.load(arrays / "test.npy")
    np.testing.assert_array_equal(Detector.load(tmp_path / "from_file").anomaly_score(x),
                                  Detector.load(tmp_path / "inline").anomaly_score(x))
    capsys.readouterr()


def test_device_choice(arrays, tmp_path, capsys):
    assert main(["--device", "cpu", *_fit_args(arrays, tmp_path / "det")]) == 0
    # a platform this machine cannot start is refused (exit 1), not silently replaced by the CPU
    env = dict(os.environ, JAX_PLATFORMS="")
    run = subprocess.run([sys.executable, "-m", "flipad_jax.cli", "--device", "tpu", "verify",
                          str(tmp_path / "nothing")], capture_output=True, text=True, env=env)
    assert run.returncode == 1, run.stderr
    assert "--device tpu: JAX cannot start a tpu backend here" in run.stderr
    # the torch --device of convert and sample is theirs, apart from JAX's
    args = build_parser().parse_args(["--device", "cpu", "sample", "m.pt", "--n", "1", "--out",
                                      "o", "--device", "cuda"])
    assert (args.jax_device, args.device) == ("cpu", "cuda")
    capsys.readouterr()


def test_progress_bars_only_on_a_terminal_unless_asked(arrays, tmp_path, capsys):
    quiet_free = [a for a in _fit_args(arrays, tmp_path / "a") if a != "--quiet"]
    assert main(quiet_free) == 0  # pytest's stderr is not a terminal
    assert "it/s" not in capsys.readouterr().err
    forced = [a for a in _fit_args(arrays, tmp_path / "b") if a != "--quiet"]
    assert main(["--progress", *forced]) == 0
    err = capsys.readouterr().err
    assert "it/s" in err or "s/it" in err
