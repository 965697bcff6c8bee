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


def _tensors(directory):
    from svgear.quality import st_io

    state = {}
    for path in shard_paths(directory):
        state.update(st_io.load_file(path)[0])
    return state


def test_resume_starts_from_the_checkpoint_and_counts_steps(tmp_path, capsys):
    import json

    import torch

    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    common = TINY + ["--time-budget", "600", "--curriculum", "1:2x8x8:2", "--num-samples", "0", "--log-every", "1"]
    assert train.main(common + ["--out", first, "--max-steps", "2"]) == 0
    # lr 0 and no weight decay: the resumed run must hand back exactly the weights it started from
    assert train.main(common + ["--out", second, "--max-steps", "3", "--resume", first, "--lr", "0",
                                "--weight-decay", "0", "--num-samples", "1", "--sample-steps", "1"]) == 0
    assert os.path.getsize(os.path.join(second, "samples.png")) > 0
    before, after = _tensors(first), _tensors(second)
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)
    meta = json.loads(load_checkpoint(second)[1]["train"])
    assert meta["step"] == 3 and meta["total_steps"] == 5
    assert meta["resumed"]["steps"] == 2 and meta["resumed"]["previous"]["step"] == 2
    assert meta["warmup_steps"] == 100, "a resumed run defaults to a short warm-up"
    assert "resumed from %s: 2 steps" % first in capsys.readouterr().out


def test_resume_refuses_a_different_config(tmp_path, capsys):
    first = str(tmp_path / "first")
    common = ["--device", "cpu", "--time-budget", "600", "--curriculum", "1:2x8x8:2", "--num-samples", "0",
              "--heads", "2", "--layers", "2", "--video", "4x16x16"]
    assert train.main(common + ["--dim", "32", "--out", first, "--max-steps", "1"]) == 0
    with pytest.raises(SystemExit):
        train.main(common + ["--dim", "64", "--out", str(tmp_path / "second"), "--max-steps", "1", "--resume", first])
    err = capsys.readouterr().err
    assert "config differs" in err and "dim: 64 != 32" in err
    with pytest.raises(SystemExit):
        train.main(common + ["--dim", "32", "--out", str(tmp_path / "third"), "--resume", str(tmp_path / "nothing")])
    assert "no model-*-of-*.safetensors" in capsys.readouterr().err


def test_training_timesteps_cover_every_sampler_step():
    """The sampler's first steps (t near 1) decide a video's layout; the default timestep
    distribution must train there. Each interval of the default 25-step grid gets >= 0.5% of the
    training timesteps; the first run's distribution (logit-normal, shift 2) gave the top
    interval almost none, and its samples had no shapes."""
    import torch

    from svgear.quality.sampling import time_grid

    args = train.build_parser().parse_args([])
    torch.manual_seed(0)
    n = 200000
    grid = time_grid(25, args.shift).float()

    def shares(t):
        return [float(((t <= hi) & (t > lo)).float().mean()) for hi, lo in zip(grid[:-1], grid[1:])]

    default = train.logit_normal_t(n, args.shift, "cpu", args.t_uniform, args.t_linear)
    assert min(shares(default)) >= 0.005
    old = shares(train.logit_normal_t(n, 2.0, "cpu", 0.0))
    assert old[0] < 0.002 and max(old) > 0.05
    t = train.logit_normal_t(n, 1.0, "cpu", 1.0)
    assert abs(float(t.mean()) - 0.5) < 0.01 and abs(float((t < 0.1).float().mean()) - 0.1) < 0.01


def test_training_timesteps_reach_the_low_noise_end():
    """--t-linear moves timesteps to the low-noise end (t < 0.2): with shift 5 alone about 1% of
    them fall there; with --t-linear 0.3 (the committed model's second run) about 7%, and the
    layout end (t > 0.9) keeps most of its share."""
    import torch

    args = train.build_parser().parse_args(["--t-linear", "0.3"])
    torch.manual_seed(0)
    n = 200000
    shifted_only = train.logit_normal_t(n, args.shift, "cpu", args.t_uniform, 0.0)
    linear = train.logit_normal_t(n, args.shift, "cpu", args.t_uniform, args.t_linear)
    assert float((shifted_only < 0.2).float().mean()) < 0.015
    assert float((linear < 0.2).float().mean()) >= 0.2 * args.t_linear
    assert float((linear > 0.9).float().mean()) >= 0.75 * float((shifted_only > 0.9).float().mean())


def test_guidance_mixes_the_conditional_and_unconditional_velocities(conditional_dit):
    """guidance 0 is the unconditional sample, 1 the conditional one, and other scales run both
    halves as one batch of 2 (what attention, and so a sparse router, sees)."""
    import torch

    from svgear.quality.model import dense_attention
    from svgear.quality.sampling import sample

    model = conditional_dit.eval()
    noise, labels = torch.randn(1, 3, 2, 8, 8), torch.ones(1, 9)
    batches = []

    def attention(layer, q, k, v):
        batches.append(q.shape[0])
        return dense_attention(layer, q, k, v)

    uncond = sample(model, noise, 3, 2.0, labels=torch.zeros(1, 9))
    cond = sample(model, noise, 3, 2.0, labels=labels)
    assert set(batches) == set()
    assert torch.allclose(sample(model, noise, 3, 2.0, labels=labels, guidance=0.0, attention_fn=attention), uncond, atol=1e-5)
    assert set(batches) == {2}
    assert torch.allclose(sample(model, noise, 3, 2.0, labels=labels, guidance=1.0), cond)
    assert not torch.allclose(sample(model, noise, 3, 2.0, labels=labels, guidance=3.0), cond, atol=1e-3)


