"""The examples end to end, on a small budget: outputs, metrics, --resume, and what a new user
runs into (few test images, a missing data folder, a missing device, zero epochs, --help)."""

import json
import math
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
TOOLS = EXAMPLES.parent / "tools"


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
    assert "data: MNIST from" in printed and "3,000 training / 0 validation" in printed
    assert all(column in printed for column in ("LL", "ELBO", "RE", "KL", "AU", "MI"))
    for name in ("checkpoint.pt", "metrics.json", "samples.png", "reconstructions.png",
                 "latent.png"):
        assert (out / name).is_file(), name
    test = json.loads((out / "metrics.json").read_text())["test"]
    assert test["elbo"] == pytest.approx(test["reconstruction"] - test["kl"], rel=1e-6)
    assert test["elbo"] <= test["log_likelihood"] + 1.0 and test["kl"] > 0
    assert metrics["history"][0]["epoch"] == 1

    resumed = run_example(monkeypatch, "--epochs", 2, "--resume", *common)
    printed = capsys.readouterr().out
    assert "resumed run" in printed and "epoch    2" in printed and "epoch    1 " not in printed
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    assert resumed["run_id"] == metrics["run_id"]

    # the reproduction page's table is printed from the same metrics.json
    runpy.run_path(str(TOOLS / "reproduction_table.py"))["main"]([str(out)])
    table = capsys.readouterr().out
    paper = "-132.50 / -133.72 / -126.43 / 7.28" if latent == "vmf" else "-135.73 / -137.08"
    assert f"{'S' if latent == 'vmf' else 'N'}-VAE, d = 2" in table and paper in table
    assert f"- {resumed['test']['log_likelihood']:.2f} (± " in table
    assert f"- 2 ({resumed['best_epoch']})" in table


def test_svae_example_with_validation_keeps_the_best_epoch(data_dir, tmp_path, monkeypatch,
                                                           capsys):
    out = tmp_path / "run"
    metrics = run_example(monkeypatch, "--epochs", 2, "--valid-images", 300, "--patience", 5,
                          "--warmup-epochs", 1, "--latent-dim", 3, "--num-samples", 4,
                          "--train-images", 1300, "--test-images", 100, "--data-dir", data_dir,
                          "--out", out, "--no-progress")
    printed = capsys.readouterr().out
    assert "1,000 training / 300 validation / 100 test images" in printed
    assert "loaded the best epoch" in printed and (out / "best.pt").is_file()
    assert metrics["best_epoch"] in (1, 2)
    assert [h["kl_scale"] for h in metrics["history"]] == [1.0, 1.0]  # beta reaches 1 in epoch 1
    assert all("valid_score" in h for h in metrics["history"])

    curves = tmp_path / "curves.png"  # the reproduction page's figure
    runpy.run_path(str(TOOLS / "reproduction_table.py"))["main"]([str(out), "--curves",
                                                                  str(curves)])
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_ten_test_images_still_give_metrics_and_pictures(data_dir, tmp_path, monkeypatch):
    out = tmp_path / "run"
    run_example(monkeypatch, "--epochs", 1, "--latent-dim", 2, "--num-samples", 2,
                "--train-images", 500, "--test-images", 10, "--surgery-points", 10,
                "--data-dir", data_dir, "--out", out, "--no-progress")
    assert json.loads((out / "metrics.json").read_text())["test"]["test_images"] == 10
    assert (out / "reconstructions.png").is_file() and (out / "samples.png").is_file()


