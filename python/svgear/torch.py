"""svgear.torch.attention: the library as a torch operator.

On torch >= 2.4 it is registered with torch.library.custom_op (plus a fake implementation for
shape propagation), so torch.compile keeps a model that calls it in one graph. Older torch
(Debian's 1.13 in CI) gets the same function without registration. Inference only: the op has
no backward.
"""

from typing import Tuple

import torch

from . import core

_OP_NAME = "svgear::attention"


def _rows(q, layout):
    b, x, y = q.shape[0], q.shape[1], q.shape[2]
    return (b, y, x) if layout == "bshd" else (b, x, y)


def _attention_impl(q, k, v, key, state_id, layout, want_lse):
    state = core.LayerState.by_id(state_id)
    out = torch.empty_like(q)
    lse = torch.empty(_rows(q, layout) if want_lse else (0,), dtype=torch.float32, device=q.device)
    core.run(key, q.detach(), k.detach(), v.detach(), layout=layout, state=state, out=out,
             lse=lse if want_lse else None)
    return out, lse


if hasattr(torch.library, "custom_op"):

    @torch.library.custom_op(_OP_NAME, mutates_args=())
    def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, key: str, state_id: int,
                      layout: str, want_lse: bool) -> Tuple[torch.Tensor, torch.Tensor]:
        return _attention_impl(q, k, v, key, state_id, layout, want_lse)

    @_attention_op.register_fake
    def _(q, k, v, key, state_id, layout, want_lse):
        lse = q.new_empty(_rows(q, layout) if want_lse else (0,), dtype=torch.float32)
        return torch.empty_like(q), lse

    REGISTERED = True
else:
    _attention_op = _attention_impl
    REGISTERED = False


def _compiling():
    compiler = getattr(torch, "compiler", None)
    return compiler is not None and hasattr(compiler, "is_compiling") and compiler.is_compiling()


def attention(q, k, v, *, method="ear", density=None, layout="bshd", state=None, return_lse=False, **options):
    """svgear.attention for torch tensors, as an operator torch.compile can trace through.

    Same arguments as svgear.attention (q, k, v: torch tensors in `layout` "bshd" or "bhsd");
    returns a new tensor like q, or (out, lse) with return_lse=True (lse: float32 (B, H, Sq)).
    """
    for name, x in (("q", q), ("k", k), ("v", v)):
        if not isinstance(x, torch.Tensor):
            raise core.SvgearTypeError(f"svgear.torch.attention: '{name}' is a {type(x).__name__}, not a torch.Tensor")
    if state is not None and not isinstance(state, core.LayerState):
        raise core.SvgearTypeError(f"svgear: state must be a svgear.LayerState, got {type(state).__name__}")
    if layout not in ("bshd", "bhsd"):
        raise core.SvgearValueError(f"svgear: layout '{layout}' is unknown: use 'bshd' or 'bhsd'")
    if q.dim() != 4:
        raise core.SvgearTypeError(
            f"svgear: tensor 'q' has {q.dim()} dimensions: svgear takes 4-D tensors in layout '{layout}'")
    key = core.options_key(method, density, **options)
    if not _compiling():
        core.config_for(key)  # bad options fail here, before anything runs (eager calls)
    out, lse = _attention_op(q, k, v, key, state.id if state is not None else -1, layout, bool(return_lse))
    return (out, lse) if return_lse else out
