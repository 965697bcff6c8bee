"""Trains the quality model: rectified flow on procedural videos, within a wall-clock budget.

    python3 -m svgear.quality.train --out DIR [--time-budget 330] [--curriculum ...] [--resume CKPT_DIR]

The first 45% of the time goes to small clips (crops of the full scene: RoPE is relative, so
what is learnt carries over), the rest to the full 16x96x96 video (16x24x24 = 9216 tokens).
Phases, the learning-rate schedule and the end are driven by the fraction of the budget spent
(or of --max-steps, when given). EMA weights are saved as bf16 safetensors shards every
--ckpt-every seconds and at the end, with loss.csv / loss.png and samples.png (dense samples
of the final model next to a training video). --resume starts from a checkpoint's (EMA) weights
with a fresh optimizer and a short warm-up, and keeps the cumulative step count.

Timesteps: u is logit-normal (sigmoid of N(0, 1)), or with probability --t-uniform uniform on
[0, 1] (the sampler's own grid), then shifted, t = s u / (1 + (s - 1) u) with s = --shift, the
shift the sampler uses. A pixel video is very redundant: its layout (which colours, where the
shapes are) is decided at t > ~0.9, so the shift must be large and the tail near t = 1 covered.
"""
import argparse
import csv
import dataclasses
import json
import math
import os
import sys
import time

import torch
import torch.nn.functional as F

from . import data, plots
from .model import DiTConfig, VideoDiT, read_shards, save_checkpoint, with_given_frame_inputs
from .sampling import autocast, flow_pair, given_scene_row, initial_noise, sample, sample_condition, shift_time

DEFAULT_CURRICULUM = "0.2:8x48x48:64,0.25:16x64x64:16,0.55:16x96x96:8"


def parse_triple(text, name="video"):
    try:
        parts = tuple(int(v) for v in str(text).lower().split("x"))
    except ValueError:
        parts = ()
    if len(parts) != 3 or min(parts) <= 0:
        raise argparse.ArgumentTypeError("%s must look like FRAMESxHEIGHTxWIDTH, e.g. 16x96x96: %r" % (name, text))
    return parts


def parse_curriculum(text):
    """'frac:FxHxW:batch,...' -> [(fraction of the run, (F, H, W) pixels, batch)], fractions normalised."""
    phases = []
    for item in str(text).split(","):
        try:
            frac, clip, batch = item.strip().split(":")
            phases.append((float(frac), parse_triple(clip, "clip"), int(batch)))
        except (ValueError, argparse.ArgumentTypeError) as error:
            raise argparse.ArgumentTypeError("curriculum entry %r: expected FRACTION:FxHxW:BATCH (%s)" % (item, error))
    total = sum(p[0] for p in phases)
    if total <= 0 or any(p[0] < 0 or p[2] <= 0 for p in phases):
        raise argparse.ArgumentTypeError("curriculum %r: fractions must be >= 0 with a positive sum, batches > 0" % text)
    return [(f / total, clip, batch) for f, clip, batch in phases]


