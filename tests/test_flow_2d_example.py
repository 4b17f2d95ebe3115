"""examples/flow_2d_kl.py on a small budget: the KLs it prints and returns are finite, each fit
wins on its own divergence (mode covering against mode seeking), and the figure is written."""

import json
import math
import runpy
import sys
from pathlib import Path

import pyro
import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "flow_2d_kl.py"


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("flow_2d_kl")
    main = runpy.run_path(str(EXAMPLE), run_name="flow_2d_kl")["main"]
    with pyro.validation_enabled(False):  # restores the state the example's seeding changes
        return out, main(["--steps", "300", "--eval-samples", "4000", "--seed", "0",
                          "--out", str(out)])


def test_kls_are_finite_and_written(run):
    out, results = run
    assert set(results) == {"forward", "reverse"}
    for kl in results.values():
        for name in ("forward_kl", "forward_kl_se", "reverse_kl", "reverse_kl_se"):
            assert math.isfinite(kl[name]) and kl[name] >= 0, (name, kl)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved["forward"] == pytest.approx(results["forward"])
    assert saved["config"]["steps"] == 300


def test_each_fit_wins_on_its_own_divergence(run):
    _, results = run
    forward, reverse = results["forward"], results["reverse"]
    # Mode covering: the maximum-likelihood fit has the lower KL(p||q); the other fit misses
    # modes, so its estimate is large and heavy-tailed (its standard error says little).
    assert forward["forward_kl"] < reverse["forward_kl"]
    # Mode seeking: the variational fit has the lower KL(q||p), by more than the noise.
    assert (reverse["reverse_kl"] + 3 * reverse["reverse_kl_se"]
            < forward["reverse_kl"] - 3 * forward["reverse_kl_se"])


def test_figure_is_saved(run):
    out, _ = run
    figure = out / "flow_2d_kl.png"
    assert figure.is_file() and figure.stat().st_size > 10_000


def test_bad_arguments_name_the_option(monkeypatch, capsys):
    main = runpy.run_path(str(EXAMPLE), run_name="flow_2d_kl")["main"]
    monkeypatch.setattr(sys, "argv", ["flow_2d_kl.py"])
    with pytest.raises(SystemExit):
        main(["--steps", "0"])
    assert "--steps must be a positive number, got 0" in capsys.readouterr().err
