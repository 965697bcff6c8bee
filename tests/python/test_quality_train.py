"""svgear.quality.train: the training loop at a tiny config."""
import csv
import math
import os
import sys

_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python")
if os.path.abspath(_PY) not in map(os.path.abspath, sys.path):
    sys.path.insert(0, _PY)

import pytest  # noqa: E402

from svgear.quality import train  # noqa: E402
from svgear.quality.model import load_checkpoint, shard_paths  # noqa: E402

TINY = ["--dim", "32", "--heads", "2", "--layers", "2", "--video", "4x16x16", "--device", "cpu"]


def test_three_steps_give_a_finite_loss_and_a_checkpoint(tmp_path, capsys):
    out = str(tmp_path / "run")
    rc = train.main(TINY + ["--out", out, "--max-steps", "3", "--time-budget", "600", "--log-every", "1",
                            "--curriculum", "0.5:2x8x8:4,0.5:4x16x16:2", "--sample-steps", "2", "--num-samples", "1"])
    assert rc == 0
    with open(os.path.join(out, "loss.csv")) as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows][:3] == [1, 2, 3]
    assert all(math.isfinite(float(r["loss"])) and float(r["loss"]) > 0 for r in rows)
    assert {r["clip"] for r in rows} == {"2x8x8", "4x16x16"}, "both curriculum phases ran"
    for name in ("loss.png", "samples.png"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    model, meta = load_checkpoint(out)
    assert model.cfg.video == (4, 16, 16) and '"step": 3' in meta["train"]
    assert len(shard_paths(out)) == 1
    printed = capsys.readouterr().out
    assert "it/s" in printed and "loss" in printed


def test_curriculum_parsing():
    phases = train.parse_curriculum("3:8x48x48:64,1:16x96x96:8")
    assert phases == [(0.75, (8, 48, 48), 64), (0.25, (16, 96, 96), 8)]
    with pytest.raises(Exception):
        train.parse_curriculum("0.5:8x48:64")
    with pytest.raises(SystemExit):
        train.main(TINY + ["--curriculum", "1:3x16x15:2", "--max-steps", "1"])  # not divisible by the patch


def test_the_sampler_inverts_the_training_convention():
    """With one training video x*, the best velocity at (x_t, t) is (x_t - x*) / t; it equals the
    training target, and the Euler sampler driven by it lands exactly on x*."""
    import torch

    from svgear.quality.sampling import flow_pair, sample

    torch.manual_seed(0)
    target_video = torch.rand(1, 3, 2, 8, 8) * 2 - 1
    noise = torch.randn_like(target_video)
    t = torch.tensor([0.37])
    xt, v = flow_pair(target_video, noise, t)
    assert torch.allclose((xt - target_video) / 0.37, v, atol=1e-5)

    def oracle(x, t, attention_fn=None):
        return (x - target_video) / t.view(-1, 1, 1, 1, 1)

    steps = []
    out = sample(oracle, noise, num_steps=7, shift=3.0, on_step=lambda i, n: steps.append((i, n)))
    assert torch.allclose(out, target_video, atol=1e-5)
    assert steps == [(i, 7) for i in range(7)]