def test_zero_epochs_say_no_checkpoint_was_written(data_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    run_example(monkeypatch, "--epochs", 0, "--latent-dim", 2, "--num-samples", 2,
                "--train-images", 500, "--test-images", 40, "--surgery-points", 10,
                "--data-dir", data_dir, "--out", out, "--no-progress")
    printed = capsys.readouterr().out
    assert "checkpoint" not in printed.splitlines()[-1]
    assert not (out / "checkpoint.pt").exists() and (out / "metrics.json").is_file()


def _command_line(tmp_path, *args, name="svae_mnist"):
    return subprocess.run([sys.executable, str(EXAMPLES / f"{name}.py"), *map(str, args)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)


def test_a_named_data_folder_that_is_missing_is_an_error(tmp_path):
    result = _command_line(tmp_path, "--data-dir", tmp_path / "nonexistent", "--out",
                           tmp_path / "run")
    assert result.returncode == 2
    assert f"--data-dir {tmp_path / 'nonexistent'}: no such folder" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "run").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
@pytest.mark.parametrize("device, message", [
    ("cuda", "--device cuda: this machine has no CUDA device"),
    ("gpu", "--device gpu: not a device"),
])
def test_a_missing_device_is_a_one_line_error_before_anything_runs(tmp_path, device, message):
    result = _command_line(tmp_path, "--device", device, "--out", tmp_path / "run")
    assert result.returncode == 2 and message in result.stderr
    assert "Traceback" not in result.stderr and "data:" not in result.stdout
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("name", ["svae_mnist", "vampprior_mnist", "flows_mnist"])
def test_help_explains_every_option_once(tmp_path, name):
    text = _command_line(tmp_path, "--help", name=name).stdout
    assert "(default: None)" not in text and "(default: all)" not in text
    options = [line.split()[0] for line in text.splitlines()
               if line.startswith("  --") and line.split()[0] != "--help"]
    described = " ".join(text.split())
    for option in ("--epochs", "--batch-size", "--lr", "--seed"):
        assert option in options
    # every option has help text: no option line is followed directly by another option
    lines = text.splitlines()
    for number, line in enumerate(lines):
        if line.startswith("  --") and len(line.split()) <= 2 and number + 1 < len(lines):
            assert not lines[number + 1].startswith("  -"), line
    assert "preset default:" in described


def test_one_wrong_argument_is_named_alone(tmp_path):
    result = _command_line(tmp_path, "--batch-size", 0, "--out", tmp_path / "run")
    assert result.returncode == 2
    assert result.stderr.splitlines()[-1].endswith(
        "error: --batch-size must be a positive number, got 0")


def test_flows_example_trains_reports_and_resumes(data_dir, tmp_path, monkeypatch, capsys):
    if not (data_dir / "BinarizedMNIST").is_dir():
        pytest.skip(f"no BinarizedMNIST in {data_dir}")
    out = tmp_path / "run"
    common = ["--flow", "householder-sylvester", "--num-flows", 2, "--latent-dim", 8,
              "--num-samples", 4, "--train-images", 300, "--valid-images", 100,
              "--test-images", 100, "--surgery-points", 50, "--data-dir", data_dir,
              "--out", out, "--no-progress"]
    metrics = run_example(monkeypatch, "--epochs", 1, *common, name="flows_mnist")
    printed = capsys.readouterr().out
    assert "data: statically binarized MNIST" in printed
    assert "300 training / 100 validation / 100 test images" in printed
    assert "-ELBO" in printed and "NLL" in printed and "householder-sylvester" in printed
    for name in ("checkpoint.pt", "best.pt", "metrics.json", "samples.png",
                 "reconstructions.png"):
        assert (out / name).is_file(), name
    test = json.loads((out / "metrics.json").read_text())["test"]
    assert test["test_images"] == 100 and test["num_samples"] == 4
    assert test["elbo"] == pytest.approx(test["reconstruction"] - test["kl"], rel=1e-6)
    assert test["elbo"] <= test["log_likelihood"] + 1.0
    assert metrics["history"][0]["epoch"] == 1 and "valid_score" in metrics["history"][0]

    resumed = run_example(monkeypatch, "--epochs", 2, "--resume", *common, name="flows_mnist")
    printed = capsys.readouterr().out
    assert "resumed run" in printed and "epoch    2" in printed and "epoch    1 " not in printed
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]


def test_flows_example_names_the_missing_data(tmp_path, monkeypatch):
    with pytest.raises(SystemExit, match="binarized_mnist_train.amat"):
        run_example(monkeypatch, "--data-dir", tmp_path, "--out", tmp_path / "run",
                    name="flows_mnist")


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
    assert "1,000 training / 200 validation" in printed and prior in printed
    pictures = ["samples.png", "reconstructions.png"] + (["pseudo_inputs.png"]
                                                         if prior == "vamp" else [])
    for name in ("checkpoint.pt", "best.pt", "metrics.json", *pictures):
        assert (out / name).is_file(), name
    test = json.loads((out / "metrics.json").read_text())["test"]
    assert test["elbo"] == pytest.approx(test["reconstruction"] - test["kl"], rel=1e-6)
    assert test["elbo"] <= test["log_likelihood"] + 1.0
    assert metrics["history"][0]["epoch"] == 1 and "valid_score" in metrics["history"][0]
    latents = metrics["history"][0]["latents"]  # per epoch: KL per unit, AU, MI
    assert len(latents["kl_per_unit"]["z"]) == (4 if prior == "standard" else 1)
    assert 0 <= latents["active_units"] <= 5 and "mutual_information" in latents
    resumed = run_example(monkeypatch, "--epochs", 2, "--resume", *common,
                          name="vampprior_mnist")
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
