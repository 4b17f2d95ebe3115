"""examples/hvae_mnist.py end to end on a small budget: the HVAE and the PixelHVAE train,
report per-level figures every epoch and at the end, and resume."""

import json
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "hvae_mnist.py"


def run_example(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["hvae_mnist.py", *map(str, args)])
    return runpy.run_path(str(EXAMPLE), run_name="hvae_mnist")["main"]()


def test_hvae_example_trains_reports_per_level_and_resumes(data_dir, tmp_path, monkeypatch,
                                                           capsys):
    out = tmp_path / "run"
    common = ["--latent-dims", 4, 3, "--num-pseudo-inputs", 20, "--num-samples", 4,
              "--train-images", 700, "--valid-images", 200, "--test-images", 100,
              "--probe-images", 100, "--surgery-points", 100, "--data-dir", data_dir,
              "--out", out, "--no-progress"]
    metrics = run_example(monkeypatch, "--epochs", 1, *common)
    printed = capsys.readouterr().out
    assert "HVAE + vamp" in printed and "500 training / 200 validation / 100 test" in printed
    assert all(column in printed
               for column in ("LL", "KL z1", "KL z2", "AU z1", "AU z2", "MI"))
    for name in ("checkpoint.pt", "best.pt", "metrics.json", "samples.png",
                 "reconstructions.png", "pseudo_inputs.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    test = saved["test"]
    assert test["elbo"] == pytest.approx(test["reconstruction"] - test["kl"], rel=1e-6)
    assert test["elbo"] <= test["log_likelihood"] + 1.0
    assert 0 <= test["active_units_z1"] <= 4 and 0 <= test["active_units_z2"] <= 3
    assert test["active_units"] == test["active_units_z1"] + test["active_units_z2"]
    assert 0 <= test["mutual_information"] <= test["log_num_data_z2"] + 0.05
    latents = saved["history"][0]["latents"]  # the per-epoch collapse curve
    assert len(latents["kl_per_unit"]["z1"]) == 4
    assert len(latents["kl_per_unit"]["z2"]) == 1  # the VampPrior's KL does not split
    assert latents["kl_z1"] == pytest.approx(sum(latents["kl_per_unit"]["z1"]), abs=1e-3)
    assert "mutual_information_z2" in latents and "active_units_z1" in latents

    resumed = run_example(monkeypatch, "--epochs", 2, "--resume", *common)
    printed = capsys.readouterr().out
    assert "resumed run" in printed and "epoch    2" in printed and "epoch    1 " not in printed
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    assert resumed["run_id"] == metrics["run_id"]
    assert all("latents" in h for h in resumed["history"])


def test_pixelhvae_with_free_bits_and_a_vmf_top_level(data_dir, tmp_path, monkeypatch, capsys):
    """--decoder pixelcnn gives the PixelHVAE; --free-bits trains with the floor while the
    validation score stays the ELBO; z2 on the sphere."""
    out = tmp_path / "run"
    metrics = run_example(monkeypatch, "--epochs", 1, "--decoder", "pixelcnn",
                          "--pixelcnn-layers", 2, "--pixelcnn-channels", 8, "--prior",
                          "standard", "--top-latent", "vmf", "--free-bits", 0.25,
                          "--latent-dims", 4, 3, "--num-samples", 2, "--train-images", 400,
                          "--valid-images", 100, "--test-images", 20, "--probe-images", 20,
                          "--surgery-points", 20, "--data-dir", data_dir, "--out", out,
                          "--no-progress")
    printed = capsys.readouterr().out
    assert "PixelHVAE + standard" in printed and "free-bits objective" in printed
    assert len(metrics["history"][0]["latents"]["kl_per_unit"]["z2"]) == 1  # vMF: one group
    assert metrics["test"]["active_units_z2"] <= 4  # coordinates of E[z2] on S^3
    assert (out / "samples.png").is_file()


def test_one_level_with_the_same_networks(data_dir, tmp_path, monkeypatch, capsys):
    """--levels 1: the one-level gated VampPrior VAE, for a comparison at equal budget."""
    out = tmp_path / "run"
    metrics = run_example(monkeypatch, "--levels", 1, "--epochs", 1, "--latent-dims", 4, 3,
                          "--num-pseudo-inputs", 20, "--num-samples", 2, "--train-images", 400,
                          "--valid-images", 100, "--test-images", 20, "--probe-images", 20,
                          "--surgery-points", 20, "--data-dir", data_dir, "--out", out,
                          "--no-progress")
    printed = capsys.readouterr().out
    assert "VAE + vamp, z = 3" in printed and "HVAE" not in printed
    assert len(metrics["history"][0]["latents"]["kl_per_unit"]["z"]) == 1
    assert "kl_z" in metrics["test"] and "kl_z1" not in metrics["test"]


def test_bad_arguments_name_the_option(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        run_example(monkeypatch, "--latent-dims", 0, 3)
    assert "--latent-dims must be two positive integers" in capsys.readouterr().err


def test_help_names_every_option_with_its_default(monkeypatch, capsys):
    with pytest.raises(SystemExit):
        run_example(monkeypatch, "--help")
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "preset default:" in " ".join(text.split())
    for option in ("--decoder", "--prior", "--top-latent", "--latent-dims", "--free-bits",
                   "--probe-images", "--epochs", "--warmup-unit", "--resume"):
        assert option in text, option
