#!/usr/bin/env python3
"""End-to-end denoising-loop benchmark: diffusers' video transformers, dense SDPA vs svgear.

What is timed: the whole denoising loop (no text encoder, no VAE) as WanPipeline /
HunyuanVideoPipeline run it: every step one transformer forward per guidance branch (Wan:
classifier-free guidance, two forwards of batch 1 per step; HunyuanVideo: guidance-distilled,
one forward, `--cfg` adds the negative branch), the guidance combination and the scheduler step
(diffusers' FlowMatchEulerDiscreteScheduler), between torch.cuda.synchronize() calls. Methods:

  dense  the transformer's own processors (diffusers' attention dispatch: SDPA)
  ear    svgear.diffusers.apply(method="ear")  with the dense warm-up (--warmup-steps, 0.2)
  svg2   svgear.diffusers.apply(method="svg2") likewise
  skip   not a method, a bound: svgear's processors as for ear, but every sparse call returns v
         instead of attending (no k-means, no kernel), so the loop's time is what the model costs
         besides a free sparse attention: the most any sparse method can gain in this loop

on the same random weights (bf16, CUDA), the same initial latents, text embeddings and seeds,
in one process. Weights are random: the timings are those of the real architectures and shapes;
the attention patterns (and so the final-latent differences printed) are not those of trained
weights.

Models (--model):
  wan2.1-1.3b   WanTransformer3DModel with Wan2.1-T2V-1.3B's config (dim 1536, 30 layers,
                12 heads x 128, ffn 8960, text_dim 4096); 480p 81 frames: latent
                (1, 16, 21, 60, 104) -> 21 x 30 x 52 = 32,760 tokens; text (1, 512, 4096); 50
                steps with CFG. Defaults fit in about 6 minutes on an H100 for the three methods.
  hunyuan       HunyuanVideoTransformer3DModel with HunyuanVideo's config (24 heads x 128,
                20 double- + 40 single-stream blocks); 720p 129 frames: latent
                (1, 16, 33, 90, 160) -> 33 x 45 x 80 = 118,800 video tokens + 256 text tokens.
                One full-depth dense forward takes tens of seconds, so the default is reduced
                depth (--layers 12: 4 double + 8 single blocks) and 10 steps; the output says so.

Prints progress per step, a table, optionally the self-attention share of the loop (CUDA
events around the self-attention modules, --attn-share), writes results to --out (JSON and
BENCHMARKS rows) and, with --write-benchmarks, appends the rows to BENCHMARKS.md.
"""

import argparse
import contextlib
import datetime
import json
import os
import sys
import time

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "python"))

# --device cpu (float32) exists only to smoke-test this script on a machine without a GPU.
DEVICE = "cuda"
DTYPE = torch.bfloat16


def sync():
    if DEVICE == "cuda":
        torch.cuda.synchronize()

# Wan2.1-T2V-1.3B transformer (diffusers' Wan-AI/Wan2.1-T2V-1.3B-Diffusers config).
WAN_1_3B = dict(
    patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
    qk_norm="rms_norm_across_heads", eps=1e-6, image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024,
)
# HunyuanVideo transformer (hunyuanvideo-community/HunyuanVideo config).
HUNYUAN = dict(
    in_channels=16, out_channels=16, num_attention_heads=24, attention_head_dim=128, num_layers=20,
    num_single_layers=40, num_refiner_layers=2, mlp_ratio=4.0, patch_size=2, patch_size_t=1, qk_norm="rms_norm",
    guidance_embeds=True, text_embed_dim=4096, pooled_projection_dim=768, rope_theta=256.0,
    rope_axes_dim=(16, 56, 56),
)

