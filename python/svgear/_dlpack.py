"""DLPack structures (dlpack.h, ABI-stable since 0.6) and how to read them out of a capsule."""

import ctypes

K_DL_CPU = 1
K_DL_CUDA = 2
K_DL_CUDA_HOST = 3
K_DL_CUDA_MANAGED = 13
K_DL_FLOAT = 2
K_DL_BFLOAT = 4


class DLDevice(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class DLDataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class DLTensor(ctypes.Structure):
    _fields_ = [
        ("data", ctypes.c_void_p),
        ("device", DLDevice),
        ("ndim", ctypes.c_int32),
        ("dtype", DLDataType),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("strides", ctypes.POINTER(ctypes.c_int64)),
        ("byte_offset", ctypes.c_uint64),
    ]


_get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_get_pointer.restype = ctypes.c_void_p
_get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_is_valid = ctypes.pythonapi.PyCapsule_IsValid
_is_valid.restype = ctypes.c_int
_is_valid.argtypes = [ctypes.py_object, ctypes.c_char_p]


def tensor_of_capsule(capsule):
    """The DLTensor inside an unconsumed "dltensor" capsule (valid while the capsule lives).

    The capsule stays unconsumed, so its destructor releases the producer's memory reference
    once the caller drops it; svgear never outlives the call with the pointer.
    """
    if not _is_valid(capsule, b"dltensor"):
        raise TypeError("svgear: __dlpack__() did not return a 'dltensor' capsule")
    # DLManagedTensor starts with its DLTensor, so the capsule's pointer is the DLTensor's.
    return DLTensor.from_address(_get_pointer(capsule, b"dltensor"))


class OwnedDLTensor:
    """A DLTensor built from metadata (shape, strides in elements) that keeps its arrays alive."""

    def __init__(self, data, device_type, device_id, code, bits, shape, strides):
        self.shape = (ctypes.c_int64 * len(shape))(*shape)
        self.strides = (ctypes.c_int64 * len(strides))(*strides)
        self.tensor = DLTensor(
            data=data,
            device=DLDevice(device_type, device_id),
            ndim=len(shape),
            dtype=DLDataType(code, bits, 1),
            shape=self.shape,
            strides=self.strides,
            byte_offset=0,
        )
