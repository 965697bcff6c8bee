"""svgear: training-free sparse attention for video diffusion transformers (SVG-EAR, SVG2).

    import svgear
    out = svgear.attention(q, k, v, method="ear", density=0.2, layout="bshd", state=svgear.LayerState())

Tensors of any library with DLPack (torch, NumPy, CuPy, JAX) go to the C library through its
stable C API (ctypes), so this package has no compiled extension. svgear.torch.attention is the
same call as a torch operator (torch.compile-friendly); svgear.AttentionRouter adds per-layer
states and dense warm-up; svgear.diffusers plugs it into Wan and HunyuanVideo transformers.
"""

from ._errors import Error, SvgearMemoryError, SvgearRuntimeError, SvgearTypeError, SvgearValueError
from .core import LayerState, attention, describe, last_report
from .router import AttentionRouter, dense_attention

__version__ = "0.1.0"


def library_path():
    """Path of the loaded libsvgear.so (loads it)."""
    from . import _capi

    return _capi.library_path()


def has_cuda():
    """True when the loaded library was built with its CUDA path."""
    from . import _capi

    return bool(_capi.library().svgear_has_cuda())


__all__ = [
    "attention", "LayerState", "AttentionRouter", "dense_attention", "describe", "last_report",
    "library_path", "has_cuda", "Error", "SvgearValueError", "SvgearTypeError",
    "SvgearRuntimeError", "SvgearMemoryError",
]