MODELS = {
    # name: defaults
    "wan2.1-1.3b": dict(latent=(21, 60, 104), text_len=512, steps=50, cfg=True, guidance=5.0, shift=3.0,
                        layers=None, label="480p 81f"),
    "hunyuan": dict(latent=(33, 90, 160), text_len=256, steps=10, cfg=False, guidance=6.0, shift=7.0,
                    layers=12, label="720p 129f"),
}


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=sorted(MODELS), default="wan2.1-1.3b")
    p.add_argument("--methods", default="dense,ear,svg2", help="comma list of dense, ear, svg2, skip (the bound)")
    p.add_argument("--steps", type=int, default=None, help="denoising steps (wan 50, hunyuan 10)")
    p.add_argument("--layers", type=int, default=None,
                   help="transformer depth (wan: blocks, default 30; hunyuan: double+single blocks, split 1:2, "
                        "default 12 of 60)")
    p.add_argument("--latent", default=None, help="latent frames,height,width (wan 21,60,104; hunyuan 33,90,160)")
    p.add_argument("--text-len", type=int, default=None, help="text tokens (wan 512, hunyuan 256)")
    p.add_argument("--text-valid", type=int, default=64, help="hunyuan: unmasked text tokens of --text-len")
    p.add_argument("--cfg", dest="cfg", action="store_true", default=None, help="two forwards per step")
    p.add_argument("--no-cfg", dest="cfg", action="store_false")
    p.add_argument("--density", type=float, default=0.12, help="svgear budget for ear and svg2 (default 0.12)")
    p.add_argument("--clusters-q", type=int, default=256)
    p.add_argument("--clusters-k", type=int, default=1024)
    p.add_argument("--warm-iters", type=int, default=None,
                   help="k-means iterations of a warm-started call (default: the library's)")
    p.add_argument("--warmup-steps", type=float, default=0.2, help="dense warm-up: fraction (<1) or count")
    p.add_argument("--warmup-layers", type=float, default=0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attn-share", dest="attn_share", action="store_true", default=True,
                   help="time the self-attention modules with CUDA events (default on)")
    p.add_argument("--no-attn-share", dest="attn_share", action="store_false")
    p.add_argument("--quiet", action="store_true", help="no per-step progress lines")
    p.add_argument("--out", default=None, help="folder for e2e_results.json and BENCHMARKS-e2e-rows.md")
    p.add_argument("--write-benchmarks", action="store_true", help="append the rows to BENCHMARKS.md")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help=argparse.SUPPRESS)
    p.add_argument("--benchmarks-file", default=os.path.join(REPO, "BENCHMARKS.md"))
    return p.parse_args()


def to_model_dtype(model, dtype):
    """bf16 weights except the modules diffusers keeps in float32 when loading (Wan: rope,
    time_embedder, scale_shift_table, norm1..3), as from_pretrained(torch_dtype=bf16) does."""
    keep = set(getattr(model, "_keep_in_fp32_modules", None) or [])
    for name, param in model.named_parameters():
        kept = any(part in keep for part in name.split("."))
        param.data = param.data.to(torch.float32 if kept else dtype)
    return model


@contextlib.contextmanager
def build_device():
    """Parameters made directly on the GPU in the model dtype (random init of billions of
    parameters on the CPU, or in float32 first, is slow and doubles the memory)."""
    if DEVICE != "cuda":
        yield
        return
    previous = torch.get_default_dtype()
    try:
        torch.set_default_dtype(DTYPE)
    except (TypeError, RuntimeError):
        pass  # float32 first, converted by to_model_dtype
    try:
        with torch.device(DEVICE):
            yield
    finally:
        torch.set_default_dtype(previous)


