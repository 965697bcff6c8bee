"""The C API of libsvgear.so through ctypes: the one way Python reaches the library.

Why ctypes: nothing of Python's or torch's binary interface crosses the boundary, so one build
of the library serves every Python and torch version (include/svgear/svgear.h).
"""

import ctypes
import os
import pathlib

from ._errors import BY_STATUS, SvgearRuntimeError
from ._dlpack import DLTensor

C_API_VERSION = 2
LAYOUTS = {"bhsd": 0, "bshd": 1}


class Report(ctypes.Structure):
    _fields_ = [
        ("density", ctypes.c_double),
        ("exact_pairs", ctypes.c_int64),
        ("selected_blocks", ctypes.c_int64),
        ("total_blocks", ctypes.c_int64),
        ("warm_started", ctypes.c_int32),
        ("check_ms", ctypes.c_double),
        ("cluster_ms", ctypes.c_double),
        ("permute_ms", ctypes.c_double),
        ("score_ms", ctypes.c_double),
        ("select_ms", ctypes.c_double),
        ("attend_ms", ctypes.c_double),
        ("total_ms", ctypes.c_double),
        ("complete", ctypes.c_int32),  # 0: an asynchronous call's partial report (NaN / -1 where unknown)
    ]

    def as_dict(self):
        return {name: getattr(self, name) for name, _ in self._fields_}


def _candidates():
    """Where libsvgear.so may be, first match wins."""
    explicit = os.environ.get("SVGEAR_LIBRARY")
    if explicit:
        yield pathlib.Path(explicit)
        return
    here = pathlib.Path(__file__).resolve().parent
    yield here / "lib" / "libsvgear.so"  # copied in by `pip install` after a build
    repo = here.parent.parent  # python/svgear -> the repository, when run from a checkout
    for build in ("build", "build-device", "build-asan"):
        yield repo / build / "lib" / "libsvgear.so"


_library = None


def library():
    """The loaded library; loads it on first use so `import svgear` never needs a build."""
    global _library
    if _library is not None:
        return _library
    tried = []
    for path in _candidates():
        tried.append(str(path))
        if path.is_file():
            _library = _bind(ctypes.CDLL(str(path)))
            return _library
    raise ImportError(
        "svgear: libsvgear.so not found (looked at: " + ", ".join(tried) + "). Build it with "
        "`scripts/build` in the repository, or point SVGEAR_LIBRARY at it."
    )


def library_path():
    library()
    return _library._name


def _bind(lib):
    c = ctypes
    handle = c.c_void_p
    signatures = {
        "svgear_last_error": (c.c_char_p, []),
        "svgear_c_api_version": (c.c_int32, []),
        "svgear_version": (c.c_char_p, []),
        "svgear_has_cuda": (c.c_int32, []),
        "svgear_config_create": (c.c_int, [c.c_char_p, c.POINTER(handle)]),
        "svgear_config_set": (c.c_int, [handle, c.c_char_p, c.c_char_p]),
        "svgear_config_describe": (c.c_char_p, [handle]),
        "svgear_config_destroy": (None, [handle]),
        "svgear_state_create": (c.c_int, [c.POINTER(handle)]),
        "svgear_state_reset": (c.c_int, [handle]),
        "svgear_state_synchronize": (c.c_int, [handle]),
        "svgear_state_steps": (c.c_int64, [handle]),
        "svgear_state_destroy": (None, [handle]),
        "svgear_attention": (
            c.c_int,
            [handle, handle, c.POINTER(DLTensor), c.POINTER(DLTensor), c.POINTER(DLTensor),
             c.POINTER(DLTensor), c.POINTER(DLTensor), c.c_int, handle, c.POINTER(Report)],
        ),
    }
    for name, (restype, argtypes) in signatures.items():
        function = getattr(lib, name)
        function.restype = restype
        function.argtypes = argtypes
    version = lib.svgear_c_api_version()
    if version != C_API_VERSION:
        raise ImportError(
            f"svgear: the library has C API version {version} but this package needs "
            f"{C_API_VERSION}: rebuild the library or reinstall the package from the same checkout"
        )
    return lib


def check(status):
    """Raises the exception matching a non-zero svgear_status, with the library's message."""
    if status != 0:
        message = library().svgear_last_error().decode("utf-8", "replace")
        raise BY_STATUS.get(status, SvgearRuntimeError)(message)
