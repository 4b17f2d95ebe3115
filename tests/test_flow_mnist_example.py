"""examples/flow_mnist.py end to end on a tiny budget: outputs, metrics, finite bits/dim,
--resume, and the one-line errors of bad options."""

import json
import math
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "flow_mnist.py"
TINY = ["--train-images", 96, "--test-images", 6, "--batch-size", 32, "--levels", 1,
        "--steps", 1, "--hidden-channels", 4, "--dequantizer-channels", 4, "--num-samples", 3,
        "--no-progress"]


def run_example(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["flow_mnist.py", *map(str, args)])
    return runpy.run_path(str(EXAMPLE), run_name="flow_mnist")["main"]()


def test_glow_with_variational_dequantization_trains_reports_and_resumes(
        data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    common = ["--flow", "glow", "--dequantization", "variational", "--data-dir", data_dir,
              "--out", out, *TINY]
    metrics = run_example(monkeypatch, "--epochs", 1, *common)
    printed = capsys.readouterr().out
    assert "MNIST from" in printed and "96 training / 6 test images" in printed
    assert "Glow, variational dequantization" in printed and "bits/dim" in printed
    for name in ("checkpoint.pt", "metrics.json", "samples.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    elbo, weighted = saved["test"]
    assert (elbo["bound"], elbo["num_samples"]) == ("ELBO", 1)
    assert (weighted["bound"], weighted["num_samples"]) == ("IW bound", 3)
    for row in (elbo, weighted):
        assert math.isfinite(row["bits_per_dim"]) and 0 < row["bits_per_dim"] < 16
        assert math.isfinite(row["standard_error"]) and row["num_images"] == 6
    assert elbo["monte_carlo_standard_error"] is None
    assert weighted["monte_carlo_standard_error"] >= 0
    assert saved["train_bits_per_dim"][0] == pytest.approx(
        -saved["history"][0]["train_objective"] / (784 * math.log(2)))

    resumed = run_example(monkeypatch, "--epochs", 2, "--resume", *common)
    printed = capsys.readouterr().out
    assert "resumed run" in printed and "epoch    2" in printed and "epoch    1 " not in printed
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    assert resumed["run_id"] == metrics["run_id"]


def test_real_nvp_with_uniform_dequantization(data_dir, tmp_path, monkeypatch, capsys):
    metrics = run_example(monkeypatch, "--flow", "realnvp", "--epochs", 1, "--data-dir",
                          data_dir, "--out", tmp_path, *TINY)
    assert "Real NVP, uniform dequantization" in capsys.readouterr().out
    assert all(math.isfinite(row["bits_per_dim"]) for row in metrics["test"])
    assert metrics["config"]["levels"] == 1 and metrics["config"]["hidden_channels"] == 4


def test_paper_preset_resolves_per_flow_and_bad_options_fail_in_one_line(monkeypatch, capsys):
    namespace = runpy.run_path(str(EXAMPLE), run_name="flow_mnist")
    glow_args = namespace["parse_args"](["--preset", "paper"])
    assert (glow_args.levels, glow_args.steps, glow_args.hidden_channels) == (2, 32, 512)
    real_nvp_args = namespace["parse_args"](["--preset", "paper", "--flow", "realnvp"])
    assert (real_nvp_args.levels, real_nvp_args.hidden_channels) == (3, 64)
    for option in ("--num-samples", "--levels", "--dequantizer-channels"):
        with pytest.raises(SystemExit):
            namespace["parse_args"]([option, "0"])
        assert f"{option} must be a positive number, got 0" in capsys.readouterr().err