def build(args, spec):
    import diffusers

    diffusers.utils.logging.set_verbosity_error()
    torch.manual_seed(args.seed)
    if args.model == "wan2.1-1.3b":
        cfg = dict(WAN_1_3B)
        if args.layers is not None:
            cfg["num_layers"] = args.layers
        with build_device():
            model = diffusers.WanTransformer3DModel(**cfg)
        depth = f"{cfg['num_layers']}/{WAN_1_3B['num_layers']} blocks"
        full = cfg["num_layers"] == WAN_1_3B["num_layers"]
    else:
        cfg = dict(HUNYUAN)
        layers = args.layers if args.layers is not None else spec["layers"]
        if layers is not None:
            double = max(1, round(layers / 3))
            cfg["num_layers"], cfg["num_single_layers"] = double, max(0, layers - double)
        with build_device():
            model = diffusers.HunyuanVideoTransformer3DModel(**cfg)
        depth = (f"{cfg['num_layers']}+{cfg['num_single_layers']}/"
                 f"{HUNYUAN['num_layers']}+{HUNYUAN['num_single_layers']} blocks")
        full = (cfg["num_layers"], cfg["num_single_layers"]) == (HUNYUAN["num_layers"], HUNYUAN["num_single_layers"])
    model = to_model_dtype(model, DTYPE).eval().requires_grad_(False)
    return model, cfg, depth, full


def make_inputs(args, spec, cfg):
    g = torch.Generator(device=DEVICE).manual_seed(args.seed)
    f, h, w = spec["latent"]
    latents = torch.randn(1, 16, f, h, w, generator=g, device=DEVICE, dtype=torch.float32)
    text_dim = cfg.get("text_dim", cfg.get("text_embed_dim"))
    pos = torch.randn(1, spec["text_len"], text_dim, generator=g, device=DEVICE).to(DTYPE)
    neg = torch.randn(1, spec["text_len"], text_dim, generator=g, device=DEVICE).to(DTYPE)
    extra = {}
    if args.model == "hunyuan":
        valid = min(args.text_valid, spec["text_len"])
        mask = torch.zeros(1, spec["text_len"], dtype=torch.long, device=DEVICE)
        mask[:, :valid] = 1
        pooled = torch.randn(1, cfg["pooled_projection_dim"], generator=g, device=DEVICE).to(DTYPE)
        extra = dict(encoder_attention_mask=mask, pooled_projections=pooled,
                     guidance=torch.tensor([spec["guidance"] * 1000.0], device=DEVICE, dtype=torch.float32))
    return latents, pos, neg, extra


class AttnTimer:
    """CUDA events around each self-attention module call; no synchronisation until read."""

    def __init__(self, modules):
        self.pairs = []
        self.handles = []
        for m in modules:
            self.handles.append(m.register_forward_pre_hook(self._pre))
            self.handles.append(m.register_forward_hook(self._post))
        self._open = []

    def _pre(self, module, args):
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        self._open.append(e)

    def _post(self, module, args, output):
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        self.pairs.append((self._open.pop(), e))

    def seconds(self):
        torch.cuda.synchronize()
        return sum(a.elapsed_time(b) for a, b in self.pairs) / 1000.0

    def close(self):
        for h in self.handles:
            h.remove()


def self_attention_modules(model, name):
    if name == "wan2.1-1.3b":
        return [b.attn1 for b in model.blocks]
    return [b.attn for b in model.transformer_blocks] + [b.attn for b in model.single_transformer_blocks]


def run_loop(args, spec, model, inputs, method, dense_steps):
    from diffusers import FlowMatchEulerDiscreteScheduler

    latents0, pos, neg, extra = inputs
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=spec["shift"])
    scheduler.set_timesteps(spec["steps"], device=DEVICE)
    latents = latents0.clone()
    timer = AttnTimer(self_attention_modules(model, args.model)) if args.attn_share else None
    step_times = []
    sync()
    start = time.perf_counter()
    last = start
    with torch.inference_mode():
        for i, t in enumerate(scheduler.timesteps):
            x = latents.to(DTYPE)
            timestep = t.expand(x.shape[0])
            pred = model(hidden_states=x, timestep=timestep, encoder_hidden_states=pos, return_dict=False, **extra)[0]
            if spec["cfg"]:
                pred_neg = model(hidden_states=x, timestep=timestep, encoder_hidden_states=neg, return_dict=False,
                                 **extra)[0]
                pred = pred_neg + spec["guidance"] * (pred - pred_neg)
            latents = scheduler.step(pred.float(), t, latents, return_dict=False)[0]
            sync()
            now = time.perf_counter()
            step_times.append(now - last)
            if not args.quiet:
                kind = "dense" if (method == "dense" or i < dense_steps) else "sparse"
                print(f"  [{method}] step {i + 1:3d}/{spec['steps']} t={float(t):7.2f} {kind:6s} "
                      f"{now - last:7.3f} s  (elapsed {now - start:7.1f} s)", flush=True)
            last = now
    sync()
    loop = time.perf_counter() - start
    attn = timer.seconds() if timer else None
    if timer:
        timer.close()
    if not torch.isfinite(latents).all():
        print(f"  [{method}] WARNING: non-finite final latents", flush=True)
    return loop, step_times, attn, latents


