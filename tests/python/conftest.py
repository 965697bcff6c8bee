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


@pytest.fixture()
def conditional_dit():
    """A tiny class-conditional quality model (4x16x16 video, 9 labels) whose output depends on
    its labels and on attention, as after training (an untrained one predicts zero)."""
    import torch

    from svgear.quality.model import DiTConfig, VideoDiT

    torch.manual_seed(0)
    model = VideoDiT(DiTConfig(dim=32, num_heads=2, num_layers=2, video=(4, 16, 16), num_labels=9))
    with torch.no_grad():
        model.head.head.weight.normal_(0, 0.3)
        model.label_embedding.weight.normal_()
    return model
