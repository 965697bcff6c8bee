"""Rectified flow: x_t = (1 - t) x0 + t noise, the model predicts v = noise - x0; Euler sampler
from t = 1 (noise) to t = 0 (data) on a shifted time grid."""
import contextlib

import torch

from . import data


def shift_time(t, shift):
    """SD3/Wan timestep shift: t' = s t / (1 + (s - 1) t); s > 1 spends more time at high noise."""
    return shift * t / (1 + (shift - 1) * t)


def sampler_shift(train_meta):
    """The sampler shift a checkpoint's training record asks for: its `sample_shift`, else the
    training `shift` (older checkpoints), else 2."""
    return float(train_meta.get("sample_shift", train_meta.get("shift", 2.0)))


def sampler_guidance(train_meta):
    """The classifier-free guidance scale a checkpoint's training record asks for (1: none)."""
    return float(train_meta.get("sample_guidance", 1.0))


def sample_condition(model, seed, device="cpu", video=None):
    """What to sample a model with for `seed`, as keyword arguments of sample(): the labels
    (class-conditional model) and the leading frames (a model with num_given_frames) of the
    training scene with that seed (data.generate, at `video` pixels, default the model's), so
    every seed asks for a plausible scene; {} for an unconditional model."""
    cfg = model.cfg
    if not (getattr(cfg, "num_labels", 0) or getattr(cfg, "num_given_frames", 0)):
        return {}
    scene, labels = data.generate(seed, 1, *(video or cfg.video), labels=True)
    return scene_condition(model, scene, labels, device)


def scene_condition(model, scene, labels, device="cpu"):
    """The keyword arguments of model() / sample() that tell `model` about a scene: its labels
    (class-conditional model) and its leading frames (a model with num_given_frames)."""
    cfg = model.cfg
    condition = {}
    if getattr(cfg, "num_labels", 0):
        if labels.shape[1] != cfg.num_labels:
            raise ValueError("the model takes %d labels, the data gives %d" % (cfg.num_labels, labels.shape[1]))
        condition["labels"] = labels.to(device)
    if getattr(cfg, "num_given_frames", 0):
        condition["given_frames"] = scene[:, :, :cfg.num_given_frames].to(device)
    return condition


def given_scene_row(seed, cfg, device="cpu"):
    """(label, video) picture row of the training scene whose leading frames the sample of
    `seed` was given, for a model with num_given_frames."""
    n = cfg.num_given_frames
    given = "frame 0" if n == 1 else "frames 0-%d" % (n - 1)
    return "scene %d (%s given)" % (seed, given), data.generate(seed, 1, *cfg.video, device=device)[0]


def time_grid(num_steps, shift, device="cpu"):
    return shift_time(torch.linspace(1.0, 0.0, num_steps + 1, device=device, dtype=torch.float64), shift)


def autocast(device, dtype=torch.bfloat16):
    """bf16 autocast on CUDA; nothing elsewhere."""
    device = torch.device(device)
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        return torch.autocast(device_type="cuda", dtype=dtype)
    return contextlib.nullcontext()


def flow_pair(x0, noise, t):
    """Training input and target at times t (B,): x_t = (1 - t) x0 + t noise, v = noise - x0."""
    tb = t.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - tb) * x0 + tb * noise, noise - x0


def initial_noise(seed, shape, device="cpu"):
    """The same noise for a seed on every device: drawn on the CPU, then moved."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randn(*shape, generator=g).to(device)


@torch.no_grad()
def sample(model, noise, num_steps=25, shift=2.0, attention_fn=None, on_step=None, dtype=torch.bfloat16,
           labels=None, guidance=1.0, given_frames=None):
    """Euler integration of the learned velocity; returns x0 (float32, model's pixel range).

    on_step(step, num_steps) is called before each step (the router's set_step).
    labels (B, num_labels) condition the model; with guidance != 1 each step runs the
    conditional and the unconditional (zero-label) inputs as one batch of 2B, as Wan's CFG
    does, and takes v_u + guidance * (v_c - v_u). Attention then sees batch 2B.
    given_frames (B, C, N, H, W) are the clean leading frames a model with num_given_frames
    continues (both halves of a guided batch get them, as Wan2.1-I2V's image condition).
    """
    x = noise.float()
    cfg = labels is not None and guidance != 1.0
    extra = {}
    if labels is not None:
        extra["labels"] = torch.cat([labels, torch.zeros_like(labels)]) if cfg else labels
    if given_frames is not None:
        extra["given_frames"] = torch.cat([given_frames, given_frames]) if cfg else given_frames
    ts = time_grid(num_steps, shift, device=x.device)
    for i in range(num_steps):
        if on_step is not None:
            on_step(i, num_steps)
        xin = torch.cat([x, x]) if cfg else x
        t = torch.full((xin.shape[0],), float(ts[i]), device=x.device)
        with autocast(x.device, dtype):
            v = model(xin, t, attention_fn=attention_fn, **extra).float()
        if cfg:
            v_c, v_u = v.chunk(2)
            v = v_u + guidance * (v_c - v_u)
        x = x + float(ts[i + 1] - ts[i]) * v
    return x
