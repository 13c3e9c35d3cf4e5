# The GGUF file layout this module reads (versions 2 and 3; everything little-endian):
#
#   magic       4 bytes   "GGUF"
#   version     u32       2 or 3 (v1 had 32-bit counts and lengths; v3 allows big-endian files,
#                         which we refuse: their version field reads 0x03000000 here)
#   n_tensors   u64
#   n_kv        u64
#   n_kv x metadata pair:
#       key     string    string = u64 byte length + that many UTF-8 bytes, no terminator
#       type    u32       0 u8, 1 i8, 2 u16, 3 i16, 4 u32, 5 i32, 6 f32, 7 bool (1 byte),
#                         8 string, 9 array, 10 u64, 11 i64, 12 f64
#       value   by type   array = element type (u32) + u64 count + the elements
#                         (arrays may hold arrays)
#   n_tensors x tensor info:
#       name    string
#       n_dims  u32       at most 4 (0: a scalar, one element)
#       dims    n_dims x u64, ne0 first: ne0 is the contiguous row length
#       type    u32       a ggml_type id (runtime.ggml_types)
#       offset  u64       of the tensor's data, from the start of the data section;
#                         a multiple of the alignment
#   padding     zeros up to a multiple of `general.alignment` (default 32) from the GGUF start
#   data        the tensors' bytes
"""Fast, strict GGUF reader over a buffer and an offset, copying nothing.

The runtime starts here, so reading a header must cost milliseconds even for a vocabulary of
262,144 tokens: numbers and tensors are numpy views of the memory-mapped file, and string
arrays are decoded only when someone reads them. Every structural fact is checked before it
is used, so a damaged or hostile file raises GGUFError (with the offset of the problem)
instead of allocating what the file could not hold, hanging, or crashing further on.

Strings: keys, string values and tensor names must be valid UTF-8 (GGUFError otherwise).
Strings inside arrays (token vocabularies) are decoded on access with errors="replace", because
some converted vocabularies hold tokens that are fragments of multi-byte characters; a
tokenizer that needs the exact bytes reads them with StringArray.bytes_at / bytes_list
(runtime/gguf_strings.py).
"""

from __future__ import annotations

import hashlib
import mmap
import os
import struct
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

import numpy as np

from runtime.ggml_types import GGMLType, UnsupportedTypeError, ggml_type
from runtime.gguf_strings import StringArray, skip_strings

MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4
# Nesting deeper than this is refused so a hostile file cannot exhaust Python's stack.
MAX_ARRAY_DEPTH = 16

_HEADER_BYTES = 24
_MIN_KV_BYTES = 8 + 4 + 1  # empty key, type, 1-byte value
_MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8  # empty name, n_dims = 0, type, offset
_INT64_LIMIT = 1 << 63

_DAMAGED = "the file is damaged or truncated; download or convert the model again"
_NOT_GGUF = "pass a .gguf model file"


class GGUFError(Exception):
    """A file that is not a GGUF file this reader can trust.

    `problem` says what is wrong and where (offsets count from the start of the GGUF),
    `hint` what the user can do about it; str() is "GGUF: <problem>".
    """

    def __init__(self, problem: str, offset: int | None = None, hint: str = _DAMAGED):
        super().__init__(f"GGUF: {problem}")
        self.problem = problem
        self.offset = offset
        self.hint = hint


