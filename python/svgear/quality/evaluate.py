"""End-to-end quality of sparse attention: samples videos from the trained quality model with
dense attention and with each method/budget from the same initial noise, and compares them.

    python3 -m svgear.quality.evaluate [--checkpoint DIR] [--out DIR] [--num-videos 8] ...

Sparse methods run through svgear.AttentionRouter (the model's attention_fn); "dense" also
goes through the router (so its row checks that path: identical output gives PSNR inf). Writes
results.csv (one row per video and method), summary.csv / summary.json (means), pareto.png
(PSNR and SSIM against density and against time) and frames.png (one video, side by side),
and prints a table.
"""
import argparse
import csv
import json
import math
import os
import sys
import time

import torch

from . import metrics, plots
from .model import load_checkpoint
from .sampling import initial_noise, sample, sample_condition, sampler_guidance, sampler_shift
from .train import parse_triple, pick_device

DEFAULT_CHECKPOINT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")


def make_router(method, density, num_layers, warmup_steps, warmup_layers, options):
    """svgear.AttentionRouter for one method and budget (tests replace this function)."""
    import svgear

    router_class = getattr(svgear, "AttentionRouter", None)
    if router_class is None:
        raise RuntimeError("svgear.AttentionRouter is not available: the svgear Python package "
                           "(python/svgear/__init__.py) must be importable with PYTHONPATH=python")
    return router_class(method=method, density=density, num_layers=num_layers, warmup_steps=warmup_steps,
                        warmup_layers=warmup_layers, **options)


def parse_list(text, kind=str):
    return [kind(v) for v in str(text).split(",") if v.strip()]


def parse_option(text):
    if "=" not in text:
        raise argparse.ArgumentTypeError("--option takes KEY=VALUE, got %r" % text)
    key, value = text.split("=", 1)
    for cast in (int, float):
        try:
            return key.strip(), cast(value)
        except ValueError:
            pass
    return key.strip(), {"true": True, "false": False}.get(value.lower(), value)


def warmup_count(spec, total):
    """svgear.AttentionRouter's rule: a fraction (< 1) of total, rounded half up, or a count (>= 1)."""
    if not spec:
        return 0
    return min(int(math.floor(spec * total + 0.5)) if spec < 1 else int(spec), total)


def effective_density(density, warmup_steps, warmup_layers, num_steps, num_layers):
    """Fraction of query-key pairs computed over the whole sampling run (dense warm-up counted)."""
    w = warmup_count(warmup_steps, num_steps)
    wl = warmup_count(warmup_layers, num_layers)
    per_sparse_step = (wl + (num_layers - wl) * density) / num_layers
    return (w + (num_steps - w) * per_sparse_step) / num_steps


def build_parser():
    p = argparse.ArgumentParser(prog="python3 -m svgear.quality.evaluate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default=DEFAULT_CHECKPOINT, help="folder of model-*-of-*.safetensors (default: the committed weights)")
    p.add_argument("--out", default="/tmp/svgear-quality/eval")
    p.add_argument("--num-videos", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="video i uses initial noise from seed + i")
    p.add_argument("--steps", type=int, default=25, help="Euler sampling steps")
    p.add_argument("--shift", type=float, default=None, help="timestep shift of the sampler (default: the checkpoint's sample_shift, else its training shift)")
    p.add_argument("--guidance", type=float, default=None,
                   help="classifier-free guidance scale of a conditional model (default: the checkpoint's sample_guidance; 1: none)")
    p.add_argument("--video", type=parse_triple, default=None, help="FxHxW pixels (default: the model's full size)")
    p.add_argument("--methods", default="dense,svg2,ear", help="comma list; 'dense' runs the router's dense path")
    p.add_argument("--densities", default="0.1,0.2,0.3")
    p.add_argument("--warmup-steps", type=float, default=0.2, help="fraction of sampling steps run dense first")
    p.add_argument("--warmup-layers", type=float, default=0, help="the first layers always run dense (a count, or a fraction < 1 of the layers)")
    p.add_argument("--clusters-q", type=int, default=64)
    p.add_argument("--clusters-k", type=int, default=128)
    p.add_argument("--kmeans-iters", type=int, default=None)
    p.add_argument("--warm-iters", type=int, default=None)
    p.add_argument("--probe-queries", type=int, default=None)
    p.add_argument("--option", type=parse_option, action="append", default=[], metavar="KEY=VALUE",
                   help="any other svgear method option (repeatable)")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=["bf16", "f16"], default="bf16", help="autocast dtype on CUDA")
    p.add_argument("--frames-video", type=int, default=0, help="video shown in frames.png")
    p.add_argument("--frames-count", type=int, default=6, help="frames per row in frames.png")
    p.add_argument("--no-timing-warmup", action="store_true", help="skip the untimed warm-up call of each method")
    return p


