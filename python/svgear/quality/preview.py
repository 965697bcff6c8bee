"""Looks at a checkpoint.

Sampling (default): dense samples under several sampler settings, side by side in one PNG: how
a user picks the sampler's shift and step count for a trained model (the evaluation then uses
the checkpoint's `sample_shift` unless told otherwise).

    python3 -m svgear.quality.preview --checkpoint DIR --out samples.png [--shifts 5,3,2] [--steps 25]

Denoising (--denoise T1,T2,...): one training video noised to each time t, next to the model's
one-step x0 prediction x_t - t v, with its MSE against the video and against the best constant
(the video's mean). It tells where generation goes wrong: a model that restores crisp shapes
from t = 0.6 but not from 0.95 fails at the layout, in the sampler's first steps.

    python3 -m svgear.quality.preview --checkpoint DIR --out denoise.png --denoise 0.2,0.4,0.6,0.8,0.95 [--video 8x48x48]
"""
import argparse
import json
import sys

import torch

from . import data, plots
from .evaluate import DEFAULT_CHECKPOINT, parse_list
from .model import load_checkpoint
from .sampling import (autocast, flow_pair, given_scene_row, initial_noise, sample, sample_condition, sampler_guidance,
                       sampler_shift, scene_condition)
from .train import parse_triple, pick_device


def build_parser():
    p = argparse.ArgumentParser(prog="python3 -m svgear.quality.preview", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="folder of model-*-of-*.safetensors shards")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--shifts", default=None, help="comma list of sampler shifts (default: the checkpoint's)")
    p.add_argument("--steps", default="25", help="comma list of Euler step counts")
    p.add_argument("--guidance", default=None,
                   help="comma list of classifier-free guidance scales of a conditional model (default: the checkpoint's)")
    p.add_argument("--num-samples", type=int, default=2, help="seeds 1000, 1001, ...")
    p.add_argument("--frames", type=int, default=8, help="frames shown per video")
    p.add_argument("--denoise", default=None, metavar="T1,T2,...",
                   help="instead of sampling: one-step x0 predictions of a training video noised to these times")
    p.add_argument("--video", default=None,
                   help="FxHxW pixels of the --denoise video (default: the model's; smaller is faster on a CPU)")
    p.add_argument("--device", default="auto")
    return p


@torch.no_grad()
def denoise_rows(model, times, video, device):
    """[(label, video)] rows and [(t, mse, mean_mse)] of one-step x0 predictions at `times`."""
    x0, labels = data.generate(12345, 1, *video, device=device, labels=True)
    # a conditional model is told what the video shows, a continuing one its leading frames
    condition = scene_condition(model, x0, labels, device)
    noise = initial_noise(0, x0.shape, device)
    rows, table = [("training video", x0[0])], []
    baseline = float(((x0 - x0.mean()) ** 2).mean())
    for t in times:
        tt = torch.full((1,), float(t), device=device)
        xt, _ = flow_pair(x0, noise, tt)
        with autocast(device):
            v = model(xt, tt, **condition).float()
        pred = xt - float(t) * v
        table.append((float(t), float(((pred - x0) ** 2).mean()), baseline))
        rows.append(("t=%.2f input" % t, xt[0].clamp(-1, 1)))
        rows.append(("t=%.2f x0 prediction" % t, pred[0].clamp(-1, 1)))
    return rows, table


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    try:
        model, meta = load_checkpoint(args.checkpoint, device)
        train_meta = json.loads(meta["train"]) if meta.get("train") else {}
        shifts = parse_list(args.shifts, float) if args.shifts else [sampler_shift(train_meta)]
        steps = parse_list(args.steps, int)
        guidances = parse_list(args.guidance, float) if args.guidance else [sampler_guidance(train_meta)]
    except (OSError, ValueError) as error:
        parser.error(str(error))
    if not shifts or not steps or min(shifts) <= 0 or min(steps) < 1:
        parser.error("--shifts must be > 0 and --steps >= 1")
    if not guidances or min(guidances) < 0:
        parser.error("--guidance must be >= 0")
    total = train_meta.get("total_steps", train_meta.get("step", "?"))
    if args.denoise:
        try:
            times = parse_list(args.denoise, float)
            video = parse_triple(args.video) if args.video else tuple(model.cfg.video)
            model.cfg.tokens(video)
        except (argparse.ArgumentTypeError, ValueError) as error:
            parser.error(str(error))
        if not times or min(times) < 0 or max(times) > 1:
            parser.error("--denoise times must be in [0, 1]: %s" % args.denoise)
        rows, table = denoise_rows(model, times, video, device)
        for t, mse, baseline in table:
            print("t=%.2f: x0 prediction MSE %.4f (the video's mean: %.4f)" % (t, mse, baseline))
        plots.frames_grid(args.out, rows, count=min(args.frames, video[0]),
                          title="one-step x0 predictions of %s (%s training steps), video %s" % (
                              args.checkpoint, total, "x".join(map(str, video))))
        print("wrote %s" % args.out)
        return 0
    shape = (1, model.cfg.in_channels) + tuple(model.cfg.video)
    rows, sampled = [], 0
    conditional = bool(model.cfg.num_labels)
    for seed in range(1000, 1000 + args.num_samples):
        noise = initial_noise(seed, shape, device)
        condition = sample_condition(model, seed, device)
        for n in steps:
            for s in shifts:
                for g in (guidances if conditional else [1.0]):
                    name = "seed %d, %d steps, shift %g%s" % (seed, n, s, ", cfg %g" % g if conditional else "")
                    rows.append((name, sample(model, noise, n, s, guidance=g, **condition)[0]))
                    sampled += 1
        if model.cfg.num_given_frames:  # the scene whose leading frames the samples were given
            rows.append(given_scene_row(seed, model.cfg, device))
    if not model.cfg.num_given_frames:
        rows.append(("training data", data.generate(12345, 1, *model.cfg.video, device=device)[0]))
    plots.frames_grid(args.out, rows, count=args.frames,
                      title="dense samples of %s (%s training steps)" % (args.checkpoint, total))
    print("wrote %s (%d videos)" % (args.out, sampled))
    return 0


if __name__ == "__main__":
    sys.exit(main())
