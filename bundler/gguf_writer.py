"""Writing a GGUF v3 file's header with struct: metadata, tensor infos, alignment padding.

The quantizer (bundler/quantize.py) writes the header from here and streams the tensor
data after it; values come as runtime/gguf.py reads them, so a file's metadata is copied
exactly.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np

from runtime.ggml_types import GGMLType
from runtime.gguf import StringArray, ValueType

_SCALAR_FORMATS = {
    ValueType.UINT8: "<B", ValueType.INT8: "<b", ValueType.UINT16: "<H", ValueType.INT16: "<h",
    ValueType.UINT32: "<I", ValueType.INT32: "<i", ValueType.FLOAT32: "<f", ValueType.BOOL: "<?",
    ValueType.UINT64: "<Q", ValueType.INT64: "<q", ValueType.FLOAT64: "<d",
}
# numpy arrays the reader hands out, by dtype, and how to write their elements
_ARRAY_TYPES = {
    "u1": ValueType.UINT8, "i1": ValueType.INT8, "u2": ValueType.UINT16, "i2": ValueType.INT16,
    "u4": ValueType.UINT32, "i4": ValueType.INT32, "f4": ValueType.FLOAT32, "b1": ValueType.BOOL,
    "u8": ValueType.UINT64, "i8": ValueType.INT64, "f8": ValueType.FLOAT64,
}


def _string(text: str | bytes) -> bytes:
    raw = text.encode("utf-8") if isinstance(text, str) else text
    return struct.pack("<Q", len(raw)) + raw


def _array(value: Any) -> bytes:
    """An array value as GGUF stores it: element type, count, elements."""
    if isinstance(value, StringArray):
        parts = [struct.pack("<IQ", ValueType.STRING, len(value))]
        parts.extend(_string(s) for s in value.bytes_list())
        return b"".join(parts)
    if isinstance(value, np.ndarray):
        etype = _ARRAY_TYPES[value.dtype.kind + str(value.dtype.itemsize)]
        le = value.astype(value.dtype.newbyteorder("<"), copy=False)
        return struct.pack("<IQ", etype, value.size) + le.tobytes()
    if isinstance(value, list):  # an array of arrays (the reader yields [] only for these)
        return struct.pack("<IQ", ValueType.ARRAY, len(value)) + b"".join(_array(v) for v in value)
    raise TypeError(f"cannot write {type(value).__name__} as a GGUF array")


def metadata_bytes(key: str, vtype: ValueType, value: Any) -> bytes:
    """One key/value pair as GGUF stores it."""
    head = _string(key) + struct.pack("<I", vtype)
    if vtype == ValueType.STRING:
        return head + _string(value)
    if vtype == ValueType.ARRAY:
        return head + _array(value)
    return head + struct.pack(_SCALAR_FORMATS[vtype], value)


def aligned(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


def header_bytes(metadata: list[tuple[str, ValueType, Any]],
                 tensors: list[tuple[str, tuple[int, ...], GGMLType, int]], alignment: int) -> bytes:
    """Header, metadata and tensor infos of a GGUF v3 file, padded to where the data starts.

    tensors: (name, shape with ne0 first, type, data offset from the start of the data).
    """
    parts = [b"GGUF", struct.pack("<IQQ", 3, len(tensors), len(metadata))]
    parts.extend(metadata_bytes(k, t, v) for k, t, v in metadata)
    for name, shape, qtype, offset in tensors:
        parts.append(_string(name) + struct.pack(f"<I{len(shape)}QIQ", len(shape), *shape,
                                                 qtype.id, offset))
    head = b"".join(parts)
    return head + bytes(aligned(len(head), alignment) - len(head))
