"""Every bad input raises ValueError / TypeError with the library's message; nothing crashes."""

import numpy as np
import pytest

import svgear

torch = pytest.importorskip("torch")


def qkv(shape=(1, 2, 64, 16), dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    return tuple(torch.randn(shape, generator=g).to(dtype) for _ in range(3))


CASES = [
    # (description, call, exception, message fragment)
    ("wrong rank", lambda q, k, v: svgear.attention(q[0], k[0], v[0]), TypeError, "3 dimensions"),
    ("mismatched dtypes", lambda q, k, v: svgear.attention(q, k.half(), v), TypeError, "one dtype"),
    ("mismatched value dtype", lambda q, k, v: svgear.attention(q, k, v.bfloat16()), TypeError, "one dtype"),
    ("unsupported dtype", lambda q, k, v: svgear.attention(q.double(), k.double(), v.double()), TypeError, "float64"),
    ("integer tensors", lambda q, k, v: svgear.attention(*(x.long() for x in (q, k, v))), TypeError, "int64"),
    ("mismatched head dim", lambda q, k, v: svgear.attention(q, k[..., :8], v[..., :8], layout="bhsd"), ValueError, "head dim"),
    ("k and v shapes", lambda q, k, v: svgear.attention(q, k, v[:, :, :32], layout="bhsd"), ValueError, "keys and values"),
    ("batch mismatch", lambda q, k, v: svgear.attention(q, torch.cat([k, k]), torch.cat([v, v]), layout="bhsd"), ValueError, "batch"),
    ("NaN input", lambda q, k, v: svgear.attention(q.index_fill(2, torch.tensor([5]), float("nan")), k, v, layout="bhsd"), ValueError, "non-finite"),
    ("density above 1", lambda q, k, v: svgear.attention(q, k, v, density=1.5, layout="bhsd", clusters_q=4, clusters_k=4), ValueError, "outside"),
    ("density zero", lambda q, k, v: svgear.attention(q, k, v, density=0.0, layout="bhsd", clusters_q=4, clusters_k=4), ValueError, "outside"),
    ("unknown option", lambda q, k, v: svgear.attention(q, k, v, clusterz=4), ValueError, "unknown option 'clusterz'"),
    ("bad option value", lambda q, k, v: svgear.attention(q, k, v, clusters_q="many"), ValueError, "not an integer"),
    ("unknown method", lambda q, k, v: svgear.attention(q, k, v, method="fast"), ValueError, "unknown method"),
    ("too many clusters", lambda q, k, v: svgear.attention(q, k, v, layout="bhsd", clusters_q=100), ValueError, "exceeds"),
    ("unknown layout", lambda q, k, v: svgear.attention(q, k, v, layout="sbhd"), ValueError, "layout"),
    ("not a tensor", lambda q, k, v: svgear.attention([[1.0]], k, v), TypeError, "DLPack"),
    ("bad state", lambda q, k, v: svgear.attention(q, k, v, state="warm"), TypeError, "LayerState"),
    ("out aliases q", lambda q, k, v: svgear.attention(q, k, v, layout="bhsd", method="dense", out=q), ValueError, "overlaps"),
    ("out of the wrong shape", lambda q, k, v: svgear.attention(q, k, v, layout="bhsd", method="dense", out=torch.empty(1, 2, 63, 16)), ValueError, "shape of q"),
    ("lse of the wrong dtype", lambda q, k, v: svgear.attention(q, k, v, layout="bhsd", method="dense", lse=torch.empty(1, 2, 64, dtype=torch.float16)), TypeError, "float32"),
    ("lse of the wrong shape", lambda q, k, v: svgear.attention(q, k, v, layout="bhsd", method="dense", lse=torch.empty(1, 2, 63)), ValueError, "lse"),
    ("empty tensors", lambda q, k, v: svgear.attention(q[:, :, :0], k, v, layout="bhsd", method="dense"), ValueError, "empty"),
    ("top-p with ear", lambda q, k, v: svgear.attention(q, k, v, layout="bhsd", top_p=0.9, clusters_q=4, clusters_k=4), ValueError, "criticality"),
]


@pytest.mark.parametrize("description,call,exception,fragment", CASES, ids=[c[0] for c in CASES])
def test_bad_input_raises_with_the_library_message(description, call, exception, fragment):
    q, k, v = qkv()
    with pytest.raises(exception) as caught:
        call(q, k, v)
    assert isinstance(caught.value, svgear.Error), f"{description}: not raised by svgear"
    assert fragment in str(caught.value), f"{description}: message was {caught.value}"


def test_torch_op_raises_the_same_errors():
    import svgear.torch as st

    q, k, v = qkv()
    with pytest.raises(TypeError, match="3 dimensions"):
        st.attention(q[0], k[0], v[0])
    with pytest.raises(ValueError, match="unknown option"):
        st.attention(q, k, v, clusterz=3)
    with pytest.raises(TypeError, match="not a torch.Tensor"):
        st.attention(np.zeros((1, 2, 3, 4)), k, v)


def test_cuda_tensors_in_a_cpu_only_run_are_reported():
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    # A DLPack object claiming CUDA memory must not be dereferenced on the CPU path.
    import ctypes
    from svgear import _capi, _dlpack, core

    q, k, v = qkv()
    owned = [_dlpack.OwnedDLTensor(x.data_ptr(), _dlpack.K_DL_CUDA, 0, _dlpack.K_DL_FLOAT, 32, tuple(x.shape), tuple(x.stride())) for x in (q, k, v, torch.empty_like(q))]
    config = core.config_for(core.options_key("dense"))
    status = _capi.library().svgear_attention(config.handle, None, *(ctypes.pointer(o.tensor) for o in owned), None, 0, None, None)
    assert status != 0
    message = _capi.library().svgear_last_error().decode()
    assert "CUDA" in message or "device" in message
