"""AttentionRouter: per-layer states and dense warm-up for a model's self-attention layers.

One object decides, for every (step, layer), whether attention runs dense or through svgear,
and holds each layer's LayerState. The diffusers integration and the quality tool both use it,
so both apply the same warm-up rule.
"""

import math

from . import core
from ._errors import Error


def _count(spec, total, what):
    """A warm-up spec: a fraction (< 1) of `total`, or a count (>= 1)."""
    if spec is None or spec == 0:
        return 0
    if spec < 0:
        raise core.SvgearValueError(f"svgear: {what} = {spec} must be >= 0 (a fraction < 1 or a count)")
    if spec < 1:
        if total is None:
            raise core.SvgearValueError(
                f"svgear: {what} = {spec} is a fraction, so the total is needed: "
                + ("call set_step(step, num_steps)" if what == "warmup_steps" else "pass num_layers"))
        return int(math.floor(spec * total + 0.5))
    return int(spec)


def dense_attention(q, k, v, layout="bshd"):
    """Exact attention with torch (SDPA where it exists): the dense baseline."""
    import torch
    import torch.nn.functional as F

    if layout == "bshd":
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))
    if hasattr(F, "scaled_dot_product_attention"):
        out = F.scaled_dot_product_attention(q, k, v)
    else:  # torch < 2.0
        scores = torch.matmul(q.float(), k.float().transpose(-1, -2)) / math.sqrt(q.shape[-1])
        out = torch.matmul(torch.softmax(scores, dim=-1), v.float()).to(q.dtype)
    return out.transpose(1, 2) if layout == "bshd" else out


class AttentionRouter:
    """Routes each layer's attention to dense or svgear.

    method: "ear", "svg2" or "dense"; density and options as in svgear.attention.
    warmup_steps: the first steps run dense, as a fraction of num_steps (< 1) or a count (>= 1);
    warmup_layers: the first layers always run dense (fraction of num_layers, or a count).
    synchronize: False (default) runs CUDA calls asynchronously, so the host queues the next
    layer while the GPU runs this one; their NaN/Inf checks are raised by synchronize(), which
    set_step (at each new step) and reset call. True: every call waits and raises at once.
    Use: reset() before a video, set_step(step, num_steps) before each denoising step, then
    router(layer, q, k, v) inside each self-attention; synchronize() after the last step.
    """

    def __init__(self, method="ear", density=0.2, num_layers=None, warmup_steps=0.2, warmup_layers=0,
                 synchronize=False, **options):
        self.method = method
        self.density = density
        self.num_layers = num_layers
        self.warmup_steps = warmup_steps
        self.warmup_layers = warmup_layers
        self.options = options
        # Every svgear call of the router has a state, so it may run asynchronously; the option
        # has no effect on the CPU.
        self._call_options = dict(options, synchronize=bool(synchronize))
        self.key = core.options_key(method, density if method != "dense" else None, **self._call_options)
        if method != "dense":
            core.config_for(self.key)  # bad options fail at construction, not mid-video
        _count(warmup_layers, num_layers, "warmup_layers")
        self._states = {}
        self.step = 0
        self.num_steps = None

    def synchronize(self):
        """Wait for every layer's asynchronous calls and raise the first deferred error (ValueError
        for NaN/Inf inputs, naming the layer) once all layers are checked."""
        first = None
        for layer in sorted(self._states):
            try:
                self._states[layer].synchronize()
            except Error as error:
                if first is None:
                    first = type(error)(f"svgear: layer {layer}: {error}")
        if first is not None:
            raise first

    def reset(self):
        """A new video: every layer starts cold again. Raises a deferred error of the last video
        (after the reset)."""
        for state in self._states.values():
            state.reset()
        self.step = 0
        self.synchronize()

    def set_step(self, step, num_steps=None):
        """Before each denoising step. A new step first raises the last step's deferred errors."""
        step = int(step)
        changed = step != self.step
        self.step = step
        if num_steps is not None:
            self.num_steps = int(num_steps)
        if changed:
            self.synchronize()

    def is_dense(self, layer):
        if self.method == "dense":
            return True
        if layer < _count(self.warmup_layers, self.num_layers, "warmup_layers"):
            return True
        return self.step < _count(self.warmup_steps, self.num_steps, "warmup_steps")

    def state(self, layer):
        state = self._states.get(layer)
        if state is None:
            state = self._states[layer] = core.LayerState()
        return state

    def __call__(self, layer, q, k, v, layout="bshd", return_lse=False):
        from . import torch as svgear_torch

        if self.is_dense(layer):
            if not return_lse:
                return dense_attention(q, k, v, layout)
            # The merge with other keys needs the normaliser: svgear's own dense kernel gives it
            # (with the layer's state, which holds an asynchronous call's input check).
            return svgear_torch.attention(q, k, v, method="dense", layout=layout, state=self.state(layer),
                                          return_lse=True, synchronize=self._call_options["synchronize"])
        return svgear_torch.attention(q, k, v, method=self.method, density=self.density, layout=layout,
                                      state=self.state(layer), return_lse=return_lse, **self._call_options)