def _sync(device):
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def _mean(values):
    return sum(values) / len(values) if values else float("nan")


def _fmt(value, digits=2):
    if isinstance(value, float) and math.isinf(value):
        return "inf"
    return ("%%.%df" % digits) % value


def run_evaluation(model, configs, *, num_videos, seed, steps, shift, video, device, options, warmup_steps,
                   warmup_layers, dtype=torch.bfloat16, frames_video=0, timing_warmup=True, log=print, guidance=1.0):
    """configs: [(method, density)]. Returns (rows, summary, frames) — frames: [(label, video)].

    A conditional model samples video i with the labels (class-conditional, with
    classifier-free guidance `guidance`) or the leading frames (num_given_frames) of training
    scene seed + i, dense and every method alike; PSNR and SSIM then cover the frames after the
    given ones."""
    cfg = model.cfg
    shape = (1, cfg.in_channels) + tuple(video)
    # PSNR and SSIM over the frames the model generates: given frames would raise every
    # method's score alike
    generated = slice(cfg.num_given_frames, None)
    routers = []
    for method, density in configs:
        opts = {} if method == "dense" else dict(options)
        routers.append(make_router(method, density, cfg.num_layers, warmup_steps, warmup_layers, opts))

    def timed_sample(noise, condition, router=None):
        if router is not None:
            router.reset()
            fn = lambda layer, q, k, v: router(layer, q, k, v, layout="bshd")  # noqa: E731
            on_step = router.set_step
        else:
            fn, on_step = None, None
        _sync(device)
        t0 = time.perf_counter()
        out = sample(model, noise, steps, shift, attention_fn=fn, on_step=on_step, dtype=dtype,
                     guidance=guidance, **condition)
        _sync(device)
        return out[0], time.perf_counter() - t0

    if timing_warmup:  # first calls pay for kernel selection / library start-up: keep them out of the timings
        noise = initial_noise(seed, shape, device)
        condition = sample_condition(model, seed, device, video)
        sample(model, noise, 1, shift, dtype=dtype, guidance=guidance, **condition)
        for router in routers:  # one sparse step each (the last step is past any warm-up)
            router.reset()
            sample(model, noise, 1, shift, attention_fn=lambda layer, q, k, v, r=router: r(layer, q, k, v, layout="bshd"),
                   on_step=lambda step, n, r=router: r.set_step(steps - 1, steps), dtype=dtype,
                   guidance=guidance, **condition)
            router.reset()
        _sync(device)

    rows, frames = [], []
    for i in range(num_videos):
        noise = initial_noise(seed + i, shape, device)
        condition = sample_condition(model, seed + i, device, video)
        reference, dense_seconds = timed_sample(noise, condition)
        if i == frames_video:
            frames.append(("dense (reference)", reference.cpu()))
        for (method, density), router in zip(configs, routers):
            out, seconds = timed_sample(noise, condition, router)
            row = {
                "video": i, "method": method, "density": density,
                "effective_density": round(effective_density(density, warmup_steps if method != "dense" else 0,
                                                             warmup_layers, steps, cfg.num_layers), 4),
                "psnr": metrics.psnr(out[:, generated], reference[:, generated]),
                "ssim": metrics.ssim(out[:, generated], reference[:, generated]),
                "seconds": seconds, "dense_seconds": dense_seconds, "speedup": dense_seconds / seconds,
            }
            rows.append(row)
            if i == frames_video:
                frames.append(("%s d=%.2f: %s dB" % (method, density, _fmt(row["psnr"], 1)), out.cpu()))
            log("video %d %-5s density %.2f: PSNR %s dB, SSIM %.4f, %.2f s (dense %.2f s)" % (
                i, method, density, _fmt(row["psnr"]), row["ssim"], seconds, dense_seconds))

    summary = []
    for method, density in configs:
        sel = [r for r in rows if r["method"] == method and r["density"] == density]
        psnrs = [r["psnr"] for r in sel]
        summary.append({
            "method": method, "density": density, "effective_density": sel[0]["effective_density"],
            "psnr_mean": _mean(psnrs), "psnr_min": min(psnrs), "ssim_mean": _mean([r["ssim"] for r in sel]),
            "ssim_min": min(r["ssim"] for r in sel), "seconds_mean": _mean([r["seconds"] for r in sel]),
            "dense_seconds_mean": _mean([r["dense_seconds"] for r in sel]), "videos": len(sel),
        })
        summary[-1]["speedup"] = summary[-1]["dense_seconds_mean"] / summary[-1]["seconds_mean"]
    return rows, summary, frames


