"""svgear.attention over any DLPack tensor: validate nothing here, convert, call the C API.

The library validates every input and reports what to change; this layer only turns tensors
into DLTensors, keeps configurations and per-layer states as C handles, and raises the
library's message as ValueError / TypeError / RuntimeError / MemoryError.
"""

import ctypes
import itertools
import json
import sys
import threading
import weakref

from . import _capi, _dlpack
from ._errors import SvgearTypeError, SvgearValueError  # noqa: F401 (re-exported)

_local = threading.local()


def last_report():
    """What the last svgear.attention call on this thread did: density, blocks, stage times (ms).

    After an asynchronous CUDA call (synchronize=False) the GPU has not run yet: "complete" is 0,
    density and the times are NaN, exact_pairs and selected_blocks -1 (total_blocks and
    warm_started are valid).
    """
    return getattr(_local, "report", None)


class LayerState:
    """One attention layer's memory across denoising steps (the k-means centroids of its last
    call, so the next call warm-starts). Use one per layer; reset() between videos.

    It also holds the input check of its last asynchronous CUDA call (synchronize=False):
    the state's next call, or synchronize(), raises it."""

    _ids = itertools.count(1)
    _live = weakref.WeakValueDictionary()  # id -> state, for the torch op (which takes an int)

    def __init__(self):
        handle = ctypes.c_void_p()
        lib = _capi.library()
        _capi.check(lib.svgear_state_create(ctypes.byref(handle)))
        self._handle = handle
        self._lib = lib
        self.id = next(LayerState._ids)
        LayerState._live[self.id] = self

    @property
    def steps(self):
        """How many calls used this state since it was created or reset."""
        return int(self._lib.svgear_state_steps(self._handle))

    def reset(self):
        """Forget the centroids: the next call starts cold. A deferred error is kept (synchronize())."""
        _capi.check(self._lib.svgear_state_reset(self._handle))

    def synchronize(self):
        """Wait for this state's last asynchronous call (synchronize=False) to run on the GPU and
        raise what it found: ValueError when its q, k or v held NaN/Inf (its output is not valid),
        RuntimeError when the GPU failed. Each error is raised once; the state then starts cold.
        Returns at once when nothing is pending (CPU or synchronous calls)."""
        _capi.check(self._lib.svgear_state_synchronize(self._handle))

    @classmethod
    def by_id(cls, state_id):
        if state_id < 0:
            return None
        state = cls._live.get(state_id)
        if state is None:
            raise SvgearValueError(f"svgear: LayerState {state_id} no longer exists; keep the state object alive")
        return state

    def __del__(self):
        handle = getattr(self, "_handle", None)
        if handle is not None and handle.value:
            self._lib.svgear_state_destroy(handle)
            self._handle = None


class _Config:
    """A C config handle for one (method, options) pair; cached because calls repeat them."""

    def __init__(self, method, options):
        lib = _capi.library()
        handle = ctypes.c_void_p()
        _capi.check(lib.svgear_config_create(method.encode(), ctypes.byref(handle)))
        self._lib = lib
        self.handle = handle
        for key, value in options:
            _capi.check(lib.svgear_config_set(handle, key.encode(), value.encode()))

    def describe(self):
        return json.loads(self._lib.svgear_config_describe(self.handle).decode())

    def __del__(self):
        if getattr(self, "handle", None) is not None and self.handle.value:
            self._lib.svgear_config_destroy(self.handle)


_configs = {}
_configs_lock = threading.Lock()


def _option_text(value):
    if isinstance(value, bool):
        return "true" if value else "false"  # the library's form (synchronize); numeric options refuse it
    return str(value)  # str(float) is its shortest round-trip text in Python 3


def options_key(method, density=None, **options):
    """A canonical text form of a method and its options: "ear;clusters_k=1024;density=0.2".

    Plain string operations only, so torch.compile (dynamo) traces through it to a constant.
    """
    if not isinstance(method, str):
        raise SvgearTypeError(f"svgear: method must be a string such as 'ear', got {type(method).__name__}")
    if density is not None:
        options["density"] = density
    parts = [method]
    for name in sorted(options):
        if options[name] is not None:
            parts.append(name + "=" + _option_text(options[name]))
    return ";".join(parts)


def _parse_key(key):
    method, *items = key.split(";")
    pairs = []
    for item in items:
        name, separator, value = item.partition("=")
        if not separator:
            raise SvgearValueError(f"svgear: option '{item}' is malformed: options are name=value")
        pairs.append((name, value))
    return method, pairs


