"""svgear in diffusers' video transformers: Wan2.1/2.2 and HunyuanVideo.

    import svgear.diffusers
    router = svgear.diffusers.apply(pipe.transformer, method="ear", density=0.12,
                                    num_inference_steps=50, clusters_q=256, clusters_k=1024)
    video = pipe(prompt, num_inference_steps=50).frames[0]
    svgear.diffusers.remove(pipe.transformer)          # the original processors again

`apply` replaces the attention processors of the self-attention modules only (diffusers' public
`set_processor` of each attention module; no diffusers class is edited) and registers one
forward pre-hook on the transformer that tracks the denoising step from the `timestep`
argument. Cross-attention (Wan's `attn2`, HunyuanVideo's token refiner) keeps its processors.

- Wan (`WanTransformer3DModel`): every block's `attn1` attends through svgear.
- HunyuanVideo (`HunyuanVideoTransformer3DModel`): the double- and single-stream blocks attend
  jointly over [video tokens; text tokens]. Video query rows attend through svgear over the
  video keys, and exactly (dense, in float32) over the text keys with the padding mask
  honoured; the two parts are merged by their log-sum-exps (`merge_attention`). Text query rows
  attend densely over all valid keys through diffusers' own attention dispatch.

Q/K/V are computed exactly as the original processors do (projections, QK-norm, RoPE); a layer
that is dense at the current step (warm-up, `method="dense"`) is run by the original processor
object itself, so warm-up steps reproduce the original model bit for bit.

Steps: a new step starts when the `timestep` passed to the transformer changes, so the two
forwards of classifier-free guidance (same timestep) count as one step; a timestep larger than
the previous one (or more steps than `num_inference_steps`) starts a new video, which resets
the per-layer k-means state. `reset(transformer)` forces a new video.

svgear runs asynchronously on the GPU (the router's default), so its NaN/Inf input checks are
raised by the router's synchronize(): at each new step, at a new video, after every forward of
the last step, and by `synchronize(transformer)`.

`capture(transformer, layers, steps, path)` writes the Q/K/V that attention sees (after norm
and RoPE; video tokens only for HunyuanVideo) as safetensors files in the CLI's format.
"""

from __future__ import annotations

import json
import math
import os
import struct
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, Iterable

import torch

__all__ = [
    "SUPPORTED_MODELS",
    "StepInfo",
    "Capture",
    "apply",
    "remove",
    "reset",
    "synchronize",
    "is_applied",
    "step_info",
    "capture",
    "merge_attention",
    "dense_attention_lse",
    "save_safetensors",
]

SUPPORTED_MODELS = ("WanTransformer3DModel", "HunyuanVideoTransformer3DModel")

# Processor classes whose computation the svgear processors reproduce (by class name, so that
# importing this module needs no diffusers).
_WAN_PROCESSORS = ("WanAttnProcessor", "WanAttnProcessor2_0")
_HUNYUAN_PROCESSORS = ("HunyuanVideoAttnProcessor2_0",)

# Elements of one float32 score block of the dense text-key part (256 MiB).
_DENSE_BLOCK_ELEMENTS = 1 << 26


# ---------------------------------------------------------------------------------------------
# Attention pieces (pure torch; these run on the CPU too)
# ---------------------------------------------------------------------------------------------


def _lse_as_weights(lse: torch.Tensor, layout: str) -> torch.Tensor:
    """(B, H, S) -> a tensor broadcastable against an output of the given layout."""
    if layout == "bshd":
        return lse.transpose(1, 2).unsqueeze(-1)  # (B, S, H, 1)
    if layout == "bhsd":
        return lse.unsqueeze(-1)  # (B, H, S, 1)
    raise ValueError(f'layout must be "bshd" or "bhsd", got {layout!r}')


