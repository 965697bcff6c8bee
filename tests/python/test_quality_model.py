"""svgear.quality.model: the small video DiT, its 3D RoPE, pluggable attention, checkpoints."""
import math
import os
import sys

_PY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "python")
if os.path.abspath(_PY) not in map(os.path.abspath, sys.path):
    sys.path.insert(0, _PY)

import pytest  # noqa: E402
import torch  # noqa: E402

from svgear.quality import st_io  # noqa: E402
from svgear.quality.model import (DiTConfig, VideoDiT, _manual_attention, apply_rope, dense_attention, rope_freqs,  # noqa: E402
                                  load_checkpoint, rope_angles, rope_axis_dims, save_checkpoint, shard_paths)

TINY = dict(dim=32, num_heads=2, num_layers=2, mlp_ratio=2.0, video=(4, 16, 16))


def tiny_model(seed=0):
    torch.manual_seed(seed)
    model = VideoDiT(DiTConfig(**TINY))
    with torch.no_grad():  # leave the zero-initialised head so the output depends on the blocks
        model.head.head.weight.normal_(0, 0.2)
        model.time_projection[1].weight.normal_(0, 0.05)
    return model.eval()


def test_forward_shapes_and_pluggable_attention():
    model = tiny_model()
    x = torch.randn(2, 3, 4, 16, 16)
    t = torch.tensor([0.3, 0.9])
    calls = []

    def attention_fn(layer, q, k, v):
        calls.append((layer, tuple(q.shape), tuple(k.shape), tuple(v.shape), q.dtype))
        return dense_attention(layer, q, k, v)

    with torch.no_grad():
        out = model(x, t, attention_fn=attention_fn)
        ref = model(x, t)
        zero = model(x, t, attention_fn=lambda layer, q, k, v: torch.zeros_like(q))
    assert out.shape == x.shape
    s = 4 * 4 * 4
    assert calls == [(i, (2, s, 2, 16), (2, s, 2, 16), (2, s, 2, 16), torch.float32) for i in range(2)]
    assert torch.allclose(out, ref)
    assert not torch.allclose(out, zero, atol=1e-4), "the attention output is used"


