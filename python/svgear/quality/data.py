"""Procedural videos: moving, rotating, occluding textured shapes over a textured, panning
background. Rendered in torch (on the GPU when given a CUDA device), so training is not
data-bound, and deterministic from a seed.

A scene is laid out in a WORLD x WORLD pixel frame (96 x 96) over WORLD_FRAMES frames (16). Its
parameters are drawn on the CPU from a torch.Generator; any window of it (frames t0.., rows
y0.., columns x0..) can be rendered at the same pixel scale, which is how the training
curriculum takes small clips: a crop of a full video, not a downscaled one.
"""
import math

import torch

WORLD = 96          # the scene's full frame, pixels
WORLD_FRAMES = 16   # the scene's full length, frames
MAX_OBJECTS = 3
SHAPES = ("disc", "square", "triangle")
# Object colours (RGB in [0, 1]), jittered per object: saturated, so every object stands out
# from the muted background.
PALETTE = torch.tensor([
    [0.95, 0.15, 0.15], [0.15, 0.85, 0.25], [0.2, 0.35, 0.95],
    [0.95, 0.85, 0.1], [0.1, 0.85, 0.9], [0.9, 0.2, 0.85],
])


def scene_params(batch, generator):
    """Draws `batch` scenes' parameters from `generator`, on the generator's device (a CUDA
    generator keeps training free of host-to-device copies, which would synchronise)."""
    g = generator
    dev = g.device

    def u(*shape, lo=0.0, hi=1.0):
        return lo + (hi - lo) * torch.rand(*shape, generator=g, device=dev)

    n = MAX_OBJECTS
    # The background is muted (its second colour is the first plus a small offset) and the
    # objects are large, saturated and drawn from a small palette, so that a few minutes of
    # training learn crisp shapes. The first version (two free background colours, objects of
    # any colour, radius 7-18) gave a model whose samples after 10 minutes of H100 training
    # were drifting blobs on high-contrast textures: its capacity went to the background.
    bg_c1 = u(batch, 3, lo=0.25, hi=0.65)
    params = {
        # background: two close colours blended by a sum of low-frequency gratings, a
        # brightness gradient, and a camera pan (pixels per frame).
        "bg_c1": bg_c1,
        "bg_c2": (bg_c1 + u(batch, 3, lo=-0.12, hi=0.12)).clamp(0.0, 1.0),
        "bg_freq": u(batch, 3, lo=1.0 / 40.0, hi=1.0 / 16.0),
        "bg_angle": u(batch, 3, hi=math.pi),
        "bg_phase": u(batch, 3, hi=2 * math.pi),
        "bg_amp": u(batch, 3, lo=0.3, hi=1.0),
        "bg_gain": u(batch, lo=1.0, hi=2.5),
        "bg_grad_angle": u(batch, hi=2 * math.pi),
        "bg_grad": u(batch, lo=0.0, hi=0.3),
        "cam_vel": u(batch, 2, lo=-1.5, hi=1.5),
        # objects: 2..MAX_OBJECTS per scene, painted in index order (later ones occlude).
        "obj_count": torch.randint(2, n + 1, (batch,), generator=g, device=dev),
        "obj_type": torch.randint(0, 3, (batch, n), generator=g, device=dev),  # disc, square, triangle
        "obj_radius": u(batch, n, lo=11.0, hi=20.0),
        "obj_pos": u(batch, n, 2, lo=16.0, hi=WORLD - 16.0),
        "obj_vel": u(batch, n, 2, lo=-2.0, hi=2.0),
        "obj_angle": u(batch, n, hi=2 * math.pi),
        "obj_spin": u(batch, n, lo=-0.15, hi=0.15),
    }
    # (split from the literal above only to name the palette index: the draws keep their order)
    params["obj_palette"] = torch.randint(0, len(PALETTE), (batch, n), generator=g, device=dev)
    params["obj_color"] = (PALETTE.to(dev)[params["obj_palette"]] + u(batch, n, 3, lo=-0.08, hi=0.08)).clamp(0.0, 1.0)
    params.update({
        "obj_stripe_freq": u(batch, n, lo=2 * math.pi / 14.0, hi=2 * math.pi / 7.0),
        "obj_stripe_amp": u(batch, n, lo=0.25, hi=0.5),
        "obj_stripe_phase": u(batch, n, hi=2 * math.pi),
    })
    return params


