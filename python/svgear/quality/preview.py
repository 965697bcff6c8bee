"""Dense samples of a checkpoint under several sampler settings, side by side in one PNG: how a
user picks the sampler's shift and step count for a trained model (the evaluation then uses the
checkpoint's `sample_shift` unless told otherwise).

    python3 -m svgear.quality.preview --checkpoint DIR --out samples.png [--shifts 5,3,2] [--steps 25]
"""
import argparse
import json
import sys

import torch

from . import data, plots
from .evaluate import DEFAULT_CHECKPOINT, parse_list
from .model import load_checkpoint
from .sampling import initial_noise, sample, sampler_shift
from .train import pick_device


def build_parser():
    p = argparse.ArgumentParser(prog="python3 -m svgear.quality.preview", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="folder of model-*-of-*.safetensors shards")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--shifts", default=None, help="comma list of sampler shifts (default: the checkpoint's)")
    p.add_argument("--steps", default="25", help="comma list of Euler step counts")
    p.add_argument("--num-samples", type=int, default=2, help="seeds 1000, 1001, ...")
    p.add_argument("--frames", type=int, default=8, help="frames shown per video")
    p.add_argument("--device", default="auto")
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    device = pick_device(args.device)
    try:
        model, meta = load_checkpoint(args.checkpoint, device)
        train_meta = json.loads(meta["train"]) if meta.get("train") else {}
        shifts = parse_list(args.shifts, float) if args.shifts else [sampler_shift(train_meta)]
        steps = parse_list(args.steps, int)
    except (OSError, ValueError) as error:
        parser.error(str(error))
    if not shifts or not steps or min(shifts) <= 0 or min(steps) < 1:
        parser.error("--shifts must be > 0 and --steps >= 1")
    shape = (1, model.cfg.in_channels) + tuple(model.cfg.video)
    rows = []
    for seed in range(1000, 1000 + args.num_samples):
        noise = initial_noise(seed, shape, device)
        for n in steps:
            for s in shifts:
                rows.append(("seed %d, %d steps, shift %g" % (seed, n, s), sample(model, noise, n, s)[0]))
    rows.append(("training data", data.generate(12345, 1, *model.cfg.video, device=device)[0]))
    total = train_meta.get("total_steps", train_meta.get("step", "?"))
    plots.frames_grid(args.out, rows, count=args.frames,
                      title="dense samples of %s (%s training steps)" % (args.checkpoint, total))
    print("wrote %s (%d videos)" % (args.out, len(rows) - 1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