def format_table(summary):
    lines = ["%-6s %8s %10s %11s %11s %8s %8s %9s %8s" % (
        "method", "density", "eff. dens.", "PSNR mean", "PSNR min", "SSIM", "SSIM min", "time s", "speedup")]
    for s in summary:
        lines.append("%-6s %8.2f %10.3f %11s %11s %8.4f %8.4f %9.2f %8.2f" % (
            s["method"], s["density"], s["effective_density"], _fmt(s["psnr_mean"]), _fmt(s["psnr_min"]),
            s["ssim_mean"], s["ssim_min"], s["seconds_mean"], s["speedup"]))
    return "\n".join(lines)


def _finite(v):
    return v if isinstance(v, (int, float)) and math.isfinite(v) else float("nan")


def write_outputs(out, rows, summary, frames, info, frames_count=6):
    os.makedirs(out, exist_ok=True)
    for name, table in (("results.csv", rows), ("summary.csv", summary)):
        with open(os.path.join(out, name), "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(table[0].keys()))
            writer.writeheader()
            writer.writerows(table)
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"info": info, "summary": [{k: (str(v) if isinstance(v, float) and not math.isfinite(v) else v)
                                              for k, v in s.items()} for s in summary]}, f, indent=1)
    methods = []
    for s in summary:
        if s["method"] not in methods:
            methods.append(s["method"])
    sparse = [m for m in methods if m != "dense"]
    series = {key: [] for key in ("psnr", "ssim", "time")}
    for m in sparse:
        sel = sorted((s for s in summary if s["method"] == m), key=lambda s: s["density"])
        x = [s["density"] for s in sel]
        series["psnr"].append({"label": m, "x": x, "y": [_finite(s["psnr_mean"]) for s in sel]})
        series["ssim"].append({"label": m, "x": x, "y": [_finite(s["ssim_mean"]) for s in sel]})
        series["time"].append({"label": m, "x": [s["seconds_mean"] for s in sel], "y": [_finite(s["psnr_mean"]) for s in sel]})
    dense_rows = [s for s in summary if s["method"] == "dense"]
    hl_psnr, hl_ssim = [], []
    if dense_rows and math.isfinite(dense_rows[0]["psnr_mean"]):
        hl_psnr = [(dense_rows[0]["psnr_mean"], "dense via router")]
    if dense_rows:
        hl_ssim = [(dense_rows[0]["ssim_mean"], "dense via router")]
    dense_time = summary[0]["dense_seconds_mean"] if summary else float("nan")
    note = "" if not dense_rows or math.isfinite(dense_rows[0]["psnr_mean"]) else " (dense via router: identical, PSNR inf)"
    plots.line_plot(os.path.join(out, "pareto.png"), [
        {"title": "PSNR vs dense" + note, "xlabel": "density (sparse steps)", "ylabel": "PSNR (dB)",
         "series": series["psnr"], "hlines": hl_psnr},
        {"title": "SSIM vs dense", "xlabel": "density (sparse steps)", "ylabel": "SSIM", "series": series["ssim"],
         "hlines": hl_ssim},
        {"title": "PSNR vs sampling time", "xlabel": "seconds per video", "ylabel": "PSNR (dB)",
         "series": series["time"], "vlines": [(dense_time, "dense reference")] if math.isfinite(dense_time) else []},
    ], title="%s, %s videos, %s steps, warm-up %s" % (info.get("video"), info.get("num_videos"), info.get("steps"),
                                                   info.get("warmup_steps")))
    if frames:
        plots.frames_grid(os.path.join(out, "frames.png"), frames, count=frames_count,
                          title="same seed, dense vs sparse (%s)" % info.get("video"))