def library_warmup(method, args, spec, cfg):
    """One untimed svgear call at the layer's shape: loads kernels and the memory pool once per
    process (what a user pays once, not per video)."""
    import svgear
    import svgear.torch

    f, h, w = spec["latent"]
    if args.model == "wan2.1-1.3b":
        pt, ph, pw = cfg["patch_size"]
    else:
        pt, ph, pw = cfg["patch_size_t"], cfg["patch_size"], cfg["patch_size"]
    s = (f // pt) * (h // ph) * (w // pw)
    heads, d = cfg["num_attention_heads"], cfg["attention_head_dim"]
    q = torch.randn(1, s, heads, d, device=DEVICE, dtype=DTYPE)
    svgear.torch.attention(q, q, q, method=method, density=args.density, layout="bshd", state=svgear.LayerState(),
                           clusters_q=args.clusters_q, clusters_k=args.clusters_k)
    sync()


def skip_sparse_attention(router):
    """The `skip` bound: the router keeps its step and layer bookkeeping (so the warm-up's dense
    calls stay dense) but a sparse call returns v as its output, computing nothing."""
    base = router.__class__

    def call(self, layer, q, k, v, layout="bshd", return_lse=False):
        if self.is_dense(layer):
            return base.__call__(self, layer, q, k, v, layout=layout, return_lse=return_lse)
        if return_lse:  # HunyuanVideo merges it with the text keys: a (B, H, S) normaliser
            b, h, s = (v.shape[0], v.shape[2], v.shape[1]) if layout == "bshd" else v.shape[:3]
            return v, torch.zeros(b, h, s, device=v.device, dtype=torch.float32)
        return v

    router.__class__ = type("SkippingRouter", (base,), {"__call__": call})


def dense_step_count(args, steps):
    w = args.warmup_steps
    return sum(1 for i in range(steps) if (i < w * steps if w < 1 else i < w))


def main():
    global DEVICE, DTYPE
    args = parse_args()
    DEVICE = args.device
    if DEVICE == "cpu":
        DTYPE = torch.float32
        args.attn_share = False
    elif not torch.cuda.is_available():
        sys.exit("e2e_bench: needs a CUDA GPU")
    spec = dict(MODELS[args.model])
    if args.steps is not None:
        spec["steps"] = args.steps
    if args.latent is not None:
        spec["latent"] = tuple(int(x) for x in args.latent.split(","))
    if args.text_len is not None:
        spec["text_len"] = args.text_len
    if args.cfg is not None:
        spec["cfg"] = args.cfg
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    for m in methods:
        if m not in ("dense", "ear", "svg2", "skip"):
            sys.exit(f"e2e_bench: unknown method {m!r}")

    import diffusers

    gpu = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU (smoke test)"
    print(f"GPU {gpu}; torch {torch.__version__}; diffusers {diffusers.__version__}", flush=True)
    t0 = time.perf_counter()
    model, cfg, depth, full_depth = build(args, spec)
    if args.model == "wan2.1-1.3b":
        pt, ph, pw = cfg["patch_size"]
    else:
        pt, ph, pw = cfg["patch_size_t"], cfg["patch_size"], cfg["patch_size"]
    f, h, w = spec["latent"]
    grid = (f // pt, h // ph, w // pw)
    tokens = grid[0] * grid[1] * grid[2]
    n_params = sum(p.numel() for p in model.parameters())
    forwards = spec["steps"] * (2 if spec["cfg"] else 1)
    print(f"model {args.model} ({depth}{'' if full_depth else ', REDUCED DEPTH'}), {n_params / 1e9:.2f}B params, "
          f"random weights, bf16; built in {time.perf_counter() - t0:.1f} s", flush=True)
    text_note = f"text {spec['text_len']}" + (f" ({args.text_valid} valid)" if args.model == "hunyuan" else "")
    print(f"latent (1, 16, {f}, {h}, {w}) -> {grid[0]}x{grid[1]}x{grid[2]} = {tokens} video tokens, {text_note}; "
          f"{spec['steps']} steps, {'CFG: 2' if spec['cfg'] else '1'} forward(s) per step = {forwards} forwards",
          flush=True)
    dense_steps = dense_step_count(args, spec["steps"])
    print(f"svgear: density {args.density}, clusters {args.clusters_q}/{args.clusters_k}, "
          f"warm k-means iterations {args.warm_iters or 'default'}, warm-up "
          f"{args.warmup_steps} -> {dense_steps} dense steps, warmup_layers {args.warmup_layers}", flush=True)

    inputs = make_inputs(args, spec, cfg)
    # Untimed: one forward (CUDA context, cuBLAS/cuDNN plans) on the dense model.
    with torch.inference_mode():
        x = inputs[0].to(DTYPE)
        model(hidden_states=x, timestep=torch.tensor([999.0], device=DEVICE), encoder_hidden_states=inputs[1],
              return_dict=False, **inputs[3])
    sync()

    import svgear.diffusers as sdiff

    results = []
    dense_latents = None
    for method in methods:
        if method != "dense":
            library = "ear" if method == "skip" else method
            library_warmup(library, args, spec, cfg)
            router = sdiff.apply(model, library, density=args.density, num_inference_steps=spec["steps"],
                                 warmup_steps=args.warmup_steps, warmup_layers=args.warmup_layers,
                                 clusters_q=args.clusters_q, clusters_k=args.clusters_k,
                                 **({} if args.warm_iters is None else {"warm_iters": args.warm_iters}))
            if method == "skip":
                skip_sparse_attention(router)
        print(f"[{method}] running {spec['steps']} steps ...", flush=True)
        try:
            loop, step_times, attn, latents = run_loop(args, spec, model, inputs, method, dense_steps)
        finally:
            sdiff.remove(model)
        sparse_times = step_times[dense_steps:] if method != "dense" else step_times
        row = dict(method=method, loop_s=loop, step_s_mean=sum(step_times) / len(step_times),
                   sparse_step_s=(sum(sparse_times) / len(sparse_times)) if sparse_times else None,
                   attn_s=attn, attn_share=(attn / loop) if attn is not None else None,
                   density=None if method == "dense" else args.density,
                   warmup=None if method == "dense" else args.warmup_steps,
                   warm_iters=None if method == "dense" else args.warm_iters)
        if method == "dense":
            dense_latents = latents
        elif dense_latents is not None:
            a, b = latents.double(), dense_latents.double()
            row["latent_rel_l2_vs_dense"] = float((a - b).norm() / b.norm())
        results.append(row)
        print(f"[{method}] loop {loop:.2f} s" + (f", self-attention {attn:.2f} s ({100 * attn / loop:.1f}%)"
                                                 if attn is not None else ""), flush=True)
        del latents
        if DEVICE == "cuda":
            torch.cuda.empty_cache()

    dense = next((r for r in results if r["method"] == "dense"), None)
    for r in results:
        r["speedup"] = (dense["loop_s"] / r["loop_s"]) if dense else None

    shape = (f"{args.model} {spec['label'] if spec['latent'] == MODELS[args.model]['latent'] else 'custom'} "
             f"({depth}{'' if full_depth else ', reduced depth'}): latent 1x16x{f}x{h}x{w}, {tokens} tokens")
    steps_label = f"{spec['steps']}{' x2 CFG' if spec['cfg'] else ''}"
    print()
    print(f"{shape}; {steps_label} steps; svgear clusters {args.clusters_q}/{args.clusters_k}")
    header = ["method", "density", "warm-up", "loop s", "s/step", "sparse s/step", "speedup", "self-attn share",
              "final latent rel-L2 vs dense"]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))

    def fmt(v, pat):
        return "—" if v is None else pat.format(v)

    for r in results:
        print("| " + " | ".join([
            r["method"], fmt(r["density"], "{:g}"), fmt(r["warmup"], "{:g}"), f"{r['loop_s']:.2f}",
            f"{r['step_s_mean']:.3f}", fmt(r["sparse_step_s"], "{:.3f}"), fmt(r["speedup"], "{:.2f}x"),
            fmt(r["attn_share"] and 100 * r["attn_share"], "{:.1f}%"),
            fmt(r.get("latent_rel_l2_vs_dense"), "{:.3f}"),
        ]) + " |")

    today = datetime.date.today().isoformat()
    rows = []
    for r in results:
        method = r["method"] if r["method"] == "dense" else (
            f"{r['method']} (density {r['density']:g}, warm-up {r['warmup']:g}"
            + ("" if r["warm_iters"] is None
               else f", {r['warm_iters']} warm k-means iteration{'' if r['warm_iters'] == 1 else 's'}") + ")")
        if r["method"] == "skip":
            method += ": the bound, every sparse call returns v"
        rows.append(f"| {today} | {gpu} | {shape} | {steps_label} | {method} | {r['loop_s']:.1f} | "
                    f"{fmt(r['speedup'], '{:.2f}x')} | {fmt(r['attn_share'] and 100 * r['attn_share'], '{:.0f}%')} |")
    table_head = [
        "",
        "## End-to-end denoising loop (`bench/e2e_bench.py`)",
        "",
        "diffusers' transformer with the real architecture and random bf16 weights; the whole "
        "denoising loop (every transformer forward, guidance and scheduler step; no text encoder, "
        "no VAE) timed with torch.cuda.synchronize; dense = diffusers' own processors (SDPA); "
        "speedup against dense in the same run; self-attn share = CUDA-event time of the "
        "self-attention modules over the loop.",
        "",
        "| date | GPU | shape | steps | method | loop s | speedup vs dense | self-attn share |",
        "|---|---|---|---|---|---|---|---|",
    ]
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, "e2e_results.json"), "w") as fh:
            json.dump(dict(date=today, gpu=gpu, torch=torch.__version__, diffusers=diffusers.__version__,
                           model=args.model, depth=depth, full_depth=full_depth, latent=[1, 16, f, h, w],
                           tokens=tokens, steps=spec["steps"], cfg=spec["cfg"], clusters_q=args.clusters_q,
                           clusters_k=args.clusters_k, dense_steps=dense_steps, results=results), fh, indent=1)
        with open(os.path.join(args.out, "BENCHMARKS-e2e-rows.md"), "w") as fh:
            fh.write("\n".join(table_head[5:] + rows) + "\n")
    if args.write_benchmarks:
        append_rows(args.benchmarks_file, table_head, rows)
        print(f"added {len(rows)} rows to {args.benchmarks_file}")


def append_rows(path, table_head, rows):
    """Add rows at the end of the end-to-end table (the section and table made when missing)."""
    lines = open(path).read().split("\n") if os.path.exists(path) else ["# Benchmarks", ""]
    while lines and lines[-1] == "":
        lines.pop()
    if table_head[1] in lines:
        i = lines.index(table_head[1])
        while i < len(lines) and not lines[i].startswith("| date"):
            i += 1
        while i + 1 < len(lines) and lines[i + 1].startswith("|"):
            i += 1
        lines[i + 1:i + 1] = rows
    else:
        lines += table_head + rows
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
