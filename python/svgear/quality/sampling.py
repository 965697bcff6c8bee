"""Rectified flow: x_t = (1 - t) x0 + t noise, the model predicts v = noise - x0; Euler sampler
from t = 1 (noise) to t = 0 (data) on a shifted time grid."""
import contextlib

import torch


def shift_time(t, shift):
    """SD3/Wan timestep shift: t' = s t / (1 + (s - 1) t); s > 1 spends more time at high noise."""
    return shift * t / (1 + (shift - 1) * t)


def sampler_shift(train_meta):
    """The sampler shift a checkpoint's training record asks for: its `sample_shift`, else the
    training `shift` (older checkpoints), else 2."""
    return float(train_meta.get("sample_shift", train_meta.get("shift", 2.0)))


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
def sample(model, noise, num_steps=25, shift=2.0, attention_fn=None, on_step=None, dtype=torch.bfloat16):
    """Euler integration of the learned velocity; returns x0 (float32, model's pixel range).

    on_step(step, num_steps) is called before each step (the router's set_step).
    """
    x = noise.float()
    ts = time_grid(num_steps, shift, device=x.device)
    for i in range(num_steps):
        if on_step is not None:
            on_step(i, num_steps)
        t = torch.full((x.shape[0],), float(ts[i]), device=x.device)
        with autocast(x.device, dtype):
            v = model(x, t, attention_fn=attention_fn)
        x = x + float(ts[i + 1] - ts[i]) * v.float()
    return x
