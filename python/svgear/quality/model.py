"""A small video DiT with Wan2.1's structure, for end-to-end quality measurements.

Patchified pixels (patch 1x4x4 by default), 3D RoPE with Wan's split of head_dim over
(t, h, w), RMS-normed q/k, self-attention + GELU MLP blocks with adaLN timestep conditioning the
way Wan does it: one shared time projection to 6*dim, plus a learned per-block modulation table
added to it. Optionally class-conditional (num_labels > 0): a multi-hot label vector (which
shapes and colours the video shows, data.scene_labels) is embedded linearly and added to the
time embedding; all-zero labels are the unconditional input of classifier-free guidance.
Optionally conditioned on clean leading frames (num_given_frames > 0: 1 is image-to-video,
more is video continuation), given the way Wan2.1-I2V is given its image: extra input channels
(a mask marking the given frames, and a condition video holding them and zeros after them)
concatenated to the noisy video before the patch embedding, so the token count and the
attention are unchanged. Attention is pluggable: every self-attention calls
`attention_fn(layer_index, q, k, v)` with q, k, v of shape (B, S, H, D) ("bshd", RoPE already
applied, all in the compute dtype) and uses its (B, S, H, D) result.
"""
import dataclasses
import glob
import json
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import st_io

SHARD_LIMIT = 15 * 2 ** 20  # bytes per checkpoint shard (files come back from the GPU at <= 16 MiB)


@dataclasses.dataclass
class DiTConfig:
    in_channels: int = 3
    patch: tuple = (1, 4, 4)
    dim: int = 512
    num_heads: int = 8
    num_layers: int = 8
    mlp_ratio: float = 2.0
    freq_dim: int = 256
    rope_theta: float = 10000.0
    eps: float = 1e-6
    video: tuple = (16, 96, 96)  # frames, height, width (pixels) the model is trained and sampled at
    num_labels: int = 0  # multi-hot class labels (0: unconditional; older checkpoints have none)
    num_given_frames: int = 0  # clean leading frames given (Wan2.1-I2V's channel concatenation; 1: image-to-video)

    def __post_init__(self):
        self.patch = tuple(int(p) for p in self.patch)
        self.video = tuple(int(v) for v in self.video)
        if self.dim % self.num_heads:
            raise ValueError("dim %d is not a multiple of num_heads %d" % (self.dim, self.num_heads))
        if self.head_dim % 2:
            raise ValueError("head_dim must be even for RoPE")
        if not 0 <= self.num_given_frames < self.video[0]:
            raise ValueError("num_given_frames %d: must be 0 (none) up to %d (one frame fewer than the video)" % (
                self.num_given_frames, self.video[0] - 1))

    @property
    def head_dim(self):
        return self.dim // self.num_heads

    def tokens(self, video=None):
        """Token grid (frames, height, width) of a video of `video` pixels (default: config's)."""
        f, h, w = video or self.video
        pt, ph, pw = self.patch
        if f % pt or h % ph or w % pw:
            raise ValueError("video %dx%dx%d is not divisible by patch %dx%dx%d" % (f, h, w, pt, ph, pw))
        return f // pt, h // ph, w // pw

    @property
    def input_channels(self):
        """Channels the patch embedding reads: the noisy video, plus, when frames are given, a
        mask channel and the condition video."""
        return 2 * self.in_channels + 1 if self.num_given_frames else self.in_channels

    @property
    def noisy_patch_features(self):
        """Patch-embedding inputs that come from the noisy video (the first ones, channel-major)."""
        return self.in_channels * math.prod(self.patch)

    def to_json(self):
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text):
        return cls(**json.loads(text))


# --------------------------------------------------------------------------------------------
# 3D RoPE


def rope_axis_dims(head_dim):
    """Wan's split of head_dim over (t, h, w): d - 4*(d//6), 2*(d//6), 2*(d//6)."""
    d = head_dim
    return d - 4 * (d // 6), 2 * (d // 6), 2 * (d // 6)


def rope_angles(grid, head_dim, theta=10000.0, device="cpu", offset=(0, 0, 0)):
    """Rotation angles (S, head_dim/2) for tokens of a (frames, height, width) grid, row-major."""
    angles = []
    for axis, (n, d) in enumerate(zip(grid, rope_axis_dims(head_dim))):
        freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64, device=device) / d)
        pos = torch.arange(n, dtype=torch.float64, device=device) + offset[axis]
        angles.append(torch.outer(pos, freqs))
    f, h, w = grid
    at, ah, aw = angles
    full = torch.cat([
        at[:, None, None, :].expand(f, h, w, -1),
        ah[None, :, None, :].expand(f, h, w, -1),
        aw[None, None, :, :].expand(f, h, w, -1),
    ], dim=-1)
    return full.reshape(f * h * w, -1)


