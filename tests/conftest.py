"""Shared test fixtures: the repository root and the Animals data location."""
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def animals_dir():
    """The Animals folder the notebooks use ($ANIMALS_DIR, else datasets/Animals), or None if it has no images."""
    path = Path(os.environ.get("ANIMALS_DIR") or REPO_ROOT / "datasets" / "Animals")
    has_images = path.is_dir() and any(f.is_file() for d in path.iterdir() if d.is_dir() for f in d.iterdir())
    return path if has_images else None


@pytest.fixture
def repo_root():
    return REPO_ROOT


@pytest.fixture
def animals():
    """The Animals folder; skips the test when the images are absent."""
    path = animals_dir()
    if path is None:
        pytest.skip("Animals data absent: put it in datasets/Animals or set ANIMALS_DIR (see datasets/README.md)")
    return path