def test_dense_attention_matches_manual_softmax():
    q, k, v = (torch.randn(1, 3, 50, 16) for _ in range(3))
    ref = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1) @ v
    assert torch.allclose(_manual_attention(q, k, v, chunk=16), ref, atol=1e-5)
    bshd = dense_attention(0, q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    assert torch.allclose(bshd.transpose(1, 2), ref, atol=1e-5)


def test_rope_split_follows_wan():
    assert rope_axis_dims(64) == (24, 20, 20)
    assert rope_axis_dims(128) == (44, 42, 42)
    assert sum(rope_axis_dims(16)) == 16


def _rotate(x, pos, head_dim):
    angles = rope_angles((1, 1, 1), head_dim, offset=pos)
    return apply_rope(x.view(1, 1, 1, head_dim), rope_freqs(angles)).view(head_dim)


def test_rope_scores_depend_only_on_relative_position():
    torch.manual_seed(0)
    d = 64
    q, k = torch.randn(d, dtype=torch.float64).float(), torch.randn(d).float()
    p1, p2 = (3, 5, 7), (1, 9, 2)
    base = float(_rotate(q, p1, d) @ _rotate(k, p2, d))
    for delta in [(4, -2, 5), (10, 11, 0), (0, 0, 13)]:
        s1 = tuple(a + b for a, b in zip(p1, delta))
        s2 = tuple(a + b for a, b in zip(p2, delta))
        assert math.isclose(float(_rotate(q, s1, d) @ _rotate(k, s2, d)), base, rel_tol=1e-4, abs_tol=1e-4)
    # a different displacement along any axis changes the score; norms are kept
    for axis in range(3):
        moved = list(p2)
        moved[axis] += 3
        assert abs(float(_rotate(q, p1, d) @ _rotate(k, tuple(moved), d)) - base) > 1e-3
    assert math.isclose(float(_rotate(q, p1, d).norm()), float(q.norm()), rel_tol=1e-5)


def test_rope_grid_is_row_major_over_t_h_w():
    grid = (2, 3, 4)
    angles = rope_angles(grid, 64)
    assert angles.shape == (24, 32)
    # token (t=1, h=2, w=3) has the angles of a single token at that offset
    single = rope_angles((1, 1, 1), 64, offset=(1, 2, 3))
    assert torch.allclose(angles[1 * 12 + 2 * 4 + 3], single[0])


def test_default_config_fits_the_budget():
    cfg = DiTConfig()
    assert (cfg.num_layers, cfg.num_heads, cfg.head_dim, cfg.dim) == (8, 8, 64, 512)
    grid = cfg.tokens()
    assert grid == (16, 24, 24) and grid[0] * grid[1] * grid[2] >= 8192
    n = VideoDiT(cfg).num_params()
    assert n * 2 <= 40e6, "bf16 checkpoint must stay <= 40 MB, have %d params" % n


def test_checkpoint_round_trip_in_shards(tmp_path):
    model = tiny_model()
    paths = save_checkpoint(model, str(tmp_path), metadata={"train": {"step": 3, "shift": 2.0}}, shard_limit=80 * 1024)
    assert len(paths) > 1 and paths == shard_paths(str(tmp_path))
    assert all(os.path.getsize(p) <= 80 * 1024 for p in paths)
    loaded, meta = load_checkpoint(str(tmp_path))
    assert loaded.cfg == model.cfg
    assert meta["train"] == '{"step": 3, "shift": 2.0}'
    for (name, a), (_, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a.to(torch.bfloat16).float(), b), name
    # fewer shards on a re-save: stale ones are removed
    save_checkpoint(model, str(tmp_path))
    assert len(shard_paths(str(tmp_path))) == 1


def test_safetensors_writer_and_reader(tmp_path):
    tensors = {"a": torch.randn(2, 3), "b": torch.randn(4, 5).to(torch.bfloat16), "c": torch.arange(6).view(2, 3)}
    path = str(tmp_path / "x.safetensors")
    st_io.save_file(tensors, path, metadata={"frames": 2, "note": "x"}, use_package=False)
    with open(path, "rb") as f:
        length = int.from_bytes(f.read(8), "little")
    assert (8 + length) % 8 == 0
    loaded, meta = st_io.load_file(path, use_package=False)
    assert meta == {"frames": "2", "note": "x"}
    for name, tensor in tensors.items():
        assert loaded[name].dtype == tensor.dtype and torch.equal(loaded[name], tensor)
    try:
        import safetensors  # noqa: F401
    except ImportError:
        pytest.skip("safetensors package not installed: cross-check skipped")
    other, meta2 = st_io.load_file(path, use_package=True)
    assert meta2 == meta and all(torch.equal(other[n], tensors[n]) for n in tensors)
    path2 = str(tmp_path / "y.safetensors")
    st_io.save_file(tensors, path2, metadata={"frames": 2}, use_package=True)
    again, _ = st_io.load_file(path2, use_package=False)
    assert all(torch.equal(again[n], tensors[n]) for n in tensors)


def test_labels_start_with_no_effect_and_are_checked():
    torch.manual_seed(0)
    model = VideoDiT(DiTConfig(dim=32, num_heads=2, num_layers=2, video=(2, 8, 8), num_labels=9)).eval()
    with torch.no_grad():
        model.head.head.weight.normal_(0, 0.3)
    x, t = torch.randn(2, 3, 2, 8, 8), torch.tensor([0.3, 0.8])
    labels = torch.tensor([[1.0] * 9, [0.0] * 9])
    with torch.no_grad():
        assert torch.equal(model(x, t, labels=labels), model(x, t)), "a zero-initialised embedding changes nothing"
        model.label_embedding.weight.normal_()
        out = model(x, t, labels=labels)
        assert not torch.allclose(out[0], model(x, t)[0]) and torch.allclose(out[1], model(x, t)[1])
    with pytest.raises(ValueError, match="labels of shape"):
        model(x, t, labels=torch.zeros(2, 3))
    plain = VideoDiT(DiTConfig(dim=32, num_heads=2, num_layers=2, video=(2, 8, 8)))
    assert plain.label_embedding is None
    with pytest.raises(ValueError, match="unconditional"):
        plain(x, t, labels=labels)


def test_given_frame_inputs_start_with_no_effect_and_are_checked():
    """A model that takes given frames, made from an unconditional one's weights, computes what
    that one did; once its condition weights are non-zero the given frames matter, and they are
    checked."""
    from svgear.quality.model import with_given_frame_inputs

    plain = tiny_model()
    cfg = DiTConfig(**TINY, num_given_frames=2)
    assert cfg.input_channels == 7
    model = VideoDiT(cfg).eval()
    model.load_state_dict(with_given_frame_inputs(plain.state_dict(), cfg))
    x, t = torch.randn(2, 3, 4, 16, 16), torch.tensor([0.3, 0.9])
    given = torch.randn(2, 3, 2, 16, 16)
    with torch.no_grad():
        assert torch.equal(model(x, t, given_frames=given), plain(x, t)), "zero condition weights change nothing"
        model.patch_embedding.weight[:, cfg.noisy_patch_features:].normal_(0, 0.2)
        out = model(x, t, given_frames=given)
        assert not torch.allclose(out, plain(x, t), atol=1e-3)
        other = given.clone()
        other[1, :, 1] += 1.0  # only video 1's second frame changes: only video 1's output does
        moved = model(x, t, given_frames=other)
        assert torch.equal(moved[0], out[0]) and not torch.allclose(moved[1], out[1], atol=1e-3)
        # the condition channels: a mask on the given frames, then the frames, zeros after them
        inputs = model.with_given_frames(x, given)
        assert inputs.shape == (2, 7, 4, 16, 16) and torch.equal(inputs[:, :3], x)
        assert torch.equal(inputs[:, 3, :2], torch.ones(2, 2, 16, 16)) and not inputs[:, 3, 2:].any()
        assert torch.equal(inputs[:, 4:, :2], given) and not inputs[:, 4:, 2:].any()
    with pytest.raises(ValueError, match="pass given_frames"):
        model(x, t)
    with pytest.raises(ValueError, match=r"given_frames of shape \(2, 3, 1, 16, 16\)"):
        model(x, t, given_frames=given[:, :, :1])
    with pytest.raises(ValueError, match="leaves none to generate"):
        model(x[:, :, :2], t, given_frames=given)
    with pytest.raises(ValueError, match="takes none"):
        plain(x, t, given_frames=given)
    with pytest.raises(ValueError, match="inputs"):  # already takes given frames
        with_given_frame_inputs(model.state_dict(), cfg)
    with pytest.raises(ValueError, match="num_given_frames 4"):
        DiTConfig(**TINY, num_given_frames=4)


def test_given_frames_are_saved_in_the_checkpoint(tmp_path):
    model = VideoDiT(DiTConfig(**TINY, num_given_frames=1))
    save_checkpoint(model, str(tmp_path / "c"))
    loaded, _ = load_checkpoint(str(tmp_path / "c"))
    assert loaded.cfg.num_given_frames == 1 and loaded.patch_embedding.weight.shape == (32, 7 * 16)