def _triangle_sdf(px, py, r):
    """Signed distance to an equilateral triangle of half-side r centred at the origin."""
    k = math.sqrt(3.0)
    px = px.abs() - r
    py = py + r / k
    flip = (px + k * py) > 0
    qx = torch.where(flip, (px - k * py) / 2, px)
    qy = torch.where(flip, (-k * px - py) / 2, py)
    qx = qx - torch.maximum(torch.minimum(qx, torch.zeros_like(qx)), -2 * r)
    return -torch.sqrt(qx * qx + qy * qy) * torch.sign(qy)


def render(params, frames, height, width, t0=None, y0=None, x0=None, device="cpu", visibility=False):
    """Renders a window of each scene: (B, 3, frames, height, width) in [-1, 1], float32.

    t0, y0, x0: (B,) integer offsets of the window in the scene (default 0).
    visibility: also return (B, MAX_OBJECTS) bools, whether each object shows in the window
    (at least VISIBLE_PIXELS pixels of it over the clip after occlusion): what scene_labels needs.
    """
    device = torch.device(device)
    p = {k: v.to(device) for k, v in params.items()}  # no copy when already there
    batch = p["bg_c1"].shape[0]
    zeros = torch.zeros(batch, device=device)
    t0 = zeros if t0 is None else t0.to(device, torch.float32)
    y0 = zeros if y0 is None else y0.to(device, torch.float32)
    x0 = zeros if x0 is None else x0.to(device, torch.float32)
    t = (t0[:, None] + torch.arange(frames, device=device))[:, :, None, None]          # B,T,1,1
    y = (y0[:, None] + torch.arange(height, device=device) + 0.5)[:, None, :, None]    # B,1,H,1
    x = (x0[:, None] + torch.arange(width, device=device) + 0.5)[:, None, None, :]     # B,1,1,W

    def col(v):  # (B,) -> (B,1,1,1)
        return v[:, None, None, None]

    # Background in world coordinates that pan with the camera.
    bx = x + col(p["cam_vel"][:, 0]) * t
    by = y + col(p["cam_vel"][:, 1]) * t
    pattern = 0.0
    for i in range(p["bg_freq"].shape[1]):
        a = col(p["bg_angle"][:, i])
        w = 2 * math.pi * col(p["bg_freq"][:, i])
        pattern = pattern + col(p["bg_amp"][:, i]) * torch.sin(
            w * (torch.cos(a) * bx + torch.sin(a) * by) + col(p["bg_phase"][:, i]))
    mix = torch.sigmoid(col(p["bg_gain"]) * pattern)[:, None]                           # B,1,T,H,W
    c1 = p["bg_c1"][:, :, None, None, None]
    c2 = p["bg_c2"][:, :, None, None, None]
    ga = col(p["bg_grad_angle"])
    shade = 1 + col(p["bg_grad"]) * (torch.cos(ga) * (bx / WORLD - 0.5) + torch.sin(ga) * (by / WORLD - 0.5))
    image = (c1 * (1 - mix) + c2 * mix) * shade[:, None]

    count = p["obj_count"]
    alphas = []
    for j in range(p["obj_radius"].shape[1]):
        active = (count > j).float()
        cx = col(p["obj_pos"][:, j, 0]) + col(p["obj_vel"][:, j, 0]) * t
        cy = col(p["obj_pos"][:, j, 1]) + col(p["obj_vel"][:, j, 1]) * t
        theta = col(p["obj_angle"][:, j]) + col(p["obj_spin"][:, j]) * t
        dx, dy = x - cx, y - cy
        cos, sin = torch.cos(theta), torch.sin(theta)
        lu = cos * dx + sin * dy       # object-local coordinates (rotate with the object)
        lv = -sin * dx + cos * dy
        r = col(p["obj_radius"][:, j])
        kind = col(p["obj_type"][:, j])
        sdf = torch.where(
            kind == 0, torch.sqrt(lu * lu + lv * lv) - r,
            torch.where(kind == 1, torch.maximum(lu.abs(), lv.abs()) - 0.8 * r,
                        _triangle_sdf(lu, lv, 1.1 * r)))
        alpha = (0.5 - sdf).clamp(0.0, 1.0) * col(active)                                # 1-px edge
        stripes = 1 - col(p["obj_stripe_amp"][:, j]) * (
            0.5 + 0.5 * torch.sin(col(p["obj_stripe_freq"][:, j]) * lu + col(p["obj_stripe_phase"][:, j])))
        colour = p["obj_color"][:, j, :, None, None, None] * stripes[:, None]
        alpha = alpha[:, None]
        image = image * (1 - alpha) + colour * alpha
        alphas.append(alpha)
    video = (image.clamp(0.0, 1.0) * 2 - 1).contiguous()
    if not visibility:
        return video
    shown = []
    for j, alpha in enumerate(alphas):
        for later in alphas[j + 1:]:  # what the objects painted over it leave of it
            alpha = alpha * (1 - later)
        shown.append(alpha.sum(dim=(1, 2, 3, 4)) >= VISIBLE_PIXELS)
    return video, torch.stack(shown, dim=1)


