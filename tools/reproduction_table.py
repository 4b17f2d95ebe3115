"""Print the S-VAE reproduction table of ``docs/reproduction.rst`` from finished runs.

Each argument is the ``--out`` folder of an ``examples/svae_mnist.py`` run; its
``metrics.json`` gives the test figures (nats per test image), the epochs, the epoch of the best
validation bound and the training time (the sum of the epochs' wall-clock seconds, so the time
a run spent stopped between a checkpoint and ``--resume`` is not counted). The paper's figures
are Davidson et al. (2018)'s MNIST table as the project's reference notes give it.

    python tools/reproduction_table.py runs/paper/nvae_d10 runs/paper/svae_d10 \
        --curves docs/_static/reproduction/curves.png

``--curves`` also draws each run's validation ELBO per epoch (matplotlib, the ``examples``
extra), the best epoch marked.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

#: Davidson et al. (2018), MNIST: (LL, ELBO, RE, KL) by latent and manifold dimension d.
PAPER = {
    ("normal", 2): (-135.73, -137.08, -129.84, 7.24),
    ("vmf", 2): (-132.50, -133.72, -126.43, 7.28),
    ("normal", 5): (-110.21, -112.98, -100.16, 12.82),
    ("vmf", 5): (-108.43, -111.19, -97.84, 13.35),
    ("normal", 10): (-93.84, -98.36, -78.93, 19.44),
    ("vmf", 10): (-93.16, -97.70, -77.03, 20.67),
}
HEADER = ["model", "ours: LL (± SE) / ELBO / RE / KL", "paper: LL / ELBO / RE / KL",
          "epochs (best)", "training time", "test LL time"]


def row(folder: Path) -> list[str]:
    """One table row from a run folder's ``metrics.json``."""
    metrics = json.loads((folder / "metrics.json").read_text())
    config, test, history = metrics["config"], metrics["test"], metrics["history"]
    latent, d = config["latent"], config["latent_dim"]
    name = "S-VAE" if latent == "vmf" else "N-VAE"
    ours = (f"{test['log_likelihood']:.2f} (± {test['log_likelihood_standard_error']:.3f}) / "
            f"{test['elbo']:.2f} / {test['reconstruction']:.2f} / {test['kl']:.2f}")
    paper = PAPER.get((latent, d))
    paper = " / ".join(f"{value:.2f}" for value in paper) if paper else "-"
    hours = sum(epoch["seconds"] for epoch in history) / 3600
    return [f"{name}, d = {d}", ours, paper, f"{len(history)} ({metrics['best_epoch']})",
            f"{hours:.1f} h", f"{test['seconds'] / 60:.1f} min"]


def list_table(rows: list[list[str]]) -> str:
    """An reStructuredText ``list-table`` with a header row."""
    lines = [".. list-table::", "   :header-rows: 1", ""]
    for cells in [HEADER, *rows]:
        lines += [f"   {'*' if i == 0 else ' '} - {cell}" for i, cell in enumerate(cells)]
    return "\n".join(lines)


def plot_curves(folders: list[Path], path: Path) -> None:
    """The validation ELBO per epoch of each run (nats), its best epoch marked, into ``path``.

    :raises ValueError: if no run has validation scores.
    """
    runs = [json.loads((folder / "metrics.json").read_text()) for folder in folders]
    curves = [[epoch for epoch in run["history"] if "valid_score" in epoch] for run in runs]
    scores = sorted(epoch["valid_score"] for curve in curves for epoch in curve)
    if not scores:
        raise ValueError("--curves: the runs have no validation scores (run with "
                         "--valid-images)")
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    warmup = max(run["config"]["warmup_epochs"] for run in runs)
    if warmup:
        axes.axvspan(0, warmup, color="0.9", zorder=0, label="KL warm-up")
    for folder, run, curve in zip(folders, runs, curves, strict=True):
        lines = axes.plot([epoch["epoch"] for epoch in curve],
                          [epoch["valid_score"] for epoch in curve], lw=1, label=row(folder)[0])
        best = [epoch["valid_score"] for epoch in curve if epoch["epoch"] == run["best_epoch"]]
        axes.plot([run["best_epoch"]] * len(best), best, "o", color=lines[0].get_color())
    axes.set_ylim(scores[len(scores) // 50], scores[-1] + 1)  # the first epochs' tail cut off
    axes.set_xlabel("epoch")
    axes.set_ylabel("validation ELBO (nats)")
    axes.set_title("MNIST, paper protocol: validation ELBO per epoch (dot: best epoch)")
    axes.grid(alpha=0.3)
    axes.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=100)
    plt.close(figure)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="--out folders of svae_mnist.py runs")
    parser.add_argument("--curves", type=Path, help="also draw the validation curves into this "
                                                      "PNG file")
    args = parser.parse_args(argv)
    missing = [str(folder) for folder in args.runs if not (folder / "metrics.json").is_file()]
    if missing:
        parser.error(f"runs: no metrics.json in {', '.join(missing)}")
    print(list_table([row(folder) for folder in args.runs]))
    if args.curves:
        try:
            plot_curves(args.runs, args.curves)
        except ValueError as error:
            parser.error(str(error))


if __name__ == "__main__":
    main()
