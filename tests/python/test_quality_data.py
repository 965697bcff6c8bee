"""svgear.quality.data: the procedural video generator."""
import os
import sys

_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python")
if os.path.abspath(_PY) not in map(os.path.abspath, sys.path):
    sys.path.insert(0, _PY)

import torch  # noqa: E402

from svgear.quality import data  # noqa: E402


def test_generate_is_deterministic_from_the_seed():
    a = data.generate(7, batch=2, frames=6, height=32, width=32)
    b = data.generate(7, batch=2, frames=6, height=32, width=32)
    c = data.generate(8, batch=2, frames=6, height=32, width=32)
    assert a.shape == (2, 3, 6, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1
    assert a.std() > 0.1  # not a flat image


def test_videos_show_motion():
    v = data.generate(3, batch=4, frames=16, height=96, width=96)
    step = (v[:, :, 1:] - v[:, :, :-1]).abs().mean(dim=(1, 3, 4))  # (B, T-1)
    assert (step > 1e-3).all(), "every video changes from every frame to the next"
    drift = (v[:, :, -1] - v[:, :, 0]).abs().mean(dim=(1, 2, 3))
    assert (drift > 0.02).all(), "first and last frames differ clearly"


def test_a_crop_is_the_same_window_of_the_scene():
    g = torch.Generator().manual_seed(5)
    params = data.scene_params(2, g)
    full = data.render(params, 16, 96, 96)
    t0, y0, x0 = torch.tensor([2, 7]), torch.tensor([10, 40]), torch.tensor([20, 0])
    crop = data.render(params, 4, 24, 32, t0, y0, x0)
    for i in range(2):
        ref = full[i, :, t0[i]:t0[i] + 4, y0[i]:y0[i] + 24, x0[i]:x0[i] + 32]
        assert torch.allclose(crop[i], ref, atol=1e-4)


def test_random_clips_follow_the_generator():
    a = data.random_clips(3, 4, 16, 16, torch.Generator().manual_seed(1))
    b = data.random_clips(3, 4, 16, 16, torch.Generator().manual_seed(1))
    assert a.shape == (3, 3, 4, 16, 16)
    assert torch.equal(a, b)
