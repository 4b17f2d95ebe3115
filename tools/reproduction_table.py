"""Print the S-VAE reproduction table of ``docs/reproduction.rst`` from finished runs.

Each argument is the ``--out`` folder of an ``examples/svae_mnist.py`` run; its
``metrics.json`` gives the test figures (nats per test image), the epochs, the epoch of the best
validation bound and the training time (the sum of the epochs' wall-clock seconds, so the time
a run spent stopped between a checkpoint and ``--resume`` is not counted). The paper's figures
are Davidson et al. (2018)'s MNIST table as the project's reference notes give it.

    python tools/reproduction_table.py runs/paper/nvae_d10 runs/paper/svae_d10
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

#: Davidson et al. (2018), MNIST: (LL, ELBO, RE, KL) by latent and manifold dimension d.
PAPER = {
    ("normal", 2): (-135.73, -137.08, -129.84, 7.24), ("vmf", 2): (-132.50, -133.72, -126.43, 7.28),
    ("normal", 5): (-110.21, -112.98, -100.16, 12.82), ("vmf", 5): (-108.43, -111.19, -97.84, 13.35),
    ("normal", 10): (-93.84, -98.36, -78.93, 19.44), ("vmf", 10): (-93.16, -97.70, -77.03, 20.67),
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


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path, help="--out folders of svae_mnist.py runs")
    args = parser.parse_args(argv)
    missing = [str(folder) for folder in args.runs if not (folder / "metrics.json").is_file()]
    if missing:
        parser.error(f"runs: no metrics.json in {', '.join(missing)}")
    print(list_table([row(folder) for folder in args.runs]))


if __name__ == "__main__":
    main()