def rope_freqs(angles):
    """Unit complex rotations (S, head_dim/2) from rope_angles."""
    return torch.polar(torch.ones_like(angles), angles).to(torch.complex64)


def apply_rope(x, freqs):
    """Rotates adjacent pairs (x[2i], x[2i+1]) of (B, S, H, D) by complex freqs (S, D/2), as Wan
    does (view_as_complex), in float32; returns x's dtype."""
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs[None, :, None, :]).flatten(-2).to(x.dtype)


# --------------------------------------------------------------------------------------------
# Attention


def _manual_attention(q, k, v, chunk=1024):
    """softmax(q k^T / sqrt(D)) v in float32 over (B, H, S, D), in query chunks."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    out = torch.empty_like(q)
    kf, vf = k.float(), v.float()
    for i in range(0, q.shape[2], chunk):
        scores = torch.matmul(q[:, :, i:i + chunk].float(), kf.transpose(-1, -2)) * scale
        out[:, :, i:i + chunk] = torch.matmul(scores.softmax(dim=-1), vf).to(q.dtype)
    return out


def sdpa(q, k, v):
    """Dense attention on (B, H, S, D): F.scaled_dot_product_attention when this torch has it."""
    if hasattr(F, "scaled_dot_product_attention"):
        return F.scaled_dot_product_attention(q, k, v)
    return _manual_attention(q, k, v)


def dense_attention(layer_index, q, k, v):
    """The default attention_fn: dense attention, (B, S, H, D) in and out."""
    return sdpa(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)).transpose(1, 2)


# --------------------------------------------------------------------------------------------
# Modules


class RMSNorm(nn.Module):
    def __init__(self, dim, eps):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        if hasattr(F, "rms_norm"):  # fused where this torch has it (>= 2.4)
            return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight).to(x.dtype)


def sinusoidal_embedding(t, dim):
    """Wan's sinusoidal_embedding_1d: [cos, sin] of t * 10000^(-i/half)."""
    half = dim // 2
    freqs = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64, device=t.device) / half)
    args = t.double()[:, None] * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=1).float()


class SelfAttention(nn.Module):
    def __init__(self, cfg, layer_index):
        super().__init__()
        self.layer_index = layer_index
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.k = nn.Linear(cfg.dim, cfg.dim)
        self.v = nn.Linear(cfg.dim, cfg.dim)
        self.o = nn.Linear(cfg.dim, cfg.dim)
        self.norm_q = RMSNorm(cfg.dim, cfg.eps)
        self.norm_k = RMSNorm(cfg.dim, cfg.eps)

    def forward(self, x, freqs, attention_fn):
        b, s, _ = x.shape
        shape = (b, s, self.num_heads, self.head_dim)
        v = self.v(x).view(shape)
        q = apply_rope(self.norm_q(self.q(x)).view(shape), freqs).to(v.dtype)
        k = apply_rope(self.norm_k(self.k(x)).view(shape), freqs).to(v.dtype)
        out = attention_fn(self.layer_index, q, k, v)
        if tuple(out.shape) != shape:
            raise ValueError("attention_fn returned shape %s, expected %s (B, S, H, D)" % (tuple(out.shape), shape))
        return self.o(out.reshape(b, s, -1).to(v.dtype))


class Block(nn.Module):
    def __init__(self, cfg, layer_index):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.attn = SelfAttention(cfg, layer_index)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.ffn = nn.Sequential(nn.Linear(cfg.dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, cfg.dim))
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x, e0, freqs, attention_fn):
        e = (self.modulation.float() + e0).chunk(6, dim=1)  # each (B, 1, dim)
        y = self.attn(torch.addcmul(e[0], self.norm1(x).float(), 1 + e[1]), freqs, attention_fn)
        x = torch.addcmul(x, y.float(), e[2])
        y = self.ffn(torch.addcmul(e[3], self.norm2(x).float(), 1 + e[4]))
        return torch.addcmul(x, y.float(), e[5])


class Head(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.norm = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=False)
        self.head = nn.Linear(cfg.dim, cfg.in_channels * cfg.patch[0] * cfg.patch[1] * cfg.patch[2])
        self.modulation = nn.Parameter(torch.randn(1, 2, cfg.dim) / cfg.dim ** 0.5)

    def forward(self, x, e):
        shift, scale = (self.modulation.float() + e[:, None]).chunk(2, dim=1)
        return self.head(torch.addcmul(shift, self.norm(x).float(), 1 + scale))


