"""Captures real Q/K/V of the quality model during a dense sample, for the svgear CLI.

    python3 -m svgear.quality.capture --layers 0,4,7 --steps 5,20 --out DIR

Writes DIR/qkv_layerLL_stepSS.safetensors per (layer, step): tensors "q", "k", "v" of shape
[1, H, S, D] (RoPE applied, as the attention sees them) in BF16 (or F32), and string metadata
"frames", "height", "width" (the token grid), plus layer, step, num_steps, t, heads, seed and
video. The defaults keep the files small enough to commit: the model sampled at 8x48x48 pixels
(8x12x12 = 1152 tokens), heads 0,3,6: 6 files of 1.3 MB for 3 layers x 2 steps.
"""
import argparse
import json
import os
import sys

import torch

from . import st_io
from .evaluate import DEFAULT_CHECKPOINT, parse_list
from .model import dense_attention, load_checkpoint
from .sampling import initial_noise, sample, sample_condition, sampler_guidance, sampler_shift, time_grid
from .train import parse_triple, pick_device


def build_parser():
    p = argparse.ArgumentParser(prog="python3 -m svgear.quality.capture", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT)
    p.add_argument("--out", required=True)
    p.add_argument("--layers", default="0,4,7", help="comma list of layer indices")
    p.add_argument("--steps", default="5,20", help="comma list of sampling step indices (0-based)")
    p.add_argument("--num-steps", type=int, default=25, help="Euler steps of the dense sample")
    p.add_argument("--video", type=parse_triple, default=(8, 48, 48), help="FxHxW pixels the model is run at")
    p.add_argument("--heads", default="0,3,6", help="comma list of heads to keep, or 'all'")
    p.add_argument("--dtype", choices=["bf16", "f32"], default="bf16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--shift", type=float, default=None, help="timestep shift of the sampler (default: the checkpoint's sample_shift, else its training shift)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale of a conditional model (default: the checkpoint's sample_guidance)")
    p.add_argument("--device", default="auto")
    return p


def capture(model, *, layers, steps, num_steps, video, heads, dtype, seed, shift, device, out, guidance=1.0):
    """Runs one dense sample and writes the files; returns their paths. A conditional model is
    sampled with the labels (and guidance `guidance`) or the leading frames of training scene
    `seed`; with guidance, attention sees the conditional and unconditional batch, and the files
    keep the conditional half (batch entry 0)."""
    cfg = model.cfg
    grid = cfg.tokens(video)
    for layer in layers:
        if not 0 <= layer < cfg.num_layers:
            raise ValueError("layer %d: the model has layers 0..%d" % (layer, cfg.num_layers - 1))
    for step in steps:
        if not 0 <= step < num_steps:
            raise ValueError("step %d: the sample has steps 0..%d" % (step, num_steps - 1))
    heads = list(range(cfg.num_heads)) if heads is None else list(heads)
    for h in heads:
        if not 0 <= h < cfg.num_heads:
            raise ValueError("head %d: the model has heads 0..%d" % (h, cfg.num_heads - 1))
    os.makedirs(out, exist_ok=True)
    ts = time_grid(num_steps, shift)
    current = {"step": -1}
    written = []

    def on_step(step, total):
        current["step"] = step

    def attention_fn(layer, q, k, v):
        step = current["step"]
        if step in steps and layer in layers:
            sel = torch.tensor(heads, device=q.device)
            tensors = {name: t[:1].index_select(2, sel).permute(0, 2, 1, 3).contiguous().to("cpu", dtype)
                       for name, t in (("q", q), ("k", k), ("v", v))}
            metadata = {
                "frames": grid[0], "height": grid[1], "width": grid[2], "layer": layer, "step": step,
                "num_steps": num_steps, "t": "%.6f" % float(ts[step]), "heads": ",".join(map(str, heads)),
                "seed": seed, "video": "x".join(map(str, video)), "shift": shift, "guidance": guidance,
                "source": "svgear.quality.capture (dense sample of the quality model)", "model": cfg.to_json(),
            }
            path = os.path.join(out, "qkv_layer%02d_step%02d.safetensors" % (layer, step))
            st_io.save_file(tensors, path, metadata=metadata)
            written.append(path)
        return dense_attention(layer, q, k, v)

    noise = initial_noise(seed, (1, cfg.in_channels) + tuple(video), device)
    sample(model, noise, num_steps, shift, attention_fn=attention_fn, on_step=on_step, guidance=guidance,
           **sample_condition(model, seed, device, video))
    return written


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = pick_device(args.device)
    try:
        model, meta = load_checkpoint(args.checkpoint, device)
    except (FileNotFoundError, ValueError) as error:
        print("svgear-quality: error: %s" % error, file=sys.stderr)
        return 2
    train_meta = json.loads(meta.get("train", "{}"))
    shift = args.shift if args.shift is not None else sampler_shift(train_meta)
    guidance = args.guidance if args.guidance is not None else sampler_guidance(train_meta)
    heads = None if args.heads == "all" else parse_list(args.heads, int)
    paths = capture(model, layers=parse_list(args.layers, int), steps=parse_list(args.steps, int),
                    num_steps=args.num_steps, video=tuple(args.video), heads=heads,
                    dtype=torch.bfloat16 if args.dtype == "bf16" else torch.float32, seed=args.seed,
                    shift=shift, device=device, out=args.out, guidance=guidance)
    total = 0
    for path in paths:
        size = os.path.getsize(path)
        total += size
        print("wrote %s (%.2f MB)" % (path, size / 1e6))
    print("%d files, %.2f MB in all; token grid %s" % (len(paths), total / 1e6, "x".join(map(str, model.cfg.tokens(args.video)))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