def merge_attention(
    o1: torch.Tensor,
    lse1: torch.Tensor,
    o2: torch.Tensor,
    lse2: torch.Tensor,
    *,
    layout: str = "bshd",
    dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge two attention results over disjoint key sets into the result over their union.

    `o1`, `o2`: outputs normalised over their own keys, (B, S, H, D) for layout "bshd" or
    (B, H, S, D) for "bhsd"; `lse1`, `lse2`: (B, H, S) natural logs of their softmax
    denominators (scaled scores). Returns (out, lse) with
    out = (o1·e^lse1 + o2·e^lse2) / (e^lse1 + e^lse2), computed with the larger lse subtracted,
    in float32, cast to `dtype` (default: o1's dtype); lse float32. A side whose lse is -inf
    (no keys) gets no weight; a row where both are -inf gives out 0 and lse -inf.
    """
    if o1.shape != o2.shape:
        raise ValueError(f"merge_attention: output shapes differ: {tuple(o1.shape)} vs {tuple(o2.shape)}")
    if lse1.shape != lse2.shape:
        raise ValueError(f"merge_attention: lse shapes differ: {tuple(lse1.shape)} vs {tuple(lse2.shape)}")
    l1 = lse1.float()
    l2 = lse2.float()
    m = torch.maximum(l1, l2)
    m = m.masked_fill(~torch.isfinite(m), 0.0)  # both -inf: weights 0 and 0
    w1 = torch.exp(l1 - m)
    w2 = torch.exp(l2 - m)
    den = w1 + w2
    lse = m + torch.log(den)  # -inf where den == 0
    den = den.masked_fill(den == 0, 1.0)
    a1 = _lse_as_weights(w1 / den, layout)
    a2 = _lse_as_weights(w2 / den, layout)
    out = o1.float() * a1
    out.add_(o2.float() * a2)
    return out.to(dtype or o1.dtype), lse


def dense_attention_lse(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    key_bias: torch.Tensor | None = None,
    *,
    scale: float | None = None,
    block_elements: int = _DENSE_BLOCK_ELEMENTS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact attention with its log-sum-exp, layout (B, S, H, D), in float32.

    `key_bias`: None or a float tensor broadcastable to (B, H, Sk) added to the scaled scores
    (0 for a valid key, -inf for a masked one). Query rows are processed in blocks of at most
    `block_elements` scores. Returns out (B, Sq, H, D) float32 and lse (B, H, Sq) float32; a row
    whose keys are all masked gets out 0 and lse -inf.
    """
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError("dense_attention_lse: q, k, v must be (B, S, H, D)")
    b, sq, h, d = q.shape
    sk = k.shape[1]
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    kt = k.permute(0, 2, 3, 1).float()  # (B, H, D, Sk)
    vv = v.permute(0, 2, 1, 3).float()  # (B, H, Sk, Dv)
    bias = None
    if key_bias is not None:
        bias = key_bias.float()
        while bias.dim() < 3:
            bias = bias.unsqueeze(0)
        bias = bias.unsqueeze(2)  # (B|1, H|1, 1, Sk)
    out = torch.empty((b, sq, h, v.shape[-1]), dtype=torch.float32, device=q.device)
    lse = torch.empty((b, h, sq), dtype=torch.float32, device=q.device)
    rows = max(1, block_elements // max(1, b * h * max(sk, 1)))
    for start in range(0, sq, rows):
        end = min(sq, start + rows)
        qc = q[:, start:end].permute(0, 2, 1, 3).float()  # (B, H, c, D)
        s = torch.matmul(qc, kt).mul_(scale)  # (B, H, c, Sk)
        if bias is not None:
            s.add_(bias)
        m = s.amax(dim=-1, keepdim=True)
        m = m.masked_fill(~torch.isfinite(m), 0.0)
        p = torch.exp(s.sub_(m))
        den = p.sum(dim=-1, keepdim=True)
        o = torch.matmul(p, vv).div_(den.masked_fill(den == 0, 1.0))
        out[:, start:end] = o.permute(0, 2, 1, 3)
        lse[:, :, start:end] = (m + torch.log(den)).squeeze(-1)
    return out, lse


# ---------------------------------------------------------------------------------------------
# safetensors output (the CLI's format)
# ---------------------------------------------------------------------------------------------

_ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}


def save_safetensors(path: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors (F32, BF16 or F16) and string metadata as a .safetensors file.

    Uses `safetensors.torch.save_file` when importable, else writes the format directly:
    8-byte little-endian header length, JSON header (padded with spaces to 8 bytes), raw data.
    """
    cpu = {name: t.detach().contiguous().cpu() for name, t in tensors.items()}
    for name, t in cpu.items():
        if t.dtype not in _ST_DTYPES:
            raise ValueError(f"save_safetensors: tensor {name!r} has dtype {t.dtype}; use float32, bfloat16 or float16")
    meta = {str(k): str(v) for k, v in (metadata or {}).items()}
    try:
        from safetensors.torch import save_file  # type: ignore
    except Exception:  # noqa: BLE001 - any import problem means: write it by hand
        save_file = None
    if save_file is not None:
        save_file(cpu, path, metadata=meta or None)
    else:
        _write_safetensors(path, cpu, meta)


def _write_safetensors(path: str, cpu: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    header: dict[str, Any] = {}
    blobs = []
    offset = 0
    for name in sorted(cpu):
        t = cpu[name]
        raw = (t.view(torch.int16) if t.dtype == torch.bfloat16 else t).numpy().tobytes()
        header[name] = {"dtype": _ST_DTYPES[t.dtype], "shape": list(t.shape), "data_offsets": [offset, offset + len(raw)]}
        blobs.append(raw)
        offset += len(raw)
    if meta:
        header["__metadata__"] = meta
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)
    tmp = path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(struct.pack("<Q", len(text)))
        fh.write(text)
        for raw in blobs:
            fh.write(raw)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------
# The controller: one per transformer, holds the router, the step and the capture request
# ---------------------------------------------------------------------------------------------


@dataclass
class StepInfo:
    """Where the denoising loop is, as the forward pre-hook saw it."""

    step: int  # 0-based denoising step of the current video (-1 before the first forward)
    pass_index: int  # forward within the step (CFG: 0 = first, 1 = second)
    num_steps: int | None  # from num_inference_steps= or the scheduler
    timestep: float | None  # the last timestep seen


class _CaptureSpec:
    def __init__(self, layers: set, steps: set, passes: set | None, path: str, dtype):
        self.layers = layers
        self.steps = steps
        self.passes = passes
        self.path = path
        self.dtype = dtype
        self.files: list[str] = []


def _heads_qkv(attn, x, projections, norm_q, norm_k):
    """q, k, v of x (B, S, H, D) as HunyuanVideo's processor makes them: project, split into
    heads, then normalise q and k where the module has norms. Serves the video and text streams."""
    query, key, value = (projection(x).unflatten(2, (attn.heads, -1)) for projection in projections)
    if norm_q is not None:
        query = norm_q(query)
    if norm_k is not None:
        key = norm_k(key)
    return query, key, value


class _Controller:
    def __init__(self, transformer, kind: str, router, num_inference_steps, scheduler, num_layers: int,
                 fractional_warmup: bool = False):
        self.transformer_ref = weakref.ref(transformer)
        self.kind = kind
        self.router = router
        self.fractional_warmup = fractional_warmup
        self.num_inference_steps = num_inference_steps
        self.scheduler = scheduler
        self.num_layers = num_layers
        self.step = -1
        self.pass_index = 0
        self.last_t: float | None = None
        self.num_steps: int | None = None
        self.grid: tuple[int, int, int] | None = None
        self.capture: _CaptureSpec | None = None
        self.installed: list[tuple[torch.nn.Module, Any]] = []  # (attention module, original processor)
        self.hook_handle = None
        self.post_hook_handle = None
        self._mask_cache: dict[int, bool] = {}
        self._warned: set[str] = set()

    # -- steps ---------------------------------------------------------------------------------
    def _resolve_num_steps(self) -> int | None:
        if self.num_inference_steps is not None:
            return int(self.num_inference_steps)
        if self.scheduler is not None:
            ts = getattr(self.scheduler, "timesteps", None)
            if ts is not None and len(ts) > 0:
                return int(len(ts))
        return None

    def warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, RuntimeWarning, stacklevel=3)

    def new_video(self) -> None:
        self.step = 0
        self.pass_index = 0
        self.num_steps = self._resolve_num_steps()
        if self.router is not None:
            self.router.reset()

    def observe_timestep(self, t: float) -> None:
        """Advance the step counter for one transformer forward at timestep t."""
        if self.last_t is None or t > self.last_t:
            self.new_video()
        elif t < self.last_t:
            self.step += 1
            self.pass_index = 0
            if self.num_steps is None:
                self.num_steps = self._resolve_num_steps()
            if self.num_steps is not None and self.step >= self.num_steps:
                self.warn_once(
                    "steps",
                    f"svgear.diffusers: more denoising steps than num_steps={self.num_steps}; treating "
                    "the next timestep as a new video (pass the right num_inference_steps=)",
                )
                self.new_video()
        else:
            self.pass_index += 1
        self.last_t = t
        if self.router is not None:
            num_steps = self.num_steps
            if num_steps is None:
                if self.fractional_warmup:
                    raise RuntimeError(
                        "svgear.diffusers: fractional warm-up needs the number of steps: pass "
                        "num_inference_steps= (or a scheduler whose set_timesteps has run) to apply()"
                    )
                num_steps = self.step + 1
            self.router.set_step(self.step, num_steps)

    def pre_forward_hook(self, module, args, kwargs):
        t = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        hs = kwargs.get("hidden_states", args[0] if len(args) > 0 else None)
        if t is None:
            self.warn_once("timestep", "svgear.diffusers: transformer called without a timestep; step not advanced")
        else:
            if isinstance(t, torch.Tensor):
                tv = float(t.detach().float().max()) if t.numel() > 0 else 0.0
            else:
                tv = float(t)
            self.observe_timestep(tv)
        if isinstance(hs, torch.Tensor) and hs.dim() == 5:
            self.grid = _latent_grid(module, hs.shape)
        self._mask_cache.clear()
        return None

    def post_forward_hook(self, module, args, output):
        """After each forward of a video's last step: its asynchronous calls' errors surface
        before the pipeline uses the latents (earlier steps': at the next step's set_step)."""
        if self.router is not None and self.num_steps is not None and self.step >= self.num_steps - 1:
            self.router.synchronize()
        return None

    # -- per-call decisions ------------------------------------------------------------------
    def sparse(self, layer: int) -> bool:
        return self.router is not None and not self.router.is_dense(layer)

    def capture_wanted(self, layer: int) -> bool:
        c = self.capture
        if c is None or layer not in c.layers or self.step not in c.steps:
            return False
        return c.passes is None or self.pass_index in c.passes

    def save_capture(self, layer: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
        """q, k, v: (B, S, H, D) as attention sees them (video tokens only)."""
        c = self.capture
        assert c is not None
        dtype = c.dtype
        if dtype is None:
            dtype = q.dtype if q.dtype in (torch.float32, torch.bfloat16) else torch.float32
        tensors = {name: t.detach().permute(0, 2, 1, 3).to(dtype) for name, t in (("q", q), ("k", k), ("v", v))}
        frames, height, width = self.grid if self.grid is not None else (0, 0, 0)
        if frames * height * width != q.shape[1]:
            self.warn_once("grid", "svgear.diffusers.capture: token count does not match the latent grid")
        meta = {
            "frames": str(frames),
            "height": str(height),
            "width": str(width),
            "layer": str(layer),
            "step": str(self.step),
            "pass": str(self.pass_index),
            "model": self.kind,
        }
        if self.last_t is not None:
            meta["timestep"] = repr(self.last_t)
        name = f"layer{layer:02d}_step{self.step:03d}"
        if self.pass_index:
            name += f"_pass{self.pass_index}"
        path = os.path.join(c.path, name + ".safetensors")
        save_safetensors(path, tensors, meta)
        c.files.append(path)

    def video_keys_unmasked(self, mask: torch.Tensor, n_video: int) -> bool:
        """Whether the joint mask lets every query see every video key (cached per forward)."""
        key = id(mask)
        hit = self._mask_cache.get(key)
        if hit is None:
            part = mask[..., :n_video]
            hit = bool(part.all()) if part.dtype == torch.bool else bool((part == 0).all())
            self._mask_cache[key] = hit
        return hit


def _latent_grid(module, shape) -> tuple[int, int, int]:
    cfg = getattr(module, "config", None)
    _, _, f, h, w = shape
    if cfg is None:
        return (f, h, w)
    p = cfg.get("patch_size", None) if hasattr(cfg, "get") else getattr(cfg, "patch_size", None)
    if isinstance(p, (list, tuple)):
        pt, ph, pw = (int(x) for x in p)
    else:
        pt = cfg.get("patch_size_t", 1) if hasattr(cfg, "get") else getattr(cfg, "patch_size_t", 1)
        ph = pw = int(p or 1)
        pt = int(pt or 1)
    return (f // pt, h // ph, w // pw)


_CONTROLLERS: "weakref.WeakKeyDictionary[torch.nn.Module, _Controller]" = weakref.WeakKeyDictionary()


# ---------------------------------------------------------------------------------------------
# Processors
# ---------------------------------------------------------------------------------------------


def _dispatch():
    from diffusers.models.attention_dispatch import dispatch_attention_fn

    return dispatch_attention_fn


class _SvgearProcessorBase:
    """Holds the original processor; its attention backend and parallel config stay the original's."""

    def __init__(self, original, layer: int, controller: _Controller):
        self._svgear_original = original
        self._svgear_layer = layer
        self._svgear_controller = controller

    @property
    def _attention_backend(self):
        return getattr(self._svgear_original, "_attention_backend", None)

    @_attention_backend.setter
    def _attention_backend(self, value):
        self._svgear_original._attention_backend = value

    @property
    def _parallel_config(self):
        return getattr(self._svgear_original, "_parallel_config", None)

    @_parallel_config.setter
    def _parallel_config(self, value):
        self._svgear_original._parallel_config = value

    def _check_not_parallel(self):
        if self._parallel_config is not None:
            raise RuntimeError("svgear.diffusers does not support diffusers' context parallelism; remove() svgear first")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(layer={self._svgear_layer}, original={type(self._svgear_original).__name__})"


class SvgearWanAttnProcessor(_SvgearProcessorBase):
    """Replaces WanAttnProcessor on a block's self-attention (attn1)."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        ctl = self._svgear_controller
        layer = self._svgear_layer
        sparse = ctl.sparse(layer)
        grab = ctl.capture_wanted(layer)
        if (
            not (sparse or grab)
            or encoder_hidden_states is not None
            or attention_mask is not None
            or getattr(attn, "add_k_proj", None) is not None
        ):
            return self._svgear_original(attn, hidden_states, encoder_hidden_states, attention_mask, rotary_emb)
        self._check_not_parallel()

        # As WanAttnProcessor.__call__ for self-attention (no image context, no mask).
        if getattr(attn, "fused_projections", False):
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query = attn.to_q(hidden_states)
            key = attn.to_k(hidden_states)
            value = attn.to_v(hidden_states)

        query = attn.norm_q(query)
        key = attn.norm_k(key)

        query = query.unflatten(2, (attn.heads, -1))
        key = key.unflatten(2, (attn.heads, -1))
        value = value.unflatten(2, (attn.heads, -1))

        if rotary_emb is not None:

            def apply_rotary_emb(hidden_states, freqs_cos, freqs_sin):
                x1, x2 = hidden_states.unflatten(-1, (-1, 2)).unbind(-1)
                cos = freqs_cos[..., 0::2]
                sin = freqs_sin[..., 1::2]
                out = torch.empty_like(hidden_states)
                out[..., 0::2] = x1 * cos - x2 * sin
                out[..., 1::2] = x1 * sin + x2 * cos
                return out.type_as(hidden_states)

            query = apply_rotary_emb(query, *rotary_emb)
            key = apply_rotary_emb(key, *rotary_emb)

        if grab:
            ctl.save_capture(layer, query, key, value)

        if sparse:
            hidden_states = ctl.router(layer, query, key, value, layout="bshd")
        else:
            hidden_states = _dispatch()(
                query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False,
                backend=self._attention_backend, parallel_config=None,
            )
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.type_as(query)

        hidden_states = attn.to_out[0](hidden_states)
        hidden_states = attn.to_out[1](hidden_states)
        return hidden_states


def _text_masks(mask: torch.Tensor | None, n_video: int):
    """From the joint attention mask: (bias of the text keys for the video query rows, mask for
    the text query rows), or None when the mask has a form this path does not handle."""
    if mask is None:
        return None, None
    if mask.dim() == 2:  # (B, N): a key mask
        keys = mask[:, None, n_video:]  # (B, 1, St)
        rows = mask
    elif mask.dim() == 4 and mask.shape[2] == 1:  # (B, 1|H, 1, N)
        keys = mask[:, :, 0, n_video:]  # (B, 1|H, St)
        rows = mask
    else:
        return None
    if keys.dtype == torch.bool:
        bias = torch.zeros(keys.shape, dtype=torch.float32, device=keys.device).masked_fill_(~keys, float("-inf"))
    else:
        bias = keys.float()
    return bias, rows


class SvgearHunyuanVideoAttnProcessor(_SvgearProcessorBase):
    """Replaces HunyuanVideoAttnProcessor2_0 in the double- and single-stream blocks."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        ctl = self._svgear_controller
        layer = self._svgear_layer
        sparse = ctl.sparse(layer)
        grab = ctl.capture_wanted(layer)
        if not (sparse or grab) or encoder_hidden_states is None or encoder_hidden_states.shape[1] == 0:
            return self._svgear_original(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        n_video = hidden_states.shape[1]
        n_text = encoder_hidden_states.shape[1]
        if sparse:
            masks = _text_masks(attention_mask, n_video)
            if masks is None or (attention_mask is not None and not ctl.video_keys_unmasked(attention_mask, n_video)):
                ctl.warn_once(
                    "mask",
                    "svgear.diffusers: HunyuanVideo attention mask masks video keys or is per query; "
                    "this layer runs dense",
                )
                sparse = False
                if not grab:
                    return self._svgear_original(
                        attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb
                    )
        self._check_not_parallel()

        # As HunyuanVideoAttnProcessor2_0.__call__ up to the attention call.
        if attn.add_q_proj is None and encoder_hidden_states is not None:
            hidden_states = torch.cat([hidden_states, encoder_hidden_states], dim=1)

        # 1. QKV projections, 2. QK normalization
        query, key, value = _heads_qkv(attn, hidden_states, (attn.to_q, attn.to_k, attn.to_v), attn.norm_q, attn.norm_k)

        # 3. Rotational positional embeddings applied to latent stream
        if image_rotary_emb is not None:
            from diffusers.models.embeddings import apply_rotary_emb

            if attn.add_q_proj is None and encoder_hidden_states is not None:
                query = torch.cat(
                    [
                        apply_rotary_emb(query[:, : -encoder_hidden_states.shape[1]], image_rotary_emb, sequence_dim=1),
                        query[:, -encoder_hidden_states.shape[1] :],
                    ],
                    dim=1,
                )
                key = torch.cat(
                    [
                        apply_rotary_emb(key[:, : -encoder_hidden_states.shape[1]], image_rotary_emb, sequence_dim=1),
                        key[:, -encoder_hidden_states.shape[1] :],
                    ],
                    dim=1,
                )
            else:
                query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
                key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)

        # 4. Encoder condition QKV projection and normalization
        if attn.add_q_proj is not None and encoder_hidden_states is not None:
            encoder_query, encoder_key, encoder_value = _heads_qkv(
                attn, encoder_hidden_states, (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj),
                attn.norm_added_q, attn.norm_added_k)

            query = torch.cat([query, encoder_query], dim=1)
            key = torch.cat([key, encoder_key], dim=1)
            value = torch.cat([value, encoder_value], dim=1)

        if grab:
            ctl.save_capture(layer, query[:, :n_video], key[:, :n_video], value[:, :n_video])

        # 5. Attention
        dispatch = _dispatch()
        if not sparse:
            hidden_states = dispatch(
                query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
                backend=self._attention_backend, parallel_config=self._parallel_config,
            )
        else:
            text_bias, rows_mask = masks
            q_video = query[:, :n_video].contiguous()
            # Video rows: svgear over the video keys, exact over the (valid) text keys, merged.
            o_video, lse_video = ctl.router(
                layer, q_video, key[:, :n_video].contiguous(), value[:, :n_video].contiguous(),
                layout="bshd", return_lse=True,
            )
            o_text, lse_text = dense_attention_lse(q_video, key[:, n_video:], value[:, n_video:], text_bias)
            o_video, _ = merge_attention(o_video, lse_video, o_text, lse_text, layout="bshd", dtype=query.dtype)
            # Text rows: dense over all keys, as the original.
            o_rows = dispatch(
                query[:, n_video:], key, value, attn_mask=rows_mask, dropout_p=0.0, is_causal=False,
                backend=self._attention_backend, parallel_config=None,
            )
            hidden_states = torch.cat([o_video, o_rows.to(query.dtype)], dim=1)
        hidden_states = hidden_states.flatten(2, 3)
        hidden_states = hidden_states.to(query.dtype)

        # 6. Output projection
        hidden_states, encoder_hidden_states = (
            hidden_states[:, :-n_text],
            hidden_states[:, -n_text:],
        )
        if getattr(attn, "to_out", None) is not None:
            hidden_states = attn.to_out[0](hidden_states)
            hidden_states = attn.to_out[1](hidden_states)
        if getattr(attn, "to_add_out", None) is not None:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
        return hidden_states, encoder_hidden_states


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------


def _model_kind(transformer) -> str:
    for cls in type(transformer).__mro__:
        if cls.__name__ == "WanTransformer3DModel":
            return "wan"
        if cls.__name__ == "HunyuanVideoTransformer3DModel":
            return "hunyuan_video"
    hint = ""
    if not isinstance(transformer, torch.nn.Module) and hasattr(transformer, "transformer"):
        hint = " (got a pipeline: pass pipe.transformer)"
    raise ValueError(
        f"svgear.diffusers supports {' and '.join(SUPPORTED_MODELS)}; got {type(transformer).__name__}{hint}"
    )


def _unwrap(transformer):
    return getattr(transformer, "_orig_mod", transformer)  # a torch.compile'd module


def _self_attention_modules(transformer, kind: str) -> list[tuple[int, torch.nn.Module, tuple[str, ...]]]:
    if kind == "wan":
        return [(i, block.attn1, _WAN_PROCESSORS) for i, block in enumerate(transformer.blocks)]
    double = list(transformer.transformer_blocks)
    single = list(transformer.single_transformer_blocks)
    mods = [(i, block.attn, _HUNYUAN_PROCESSORS) for i, block in enumerate(double)]
    mods += [(len(double) + j, block.attn, _HUNYUAN_PROCESSORS) for j, block in enumerate(single)]
    return mods


def _install(transformer, router, num_inference_steps, scheduler, fractional_warmup=False) -> _Controller:
    transformer = _unwrap(transformer)
    kind = _model_kind(transformer)
    if transformer in _CONTROLLERS:
        remove(transformer)
    mods = _self_attention_modules(transformer, kind)
    for layer, module, allowed in mods:
        proc = module.processor
        if type(proc).__name__ not in allowed:
            raise ValueError(
                f"svgear.diffusers: layer {layer} has attention processor {type(proc).__name__}; svgear "
                f"replaces only diffusers' {' / '.join(allowed)} (set it back with set_attn_processor first)"
            )
        if getattr(proc, "_parallel_config", None) is not None:
            raise ValueError("svgear.diffusers does not support diffusers' context parallelism")
    ctl = _Controller(transformer, kind, router, num_inference_steps, scheduler, len(mods), fractional_warmup)
    processor_cls = SvgearWanAttnProcessor if kind == "wan" else SvgearHunyuanVideoAttnProcessor
    for layer, module, _ in mods:
        original = module.processor
        module.set_processor(processor_cls(original, layer, ctl))
        ctl.installed.append((module, original))
    ctl.hook_handle = transformer.register_forward_pre_hook(ctl.pre_forward_hook, with_kwargs=True)
    ctl.post_hook_handle = transformer.register_forward_hook(ctl.post_forward_hook)
    _CONTROLLERS[transformer] = ctl
    return ctl


def _num_layers(transformer) -> int:
    transformer = _unwrap(transformer)
    kind = _model_kind(transformer)
    if kind == "wan":
        return len(transformer.blocks)
    return len(transformer.transformer_blocks) + len(transformer.single_transformer_blocks)


def apply(
    transformer,
    method: str = "ear",
    *,
    num_inference_steps: int | None = None,
    scheduler=None,
    warmup_steps: float = 0.2,
    warmup_layers: float = 0,
    **options,
):
    """Route the self-attention of a diffusers video transformer through svgear.

    transformer: a `WanTransformer3DModel` or `HunyuanVideoTransformer3DModel` (e.g.
        `pipe.transformer`). Other classes raise ValueError.
    method: "ear", "svg2" or "dense" (the original processors throughout; for baselines).
    num_inference_steps / scheduler: the number of denoising steps, needed for a fractional
        `warmup_steps`; with `scheduler`, `len(scheduler.timesteps)` is read when a video starts.
    warmup_steps: dense warm-up; a fraction of the steps when < 1, else a step count (default 0.2).
    warmup_layers: the first layers kept dense; a fraction of the layers when < 1, else a count.
        Layers are the transformer blocks in order (HunyuanVideo: double-stream, then single-stream).
    options: passed to `svgear.AttentionRouter` / `svgear.torch.attention` (density,
        clusters_q, clusters_k, kmeans_iters, warm_iters, query_tail_limit, probe_queries,
        probe_mean, probe_value_dims, top_p, min_key_fraction, budget_scope, policy, compensation,
        seed, init) and synchronize (the router's; default False: asynchronous CUDA calls, errors
        raised by the step hooks).

    Applying again replaces the previous configuration. Returns the `svgear.AttentionRouter`
    (one `LayerState` per block).
    """
    from . import AttentionRouter  # the package core; imported here so merge_attention needs no build

    transformer = _unwrap(transformer)
    _model_kind(transformer)
    if float(warmup_steps) < 0 or float(warmup_layers) < 0:
        raise ValueError("svgear.diffusers.apply: warmup_steps and warmup_layers must be >= 0")
    if num_inference_steps is not None and int(num_inference_steps) < 1:
        raise ValueError("svgear.diffusers.apply: num_inference_steps must be >= 1")
    fractional = method != "dense" and 0 < float(warmup_steps) < 1
    if fractional and num_inference_steps is None and scheduler is None:
        raise ValueError(
            f"svgear.diffusers.apply: warmup_steps={warmup_steps} is a fraction of the steps: pass "
            "num_inference_steps= (or scheduler=pipe.scheduler), or give warmup_steps as a step count"
        )
    router = AttentionRouter(
        method=method,
        num_layers=_num_layers(transformer),
        warmup_steps=warmup_steps,
        warmup_layers=warmup_layers,
        **options,
    )
    _install(transformer, router, num_inference_steps, scheduler, fractional)
    return router


def remove(transformer) -> None:
    """Restore the original processor objects and remove the step hook (no-op if not applied)."""
    transformer = _unwrap(transformer)
    ctl = _CONTROLLERS.pop(transformer, None)
    if ctl is None:
        return
    for module, original in ctl.installed:
        module.set_processor(original)
    ctl.installed.clear()
    for handle in (ctl.hook_handle, ctl.post_hook_handle):
        if handle is not None:
            handle.remove()
    ctl.hook_handle = ctl.post_hook_handle = None
    ctl.capture = None


def is_applied(transformer) -> bool:
    return _unwrap(transformer) in _CONTROLLERS


def reset(transformer) -> None:
    """Start a new video at the next forward: step 0, k-means state dropped."""
    ctl = _CONTROLLERS.get(_unwrap(transformer))
    if ctl is None:
        raise ValueError("svgear.diffusers.reset: svgear is not applied to this transformer")
    ctl.last_t = None
    ctl.step = -1
    ctl.pass_index = 0
    if ctl.router is not None:
        ctl.router.reset()


def synchronize(transformer) -> None:
    """Wait for svgear's asynchronous work in this transformer and raise its first deferred error
    (ValueError for NaN/Inf attention inputs, naming the layer). The step hook already calls it
    at each new step and after the last step's forwards; call it after a loop that ends early."""
    ctl = _CONTROLLERS.get(_unwrap(transformer))
    if ctl is None:
        raise ValueError("svgear.diffusers.synchronize: svgear is not applied to this transformer")
    if ctl.router is not None:
        ctl.router.synchronize()


def step_info(transformer) -> StepInfo:
    ctl = _CONTROLLERS.get(_unwrap(transformer))
    if ctl is None:
        raise ValueError("svgear.diffusers.step_info: svgear is not applied to this transformer")
    return StepInfo(ctl.step, ctl.pass_index, ctl.num_steps, ctl.last_t)


_DTYPE_NAMES = {"f32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16}


class Capture:
    """Handle returned by `capture`: a context manager; `close()` ends it; `files` lists the
    files written so far."""

    def __init__(self, transformer, spec: _CaptureSpec, installed_here: bool):
        self._transformer = transformer
        self._spec = spec
        self._installed_here = installed_here
        self._closed = False

    @property
    def files(self) -> list[str]:
        return list(self._spec.files)

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        ctl = _CONTROLLERS.get(self._transformer)
        if ctl is None:
            return
        if self._installed_here:
            remove(self._transformer)
        elif ctl.capture is self._spec:
            ctl.capture = None

    def __enter__(self) -> "Capture":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def capture(
    transformer,
    layers: Iterable[int],
    steps: Iterable[int],
    path: str,
    *,
    passes: Iterable[int] | None = (0,),
    dtype=None,
) -> Capture:
    """Write the Q/K/V that attention sees at these layers and steps as safetensors files.

    Files `path/layer{LL}_step{SSS}.safetensors` (plus `_pass{n}` for later forwards of a step
    when `passes` asks for them; default: the first forward of each step only, i.e. the
    conditional pass of CFG): tensors "q", "k", "v" of shape [B, H, S, D] after QK-norm and
    RoPE (HunyuanVideo: the video tokens only), dtype float32 or bfloat16 (default: the model's
    when bf16/f32, else f32); metadata "frames", "height", "width" (the latent token grid after
    patchify) and "layer", "step", "pass", "model", "timestep". `layers` index the transformer
    blocks as in `apply`; `steps` are 0-based denoising steps as counted by the step hook.

    Works on a transformer with svgear applied (captures while svgear runs) or without (the
    model runs densely, as the original, while capturing). Use as a context manager, or call
    `.close()` when done.
    """
    transformer = _unwrap(transformer)
    _model_kind(transformer)
    n = _num_layers(transformer)
    layer_set = {int(x) for x in layers}
    bad = sorted(x for x in layer_set if not 0 <= x < n)
    if bad:
        raise ValueError(f"svgear.diffusers.capture: layers {bad} out of range [0, {n})")
    step_set = {int(x) for x in steps}
    if any(s < 0 for s in step_set):
        raise ValueError("svgear.diffusers.capture: steps must be >= 0")
    if isinstance(dtype, str):
        if dtype.lower() not in _DTYPE_NAMES:
            raise ValueError(f"svgear.diffusers.capture: dtype {dtype!r}; use float32 or bfloat16")
        dtype = _DTYPE_NAMES[dtype.lower()]
    if dtype not in (None, torch.float32, torch.bfloat16):
        raise ValueError(f"svgear.diffusers.capture: dtype {dtype}; use float32 or bfloat16")
    os.makedirs(path, exist_ok=True)
    spec = _CaptureSpec(layer_set, step_set, None if passes is None else {int(p) for p in passes}, path, dtype)
    ctl = _CONTROLLERS.get(transformer)
    installed_here = ctl is None
    if ctl is None:
        ctl = _install(transformer, None, None, None)
    elif ctl.capture is not None:
        raise ValueError("svgear.diffusers.capture: a capture is already active on this transformer")
    ctl.capture = spec
    return Capture(transformer, spec, installed_here)