class ValueType(IntEnum):
    """GGUF metadata value types (ids as stored in the file)."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


# Fixed-size value types: struct reader for a scalar, numpy dtype for an array of them.
_FIXED: dict[ValueType, tuple[struct.Struct, np.dtype]] = {
    ValueType.UINT8: (struct.Struct("<B"), np.dtype("u1")),
    ValueType.INT8: (struct.Struct("<b"), np.dtype("i1")),
    ValueType.UINT16: (struct.Struct("<H"), np.dtype("<u2")),
    ValueType.INT16: (struct.Struct("<h"), np.dtype("<i2")),
    ValueType.UINT32: (struct.Struct("<I"), np.dtype("<u4")),
    ValueType.INT32: (struct.Struct("<i"), np.dtype("<i4")),
    ValueType.FLOAT32: (struct.Struct("<f"), np.dtype("<f4")),
    ValueType.BOOL: (struct.Struct("<B"), np.dtype("?")),
    ValueType.UINT64: (struct.Struct("<Q"), np.dtype("<u8")),
    ValueType.INT64: (struct.Struct("<q"), np.dtype("<i8")),
    ValueType.FLOAT64: (struct.Struct("<d"), np.dtype("<f8")),
}
_INTEGER_TYPES = frozenset(
    {ValueType.UINT8, ValueType.INT8, ValueType.UINT16, ValueType.INT16, ValueType.UINT32,
     ValueType.INT32, ValueType.UINT64, ValueType.INT64}
)
_U32 = struct.Struct("<I")
_U64 = struct.Struct("<Q")


def _type_name(type_id: int) -> str:
    try:
        return ValueType(type_id).name.lower()
    except ValueError:
        return f"type {type_id}"


@dataclass(frozen=True, eq=False)
class TensorInfo:
    """One tensor: what it is, and a zero-copy uint8 view of its bytes."""

    name: str
    type: GGMLType
    shape: tuple[int, ...]  # GGUF order: shape[0] (ne0) is the contiguous row length
    n_elements: int
    n_bytes: int
    offset: int  # absolute offset of the data in the source buffer
    data: np.ndarray = field(repr=False)


class GGUFFile:
    """A parsed GGUF header over a path or a buffer, at `offset` (optionally `size` bytes long).

    source: a path (opened read-only and memory-mapped) or any buffer (bytes, bytearray,
    mmap, memoryview, uint8 ndarray). Nothing is copied: metadata arrays and tensor data are
    read-only numpy views of the source, and stay valid for as long as they are referenced,
    even after close().

    Attributes: version; metadata (key -> value, in file order) and metadata_types
    (key -> ValueType); tensors (name -> TensorInfo, in file order); alignment; offset (where
    the GGUF starts in the source) and size (its length); data_offset (absolute offset of the
    data section). Metadata values are int, float, bool, str, a numpy array (numbers), a
    StringArray, or a list (array of arrays).
    """

    def __init__(self, source: str | os.PathLike | Any, offset: int = 0, size: int | None = None):
        if offset < 0 or (size is not None and size < 0):
            raise ValueError(f"offset and size must not be negative (got {offset}, {size})")
        self.path: Path | None = None
        self._mmap: mmap.mmap | None = None
        if isinstance(source, (str, os.PathLike)):
            self.path = Path(source)
            with open(self.path, "rb") as f:
                length = os.fstat(f.fileno()).st_size
                if length == 0:
                    raise GGUFError("the file is empty (0 bytes)", 0, _NOT_GGUF)
                self._mmap = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
            source = self._mmap
        whole = memoryview(source)
        if whole.ndim != 1 or whole.itemsize != 1:
            whole = whole.cast("B")
        if offset > len(whole):
            raise GGUFError(
                f"the GGUF would start at offset {offset}, past the end of the "
                f"{len(whole)}-byte buffer", None)
        if size is None:
            size = len(whole) - offset
        elif offset + size > len(whole):
            raise GGUFError(
                f"the GGUF should be {size} bytes at offset {offset}, but the buffer ends "
                f"{offset + size - len(whole)} bytes short of that", None)
        view = whole[offset:offset + size]
        # String arrays decode fastest by slicing an object whose slices are bytes.
        if isinstance(source, (bytes, bytearray, mmap.mmap)):
            src, src_base = source, offset
        else:
            src, src_base = view, 0
        self.offset = offset
        self.size = size
        parsed = _Parser(view, src, src_base, offset).parse()
        self.version: int = parsed.version
        self.metadata: dict[str, Any] = parsed.metadata
        self.metadata_types: dict[str, ValueType] = parsed.metadata_types
        self.alignment: int = parsed.alignment
        self.data_offset: int = offset + parsed.data_offset
        self._metadata_bytes = np.frombuffer(view, np.uint8, parsed.metadata_end - _HEADER_BYTES,
                                             _HEADER_BYTES)
        self.tensors: dict[str, TensorInfo] = {t.name: t for t in parsed.tensors}

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)

    def metadata_digest(self) -> str:
        """sha256 of the key/value section as stored: the same exactly when every key and
        value is (what a cache of something built from the metadata is keyed on)."""
        return hashlib.sha256(self._metadata_bytes).hexdigest()

    def close(self) -> None:
        """Let go of the file. Views handed out earlier keep their part of the mapping alive."""
        self.metadata = {}
        self.metadata_types = {}
        self.tensors = {}
        self._metadata_bytes = np.empty(0, np.uint8)
        if self._mmap is not None:
            try:
                self._mmap.close()
            except BufferError:
                pass  # views are still referenced; the mapping goes when the last one does
            self._mmap = None

    def __enter__(self) -> GGUFFile:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        where = str(self.path) if self.path else "buffer"
        return (f"<GGUFFile {where} v{self.version}: {len(self.metadata)} keys, "
                f"{len(self.tensors)} tensors>")


@dataclass
class _Parsed:
    version: int
    metadata: dict[str, Any]
    metadata_types: dict[str, ValueType]
    alignment: int
    metadata_end: int  # relative to the GGUF start: where the key/values end
    data_offset: int  # relative to the GGUF start
    tensors: list[TensorInfo]


class _Parser:
    """One pass over the header; positions are relative to the GGUF start."""

    def __init__(self, view: memoryview, src: Any, src_base: int, base: int):
        self.base = base  # where the GGUF starts in the source, for TensorInfo.offset
        self.view = view
        self.size = len(view)
        self.src = src
        self.src_base = src_base
        self.bytes = np.frombuffer(view, np.uint8)
        self.bytes.flags.writeable = False

    # -- primitives -------------------------------------------------------------------------

    def past_end(self, what: str, pos: int) -> GGUFError:
        return GGUFError(
            f"{what} at offset {pos} runs past the end of the file ({self.size} bytes)", pos)

    def too_short(self) -> GGUFError:
        return GGUFError(f"the file is only {self.size} bytes, too short for a GGUF header "
                         f"({_HEADER_BYTES} bytes)", 0)

    def u32(self, pos: int, what: str) -> int:
        if pos + 4 > self.size:
            raise self.past_end(what, pos)
        return _U32.unpack_from(self.view, pos)[0]

    def u64(self, pos: int, what: str) -> int:
        if pos + 8 > self.size:
            raise self.past_end(what, pos)
        return _U64.unpack_from(self.view, pos)[0]

    def string(self, pos: int, what: str) -> tuple[str, int]:
        n = self.u64(pos, f"length of {what}")
        start = pos + 8
        if n > self.size - start:
            raise GGUFError(
                f"{what} length {n} at offset {pos} runs past the end of the file "
                f"({self.size} bytes)", pos)
        try:
            text = str(self.view[start:start + n], "utf-8")
        except UnicodeDecodeError as e:
            raise GGUFError(
                f"{what} at offset {pos} is not valid UTF-8 (byte {start + e.start}: {e.reason})",
                pos) from None
        return text, start + n

    def check_count(self, count: int, unit_bytes: int, what: str, pos: int, after: int) -> None:
        """A count read at pos must fit the bytes left after `after`, before anything is made."""
        left = max(self.size - after, 0)
        if count > left // unit_bytes:
            raise GGUFError(
                f"{what} {count} at offset {pos} cannot fit in the {left} bytes that follow "
                f"(each takes at least {unit_bytes})", pos)

    # -- metadata values ----------------------------------------------------------------------

    def value(self, pos: int, vtype: int, key: str, depth: int) -> tuple[Any, int]:
        fixed = _FIXED.get(vtype)  # type: ignore[call-overload]
        if fixed is not None:
            reader = fixed[0]
            if pos + reader.size > self.size:
                raise self.past_end(f"{_type_name(vtype)} value of {key!r}", pos)
            v = reader.unpack_from(self.view, pos)[0]
            if vtype == ValueType.BOOL:
                if v > 1:
                    raise GGUFError(f"bool value of {key!r} at offset {pos} is {v}, not 0 or 1", pos)
                v = bool(v)
            return v, pos + reader.size
        if vtype == ValueType.STRING:
            return self.string(pos, f"string value of {key!r}")
        if vtype == ValueType.ARRAY:
            return self.array(pos, key, depth)
        raise GGUFError(f"unknown metadata value type {vtype} for {key!r} at offset {pos - 4}",
                        pos - 4)

    def array(self, pos: int, key: str, depth: int) -> tuple[Any, int]:
        if depth >= MAX_ARRAY_DEPTH:
            raise GGUFError(
                f"arrays in {key!r} nest deeper than {MAX_ARRAY_DEPTH} levels at offset {pos}", pos)
        etype = self.u32(pos, f"element type of array {key!r}")
        count = self.u64(pos + 4, f"length of array {key!r}")
        first = pos + 12
        what = f"count of array {key!r}"
        fixed = _FIXED.get(etype)  # type: ignore[call-overload]
        if fixed is not None:
            dtype = fixed[1]
            self.check_count(count, dtype.itemsize, what, pos + 4, first)
            end = first + count * dtype.itemsize
            raw = self.bytes[first:end]
            if etype == ValueType.BOOL:
                bad = np.flatnonzero(raw > 1)
                if bad.size:
                    at = first + int(bad[0])
                    raise GGUFError(
                        f"bool element of {key!r} at offset {at} is {raw[bad[0]]}, not 0 or 1", at)
            return raw.view(dtype), end
        if etype == ValueType.STRING:
            self.check_count(count, 8, what, pos + 4, first)
            end = self.skip_strings(first, count, key)
            strings = StringArray(self.view, self.src, self.src_base + first, count)
            return strings, end
        if etype == ValueType.ARRAY:
            self.check_count(count, 12, what, pos + 4, first)
            items = []
            p = first
            for _ in range(count):
                item, p = self.array(p, key, depth + 1)
                items.append(item)
            return items, p
        raise GGUFError(f"unknown element type {etype} of array {key!r} at offset {pos}", pos)

    def skip_strings(self, pos: int, count: int, key: str) -> int:
        """Where `count` strings starting at pos end, or a GGUFError naming the one that runs
        past the end of the file."""
        start = pos
        try:
            pos = skip_strings(self.view, pos, count)
        except (struct.error, OverflowError):  # ran off the end; a huge length overflows ssize_t
            pos = self.size + 1
        if pos <= self.size:
            return pos
        # Walk again with checks, to name the culprit.
        pos = start
        for i in range(count):
            n = self.u64(pos, f"length of string {i} of array {key!r}")
            if n > self.size - pos - 8:
                raise GGUFError(
                    f"string length {n} (element {i} of array {key!r}) at offset {pos} runs "
                    f"past the end of the file ({self.size} bytes)", pos)
            pos += 8 + n
        raise AssertionError("unreachable: the fast walk and the checked walk disagree")

    # -- the file -----------------------------------------------------------------------------

    def header(self) -> tuple[int, int, int]:
        size = self.size
        if size == 0:
            raise GGUFError("the file is empty (0 bytes)", 0, _NOT_GGUF)
        magic = bytes(self.view[:4])
        if magic != MAGIC[:len(magic)]:
            raise GGUFError(
                f"not a GGUF file (bad magic 0x{magic.hex()} {magic!r} at offset 0, "
                f"expected {MAGIC!r})", 0, _NOT_GGUF)
        if size < 8:
            raise self.too_short()
        version = self.u32(4, "version")
        if version not in SUPPORTED_VERSIONS:
            swapped = int.from_bytes(version.to_bytes(4, "little"), "big")
            if version == 1:
                raise GGUFError(
                    "GGUF version 1 at offset 4 is obsolete (32-bit counts); only versions 2 "
                    "and 3 are read", 4,
                    "convert the model again with a current llama.cpp (convert_hf_to_gguf.py)")
            if swapped in (1, 2, 3):
                raise GGUFError(
                    f"big-endian GGUF (version field 0x{version:08x} at offset 4); only "
                    f"little-endian files are read", 4,
                    "use the little-endian GGUF of this model (the usual download)")
            raise GGUFError(
                f"unknown GGUF version {version} at offset 4; this reader knows versions 2 and 3",
                4, "use a GGUF v3 file, or a newer modelrun if the format has moved on")
        if size < _HEADER_BYTES:
            raise self.too_short()
        n_tensors = self.u64(8, "tensor count")
        n_kv = self.u64(16, "metadata count")
        self.check_count(n_kv, _MIN_KV_BYTES, "metadata count", 16, _HEADER_BYTES)
        self.check_count(n_tensors, _MIN_TENSOR_INFO_BYTES, "tensor count", 8, _HEADER_BYTES)
        return version, n_tensors, n_kv

    def parse(self) -> _Parsed:
        version, n_tensors, n_kv = self.header()
        pos = _HEADER_BYTES
        metadata: dict[str, Any] = {}
        types: dict[str, ValueType] = {}
        alignment_pos = None
        for _ in range(n_kv):
            key_pos = pos
            key, pos = self.string(pos, "key")
            if key in metadata:
                raise GGUFError(f"duplicate key {key!r} at offset {key_pos}", key_pos)
            vtype = self.u32(pos, f"value type of {key!r}")
            if key == "general.alignment":
                alignment_pos = pos + 4
            metadata[key], pos = self.value(pos + 4, vtype, key, 0)
            types[key] = ValueType(vtype)
        alignment = self.alignment(metadata, types, alignment_pos)
        metadata_end = pos
        self.check_count(n_tensors, _MIN_TENSOR_INFO_BYTES, "tensor count", 8, pos)

        tensors = []
        seen: set[str] = set()
        for _ in range(n_tensors):
            info, pos = self.tensor_info(pos, alignment)
            if info[0] in seen:
                raise GGUFError(f"duplicate tensor name {info[0]!r} in the tensor info at offset "
                                f"{info[-1]}", info[-1])
            seen.add(info[0])
            tensors.append(info)
        data_offset = -(-pos // alignment) * alignment
        return _Parsed(version, metadata, types, alignment, metadata_end, data_offset,
                       self.place_tensors(tensors, data_offset))

    def alignment(self, metadata: dict[str, Any], types: dict[str, ValueType],
                  pos: int | None) -> int:
        if "general.alignment" not in metadata:
            return DEFAULT_ALIGNMENT
        value = metadata["general.alignment"]
        if types["general.alignment"] not in _INTEGER_TYPES:
            raise GGUFError(
                f"general.alignment at offset {pos} is a "
                f"{types['general.alignment'].name.lower()}, not an integer", pos)
        if value <= 0 or value & (value - 1):
            raise GGUFError(f"general.alignment {value} at offset {pos} is not a power of two",
                            pos)
        return value

    def tensor_info(self, pos: int, alignment: int) -> tuple[Any, int]:
        info_pos = pos
        name, pos = self.string(pos, "tensor name")
        n_dims = self.u32(pos, f"dimension count of tensor {name!r}")
        if n_dims > MAX_DIMS:
            raise GGUFError(
                f"tensor {name!r} has {n_dims} dimensions (at offset {pos}); at most {MAX_DIMS} "
                f"are allowed", pos)
        pos += 4
        if pos + 8 * n_dims > self.size:
            raise self.past_end(f"shape of tensor {name!r}", pos)
        shape = struct.unpack_from(f"<{n_dims}Q", self.view, pos)
        n_elements = 1
        for i, d in enumerate(shape):
            if d == 0 or d >= _INT64_LIMIT:
                raise GGUFError(
                    f"tensor {name!r} has dimension {i} = {d} at offset {pos + 8 * i}; "
                    f"dimensions must be positive", pos + 8 * i)
            n_elements *= d
        if n_elements >= _INT64_LIMIT:
            raise GGUFError(
                f"tensor {name!r} has shape {list(shape)} at offset {pos}: {n_elements} elements "
                f"overflow a 64-bit count", pos)
        pos += 8 * n_dims
        type_id = self.u32(pos, f"type of tensor {name!r}")
        try:
            qtype = ggml_type(type_id)
        except UnsupportedTypeError:
            raise GGUFError(f"tensor {name!r} has unknown type id {type_id} at offset {pos}",
                            pos) from None
        row = shape[0] if shape else 1
        if row % qtype.block_elems:
            raise GGUFError(
                f"tensor {name!r} (at offset {info_pos}) has rows of {row} elements, not a "
                f"multiple of {qtype.name}'s block of {qtype.block_elems}", info_pos)
        n_bytes = n_elements // qtype.block_elems * qtype.block_bytes
        pos += 4
        rel = self.u64(pos, f"data offset of tensor {name!r}")
        if rel % alignment:
            raise GGUFError(
                f"tensor {name!r} data offset {rel} (at offset {pos}) is not a multiple of the "
                f"alignment {alignment}", pos)
        return (name, qtype, shape, n_elements, n_bytes, rel, info_pos), pos + 8

    def place_tensors(self, infos: list[tuple], data_offset: int) -> list[TensorInfo]:
        """Bounds and overlap checks, then the views."""
        room = self.size - data_offset
        for name, _, _, _, n_bytes, rel, info_pos in infos:
            if rel > room or n_bytes > room - rel:
                raise GGUFError(
                    f"tensor {name!r} (info at offset {info_pos}) has {n_bytes} bytes of data at "
                    f"offset {data_offset + rel}, past the end of the file ({self.size} bytes)",
                    info_pos)
        by_start = sorted(infos, key=lambda t: t[5])
        for before, after in zip(by_start, by_start[1:]):
            if after[5] < before[5] + before[4]:
                raise GGUFError(
                    f"tensors {before[0]!r} and {after[0]!r} overlap: {before[0]!r} takes bytes "
                    f"{data_offset + before[5]}..{data_offset + before[5] + before[4]}, "
                    f"{after[0]!r} starts at {data_offset + after[5]}", after[6])
        tensors = []
        for name, qtype, shape, n_elements, n_bytes, rel, _ in infos:
            start = data_offset + rel
            tensors.append(TensorInfo(name, qtype, tuple(shape), n_elements, n_bytes,
                                      self.base + start, self.bytes[start:start + n_bytes]))
        return tensors