# Class labels for conditioning: which shapes and which palette colours a clip shows, as a
# multi-hot vector, for classifier-free guidance at sampling (as DiT's classes, Wan's text).
# Tried against the label-free model's blobs: in 490 s it did not make them crisp shapes
# (docs/QUALITY.md), so the committed model has no labels.
NUM_LABELS = len(SHAPES) + len(PALETTE)
VISIBLE_PIXELS = 16


def scene_labels(params, visible):
    """(B, NUM_LABELS) float multi-hot: [shape kinds shown..., palette colours shown...]."""
    kinds = _one_hot(params["obj_type"].to(visible.device), len(SHAPES))
    colours = _one_hot(params["obj_palette"].to(visible.device), len(PALETTE))
    mask = visible[..., None].float()
    return torch.cat([(kinds * mask).amax(dim=1), (colours * mask).amax(dim=1)], dim=1)


def _one_hot(index, classes):
    return torch.nn.functional.one_hot(index.long(), classes).float()


def generate(seed, batch=1, frames=WORLD_FRAMES, height=WORLD, width=WORLD, device="cpu", labels=False):
    """Full-frame videos (B, 3, frames, height, width) in [-1, 1], deterministic from `seed`;
    with labels=True, (videos, their scene_labels)."""
    g = torch.Generator().manual_seed(int(seed))
    params = scene_params(batch, g)
    if not labels:
        return render(params, frames, height, width, device=device)
    video, visible = render(params, frames, height, width, device=device, visibility=True)
    return video, scene_labels(params, visible)


def random_clips(batch, frames, height, width, generator, device=None, labels=False):
    """Training clips: random windows (frames x height x width) of random scenes, drawn from
    `generator` and rendered on `device` (default: the generator's); with labels=True,
    (clips, their scene_labels), the labels naming what each window shows."""
    params = scene_params(batch, generator)
    dev = generator.device

    def offset(extent, full):
        return torch.randint(0, full - extent + 1, (batch,), generator=generator, device=dev) if extent < full else None

    t0, y0, x0 = offset(frames, WORLD_FRAMES), offset(height, WORLD), offset(width, WORLD)
    if not labels:
        return render(params, frames, height, width, t0, y0, x0, device=device or dev)
    clips, visible = render(params, frames, height, width, t0, y0, x0, device=device or dev, visibility=True)
    return clips, scene_labels(params, visible)
