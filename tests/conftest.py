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
