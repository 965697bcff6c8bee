"""The torch operator on the GPU: against SDPA, inside torch.compile, on torch's stream."""

import math

import pytest

import svgear

torch = pytest.importorskip("torch")
if not torch.cuda.is_available():
    pytest.skip("no CUDA GPU here (these run on the device: scripts/device-check python)", allow_module_level=True)
if not svgear.has_cuda():
    pytest.skip(f"{svgear.library_path()} was built without its CUDA path", allow_module_level=True)

import torch.nn.functional as F  # noqa: E402

import svgear.torch as st  # noqa: E402

DEVICE = "cuda"


def qkv(b=2, s=1500, h=4, d=128, dtype=torch.bfloat16, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    return tuple(torch.randn(b, s, h, d, generator=g, device=DEVICE, dtype=dtype) for _ in range(3))


def sdpa_bshd(q, k, v):
    return F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v))).transpose(1, 2)


def rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("method", ["dense", "ear", "svg2"])
def test_density_one_matches_sdpa(dtype, d, method):
    q, k, v = qkv(d=d, dtype=dtype)
    out = st.attention(q, k, v, method=method, density=1.0, clusters_q=16, clusters_k=32)
    assert out.dtype == dtype and out.shape == q.shape and out.device == q.device
    assert rel(out, sdpa_bshd(q, k, v)) <= 1e-2


def test_bhsd_layout_and_lse():
    q, k, v = qkv()
    qt, kt, vt = (x.transpose(1, 2).contiguous() for x in (q, k, v))
    out, lse = st.attention(qt, kt, vt, method="dense", layout="bhsd", return_lse=True)
    assert rel(out, F.scaled_dot_product_attention(qt, kt, vt)) <= 1e-2
    scores = torch.matmul(qt.float(), kt.float().transpose(-1, -2)) / qt.shape[-1] ** 0.5
    assert (lse - torch.logsumexp(scores, -1)).abs().max().item() < 2e-2


def clustered_qkv(b=2, s=4096, h=4, d=128, centers=24, seed=0):
    """Tokens around a few centres, as video tokens are: attention has structure to exploit."""
    g = torch.Generator().manual_seed(seed)
    tensors = []
    for scale in (2.0, 2.0, 1.0):
        c = torch.randn(b, h, centers, d, generator=g) * scale / d ** 0.25
        index = torch.randint(0, centers, (b, h, s), generator=g)
        x = torch.gather(c, 2, index[..., None].expand(b, h, s, d))
        x = x + 0.3 * scale * torch.randn(b, h, s, d, generator=g) / d ** 0.25
        tensors.append(x.transpose(1, 2).contiguous().to(DEVICE, torch.bfloat16))
    return tensors


def test_sparse_output_is_close_and_warm_starts():
    # On the CPU path these inputs give rel. errors of 0.006 (EAR) and 0.116 (SVG2) at density 0.3.
    q, k, v = clustered_qkv()
    dense = sdpa_bshd(q, k, v)
    state = svgear.LayerState()
    errors = []
    for _ in range(3):
        out = st.attention(q, k, v, method="ear", density=0.3, state=state, clusters_q=32, clusters_k=64)
        errors.append(rel(out, dense))
    assert svgear.last_report()["warm_started"] == 1 and state.steps == 3
    assert torch.isfinite(out).all()
    svg2 = rel(st.attention(q, k, v, method="svg2", density=0.3, clusters_q=32, clusters_k=64), dense)
    assert max(errors) < 0.03 and max(errors) < svg2, (errors, svg2)


def test_runs_on_torchs_current_stream():
    q, k, v = qkv()
    stream = torch.cuda.Stream()
    expected = st.attention(q, k, v, method="dense")
    with torch.cuda.stream(stream):
        out = st.attention(q, k, v, method="dense")
    torch.cuda.synchronize()
    assert torch.equal(out, expected)