def config_for(key):
    """The cached C config for an options_key() string."""
    with _configs_lock:
        config = _configs.get(key)
        if config is None:
            method, items = _parse_key(key)
            config = _Config(method, items)
            if len(_configs) > 256:
                _configs.clear()
            _configs[key] = config
        return config


def describe(method="ear", density=None, **options):
    """Every option of a method configuration, with the library's defaults filled in."""
    return config_for(options_key(method, density, **options)).describe()


# --- tensors -> DLTensors -----------------------------------------------------------------

def _torch_module():
    return sys.modules.get("torch")


def _is_torch_tensor(x):
    torch = _torch_module()
    return torch is not None and isinstance(x, torch.Tensor)


def _torch_dltensor(t, name):
    torch = _torch_module()
    codes = {torch.float32: (_dlpack.K_DL_FLOAT, 32), torch.float16: (_dlpack.K_DL_FLOAT, 16),
             torch.bfloat16: (_dlpack.K_DL_BFLOAT, 16)}
    if t.dtype not in codes:
        raise SvgearTypeError(f"svgear: tensor '{name}' is {t.dtype}: pass torch.bfloat16, torch.float16 or torch.float32")
    if t.device.type == "cpu":
        device = (_dlpack.K_DL_CPU, 0)
    elif t.device.type == "cuda":
        device = (_dlpack.K_DL_CUDA, t.device.index if t.device.index is not None else 0)
    else:
        raise SvgearTypeError(f"svgear: tensor '{name}' is on {t.device}: svgear runs on CPU and CUDA tensors")
    code, bits = codes[t.dtype]
    return _dlpack.OwnedDLTensor(t.data_ptr(), device[0], device[1], code, bits, tuple(t.shape), tuple(t.stride()))


def require_dlpack(x, name):
    if not (_is_torch_tensor(x) or hasattr(x, "__dlpack__")):
        raise SvgearTypeError(
            f"svgear: '{name}' is a {type(x).__name__}: pass a tensor or array with DLPack support "
            "(__dlpack__), e.g. a torch.Tensor, numpy.ndarray, cupy.ndarray or jax.Array")


def _is_numpy_array(x):
    numpy = sys.modules.get("numpy")
    return numpy is not None and isinstance(x, numpy.ndarray)