def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_parser():
    p = argparse.ArgumentParser(prog="python3 -m svgear.quality.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="/tmp/svgear-quality/train", help="output folder (checkpoint shards, loss.csv/png, samples.png)")
    p.add_argument("--time-budget", type=float, default=330.0, help="seconds of training (from the start of main, excludes the final sampling)")
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: only the time budget)")
    p.add_argument("--curriculum", type=parse_curriculum, default=parse_curriculum(DEFAULT_CURRICULUM),
                   help="FRACTION:FxHxW:BATCH,... clip sizes (pixels) and batches by fraction of the run (default %s)" % DEFAULT_CURRICULUM)
    p.add_argument("--video", type=parse_triple, default=(16, 96, 96), help="full video size (pixels) the model is for")
    p.add_argument("--patch", type=lambda s: parse_triple(s, "patch"), default=(1, 4, 4))
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--mlp-ratio", type=float, default=2.0)
    p.add_argument("--num-labels", type=int, default=0,
                   help="class conditioning: %d for multi-hot labels of the shapes and colours a clip shows, sampled "
                        "with --sample-guidance (default 0: no labels, as the committed model; labels did "
                        "not give crisper samples in 490 s, docs/QUALITY.md)" % data.NUM_LABELS)
    p.add_argument("--given-frames", type=int, default=0,
                   help="condition on this many clean leading frames of each clip, as Wan2.1-I2V is on its image (mask + "
                        "condition video concatenated to the input channels): 1 is image-to-video, more is video "
                        "continuation (default 0: none); with --resume, an unconditional checkpoint gains zero weights "
                        "for them, and a checkpoint that takes given frames may change their number")
    p.add_argument("--label-drop", type=float, default=0.1,
                   help="share of training clips whose labels are zeroed (the unconditional input of guidance)")
    p.add_argument("--sample-guidance", type=float, default=3.0,
                   help="classifier-free guidance scale of the sampler (samples.png, and saved for the evaluation)")
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="cosine decay to lr * this at the end")
    p.add_argument("--warmup-steps", type=int, default=None,
                   help="linear learning-rate warm-up steps (default 200; 100 with --resume)")
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--grad-clip", type=float, default=1.0)
    p.add_argument("--ema", type=float, default=0.995, help="EMA decay of the saved weights")
    p.add_argument("--shift", type=float, default=5.0, help="timestep shift for training and sampling (saved for the evaluation)")
    p.add_argument("--t-uniform", type=float, default=0.25,
                   help="share of training timesteps drawn uniformly before the shift (the rest logit-normal)")
    p.add_argument("--t-linear", type=float, default=0.0,
                   help="share of training timesteps drawn uniformly on [0, 1] with no shift (the low-noise end, "
                        "which the shifted draws almost never reach; the committed model's second run of four used 0.3)")
    p.add_argument("--sample-shift", type=float, default=None,
                   help="timestep shift of the sampler (samples.png, and saved for the evaluation; default: --shift)")
    p.add_argument("--resume", default=None, metavar="DIR",
                   help="start from the checkpoint shards in DIR (same config; EMA weights; fresh optimizer)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--log-every", type=int, default=50, help="steps between progress lines")
    p.add_argument("--ckpt-every", type=float, default=60.0, help="seconds between checkpoints")
    p.add_argument("--sample-steps", type=int, default=25, help="Euler steps of the final samples")
    p.add_argument("--num-samples", type=int, default=2, help="dense samples in samples.png (0: none)")
    return p


class Ema:
    def __init__(self, model, decay):
        self.decay = decay
        self.names = [n for n, _ in model.named_parameters()]
        self.params = [p for _, p in model.named_parameters()]
        self.shadow = [p.detach().clone().float() for p in self.params]
        self.updates = 0

    @torch.no_grad()
    def update(self):
        self.updates += 1
        d = min(self.decay, (1 + self.updates) / (10 + self.updates))
        current = [p.detach().float() for p in self.params]
        try:
            torch._foreach_mul_(self.shadow, d)
            torch._foreach_add_(self.shadow, current, alpha=1 - d)
        except (AttributeError, RuntimeError, TypeError):
            for s, c in zip(self.shadow, current):
                s.mul_(d).add_(c, alpha=1 - d)

    def state(self):
        return dict(zip(self.names, self.shadow))


def logit_normal_t(batch, shift, device, uniform=0.0, linear=0.0):
    """Training timesteps: logit-normal u (or uniform u with probability `uniform`), shifted; or,
    with probability `linear`, t uniform on [0, 1] without the shift."""
    u = torch.sigmoid(torch.randn(batch, device=device))
    if uniform > 0:
        u = torch.where(torch.rand(batch, device=device) < uniform, torch.rand(batch, device=device), u)
    t = shift_time(u, shift)
    if linear > 0:
        t = torch.where(torch.rand(batch, device=device) < linear, torch.rand(batch, device=device), t)
    return t


def read_checkpoint(directory):
    """(config, train metadata dict, state dict of float32 tensors) of the shards in `directory`."""
    state, meta = read_shards(directory)
    train_meta = json.loads(meta["train"]) if meta.get("train") else {}
    return DiTConfig.from_json(meta["config"]), train_meta, state


def config_differences(a, b):
    """Fields where two DiTConfigs differ: ['dim: 512 != 256', ...]."""
    da, db = dataclasses.asdict(a), dataclasses.asdict(b)
    return ["%s: %s != %s" % (k, json.dumps(da[k]), json.dumps(db.get(k))) for k in da if json.dumps(da[k]) != json.dumps(db.get(k))]