class VideoDiT(nn.Module):
    """forward(x (B, C, F, H, W) in pixel space, t (B,) in [0, 1]) -> velocity, same shape."""

    def __init__(self, cfg=None, attention_fn=None):
        super().__init__()
        self.cfg = cfg = cfg or DiTConfig()
        self.attention_fn = attention_fn or dense_attention
        patch_dim = cfg.input_channels * math.prod(cfg.patch)
        self.patch_embedding = nn.Linear(patch_dim, cfg.dim)
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(cfg.dim, 6 * cfg.dim))
        self.label_embedding = nn.Linear(cfg.num_labels, cfg.dim, bias=False) if cfg.num_labels else None
        self.blocks = nn.ModuleList([Block(cfg, i) for i in range(cfg.num_layers)])
        self.head = Head(cfg)
        self._rope_cache = {}
        self.reset_parameters()

    def reset_parameters(self):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
        for module in self.time_embedding:
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=0.02)
        # adaLN-Zero-like start: the shared projection starts at zero (modulation = the tables),
        # the output head at zero (velocity 0).
        nn.init.zeros_(self.time_projection[1].weight)
        nn.init.zeros_(self.head.head.weight)
        # zero: labels start with no effect, so a conditional model resumed from an
        # unconditional checkpoint starts as that checkpoint
        if self.label_embedding is not None:
            nn.init.zeros_(self.label_embedding.weight)
        # the same for the given frames' channels: a model made to take them from an
        # unconditional checkpoint (with_given_frame_inputs) starts as that checkpoint
        if self.cfg.num_given_frames:
            nn.init.zeros_(self.patch_embedding.weight[:, self.cfg.noisy_patch_features:])

    def num_params(self):
        return sum(p.numel() for p in self.parameters())

    def rope(self, grid, device):
        key = (tuple(grid), str(device))
        if key not in self._rope_cache:
            angles = rope_angles(grid, self.cfg.head_dim, self.cfg.rope_theta, device=device)
            self._rope_cache[key] = rope_freqs(angles)
        return self._rope_cache[key]

    def patchify(self, x):
        b, c, f, h, w = x.shape
        pt, ph, pw = self.cfg.patch
        grid = (f // pt, h // ph, w // pw)
        x = x.reshape(b, c, grid[0], pt, grid[1], ph, grid[2], pw)
        x = x.permute(0, 2, 4, 6, 1, 3, 5, 7).reshape(b, grid[0] * grid[1] * grid[2], c * pt * ph * pw)
        return x, grid

    def unpatchify(self, x, grid):
        b = x.shape[0]
        c = self.cfg.in_channels
        pt, ph, pw = self.cfg.patch
        x = x.reshape(b, grid[0], grid[1], grid[2], c, pt, ph, pw)
        return x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(b, c, grid[0] * pt, grid[1] * ph, grid[2] * pw)

    def with_given_frames(self, x, given_frames):
        """x (B, C, F, H, W) with Wan2.1-I2V's condition channels appended: a mask (1 on the given
        frames) and the condition video (the clean given frames, zeros after them)."""
        b, c, f, h, w = x.shape
        n = self.cfg.num_given_frames
        if given_frames is None:
            raise ValueError("this model continues given frames: pass given_frames, the clean first %d frame(s) "
                             "(B, %d, %d, H, W) (sampling.sample_condition gives a training scene's)" % (n, c, n))
        if tuple(given_frames.shape) != (b, c, n, h, w):
            raise ValueError("given_frames of shape %s, expected (%d, %d, %d, %d, %d) (B, C, num_given_frames, H, W)" % (
                tuple(given_frames.shape), b, c, n, h, w))
        if f <= n:
            raise ValueError("a video of %d frames leaves none to generate after %d given" % (f, n))
        mask = torch.zeros(b, 1, f, h, w, dtype=x.dtype, device=x.device)
        mask[:, :, :n] = 1
        condition = torch.zeros_like(x)
        condition[:, :, :n] = given_frames.to(x.device, x.dtype)
        return torch.cat([x, mask, condition], dim=1)

    def forward(self, x, t, attention_fn=None, labels=None, given_frames=None):
        """labels: (B, num_labels) multi-hot, or None (all zero: unconditional); given_frames:
        (B, C, num_given_frames, H, W), the clean leading frames a model with num_given_frames
        continues (required there only)."""
        attention_fn = attention_fn or self.attention_fn
        cfg = self.cfg
        _, _, f, h, w = x.shape
        cfg.tokens((f, h, w))  # validates divisibility
        if cfg.num_given_frames:
            x = self.with_given_frames(x, given_frames)
        elif given_frames is not None:
            raise ValueError("given_frames passed to a model that takes none (num_given_frames 0)")
        tokens, grid = self.patchify(x)
        freqs = self.rope(grid, x.device)
        x = self.patch_embedding(tokens).float()
        t = t.reshape(-1).to(x.device).float().expand(x.shape[0])
        e = self.time_embedding(sinusoidal_embedding(t * 1000.0, cfg.freq_dim)).float()
        if labels is not None:
            if not cfg.num_labels:
                raise ValueError("labels given to an unconditional model (num_labels 0)")
            if tuple(labels.shape) != (x.shape[0], cfg.num_labels):
                raise ValueError("labels of shape %s, expected (%d, %d)" % (tuple(labels.shape), x.shape[0], cfg.num_labels))
            e = e + self.label_embedding(labels.to(x.device, self.label_embedding.weight.dtype)).float()
        e0 = self.time_projection(e).float().view(-1, 6, cfg.dim)
        for block in self.blocks:
            x = block(x, e0, freqs, attention_fn)
        return self.unpatchify(self.head(x, e).float(), grid)


def with_given_frame_inputs(state, cfg):
    """An unconditional checkpoint's state dict made to take given frames for `cfg`: the patch
    embedding gains zero weights for the condition channels, so the model computes what the
    checkpoint did until training teaches it to use the given frames."""
    weight = state["patch_embedding.weight"]
    noisy = cfg.noisy_patch_features
    if weight.shape[1] != noisy:
        raise ValueError("patch_embedding.weight has %d inputs, an unconditional model of this config %d" % (weight.shape[1], noisy))
    extra = weight.new_zeros(weight.shape[0], cfg.input_channels * math.prod(cfg.patch) - noisy)
    return dict(state, **{"patch_embedding.weight": torch.cat([weight, extra], dim=1)})


# --------------------------------------------------------------------------------------------
# Checkpoints: sharded safetensors (bf16), the config in every shard's metadata


def shard_paths(directory):
    return sorted(glob.glob(os.path.join(directory, "model-*-of-*.safetensors")))


def save_checkpoint(model, directory, metadata=None, dtype=torch.bfloat16, shard_limit=SHARD_LIMIT, state=None):
    """Writes model-0000i-of-0000n.safetensors shards of <= shard_limit bytes; atomic per shard.

    `state` (name -> tensor) replaces the model's own state dict (e.g. EMA weights).
    Returns the list of paths written.
    """
    os.makedirs(directory, exist_ok=True)
    state = state if state is not None else model.state_dict()
    tensors = {name: value.detach().to("cpu", dtype) for name, value in state.items()}
    reserve = 64 * 1024  # header and metadata
    shards, current, size = [], {}, reserve
    for name, value in tensors.items():
        nbytes = value.numel() * value.element_size()
        if nbytes + reserve > shard_limit:
            raise ValueError("tensor %s (%d bytes) does not fit a %d-byte shard" % (name, nbytes, shard_limit))
        if current and size + nbytes > shard_limit:
            shards.append(current)
            current, size = {}, reserve
        current[name] = value
        size += nbytes
    if current:
        shards.append(current)
    meta = {"format": "pt", "config": model.cfg.to_json()}
    meta.update({k: (v if isinstance(v, str) else json.dumps(v)) for k, v in (metadata or {}).items()})
    written = []
    for i, shard in enumerate(shards):
        path = os.path.join(directory, "model-%05d-of-%05d.safetensors" % (i + 1, len(shards)))
        tmp = path + ".tmp"
        st_io.save_file(shard, tmp, metadata=dict(meta, shard="%d/%d" % (i + 1, len(shards))))
        os.replace(tmp, path)
        written.append(path)
    for stale in shard_paths(directory):
        if stale not in written:
            os.remove(stale)
    return written


def read_shards(path):
    """(float32 state dict, metadata) of a directory of shards or of one .safetensors file, with
    the shard count and the presence of a model config checked."""
    paths = [path] if os.path.isfile(path) else shard_paths(path) if os.path.isdir(path) else []
    if not paths:
        raise FileNotFoundError(
            "%s: no model-*-of-*.safetensors shards there (train a checkpoint with scripts/quality-train, "
            "see docs/QUALITY.md)" % path)
    state, metadata = {}, {}
    for p in paths:
        tensors, meta = st_io.load_file(p)
        state.update(tensors)
        metadata = metadata or meta
    if "config" not in metadata:
        raise ValueError("%s: the shards' metadata has no 'config'" % paths[0])
    expected = int(metadata.get("shard", "1/1").split("/")[1])
    if len(paths) != expected:
        raise ValueError("%s: found %d shards, the metadata says %d" % (path, len(paths), expected))
    return {k: v.float() for k, v in state.items()}, metadata


def load_checkpoint(path, device="cpu"):
    """Loads a directory of shards (or one .safetensors file). Returns (model, metadata)."""
    state, metadata = read_shards(path)
    model = VideoDiT(DiTConfig.from_json(metadata["config"]))
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise ValueError("%s: checkpoint does not match the model: missing %s, unexpected %s" % (path, missing, unexpected))
    return model.to(device).eval(), metadata
