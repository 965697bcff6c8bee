"""Safetensors files: the `safetensors` package when importable, else a small reader/writer.

The format: 8-byte little-endian header length, a JSON header mapping each tensor name to
{dtype, shape, data_offsets} (plus an optional "__metadata__" object of strings), then the raw
little-endian tensor bytes. Both paths read and write the same files.
"""
import json
import os
import struct

import numpy as np
import torch

_TO_NAME = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
_FROM_NAME = {name: dtype for dtype, name in _TO_NAME.items()}
# numpy dtype used to carry the raw bytes of each torch dtype (bf16 travels as int16 bits).
_NUMPY_CARRIER = {
    torch.float32: np.float32,
    torch.float16: np.float16,
    torch.bfloat16: np.int16,
    torch.float64: np.float64,
    torch.int64: np.int64,
    torch.int32: np.int32,
    torch.int16: np.int16,
    torch.int8: np.int8,
    torch.uint8: np.uint8,
    torch.bool: np.bool_,
}


def _have_package():
    try:
        import safetensors.torch  # noqa: F401
        return True
    except ImportError:
        return False


def _tensor_bytes(tensor):
    tensor = tensor.detach().to("cpu").contiguous()
    if tensor.dtype == torch.bfloat16:
        tensor = tensor.view(torch.int16)
    array = tensor.numpy()
    return array.astype(array.dtype.newbyteorder("<"), copy=False).tobytes()  # a no-op on little-endian hosts


def save_file(tensors, path, metadata=None, use_package=None):
    """Writes `tensors` (name -> torch.Tensor) and string `metadata` to `path`."""
    metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
    for name, tensor in tensors.items():
        if tensor.dtype not in _TO_NAME:
            raise ValueError("tensor %r: dtype %s cannot be stored" % (name, tensor.dtype))
    if use_package is None:
        use_package = _have_package()
    if use_package:
        from safetensors.torch import save_file as _save

        _save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, str(path),
              metadata=metadata or None)
        return
    header = {}
    if metadata:
        header["__metadata__"] = metadata
    chunks, offset = [], 0
    for name in sorted(tensors):
        data = _tensor_bytes(tensors[name])
        header[name] = {
            "dtype": _TO_NAME[tensors[name].dtype],
            "shape": list(tensors[name].shape),
            "data_offsets": [offset, offset + len(data)],
        }
        chunks.append(data)
        offset += len(data)
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * ((8 - len(text) % 8) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for data in chunks:
            f.write(data)


def read_header(path):
    """Returns (header dict without metadata, metadata dict, data start offset)."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError("%s: shorter than the 8-byte header length" % path)
        (length,) = struct.unpack("<Q", raw)
        size = os.path.getsize(path)
        if length > size - 8:
            raise ValueError("%s: header length %d exceeds the file" % (path, length))
        header = json.loads(f.read(length).decode("utf-8"))
    metadata = header.pop("__metadata__", None) or {}
    return header, metadata, 8 + length


def load_file(path, use_package=None):
    """Returns (tensors: name -> torch.Tensor on CPU, metadata: dict of strings)."""
    if use_package is None:
        use_package = _have_package()
    if use_package:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
            tensors = {name: f.get_tensor(name) for name in f.keys()}
        return tensors, metadata
    header, metadata, start = read_header(path)
    tensors = {}
    with open(path, "rb") as f:
        for name, entry in header.items():
            dtype = _FROM_NAME.get(entry["dtype"])
            if dtype is None:
                raise ValueError("%s: tensor %r has unsupported dtype %s" % (path, name, entry["dtype"]))
            begin, end = entry["data_offsets"]
            f.seek(start + begin)
            data = f.read(end - begin)
            carrier = np.dtype(_NUMPY_CARRIER[dtype]).newbyteorder("<")
            array = np.frombuffer(data, dtype=carrier).astype(_NUMPY_CARRIER[dtype], copy=True)
            tensor = torch.from_numpy(array)
            if dtype == torch.bfloat16:
                tensor = tensor.view(torch.bfloat16)
            tensors[name] = tensor.reshape(entry["shape"])
    return tensors, dict(metadata)
