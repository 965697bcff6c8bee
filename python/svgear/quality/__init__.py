"""svgear.quality: end-to-end quality of sparse attention on a real (small) trained video DiT.

- data:     procedural videos (moving, rotating, occluding textured shapes, camera pans)
- model:    a small video DiT with Wan2.1's structure and pluggable attention
            (attention_fn(layer_index, q, k, v), (B, S, H, D) in and out)
- train:    rectified-flow training within a wall-clock budget (python3 -m svgear.quality.train)
- evaluate: PSNR/SSIM of every method against dense generations (python3 -m svgear.quality.evaluate)
- capture:  real Q/K/V for the svgear CLI (python3 -m svgear.quality.capture)

See docs/QUALITY.md. The committed checkpoint lives in weights/ beside this file.
"""
import os

WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")

__all__ = ["WEIGHTS_DIR"]
