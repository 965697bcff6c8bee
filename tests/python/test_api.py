"""svgear.attention through the C API on CPU: DLPack round trips, layouts, strides, states."""

import numpy as np
import pytest

import svgear

torch = pytest.importorskip("torch")

SMALL = dict(clusters_q=8, clusters_k=16)


def random_qkv(shape=(1, 3, 200, 32), seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return tuple(rng.standard_normal(shape).astype(dtype) for _ in range(3))


def reference(q, k, v):
    """Exact attention in float64, (B, H, S, D)."""
    q, k, v = (x.astype(np.float64) for x in (q, k, v))
    scores = np.einsum("bhqd,bhkd->bhqk", q, k) / np.sqrt(q.shape[-1])
    lse = np.log(np.exp(scores - scores.max(-1, keepdims=True)).sum(-1)) + scores.max(-1)
    return np.einsum("bhqk,bhkd->bhqd", np.exp(scores - lse[..., None]), v), lse


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_numpy_dense_matches_reference_with_lse():
    q, k, v = random_qkv()
    out, lse = svgear.attention(q, k, v, method="dense", layout="bhsd", return_lse=True)
    expected, expected_lse = reference(q, k, v)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32 and out.shape == q.shape
    assert rel(out, expected) < 1e-5
    assert lse.shape == q.shape[:3] and np.abs(lse - expected_lse).max() < 1e-4


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_torch_dense_in_every_dtype(dtype):
    q, k, v = (torch.from_numpy(x).to(dtype) for x in random_qkv())
    out = svgear.attention(q, k, v, method="dense", layout="bhsd")
    assert out.dtype == dtype and out.shape == q.shape
    expected, _ = reference(*(x.float().numpy() for x in (q, k, v)))
    assert rel(out.float().numpy(), expected) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_layouts_and_strides_give_the_same_result():
    q, k, v = (torch.from_numpy(x) for x in random_qkv())
    bhsd = svgear.attention(q, k, v, method="ear", density=0.3, layout="bhsd", **SMALL)
    # (B, S, H, D) views of the same data: strides, not copies.
    bshd = svgear.attention(*(x.transpose(1, 2) for x in (q, k, v)), method="ear", density=0.3, layout="bshd", **SMALL)
    assert bshd.shape == (1, 200, 3, 32)
    assert torch.equal(bshd.transpose(1, 2), bhsd)
    # Padded rows (a slice of a wider tensor) are read through their strides too.
    wide = [torch.zeros(1, 3, 200, 48) for _ in range(3)]
    for w, x in zip(wide, (q, k, v)):
        w[..., :32] = x
    sliced = svgear.attention(*(w[..., :32] for w in wide), method="ear", density=0.3, layout="bhsd", **SMALL)
    assert torch.equal(sliced, bhsd)


def test_out_argument_is_written_in_place():
    q, k, v = random_qkv()
    out = np.full_like(q, np.nan)
    result = svgear.attention(q, k, v, method="svg2", density=0.5, layout="bhsd", out=out, **SMALL)
    assert result is out and np.isfinite(out).all()


def test_density_one_equals_dense_for_every_method():
    q, k, v = random_qkv()
    dense = svgear.attention(q, k, v, method="dense", layout="bhsd")
    for method in ("ear", "svg2"):
        full = svgear.attention(q, k, v, method=method, density=1.0, layout="bhsd", **SMALL)
        assert rel(full, dense) < 1e-5


def test_state_warm_starts_the_second_call():
    q, k, v = random_qkv()
    state = svgear.LayerState()
    svgear.attention(q, k, v, density=0.3, layout="bhsd", state=state, **SMALL)
    assert svgear.last_report()["warm_started"] == 0 and state.steps == 1
    svgear.attention(q, k, v, density=0.3, layout="bhsd", state=state, **SMALL)
    assert svgear.last_report()["warm_started"] == 1 and state.steps == 2
    state.reset()
    assert state.steps == 0
    svgear.attention(q, k, v, density=0.3, layout="bhsd", state=state, **SMALL)
    assert svgear.last_report()["warm_started"] == 0


def test_report_and_describe():
    q, k, v = random_qkv()
    svgear.attention(q, k, v, method="ear", density=0.25, layout="bhsd", **SMALL)
    report = svgear.last_report()
    assert 0.25 <= report["density"] < 0.4 and report["total_blocks"] == 3 * 8 * 16
    config = svgear.describe("svg2", density=0.1, clusters_k=99)
    assert config["policy"] == "criticality" and config["density"] == 0.1 and config["clusters_k"] == 99


def test_torch_op_matches_the_plain_call():
    import svgear.torch as st

    q, k, v = (torch.from_numpy(x).transpose(1, 2) for x in random_qkv())
    state_a, state_b = svgear.LayerState(), svgear.LayerState()
    for _ in range(2):  # cold, then warm
        a, lse_a = st.attention(q, k, v, method="ear", density=0.3, state=state_a, return_lse=True, **SMALL)
        b, lse_b = svgear.attention(q, k, v, method="ear", density=0.3, state=state_b, return_lse=True, **SMALL)
        assert torch.equal(a, b) and torch.equal(lse_a, lse_b)


def test_router_warm_up_runs_dense_then_sparse():
    q, k, v = (torch.from_numpy(x).transpose(1, 2) for x in random_qkv())
    router = svgear.AttentionRouter("ear", density=0.3, num_layers=4, warmup_steps=0.2, warmup_layers=1, **SMALL)
    router.set_step(0, num_steps=10)
    assert router.is_dense(2)
    dense = router(2, q, k, v)
    expected, _ = reference(*(x.transpose(1, 2).numpy() for x in (q, k, v)))
    assert rel(dense.transpose(1, 2).numpy(), expected) < 1e-5
    router.set_step(2)
    assert router.is_dense(0) and not router.is_dense(1)
    sparse = router(1, q, k, v)
    assert router.state(1).steps == 1 and not torch.equal(sparse, dense)
    router.reset()
    assert router.state(1).steps == 0 and router.step == 0
    dense_out, lse = router(1, q, k, v, return_lse=True)  # step 0 again: dense, with the normaliser
    assert lse.shape == (1, 3, 200)


def test_synchronize_option_has_no_effect_on_the_cpu():
    q, k, v = random_qkv()
    sync_state, async_state = svgear.LayerState(), svgear.LayerState()
    for call in range(2):  # cold, then warm
        expected = svgear.attention(q, k, v, density=0.3, layout="bhsd", state=sync_state, **SMALL)
        out = svgear.attention(q, k, v, density=0.3, layout="bhsd", state=async_state, synchronize=False, **SMALL)
        report = svgear.last_report()
        assert np.array_equal(out, expected)
        assert report["complete"] == 1 and 0.3 <= report["density"] < 1 and report["warm_started"] == call
    async_state.synchronize()  # nothing pending
    svgear.attention(q, k, v, layout="bhsd", synchronize=False, **SMALL)  # no state needed on the CPU
    nan_q = q.copy()
    nan_q[0, 1, 5, 2] = np.nan
    with pytest.raises(ValueError, match="non-finite"):  # raised by the call itself
        svgear.attention(nan_q, k, v, layout="bhsd", state=async_state, synchronize=False, **SMALL)
    assert svgear.describe("ear")["synchronize"] is True
    assert svgear.describe("ear", synchronize=False)["synchronize"] is False
    with pytest.raises(ValueError, match="true or false"):
        svgear.describe("ear", synchronize="sometimes")
    with pytest.raises(ValueError, match="not a finite number"):
        svgear.describe("ear", density=True)


def test_router_is_asynchronous_by_default_and_synchronizes_its_states(monkeypatch):
    assert "synchronize=false" in svgear.AttentionRouter("ear", density=0.3).key
    assert "synchronize=true" in svgear.AttentionRouter("ear", density=0.3, synchronize=True).key
    q, k, v = (torch.from_numpy(x).transpose(1, 2) for x in random_qkv())
    router = svgear.AttentionRouter("ear", density=0.3, warmup_steps=0, **SMALL)
    router(0, q, k, v)
    router(1, q, k, v)
    synchronized = []
    failing = {router.state(1).id}

    def synchronize(state):
        synchronized.append(state.id)
        if state.id in failing:
            raise svgear.SvgearValueError("deferred trouble")

    monkeypatch.setattr(svgear.LayerState, "synchronize", synchronize)
    states = sorted(router.state(layer).id for layer in (0, 1))
    router.set_step(0)  # the same step: nothing to wait for
    assert synchronized == []
    with pytest.raises(ValueError, match="layer 1: deferred trouble"):
        router.set_step(1)  # a new step raises the last one's errors, after checking every layer
    assert sorted(synchronized) == states and router.step == 1
    failing.clear()
    synchronized.clear()
    router.reset()
    assert sorted(synchronized) == states and router.state(0).steps == 0


def test_router_fraction_needs_num_steps():
    router = svgear.AttentionRouter("ear", density=0.3, warmup_steps=0.2)
    with pytest.raises(ValueError, match="set_step"):
        router.is_dense(0)


class DLPackOnly:
    """An array known to svgear only through the DLPack protocol (as CuPy or JAX arrays are)."""

    def __init__(self, array):
        self.array = array
        self.shape = array.shape
        self.dtype = array.dtype

    def __dlpack__(self, stream=None):
        return self.array.__dlpack__()

    def __dlpack_device__(self):
        return self.array.__dlpack_device__()


def test_any_dlpack_producer_round_trips():
    q, k, v = random_qkv()
    out = DLPackOnly(np.zeros_like(q))
    result = svgear.attention(DLPackOnly(q), DLPackOnly(k), DLPackOnly(v), method="dense", layout="bhsd", out=out)
    assert result is out
    expected, _ = reference(q, k, v)
    assert rel(out.array, expected) < 1e-5
    # torch reads the result back through DLPack without a copy.
    back = torch.utils.dlpack.from_dlpack(out.array.__dlpack__())
    assert back.data_ptr() == out.array.ctypes.data
    with pytest.raises(TypeError, match="pass out="):
        svgear.attention(DLPackOnly(q), DLPackOnly(k), DLPackOnly(v), method="dense", layout="bhsd")


def test_probe_rows_options():
    q, k, v = random_qkv()
    out = svgear.attention(q, k, v, density=0.3, layout="bhsd", probe_queries=0, probe_mean=True, **SMALL)
    assert out.shape == q.shape and np.isfinite(out).all()
    assert svgear.describe("ear")["probe_mean"] is True and svgear.describe("ear")["probe_queries"] == 0
    out = svgear.attention(q, k, v, density=0.3, layout="bhsd", probe_queries=4, probe_mean=False, **SMALL)
    assert out.shape == q.shape and np.isfinite(out).all()
    with pytest.raises(ValueError, match="probe_mean"):  # no probe row at all
        svgear.attention(q, k, v, density=0.3, layout="bhsd", probe_queries=0, probe_mean=False, **SMALL)


def test_query_tail_limit_option():
    q, k, v = random_qkv(shape=(1, 2, 600, 32))  # 3 query clusters of ~200 rows: tails to trim
    assert svgear.describe("ear")["query_tail_limit"] == 0
    plain = svgear.attention(q, k, v, density=0.3, layout="bhsd", clusters_q=3, clusters_k=16)
    aligned = svgear.attention(q, k, v, density=0.3, layout="bhsd", clusters_q=3, clusters_k=16,
                               query_tail_limit=32)
    assert aligned.shape == q.shape and np.isfinite(aligned).all()
    expected, _ = reference(q, k, v)
    assert rel(aligned, expected) < 1.1 * rel(plain, expected) + 1e-3
    with pytest.raises(ValueError, match="query tail limit"):
        svgear.attention(q, k, v, density=0.3, layout="bhsd", query_tail_limit=40, **SMALL)
