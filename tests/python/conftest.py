"""Finds the package in the checkout (python/) without installing it, and the built CLI."""

import pathlib
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "python"))


@pytest.fixture(scope="session")
def repo():
    return REPO


@pytest.fixture(scope="session")
def cli():
    """The svgear binary of the same build the package loads."""
    import svgear

    path = pathlib.Path(svgear.library_path()).parent.parent / "bin" / "svgear"
    if not path.is_file():
        pytest.skip(f"the svgear CLI was not built next to {svgear.library_path()}")
    return path