def _numpy_dltensor(a, name):
    # NumPy's own __dlpack__ refuses read-only arrays (np.frombuffer, memory maps); inputs may
    # well be read-only, so NumPy arrays are described from their array interface instead.
    codes = {"float32": (_dlpack.K_DL_FLOAT, 32), "float16": (_dlpack.K_DL_FLOAT, 16)}
    if a.dtype.name not in codes:
        raise SvgearTypeError(f"svgear: array '{name}' is {a.dtype.name}: pass float32 or float16 NumPy arrays")
    if any(stride % a.itemsize for stride in a.strides):
        raise SvgearValueError(f"svgear: array '{name}' has strides not a multiple of its item size: pass a copy")
    code, bits = codes[a.dtype.name]
    return _dlpack.OwnedDLTensor(a.ctypes.data, _dlpack.K_DL_CPU, 0, code, bits, a.shape,
                                 tuple(stride // a.itemsize for stride in a.strides))


class _Converted:
    """DLTensors for a call, with whatever keeps their memory alive until the call returns."""

    def __init__(self):
        self.keep = []

    def tensor(self, x, name):
        if x is None:
            return None
        if _is_torch_tensor(x):
            owned = _torch_dltensor(x, name)
            self.keep.append((owned, x))
            return ctypes.pointer(owned.tensor)
        if _is_numpy_array(x):
            owned = _numpy_dltensor(x, name)
            self.keep.append((owned, x))
            return ctypes.pointer(owned.tensor)
        require_dlpack(x, name)
        device_type = x.__dlpack_device__()[0] if hasattr(x, "__dlpack_device__") else _dlpack.K_DL_CPU
        # For CUDA producers, stream=1 asks for the data to be ready on the legacy default stream,
        # the one svgear runs on when no stream is given.
        capsule = x.__dlpack__(stream=1) if device_type == _dlpack.K_DL_CUDA else x.__dlpack__()
        self.keep.append((capsule, x))
        return ctypes.pointer(_dlpack.tensor_of_capsule(capsule))


def _empty_like(x, shape, float32=False):
    """A new array of `shape` in x's library, dtype and device (float32 for the lse)."""
    if _is_torch_tensor(x):
        torch = _torch_module()
        return torch.empty(shape, dtype=torch.float32 if float32 else x.dtype, device=x.device)
    numpy = sys.modules.get("numpy")
    if numpy is not None and isinstance(x, numpy.ndarray):
        return numpy.empty(shape, dtype=numpy.float32 if float32 else x.dtype)
    if hasattr(x, "__array_namespace__"):
        xp = x.__array_namespace__()
        dtype = xp.float32 if float32 else x.dtype
        device = getattr(x, "device", None)
        try:
            return xp.empty(shape, dtype=dtype, device=device)
        except TypeError:
            return xp.empty(shape, dtype=dtype)
    raise SvgearTypeError(
        f"svgear: cannot allocate an output like a {type(x).__name__}: pass out= (and lse=) yourself")


def _rows_of(x, layout):
    """(B, H, S) of a 4-D q in `layout`, for the lse's shape."""
    shape = tuple(x.shape)
    if len(shape) != 4:
        raise SvgearTypeError(
            f"svgear: tensor 'q' has {len(shape)} dimensions: svgear takes 4-D tensors in layout "
            f"'{layout}' (add a batch axis, e.g. x.unsqueeze(0))")
    return (shape[0], shape[2], shape[1]) if layout == "bshd" else (shape[0], shape[1], shape[2])


def _stream_of(q, stream):
    if stream is not None:
        return int(stream)
    if _is_torch_tensor(q) and q.device.type == "cuda":
        return _torch_module().cuda.current_stream(q.device).cuda_stream
    return 0


def run(key, q, k, v, *, layout="bshd", state=None, out=None, lse=None, return_lse=False, stream=None):
    """Runs one call for an options_key(); returns out, or (out, lse)."""
    if layout not in _capi.LAYOUTS:
        raise SvgearValueError(f"svgear: layout '{layout}' is unknown: use 'bshd' (B, S, H, D) or 'bhsd' (B, H, S, D)")
    if state is not None and not isinstance(state, LayerState):
        raise SvgearTypeError(f"svgear: state must be a svgear.LayerState, got {type(state).__name__}")
    config = config_for(key)
    for x, name in ((q, "q"), (k, "k"), (v, "v")):
        require_dlpack(x, name)
    if out is None:
        out = _empty_like(q, tuple(q.shape))
    if return_lse and lse is None:
        lse = _empty_like(q, _rows_of(q, layout), float32=True)
    converted = _Converted()
    pointers = [converted.tensor(x, name) for x, name in ((q, "q"), (k, "k"), (v, "v"), (out, "out"))]
    lse_pointer = converted.tensor(lse, "lse") if lse is not None else None
    report = _capi.Report()
    lib = _capi.library()
    _capi.check(lib.svgear_attention(
        config.handle, state._handle if state is not None else None, *pointers, lse_pointer,
        _capi.LAYOUTS[layout], ctypes.c_void_p(_stream_of(q, stream)), ctypes.byref(report)))
    _local.report = report.as_dict()
    return (out, lse) if (return_lse or lse is not None) else out


def attention(q, k, v, *, method="ear", density=None, layout="bshd", state=None, out=None,
              lse=None, return_lse=False, stream=None, **options):
    """Sparse (or dense) attention of q over k, v with svgear.

    q, k, v: 4-D tensors of any library with DLPack support (torch, NumPy, CuPy, JAX), one dtype
    (CPU: float32/float16/bfloat16; CUDA: float16/bfloat16 with head_dim 64 or 128), laid out as
    `layout`: "bshd" = (batch, tokens, heads, head_dim), diffusers' layout, or "bhsd" =
    (batch, heads, tokens, head_dim), scaled_dot_product_attention's. Any strides.
    method: "ear" (SVG-EAR), "svg2" or "dense". density: fraction of query-key pairs computed
    exactly (default: the method's, 0.2; dense: 1). state: a svgear.LayerState carried across
    steps. options: clusters_q, clusters_k, kmeans_iters, warm_iters, query_tail_limit,
    probe_queries, probe_mean, probe_value_dims (CUDA: 32 only), top_p, min_key_fraction,
    budget_scope, policy, compensation, init, seed (see `svgear eval --help`), and
    synchronize: False makes a CUDA call return without
    waiting for the GPU (needs `state`, whose next call or state.synchronize() raises a NaN/Inf
    input; last_report() is partial); no effect on the CPU.
    Returns a new tensor like q (or writes `out`); with return_lse=True, (out, lse) where lse is
    float32 (B, H, Sq): the log of each row's softmax denominator. stream: a CUDA stream handle
    (int); default: torch's current stream for torch tensors, else the legacy default stream.
    """
    key = options_key(method, density, **options)
    return run(key, q, k, v, layout=layout, state=state, out=out, lse=lse, return_lse=return_lse, stream=stream)
