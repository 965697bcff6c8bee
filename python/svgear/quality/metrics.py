"""PSNR and SSIM of generated videos against the dense generation.

Videos are (3, T, H, W) tensors in [-1, 1] (the model's range); both metrics use [0, 1]
(data_range 1). SSIM is the mean over frames of the per-frame colour SSIM with Wang et al.'s
Gaussian window (sigma 1.5, 11 taps, K1 0.01, K2 0.03, population covariance):
skimage.metrics.structural_similarity when importable, else the same computation in torch
(identical up to rounding: skimage crops the border where its window would need padding, and
the torch version only evaluates the interior).
"""
import math

import torch
import torch.nn.functional as F


def to_unit(video):
    return ((video.detach().float().cpu().clamp(-1, 1) + 1) / 2).double()


def psnr(video, reference):
    """PSNR in dB over the whole video; inf when identical."""
    mse = float(((to_unit(video) - to_unit(reference)) ** 2).mean())
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _gaussian_taps(sigma=1.5, truncate=3.5):
    radius = int(truncate * sigma + 0.5)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (x / sigma) ** 2)
    return w / w.sum()


def ssim_torch(a, b, sigma=1.5):
    """Mean SSIM of images a, b: (N, C, H, W) in [0, 1]; per image and channel, then averaged."""
    a, b = a.double(), b.double()
    taps = _gaussian_taps(sigma)
    size = min(a.shape[-2], a.shape[-1])
    if taps.numel() > size:  # tiny images: a shorter window (skimage would refuse them)
        r = (size - 1) // 2
        c = taps.numel() // 2
        taps = taps[c - r:c + r + 1]
        taps = taps / taps.sum()
    k = taps.numel()
    n, c = a.shape[:2]
    x = torch.cat([a, b, a * a, b * b, a * b], dim=1).reshape(n * 5 * c, 1, *a.shape[-2:])
    x = F.conv2d(x, taps.view(1, 1, 1, k))
    x = F.conv2d(x, taps.view(1, 1, k, 1))
    ua, ub, uaa, ubb, uab = x.reshape(n, 5, c, *x.shape[-2:]).unbind(1)
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    va, vb, cov = uaa - ua * ua, ubb - ub * ub, uab - ua * ub
    s = ((2 * ua * ub + c1) * (2 * cov + c2)) / ((ua * ua + ub * ub + c1) * (va + vb + c2))
    return float(s.mean())


def _skimage_ssim():
    try:
        from skimage.metrics import structural_similarity
        return structural_similarity
    except ImportError:
        return None


def ssim(video, reference, backend="auto"):
    """Mean per-frame SSIM of two (3, T, H, W) videos in [-1, 1]."""
    a = to_unit(video).permute(1, 0, 2, 3)        # T, 3, H, W
    b = to_unit(reference).permute(1, 0, 2, 3)
    fn = _skimage_ssim() if backend in ("auto", "skimage") else None
    if backend == "skimage" and fn is None:
        raise ImportError("scikit-image is not installed")
    if fn is None or min(a.shape[-2:]) < 11:
        return ssim_torch(a, b)
    values = []
    for fa, fb in zip(a, b):
        x, y = fa.permute(1, 2, 0).numpy(), fb.permute(1, 2, 0).numpy()
        kwargs = dict(data_range=1.0, gaussian_weights=True, sigma=1.5, use_sample_covariance=False)
        try:
            values.append(fn(x, y, channel_axis=-1, **kwargs))
        except TypeError:  # scikit-image < 0.19
            values.append(fn(x, y, multichannel=True, **kwargs))
    return float(sum(values) / len(values))


def ssim_backend():
    return "skimage" if _skimage_ssim() is not None else "torch"
