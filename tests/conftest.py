import os
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The verified real data: $PYRO_DGM_DATA_DIR, else ../shared/data beside the repository."""
    path = Path(os.environ.get("PYRO_DGM_DATA_DIR", REPOSITORY.parent / "shared" / "data"))
    if not (path / "MNIST" / "raw").is_dir():
        pytest.skip(f"no MNIST in {path} (set PYRO_DGM_DATA_DIR); tests never download")
    return path


@pytest.fixture(autouse=True, scope="session")
def exact_chi2_tail():
    """Pyro 1.9's ``gof.chi2sf`` returns 1.0 far in the tail (chi^2 = 500 with 18 degrees of
    freedom, where the exact value is 1e-94), so ``auto_goodness_of_fit`` would pass a wrong
    sampler. Every goodness-of-fit test uses scipy's exact tail instead."""
    import scipy.stats
    from pyro.distributions.testing import gof

    original = gof.chi2sf
    gof.chi2sf = lambda value, dof: float(scipy.stats.chi2.sf(value, dof))
    yield
    gof.chi2sf = original
