"""The examples end to end, on a small budget: outputs, metrics and --resume."""

import json
import math
import runpy
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def run_example(monkeypatch, *args, name="svae_mnist"):
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *map(str, args)])
    module = runpy.run_path(str(EXAMPLES / f"{name}.py"), run_name=name)
    return module["main"]()


@pytest.mark.parametrize("latent", ["vmf", "normal"])
def test_svae_example_trains_reports_and_resumes(latent, data_dir, tmp_path, monkeypatch,
                                                capsys):
    out = tmp_path / "run"
    common = ["--latent", latent, "--latent-dim", 2, "--num-samples", 4, "--train-images", 3000,
              "--test-images", 300, "--data-dir", data_dir, "--out", out, "--no-progress"]
    metrics = run_example(monkeypatch, "--epochs", 1, *common)
    printed = capsys.readouterr().out
    assert "MNIST from" in printed and "3,000 training images" in printed
    assert "LL" in printed and "ELBO" in printed and "RE" in printed and "KL" in printed
    for name in ("checkpoint.pt", "metrics.json", "samples.png", "reconstructions.png",
                 "latent.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    test = saved["test"]
    assert test["elbo"] == pytest.approx(test["reconstruction"] - test["kl"], rel=1e-6)
    assert test["elbo"] <= test["log_likelihood"] + 1.0 and test["kl"] > 0
    assert metrics["history"][0]["epoch"] == 1

    resumed = run_example(monkeypatch, "--epochs", 2, "--resume", *common)
    printed = capsys.readouterr().out
    assert "resumed" in printed and "epoch   2" in printed and "epoch   1 " not in printed
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]


def run_flows_example(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["flows_mnist.py", *map(str, args)])
    module = runpy.run_path(str(EXAMPLES / "flows_mnist.py"), run_name="flows_mnist")
    return module["main"]()


def test_flows_example_trains_reports_and_resumes(data_dir, tmp_path, monkeypatch, capsys):
    if not (data_dir / "BinarizedMNIST").is_dir():
        pytest.skip(f"no BinarizedMNIST in {data_dir}")
    out = tmp_path / "run"
    common = ["--flow", "householder-sylvester", "--num-flows", 2, "--latent-dim", 8,
              "--num-samples", 4, "--train-images", 300, "--valid-images", 100,
              "--test-images", 100, "--data-dir", data_dir, "--out", out, "--no-progress"]
    metrics = run_flows_example(monkeypatch, "--epochs", 1, *common)
    printed = capsys.readouterr().out
    assert "300 training / 100 validation images" in printed
    assert "-ELBO" in printed and "NLL" in printed and "householder-sylvester" in printed
    for name in ("checkpoint.pt", "best.pt", "metrics.json", "samples.png",
                 "reconstructions.png"):
        assert (out / name).is_file(), name
    saved = json.loads((out / "metrics.json").read_text())
    test = saved["test"]
    assert saved["test_images"] == 100 and test["num_samples"] == 4
    assert test["elbo"] == pytest.approx(test["reconstruction"] - test["kl"], rel=1e-6)
    assert test["elbo"] <= test["log_likelihood"] + 1.0
    assert metrics["history"][0]["epoch"] == 1 and "valid_elbo" in metrics["history"][0]

    resumed = run_flows_example(monkeypatch, "--epochs", 2, "--resume", *common)
    printed = capsys.readouterr().out
    assert "resumed" in printed and "epoch    2" in printed and "epoch    1 " not in printed
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]


def test_flows_example_names_the_missing_data(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="binarized_mnist_train.amat"):
        run_flows_example(monkeypatch, "--data-dir", tmp_path, "--out", tmp_path / "run")


def test_svae_example_trains_with_iwae_and_reports_the_diagnostics(data_dir, tmp_path,
                                                                    monkeypatch, capsys):
    out = tmp_path / "run"
    metrics = run_example(monkeypatch, "--objective", "iwae", "--num-particles", 3, "--epochs",
                          1, "--latent-dim", 3, "--num-samples", 4, "--train-images", 1000,
                          "--test-images", 200, "--surgery-points", 50, "--data-dir", data_dir,
                          "--out", out, "--no-progress")
    printed = capsys.readouterr().out
    assert "IWAE bound, K = 3" in printed and "train L_3" in printed and "AU" in printed
    test = metrics["test"]
    # L_3 on the test set lies between the ELBO and the 4-sample LL estimate, up to noise
    assert test["elbo"] - 1.0 <= test["iwae_bound"] <= test["log_likelihood"] + 1.0
    assert 0 <= test["active_units"] <= 4
    assert test["mutual_information"] <= test["log_num_data"] + 1e-9
    bits = -test["log_likelihood"] / (784 * math.log(2))
    assert test["bits_per_dim"] == pytest.approx(bits)


@pytest.mark.parametrize("latent, prior", [("normal", "vamp"), ("vmf", "vamp"),
                                           ("normal", "mog")])
def test_vampprior_example_trains_reports_and_resumes(latent, prior, data_dir, tmp_path,
                                                      monkeypatch, capsys):
    out = tmp_path / "run"
    common = ["--latent", latent, "--prior", prior, "--latent-dim", 4, "--num-pseudo-inputs",
              20, "--pseudo-init", "data", "--num-samples", 4, "--train-images", 1200,
              "--valid-images", 200, "--test-images", 100, "--surgery-points", 50,
              "--data-dir", data_dir, "--out", out, "--no-progress"]
    metrics = run_example(monkeypatch, "--epochs", 1, *common, name="vampprior_mnist")
    printed = capsys.readouterr().out
    assert "1,000 training / 200 validation images" in printed and prior in printed
    pictures = ["samples.png", "reconstructions.png"] + (["pseudo_inputs.png"]
                                                         if prior == "vamp" else [])
    for name in ("checkpoint.pt", "best.pt", "metrics.json", *pictures):
        assert (out / name).is_file(), name
    test = json.loads((out / "metrics.json").read_text())["test"]
    assert test["elbo"] == pytest.approx(test["reconstruction"] - test["kl"], rel=1e-6)
    assert test["elbo"] <= test["log_likelihood"] + 1.0
    assert metrics["history"][0]["epoch"] == 1 and "valid_elbo" in metrics["history"][0]
    resumed = run_example(monkeypatch, "--epochs", 2, "--resume", *common,
                          name="vampprior_mnist")
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
