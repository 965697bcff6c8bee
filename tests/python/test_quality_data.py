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


def test_labels_name_the_shapes_and_colours_a_clip_shows():
    g = torch.Generator().manual_seed(11)
    params = data.scene_params(6, g)
    video, visible = data.render(params, 16, 96, 96, visibility=True)
    assert torch.equal(video, data.render(params, 16, 96, 96)), "asking for visibility changes nothing else"
    labels = data.scene_labels(params, visible)
    assert labels.shape == (6, data.NUM_LABELS)
    for i in range(6):
        shown = [j for j in range(data.MAX_OBJECTS) if visible[i, j]]
        assert all(j < int(params["obj_count"][i]) for j in shown), "inactive objects are never visible"
        kinds = {int(params["obj_type"][i, j]) for j in shown}
        colours = {int(params["obj_palette"][i, j]) for j in shown}
        expected = [float(k in kinds) for k in range(len(data.SHAPES))] + [float(c in colours) for c in range(len(data.PALETTE))]
        assert labels[i].tolist() == expected
    # a window away from every object shows none of them: its labels are all zero
    params["obj_pos"][:] = 10_000.0
    _, visible = data.render(params, 2, 16, 16, visibility=True)
    assert not visible.any() and not data.scene_labels(params, visible).any()


def test_labelled_clips_are_the_same_clips():
    a = data.random_clips(3, 4, 32, 32, torch.Generator().manual_seed(2))
    b, labels = data.random_clips(3, 4, 32, 32, torch.Generator().manual_seed(2), labels=True)
    assert torch.equal(a, b) and labels.shape == (3, data.NUM_LABELS)
    _, full_labels = data.generate(4, batch=2, labels=True)
    assert (full_labels.sum(dim=1) >= 2).all(), "a full video shows at least one shape and one colour"