def test_asynchronous_calls_match_and_raise_nan_later():
    q, k, v = clustered_qkv(s=2048)
    options = dict(method="ear", density=0.3, clusters_q=32, clusters_k=64)
    sync_state, async_state = svgear.LayerState(), svgear.LayerState()
    for call in range(3):  # cold, then warm
        expected, expected_lse = st.attention(q, k, v, state=sync_state, return_lse=True, **options)
        out, lse = st.attention(q, k, v, state=async_state, return_lse=True, synchronize=False, **options)
        report = svgear.last_report()
        assert report["complete"] == 0 and math.isnan(report["density"]) and math.isnan(report["total_ms"])
        assert report["exact_pairs"] == -1 and report["selected_blocks"] == -1
        assert report["total_blocks"] == 2 * 4 * 32 * 64 and report["warm_started"] == (call > 0)
        assert torch.equal(out, expected) and torch.equal(lse, expected_lse)
    async_state.synchronize()
    bad = q.clone()
    bad[0, 7, 1, 3] = float("nan")
    st.attention(bad, k, v, state=async_state, synchronize=False, **options)  # returns before the GPU checks
    with pytest.raises(ValueError, match="earlier asynchronous call"):
        st.attention(q, k, v, state=async_state, synchronize=False, **options)
    st.attention(q, k, v, state=async_state, synchronize=False, **options)
    assert svgear.last_report()["warm_started"] == 0  # the poisoned centroids were dropped
    st.attention(bad, k, v, state=async_state, synchronize=False, **options)
    with pytest.raises(ValueError, match="earlier asynchronous call"):
        async_state.synchronize()
    async_state.synchronize()  # raised once
    with pytest.raises(ValueError, match="needs a LayerState"):
        st.attention(q, k, v, synchronize=False, **options)


def test_router_is_asynchronous_on_cuda_and_raises_at_the_next_step():
    q, k, v = qkv()
    router = svgear.AttentionRouter("ear", density=0.3, warmup_steps=0, clusters_q=16, clusters_k=32)
    router.set_step(0, 2)
    bad = k.clone()
    bad[1, 100, 2, 5] = float("inf")
    router(0, q, k, v)
    router(1, q, bad, v)  # returns: the check runs on the GPU later
    assert svgear.last_report()["complete"] == 0
    with pytest.raises(ValueError, match="layer 1: .*earlier asynchronous call"):
        router.set_step(1)
    assert torch.isfinite(router(1, q, k, v)).all()
    router.synchronize()


@pytest.mark.skipif(not st.REGISTERED, reason="torch.library.custom_op needs torch >= 2.4")
@pytest.mark.parametrize("synchronize", [True, False])
def test_torch_compile_keeps_one_graph(synchronize):
    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(128, 128, device=DEVICE, dtype=torch.bfloat16)
            self.state = svgear.LayerState()

        def forward(self, x):
            b, s, _ = x.shape
            q = self.proj(x).view(b, s, 1, 128)
            out = st.attention(q, q, q, method="ear", density=0.3, state=self.state, clusters_q=16, clusters_k=32,
                               synchronize=synchronize)
            return out.view(b, s, 128) + x

    block = Block()
    x = torch.randn(1, 2048, 128, device=DEVICE, dtype=torch.bfloat16)
    # Inference, as in a diffusion pipeline: the operator has no backward, so a graph built with
    # gradients (parameters requiring grad outside no_grad) cannot be compiled.
    with torch.no_grad():
        eager = block(x)
        compiled = torch.compile(block, fullgraph=True)
        out = compiled(x)  # fullgraph=True raises on any graph break
    assert out.shape == eager.shape and torch.isfinite(out).all()
    assert rel(out, eager) < 0.05  # the state is warm now: a slightly different clustering
    block.state.synchronize()


def test_cuda_errors_raise_with_messages():
    q, k, v = qkv(d=96)
    with pytest.raises(ValueError, match="D = 64 and 128"):
        st.attention(q, k, v, method="dense")
    q, k, v = qkv(dtype=torch.float32)
    with pytest.raises(TypeError, match="BF16 or F16"):
        st.attention(q, k, v, method="dense")
    q, k, v = qkv()
    with pytest.raises(TypeError, match="another device|different devices"):
        st.attention(q, k.cpu(), v, method="dense")
    q[0, 5, 1, 3] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        st.attention(q, k, v, method="ear", clusters_q=8, clusters_k=8)