def write_loss(out, rows, boundaries):
    with open(os.path.join(out, "loss.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0].keys()) if rows else ["step"])
        writer.writeheader()
        writer.writerows(rows)
    if rows:
        plots.line_plot(os.path.join(out, "loss.png"), [{
            "title": "flow-matching loss (mean over each logging window)", "xlabel": "step", "ylabel": "MSE (velocity)",
            "logy": True, "series": [{"label": "loss", "x": [r["step"] for r in rows], "y": [r["loss"] for r in rows], "style": "-"}],
            "vlines": [(s, "phase %d: %s" % (i + 2, name)) for i, (s, name) in enumerate(boundaries)],
        }])


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    start = time.time()
    device = pick_device(args.device)
    torch.manual_seed(args.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    os.makedirs(args.out, exist_ok=True)
    try:
        cfg = DiTConfig(patch=args.patch, dim=args.dim, num_heads=args.heads, num_layers=args.layers,
                        mlp_ratio=args.mlp_ratio, video=args.video, num_labels=args.num_labels,
                        num_given_frames=args.given_frames)
        cfg.tokens()
        for _, clip, _ in args.curriculum:
            cfg.tokens(clip)
            if clip[0] <= cfg.num_given_frames:
                raise ValueError("--given-frames %d leaves no frame to generate in %s clips: give fewer frames or "
                                 "use longer clips" % (cfg.num_given_frames, "x".join(map(str, clip))))
    except ValueError as error:
        parser.error(str(error))
    if not 0.0 <= args.t_uniform <= 1.0:
        parser.error("--t-uniform must be in [0, 1]: %g" % args.t_uniform)
    if not 0.0 <= args.t_linear <= 1.0:
        parser.error("--t-linear must be in [0, 1]: %g" % args.t_linear)
    if args.num_labels not in (0, data.NUM_LABELS):
        parser.error("--num-labels must be 0 (unconditional) or %d (the data's labels): %d" % (data.NUM_LABELS, args.num_labels))
    if not 0.0 <= args.label_drop < 1.0:
        parser.error("--label-drop must be in [0, 1): %g" % args.label_drop)
    if args.sample_guidance < 0:
        parser.error("--sample-guidance must be >= 0: %g" % args.sample_guidance)
    if args.shift <= 0:
        parser.error("--shift must be > 0: %g" % args.shift)
    if args.sample_shift is None:
        args.sample_shift = args.shift
    if args.sample_shift <= 0:
        parser.error("--sample-shift must be > 0: %g" % args.sample_shift)
    resumed = None
    if args.resume:
        try:
            ckpt_cfg, prev, state = read_checkpoint(args.resume)
        except (OSError, ValueError) as error:
            parser.error("--resume: %s" % error)
        # an unconditional checkpoint may gain conditioning: its label embedding and its
        # given-frame input weights start at zero; a model that takes given frames may take
        # another number of them (the same tensors)
        adds_labels = ckpt_cfg.num_labels == 0 and cfg.num_labels > 0
        adds_given_frames = not ckpt_cfg.num_given_frames and cfg.num_given_frames
        changes_given_frames = bool(ckpt_cfg.num_given_frames and cfg.num_given_frames)
        diff = config_differences(cfg, dataclasses.replace(
            ckpt_cfg, num_labels=cfg.num_labels if adds_labels else ckpt_cfg.num_labels,
            num_given_frames=cfg.num_given_frames if adds_given_frames or changes_given_frames else ckpt_cfg.num_given_frames))
        if diff:
            parser.error("--resume %s: the checkpoint's model config differs from this run's (this run != checkpoint): %s; "
                         "pass the checkpoint's --dim/--heads/--layers/--mlp-ratio/--patch/--video" % (args.resume, "; ".join(diff)))
    model = VideoDiT(cfg)
    if args.resume:
        if adds_given_frames:
            state = with_given_frame_inputs(state, cfg)
            print("the checkpoint takes no given frames: this run adds %d (their input weights start at zero)" % cfg.num_given_frames)
        elif changes_given_frames and ckpt_cfg.num_given_frames != cfg.num_given_frames:
            print("the checkpoint takes %d given frame(s): this run gives %d" % (ckpt_cfg.num_given_frames, cfg.num_given_frames))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if adds_labels and missing == ["label_embedding.weight"]:
            missing = []
            print("the checkpoint is unconditional: this run adds %d-label conditioning (embedding starts at zero)" % cfg.num_labels)
        if missing or unexpected:
            parser.error("--resume %s: the checkpoint's tensors do not match the model: missing %s, unexpected %s" % (
                args.resume, missing, unexpected))
        prev_total = int(prev.get("total_steps", prev.get("step", 0)) or 0)
        prev_seconds = float(prev.get("total_seconds", prev.get("seconds", 0.0)) or 0.0)
        resumed = {"from": os.path.abspath(args.resume), "steps": prev_total, "seconds": prev_seconds,
                   "previous": prev}
    model = model.to(device)
    warmup_steps = args.warmup_steps if args.warmup_steps is not None else (100 if args.resume else 200)
    n_params = model.num_params()
    print("svgear.quality.train: torch %s on %s%s" % (torch.__version__, device,
          " (%s)" % torch.cuda.get_device_name(device) if device.type == "cuda" else ""))
    print("model: %s; %d params = %.1f MB in bf16; full video %s -> %s tokens" % (
        cfg.to_json(), n_params, n_params * 2 / 1e6, "x".join(map(str, cfg.video)), "x".join(map(str, cfg.tokens()))))
    if resumed:
        print("resumed from %s: %d steps (%.0f s) of earlier training (shift %s); fresh optimizer, %d warm-up steps" % (
            args.resume, resumed["steps"], resumed["seconds"], resumed["previous"].get("shift", "?"), warmup_steps))
    print("timesteps: logit-normal, %.0f%% uniform, shift %g, then %.0f%% linear (unshifted); sampler shift %g" % (
        100 * args.t_uniform, args.shift, 100 * args.t_linear, args.sample_shift))
    if cfg.num_given_frames:
        print("conditioning: the clean first %d frame(s) of each clip (%s)" % (
            cfg.num_given_frames, "image-to-video" if cfg.num_given_frames == 1 else "video continuation"))
    if cfg.num_labels:
        print("conditioning: %d multi-hot labels (shapes, colours shown), %.0f%% dropped; sampler guidance %g" % (
            cfg.num_labels, 100 * args.label_drop, args.sample_guidance))
    print("curriculum: " + ", ".join("%.0f%% %s (%d tokens) x batch %d" % (
        100 * f, "x".join(map(str, c)), math.prod(cfg.tokens(c)), b) for f, c, b in args.curriculum))
    print("budget: %.0f s%s; checkpoints every %.0f s to %s" % (
        args.time_budget, ", max %d steps" % args.max_steps if args.max_steps else "", args.ckpt_every, args.out))

    kwargs = dict(lr=args.lr, betas=(0.9, 0.99), weight_decay=args.weight_decay)
    try:
        opt = torch.optim.AdamW(model.parameters(), fused=device.type == "cuda", **kwargs)
    except (TypeError, RuntimeError):
        opt = torch.optim.AdamW(model.parameters(), **kwargs)
    ema = Ema(model, args.ema)
    # scenes drawn on the device; a resumed run continues with other scenes and noise than the first run's
    seed = args.seed + (resumed["steps"] if resumed else 0)
    torch.manual_seed(seed)
    data_gen = torch.Generator(device=device).manual_seed(seed + 1)
    bounds = [sum(p[0] for p in args.curriculum[:i + 1]) for i in range(len(args.curriculum))]

    def progress(step):
        p = (time.time() - start) / args.time_budget
        return max(p, step / args.max_steps) if args.max_steps else p

    def save(step, final=False):
        seconds = round(time.time() - start, 1)
        record = {"step": step, "seconds": seconds, "shift": args.shift, "t_uniform": args.t_uniform,
                  "t_linear": args.t_linear, "sample_shift": args.sample_shift,
                  "label_drop": args.label_drop if cfg.num_labels else None,
                  "sample_guidance": args.sample_guidance if cfg.num_labels else 1.0,
                  "curriculum": [[f, list(c), b] for f, c, b in args.curriculum], "lr": args.lr,
                  "warmup_steps": warmup_steps, "ema": args.ema, "seed": args.seed, "final": final,
                  "total_steps": step + (resumed["steps"] if resumed else 0),
                  "total_seconds": round(seconds + (resumed["seconds"] if resumed else 0.0), 1)}
        if resumed:
            record["resumed"] = resumed
        meta = {"train": record}
        save_checkpoint(model, args.out, metadata=meta, state=ema.state())

    rows, boundaries = [], []
    step, phase_index, last_ckpt = 0, -1, time.time()
    loss_sum, loss_count, window_start, window_steps = torch.zeros((), device=device), 0, time.time(), 0
    model.train()
    while True:
        prog = progress(step)
        if prog >= 1.0:
            break
        index = next((i for i, b in enumerate(bounds) if prog < b), len(bounds) - 1)
        _, clip, batch = args.curriculum[index]
        if index != phase_index:
            phase_index = index
            name = "x".join(map(str, clip))
            if step > 0:
                boundaries.append((step, name))
            print("phase %d/%d at step %d (%.0f s): clips %s = %s tokens, batch %d" % (
                index + 1, len(bounds), step, time.time() - start, name, "x".join(map(str, cfg.tokens(clip))), batch))
        if step < warmup_steps:
            lr = args.lr * (step + 1) / warmup_steps
        else:
            lr = args.lr * (args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(prog, 1.0))))
        for group in opt.param_groups:
            group["lr"] = lr

        labels = None
        if cfg.num_labels:
            x0, labels = data.random_clips(batch, *clip, generator=data_gen, device=device, labels=True)
            labels = labels * (torch.rand(batch, 1, device=device) >= args.label_drop)
        else:
            x0 = data.random_clips(batch, *clip, generator=data_gen, device=device)
        given_frames = x0[:, :, :cfg.num_given_frames] if cfg.num_given_frames else None
        t = logit_normal_t(batch, args.shift, device, args.t_uniform, args.t_linear)
        xt, target = flow_pair(x0, torch.randn_like(x0), t)
        with autocast(device):
            pred = model(xt, t, labels=labels, given_frames=given_frames)
        loss = F.mse_loss(pred.float(), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        opt.step()
        ema.update()
        step += 1
        loss_sum += loss.detach()
        loss_count += 1
        window_steps += 1

        if step % args.log_every == 0 or step == 1 or (args.max_steps and step >= args.max_steps):
            mean = float(loss_sum) / loss_count
            now = time.time()
            its = window_steps / max(now - window_start, 1e-9)
            row = {"step": step, "seconds": round(now - start, 2), "phase": index + 1, "clip": "x".join(map(str, clip)),
                   "batch": batch, "loss": mean, "lr": lr, "it_per_s": round(its, 3)}
            rows.append(row)
            print("step %6d | phase %d %-9s b%-3d | loss %.4f | lr %.2e | %6.2f it/s %7.1f clips/s | %5.0f s" % (
                step, index + 1, row["clip"], batch, mean, lr, its, its * batch, now - start))
            if not math.isfinite(mean):
                print("loss is not finite: stopping (the last checkpoint in %s is kept)" % args.out)
                write_loss(args.out, rows, boundaries)
                return 1
            loss_sum.zero_()
            loss_count, window_start, window_steps = 0, now, 0
        if time.time() - last_ckpt >= args.ckpt_every:
            save(step)
            write_loss(args.out, rows, boundaries)
            last_ckpt = time.time()
            print("checkpoint at step %d (%.0f s)" % (step, last_ckpt - start))

    train_seconds = time.time() - start
    if loss_count:
        rows.append({"step": step, "seconds": round(train_seconds, 2), "phase": phase_index + 1,
                     "clip": "x".join(map(str, args.curriculum[phase_index][1])), "batch": args.curriculum[phase_index][2],
                     "loss": float(loss_sum) / loss_count, "lr": lr, "it_per_s": ""})
    save(step, final=True)
    write_loss(args.out, rows, boundaries)
    print("trained %d steps in %.0f s%s; final checkpoint in %s" % (
        step, train_seconds, " (%d in all with the resumed checkpoint's)" % (step + resumed["steps"]) if resumed else "", args.out))
    if device.type == "cuda":
        print("peak GPU memory %.1f GiB" % (torch.cuda.max_memory_allocated(device) / 2 ** 30))

    if args.num_samples > 0:
        with torch.no_grad():
            for p, s in zip(ema.params, ema.shadow):
                p.copy_(s)
        model.eval()
        shape = (1, cfg.in_channels) + tuple(cfg.video)
        rows_png = []
        t0 = time.time()
        for i in range(args.num_samples):
            video = sample(model, initial_noise(1000 + i, shape, device), args.sample_steps, args.sample_shift,
                           guidance=args.sample_guidance, **sample_condition(model, 1000 + i, device))
            rows_png.append(("sample %d" % i, video[0]))
            if cfg.num_given_frames:  # the scene whose leading frames the sample was given
                rows_png.append(given_scene_row(1000 + i, cfg, device))
        if not cfg.num_given_frames:
            rows_png.append(("training data", data.generate(12345, 1, *cfg.video, device=device)[0]))
        total = step + (resumed["steps"] if resumed else 0)
        plots.frames_grid(os.path.join(args.out, "samples.png"), rows_png, count=8,
                          title="dense %ssamples (%d Euler steps, shift %g%s) after %d steps / %.0f s%s" % (
                              "%d-given-frame " % cfg.num_given_frames if cfg.num_given_frames else "", args.sample_steps, args.sample_shift,
                              ", guidance %g" % args.sample_guidance if cfg.num_labels else "", total, train_seconds + (resumed["seconds"] if resumed else 0),
                              " (resumed at step %d)" % resumed["steps"] if resumed else ""))
        print("wrote samples.png (%d samples in %.1f s)" % (args.num_samples, time.time() - t0))
    print("done in %.0f s" % (time.time() - start))
    return 0


if __name__ == "__main__":
    sys.exit(main())