RESUME_COMMON = TINY + ["--time-budget", "600", "--curriculum", "1:2x8x8:2", "--num-samples", "0"]


def _resume_unchanged(tmp_path, *options):
    """Trains one step into tmp_path/first, then resumes it into tmp_path/second with `options`
    and a zero learning rate (so the weights stay the checkpoint's). Returns both folders."""
    first, second = str(tmp_path / "first"), str(tmp_path / "second")
    assert train.main(RESUME_COMMON + ["--out", first, "--max-steps", "1"]) == 0
    assert train.main(RESUME_COMMON + ["--out", second, "--max-steps", "1", "--resume", first, "--lr", "0",
                                       "--weight-decay", "0"] + list(options)) == 0
    return first, second


def test_resume_may_add_labels_to_an_unconditional_checkpoint(tmp_path, capsys):
    import torch

    common = RESUME_COMMON
    first, second = _resume_unchanged(tmp_path, "--num-labels", "9")
    assert "adds 9-label conditioning" in capsys.readouterr().out
    before, after = _tensors(first), _tensors(second)
    assert set(after) - set(before) == {"label_embedding.weight"}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not after["label_embedding.weight"].any()
    model, meta = load_checkpoint(second)
    assert model.cfg.num_labels == 9 and '"sample_guidance": 3.0' in meta["train"]
    # the other way round is a config change like any other
    with pytest.raises(SystemExit):
        train.main(common + ["--out", str(tmp_path / "third"), "--max-steps", "1", "--resume", second])
    assert "num_labels: 0 != 9" in capsys.readouterr().err


def test_resume_may_add_given_frames_to_an_unconditional_checkpoint(tmp_path, capsys):
    import torch

    common = RESUME_COMMON
    first, second = _resume_unchanged(tmp_path, "--given-frames", "1")
    out = capsys.readouterr().out
    assert "this run adds 1 (their input weights start at zero)" in out
    assert "conditioning: the clean first 1 frame(s) of each clip (image-to-video)" in out
    before, after = _tensors(first), _tensors(second)
    assert set(after) == set(before)
    assert all(torch.equal(before[k], after[k]) for k in before if k != "patch_embedding.weight")
    weight = after["patch_embedding.weight"]
    assert weight.shape == (32, 7 * 16)
    assert torch.equal(weight[:, :48], before["patch_embedding.weight"]) and not weight[:, 48:].any()
    model, _ = load_checkpoint(second)
    assert model.cfg.num_given_frames == 1
    # it may go on with more given frames (the same tensors); its samples are made next to their scenes
    third = str(tmp_path / "third")
    assert train.main(TINY + ["--time-budget", "600", "--curriculum", "1:4x8x8:2", "--out", third, "--max-steps", "2",
                              "--resume", second, "--given-frames", "2", "--num-samples", "1", "--sample-steps", "2"]) == 0
    assert "takes 1 given frame(s): this run gives 2" in capsys.readouterr().out
    assert load_checkpoint(third)[0].cfg.num_given_frames == 2
    assert os.path.getsize(os.path.join(third, "samples.png")) > 0
    # dropping the condition is a config change like any other
    with pytest.raises(SystemExit):
        train.main(common + ["--out", str(tmp_path / "fourth"), "--max-steps", "1", "--resume", second])
    assert "num_given_frames: 0 != 1" in capsys.readouterr().err
    # and clips must leave frames to generate
    with pytest.raises(SystemExit):
        train.main(common + ["--out", str(tmp_path / "fifth"), "--max-steps", "1", "--given-frames", "2"])
    assert "leaves no frame to generate in 2x8x8 clips" in capsys.readouterr().err


def test_given_frame_samples_start_from_their_scene():
    """sample_condition gives the leading frames of the seed's training scene, and both halves of
    a guided batch get them."""
    import torch

    from svgear.quality import data
    from svgear.quality.model import DiTConfig, VideoDiT, dense_attention
    from svgear.quality.sampling import sample, sample_condition

    model = VideoDiT(DiTConfig(dim=32, num_heads=2, num_layers=2, video=(4, 16, 16), num_labels=9,
                               num_given_frames=2)).eval()
    condition = sample_condition(model, 7)
    scene, labels = data.generate(7, 1, 4, 16, 16, labels=True)
    assert set(condition) == {"labels", "given_frames"}
    assert torch.equal(condition["given_frames"], scene[:, :, :2]) and torch.equal(condition["labels"], labels)
    batches = []

    def attention(layer, q, k, v):
        batches.append(q.shape[0])
        return dense_attention(layer, q, k, v)

    sample(model, torch.randn(1, 3, 4, 16, 16), 2, 2.0, attention_fn=attention, guidance=2.0, **condition)
    assert set(batches) == {2}
    plain = VideoDiT(DiTConfig(dim=32, num_heads=2, num_layers=2, video=(4, 16, 16)))
    assert sample_condition(plain, 7) == {}