def main(argv=None):
    args = build_parser().parse_args(argv)
    device = pick_device(args.device)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float16
    try:
        model, meta = load_checkpoint(args.checkpoint, device)
    except (FileNotFoundError, ValueError) as error:
        print("svgear-quality: error: %s" % error, file=sys.stderr)
        return 2
    cfg = model.cfg
    train_meta = json.loads(meta.get("train", "{}"))
    shift = args.shift if args.shift is not None else sampler_shift(train_meta)
    guidance = args.guidance if args.guidance is not None else sampler_guidance(train_meta)
    video = tuple(args.video or cfg.video)
    grid = cfg.tokens(video)
    tokens = grid[0] * grid[1] * grid[2]
    options = {"clusters_q": args.clusters_q, "clusters_k": args.clusters_k}
    for key in ("kmeans_iters", "warm_iters", "probe_queries"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    options.update(dict(args.option))
    for key in ("clusters_q", "clusters_k"):
        if options[key] > tokens:
            print("note: %s %d > %d tokens: using %d" % (key, options[key], tokens, tokens))
            options[key] = tokens
    methods = parse_list(args.methods)
    densities = parse_list(args.densities, float)
    configs = [(m, 1.0) if m == "dense" else (m, d) for m in methods for d in ([1.0] if m == "dense" else densities)]
    info = {
        "checkpoint": os.path.abspath(args.checkpoint), "train_step": train_meta.get("step"),
        "video": "x".join(map(str, video)), "tokens": "x".join(map(str, grid)) + " = %d" % tokens,
        "num_videos": args.num_videos, "seed": args.seed, "steps": args.steps, "shift": shift,
        "guidance": guidance if cfg.num_labels else None, "given_frames": cfg.num_given_frames, "warmup_steps": args.warmup_steps, "warmup_layers": args.warmup_layers, "options": options,
        "device": str(device) + (" (%s)" % torch.cuda.get_device_name(device) if device.type == "cuda" else ""),
        "dtype": args.dtype if device.type == "cuda" else "f32", "torch": torch.__version__,
        "ssim": metrics.ssim_backend(),
    }
    print("svgear.quality.evaluate: " + json.dumps(info))
    rows, summary, frames = run_evaluation(
        model, configs, num_videos=args.num_videos, seed=args.seed, steps=args.steps, shift=shift, video=video,
        device=device, options=options, warmup_steps=args.warmup_steps, warmup_layers=args.warmup_layers,
        dtype=dtype, frames_video=args.frames_video, timing_warmup=not args.no_timing_warmup, guidance=guidance)
    write_outputs(args.out, rows, summary, frames, info, frames_count=args.frames_count)
    print()
    print(format_table(summary))
    print("\nwrote results.csv, summary.csv, summary.json, pareto.png, frames.png to %s" % args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
