"""runtime.gguf: round trips through gguf.GGUFWriter, strict validation, hostile files, Gemma."""

from __future__ import annotations

import functools
import struct
import tracemalloc

import gguf
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q
from gguf import GGUFValueType as VT
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from runtime.gguf import GGUFError, GGUFFile, StringArray, TensorInfo, ValueType

# ---------------------------------------------------------------------------------------------
# Raw builders, for files GGUFWriter would never write.


def u32(v: int) -> bytes:
    return struct.pack("<I", v)


def u64(v: int) -> bytes:
    return struct.pack("<Q", v)


def gstr(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return u64(len(b)) + b


def kv(key: str | bytes, vtype: int, payload: bytes) -> bytes:
    return gstr(key) + u32(vtype) + payload


def tensor_info(name: str | bytes, dims: list[int], type_id: int, offset: int) -> bytes:
    return gstr(name) + u32(len(dims)) + b"".join(u64(d) for d in dims) + u32(type_id) + u64(offset)


def build(kvs=(), infos=(), data=b"", *, version=3, n_kv=None, n_tensors=None, alignment=32):
    head = (b"GGUF" + u32(version) + u64(len(infos) if n_tensors is None else n_tensors)
            + u64(len(kvs) if n_kv is None else n_kv))
    body = head + b"".join(kvs) + b"".join(infos)
    if infos or data:
        body += bytes(-len(body) % alignment)
    return body + data


ARCH = kv("general.architecture", VT.STRING, gstr("llama"))
ARCH_END = 24 + len(ARCH)  # where the next key starts when ARCH is the first


def parse_bounded(data) -> GGUFFile | None:
    """Parse and read everything; only GGUFError may come out, and memory stays near the size."""
    tracemalloc.start()
    try:
        try:
            f = GGUFFile(data)
        except GGUFError as e:
            assert e.offset is None or 0 <= e.offset <= len(data), e
            assert str(e).startswith("GGUF: ") and e.hint
            return None
        for value in f.metadata.values():
            touch(value)
        for t in f.tensors.values():
            assert len(t.data.tobytes()) == t.n_bytes
        return f
    finally:
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        assert peak < 1_000_000 + 64 * len(data), f"{peak} bytes traced for a {len(data)}-byte file"


def touch(value) -> None:
    if isinstance(value, StringArray):
        assert len(value.tolist()) == len(value) == len(value.bytes_list())
        if len(value):
            value[0], value[-1], value.bytes_at(len(value) // 2)
    elif isinstance(value, np.ndarray):
        value.tobytes()
    elif isinstance(value, list):
        for item in value:
            touch(item)


def points_into(arr: np.ndarray, buf) -> bool:
    """arr's memory lies inside buf: a view, not a copy."""
    base = np.frombuffer(buf, np.uint8).ctypes.data
    ptr = arr.__array_interface__["data"][0]
    return base <= ptr and ptr + arr.nbytes <= base + len(buf)


# ---------------------------------------------------------------------------------------------
# Round trips through GGUFWriter

SCALARS = [
    ("t.u8", VT.UINT8, 200),
    ("t.i8", VT.INT8, -100),
    ("t.u16", VT.UINT16, 60000),
    ("t.i16", VT.INT16, -30000),
    ("t.u32", VT.UINT32, 4_000_000_000),
    ("t.i32", VT.INT32, -2_000_000_000),
    ("t.f32", VT.FLOAT32, 0.1),
    ("t.true", VT.BOOL, True),
    ("t.false", VT.BOOL, False),
    ("t.str", VT.STRING, "héllo ✓ 世界"),
    ("t.empty", VT.STRING, ""),
    ("t.u64", VT.UINT64, 2**64 - 1),
    ("t.i64", VT.INT64, -(2**63)),
    ("t.f64", VT.FLOAT64, 1e300),
]
NUMERIC_ARRAYS = [
    ("a.u8", VT.UINT8, [0, 1, 255], "u1"),
    ("a.i8", VT.INT8, [-128, 0, 127], "i1"),
    ("a.u16", VT.UINT16, [0, 65535], "<u2"),
    ("a.i16", VT.INT16, [-32768, 32767], "<i2"),
    ("a.u32", VT.UINT32, [0, 2**32 - 1, 7], "<u4"),
    ("a.i32", VT.INT32, [-(2**31), 2**31 - 1], "<i4"),
    ("a.f32", VT.FLOAT32, [0.5, -2.25, 0.1], "<f4"),
    ("a.bool", VT.BOOL, [True, False, True], "?"),
    ("a.u64", VT.UINT64, [2**64 - 1, 0], "<u8"),
    ("a.i64", VT.INT64, [-(2**63), 2**63 - 1], "<i8"),
    ("a.f64", VT.FLOAT64, [1e-300, -1.5], "<f8"),
]
STRINGS = ["", "a", "héllo", "▁the", "<0x0A>", "✓" * 50]
NESTED = [
    ("n.ints", [[1, 2], [3, 4, 5]]),
    ("n.strings", [["a", "b"], ["ccc"]]),
    ("n.deep", [[[1.5]], [[2.5, 3.5], [4.5]]]),
]


def add_all_values(w: gguf.GGUFWriter) -> None:
    for key, vtype, value in SCALARS:
        w.add_key_value(key, value, vtype)
    for key, vtype, values, _ in NUMERIC_ARRAYS:
        w.add_key_value(key, values, VT.ARRAY, sub_type=vtype)
    w.add_key_value("a.str", STRINGS, VT.ARRAY, sub_type=VT.STRING)
    for key, value in NESTED:
        w.add_key_value(key, value, VT.ARRAY)


@pytest.fixture(scope="module")
def all_values_path(tmp_path_factory, write_gguf):
    return write_gguf(tmp_path_factory.mktemp("values") / "values.gguf", add_all_values)


def check_all_values(f: GGUFFile) -> None:
    expected_keys = (["general.architecture"] + [k for k, _, _ in SCALARS]
                     + [k for k, *_ in NUMERIC_ARRAYS] + ["a.str"] + [k for k, _ in NESTED])
    assert list(f.metadata) == expected_keys  # file order
    assert f.get("general.architecture") == "llama"
    assert f.get("no.such.key") is None and f.get("no.such.key", 7) == 7
    for key, vtype, value in SCALARS:
        got = f.metadata[key]
        assert f.metadata_types[key] == ValueType(vtype)
        if vtype == VT.FLOAT32:
            assert got == float(np.float32(value))
        else:
            assert got == value and type(got) is type(value)
    for key, vtype, values, dtype in NUMERIC_ARRAYS:
        got = f.metadata[key]
        assert f.metadata_types[key] == ValueType.ARRAY
        assert isinstance(got, np.ndarray) and got.dtype == np.dtype(dtype)
        assert np.array_equal(got, np.array(values, dtype=dtype))
        assert not got.flags.writeable
    strings = f.metadata["a.str"]
    assert isinstance(strings, StringArray)
    assert len(strings) == len(STRINGS)
    assert strings.tolist() == list(strings) == STRINGS
    assert strings[-1] == STRINGS[-1] and strings[1:3] == STRINGS[1:3]
    assert strings.bytes_list() == [s.encode() for s in STRINGS]
    ints, strs, deep = (f.metadata[k] for k, _ in NESTED)
    assert [a.tolist() for a in ints] == [[1, 2], [3, 4, 5]] and ints[0].dtype == np.int32
    assert [s.tolist() for s in strs] == [["a", "b"], ["ccc"]]
    assert [[a.tolist() for a in inner] for inner in deep] == [[[1.5]], [[2.5, 3.5], [4.5]]]


def test_strings_near_the_start_are_found_without_indexing_the_array(all_values_path):
    with GGUFFile(all_values_path) as f:
        strings = f.metadata["a.str"]
        assert [strings.bytes_at(i) for i in range(len(STRINGS))] == [s.encode() for s in STRINGS]
        assert strings[1] == STRINGS[1] and strings._starts is None  # walked to, not indexed
        assert strings.tolist() == STRINGS and strings._starts is not None


def test_every_value_type_round_trips_v3(all_values_path):
    with GGUFFile(all_values_path) as f:
        assert f.version == 3
        assert f.tensors == {} and f.alignment == 32
        check_all_values(f)


def test_v2_file_reads_the_same(all_values_path):
    # GGUF v2 moved counts, string lengths and dimensions from 32 to 64 bits (v1 had 32);
    # v3 only added big-endian files. A little-endian v3 file is therefore a valid v2 file
    # once its version field says 2.
    data = bytearray(all_values_path.read_bytes())
    assert data[4:8] == u32(3)
    data[4:8] = u32(2)
    f = GGUFFile(bytes(data))
    assert f.version == 2
    check_all_values(f)


def test_v1_is_refused_with_a_way_out(all_values_path):
    data = bytearray(all_values_path.read_bytes())
    data[4:8] = u32(1)
    with pytest.raises(GGUFError, match="version 1") as e:
        GGUFFile(bytes(data))
    assert e.value.offset == 4 and "convert" in e.value.hint


def test_big_endian_is_refused(tmp_path, write_gguf):
    path = write_gguf(tmp_path / "be.gguf", lambda w: w.add_uint32("x", 1),
                      endianess=gguf.GGUFEndian.BIG)
    with pytest.raises(GGUFError, match="big-endian") as e:
        GGUFFile(path)
    assert e.value.offset == 4 and "little-endian" in e.value.hint


def test_string_arrays_decode_invalid_utf8_with_replacement():
    # Decided: keys, string values and tensor names must be UTF-8 (see test_rejects), but
    # strings in arrays (vocabularies) may hold partial characters; they decode with U+FFFD
    # and their exact bytes stay available.
    tokens = [b"ok", b"\xe2\x96", b"\xff", b""]
    payload = u32(VT.STRING) + u64(len(tokens)) + b"".join(gstr(t) for t in tokens)
    f = GGUFFile(build([ARCH, kv("tokenizer.ggml.tokens", VT.ARRAY, payload)]))
    arr = f.metadata["tokenizer.ggml.tokens"]
    assert arr.tolist() == ["ok", "\ufffd", "\ufffd", ""]
    assert arr[2] == "\ufffd" and arr.bytes_at(1) == b"\xe2\x96" and arr.bytes_at(-2) == b"\xff"
    assert arr.bytes_list() == tokens
    with pytest.raises(IndexError):
        arr[4]
    with pytest.raises(IndexError):
        arr.bytes_at(-5)


def test_empty_and_deeply_nested_arrays_parse():
    empty = kv("e", VT.ARRAY, u32(VT.UINT32) + u64(0))
    empty_strings = kv("es", VT.ARRAY, u32(VT.STRING) + u64(0))
    nested_empty = kv("ne", VT.ARRAY, u32(VT.ARRAY) + u64(2) + (u32(VT.INT8) + u64(0)) * 2)
    f = GGUFFile(build([ARCH, empty, empty_strings, nested_empty]))
    assert f.metadata["e"].dtype == np.uint32 and f.metadata["e"].size == 0
    assert len(f.metadata["es"]) == 0 and f.metadata["es"].tolist() == []
    assert [a.size for a in f.metadata["ne"]] == [0, 0]


# ---------------------------------------------------------------------------------------------
# Tensors

@functools.cache
def tensor_cases():
    """(name, numpy array to write, raw_dtype or None, GGML type name, GGUF shape)."""
    rng = np.random.default_rng(0)
    f32 = rng.standard_normal((3, 8)).astype(np.float32)
    f16 = rng.standard_normal((2, 16)).astype(np.float16)
    i8 = rng.integers(-128, 128, (5,), dtype=np.int8)
    i32 = rng.integers(-(2**31), 2**31, (2, 2, 3), dtype=np.int32)
    q8 = gguf.quants.quantize(rng.standard_normal((4, 64)).astype(np.float32), Q.Q8_0)
    bf16 = gguf.quants.quantize(rng.standard_normal((2, 32)).astype(np.float32), Q.BF16)
    q4k = rng.integers(0, 256, (3, 2 * 144), dtype=np.uint8)  # raw blocks: 3 rows of 512
    return [
        ("f32", f32, None, "F32", (8, 3)),
        ("f16", f16, None, "F16", (16, 2)),
        ("i8", i8, None, "I8", (5,)),
        ("i32", i32, None, "I32", (3, 2, 2)),
        ("q8_0", q8, Q.Q8_0, "Q8_0", (64, 4)),
        ("bf16", bf16, Q.BF16, "BF16", (32, 2)),
        ("q4_k", q4k, Q.Q4_K, "Q4_K", (512, 3)),
    ]


@pytest.fixture(scope="module")
def tensors_path(tmp_path_factory, write_gguf):
    def add(w):
        w.add_custom_alignment(64)
        w.add_block_count(1)
        for name, arr, raw_dtype, _, _ in tensor_cases():
            w.add_tensor(name, arr, raw_dtype=raw_dtype)

    return write_gguf(tmp_path_factory.mktemp("tensors") / "tensors.gguf", add)


def check_tensors(f: GGUFFile, base: int = 0) -> None:
    cases = tensor_cases()
    assert list(f.tensors) == [c[0] for c in cases]
    assert f.alignment == 64 and (f.data_offset - base) % 64 == 0
    for name, arr, _, type_name, shape in cases:
        t = f.tensors[name]
        assert isinstance(t, TensorInfo) and t.name == name
        assert t.type.name == type_name and t.shape == shape
        assert t.n_elements == int(np.prod(shape))
        assert t.n_bytes == arr.nbytes == t.data.nbytes
        assert t.data.dtype == np.uint8 and t.data.ndim == 1 and not t.data.flags.writeable
        assert (t.offset - f.data_offset) % 64 == 0 and t.offset >= f.data_offset
        assert t.data.tobytes() == arr.tobytes()


def test_tensor_views_match_what_was_written(tensors_path):
    with GGUFFile(tensors_path) as f:
        check_tensors(f)
        # Quantized data reads back as the values that were quantized.
        q8 = f.tensors["q8_0"]
        want = gguf.quants.dequantize(tensor_cases()[4][1], Q.Q8_0)
        assert np.array_equal(gguf.quants.dequantize(q8.data.reshape(4, -1), Q.Q8_0), want)


def test_views_are_zero_copy(tensors_path, all_values_path):
    buf = bytearray(tensors_path.read_bytes())
    t = GGUFFile(buf).tensors["i8"]
    assert points_into(t.data, buf) and not points_into(t.data.copy(), buf)
    buf[t.offset] ^= 0xFF
    assert t.data[0] == (tensor_cases()[2][1].view(np.uint8)[0] ^ 0xFF)
    values = bytearray(all_values_path.read_bytes())
    assert points_into(GGUFFile(values).metadata["a.u64"], values)


def test_reads_at_an_offset_inside_a_bigger_buffer(tensors_path, tmp_path):
    gguf_bytes = tensors_path.read_bytes()
    start = 65536
    blob = bytes(range(256)) * (start // 256) + gguf_bytes + b"trailing ZIP records" * 100
    for source in (blob, memoryview(blob), bytearray(blob), np.frombuffer(blob, np.uint8)):
        f = GGUFFile(source, offset=start)
        assert f.offset == start and f.data_offset > start
        check_tensors(f, base=start)
        assert f.tensors["f32"].offset == start + GGUFFile(gguf_bytes).tensors["f32"].offset
    path = tmp_path / "container.bin"
    path.write_bytes(blob)
    with GGUFFile(path, offset=start, size=len(gguf_bytes)) as f:
        check_tensors(f, base=start)
        assert f.metadata["llama.block_count"] == 1
    # The GGUF's own length bounds it: cut one byte short, the last tensor is out of bounds.
    with pytest.raises(GGUFError, match="past the end"):
        GGUFFile(blob, offset=start, size=len(gguf_bytes) - 64 - 1)
    with pytest.raises(GGUFError, match="past the end of the"):
        GGUFFile(blob, offset=len(blob) + 1)
    with pytest.raises(GGUFError, match="short"):
        GGUFFile(blob, offset=start, size=len(blob))


def test_string_arrays_from_every_kind_of_source(all_values_path):
    data = all_values_path.read_bytes()
    for source in (data, bytearray(data), memoryview(data), np.frombuffer(data, np.uint8)):
        strings = GGUFFile(source).metadata["a.str"]
        assert strings.tolist() == STRINGS and strings[5] == STRINGS[5]


def test_views_outlive_close(tensors_path):
    f = GGUFFile(tensors_path)
    t = f.tensors["f32"]
    f.close()
    assert f.tensors == {} and f.metadata == {}
    assert t.data.tobytes() == tensor_cases()[0][1].tobytes()
    f.close()  # twice is fine


def test_scalar_tensor_and_unpadded_end():
    data = struct.pack("<f", 2.5)
    f = GGUFFile(build([ARCH], [tensor_info("s", [], 0, 0)], data))
    t = f.tensors["s"]
    assert t.shape == () and t.n_elements == 1 and t.data.view("<f4")[0] == 2.5
    assert t.offset + t.n_bytes == len(build([ARCH], [tensor_info("s", [], 0, 0)], data))


# ---------------------------------------------------------------------------------------------
# Strict validation: each bad file gives GGUFError saying what and where

HUGE = 2**64 - 1
ARRAY_AT = ARCH_END + 8 + 1 + 4  # value of a 1-letter key after ARCH
T0 = ARCH_END  # first tensor info, after ARCH as the only key


def deep_array(levels: int) -> bytes:
    return u32(VT.ARRAY) + u64(1) + deep_array(levels - 1) if levels else u32(VT.UINT8) + u64(0)


REJECTS = [
    ("bad magic", b"PK\x03\x04" + bytes(40), "not a GGUF file (bad magic 0x504b0304", 0),
    ("empty", b"", "empty", 0),
    ("short magic", b"GG", "too short", 0),
    ("short header", b"GGUF" + u32(3) + u64(0), "too short", 0),
    ("unknown version", build(version=4), "unknown GGUF version 4", 4),
    ("big-endian", b"GGUF" + struct.pack(">I", 3) + bytes(16), "big-endian", 4),
    ("kv count", build(n_kv=2**63), "metadata count 9223372036854775808 at offset 16 cannot fit", 16),
    ("tensor count", build(n_tensors=HUGE), f"tensor count {HUGE} at offset 8 cannot fit", 8),
    ("tensor count after keys", build([ARCH], n_tensors=1), "tensor count 1 at offset 8", 8),
    ("key length", build(n_kv=1) + u64(HUGE) + b"abc" + bytes(16),
     f"key length {HUGE} at offset 24 runs past the end of the file", 24),
    ("key not utf-8", build([kv(b"\xffkey", VT.UINT32, u32(1))]), "key at offset 24 is not valid UTF-8", 24),
    ("string length", build([ARCH, kv("s", VT.STRING, u64(HUGE))]), f"value of 's' length {HUGE}",
     ARRAY_AT),
    ("string not utf-8", build([ARCH, kv("s", VT.STRING, gstr(b"a\xc3("))]), "not valid UTF-8",
     ARRAY_AT),
    ("u8 array count", build([ARCH, kv("a", VT.ARRAY, u32(VT.UINT8) + u64(2**63))]),
     "count of array 'a' 9223372036854775808", ARRAY_AT + 4),
    ("f64 array count", build([ARCH, kv("a", VT.ARRAY, u32(VT.FLOAT64) + u64(2**61) + bytes(64))]),
     "count of array 'a' 2305843009213693952", ARRAY_AT + 4),
    ("string array count", build([ARCH, kv("a", VT.ARRAY, u32(VT.STRING) + u64(2**63))]),
     "count of array 'a'", ARRAY_AT + 4),
    ("nested array count", build([ARCH, kv("a", VT.ARRAY, u32(VT.ARRAY) + u64(HUGE))]),
     "count of array 'a'", ARRAY_AT + 4),
    ("string element length",
     build([ARCH, kv("a", VT.ARRAY, u32(VT.STRING) + u64(2) + gstr("x") + u64(1000) + b"yy")]),
     "string length 1000 (element 1 of array 'a')", ARRAY_AT + 12 + 9),
    ("string element huge",
     build([ARCH, kv("a", VT.ARRAY, u32(VT.STRING) + u64(3) + u64(HUGE) + bytes(16))]),
     f"string length {HUGE} (element 0 of array 'a')", ARRAY_AT + 12),
    ("value type", build([ARCH, kv("v", 13, bytes(8))]), "unknown metadata value type 13", ARRAY_AT - 4),
    ("element type", build([ARCH, kv("a", VT.ARRAY, u32(13) + u64(0))]), "unknown element type 13",
     ARRAY_AT),
    ("bool value", build([ARCH, kv("b", VT.BOOL, b"\x02")]), "bool value of 'b' at offset", ARRAY_AT),
    ("bool element", build([ARCH, kv("b", VT.ARRAY, u32(VT.BOOL) + u64(3) + b"\x00\x01\x07")]),
     "bool element of 'b'", ARRAY_AT + 14),
    ("nesting", build([ARCH, kv("a", VT.ARRAY, deep_array(40))]), "nest deeper than 16", ARRAY_AT + 16 * 12),
    ("duplicate key", build([ARCH, ARCH]), "duplicate key 'general.architecture'", ARCH_END),
    ("alignment 48", build([ARCH, kv("general.alignment", VT.UINT32, u32(48))]), "48 at offset", None),
    ("alignment 0", build([ARCH, kv("general.alignment", VT.UINT32, u32(0))]), "not a power of two", None),
    ("alignment string", build([ARCH, kv("general.alignment", VT.STRING, gstr("32"))]),
     "not an integer", None),
    ("5 dims", build([ARCH], [tensor_info("t", [1, 1, 1, 1, 1], 0, 0)], bytes(4)),
     "tensor 't' has 5 dimensions", T0 + 9),
    ("zero dim", build([ARCH], [tensor_info("t", [4, 0], 0, 0)], bytes(16)),
     "dimension 1 = 0", T0 + 13 + 8),
    ("negative dim", build([ARCH], [tensor_info("t", [2**63], 0, 0)], bytes(16)),
     "dimensions must be positive", T0 + 13),
    ("element overflow", build([ARCH], [tensor_info("t", [2**32, 2**31], 0, 0)], bytes(16)),
     "overflow", T0 + 13),
    ("type id 4", build([ARCH], [tensor_info("t", [4], 4, 0)], bytes(16)), "unknown type id 4", T0 + 21),
    ("type id 99", build([ARCH], [tensor_info("t", [4], 99, 0)], bytes(16)), "unknown type id 99",
     T0 + 21),
    ("row length", build([ARCH], [tensor_info("t", [100, 2], 12, 0)], bytes(512)),
     "rows of 100 elements, not a multiple of Q4_K's block of 256", T0),
    ("unaligned", build([ARCH], [tensor_info("t", [4], 0, 16)], bytes(64)),
     "data offset 16 (at offset", None),
    ("out of bounds", build([ARCH], [tensor_info("t", [1000], 0, 0)], bytes(64)),
     "has 4000 bytes of data at offset", T0),
    ("offset out of bounds", build([ARCH], [tensor_info("t", [4], 0, 2**63)], bytes(64)),
     "past the end of the file", T0),
    ("overlap", build([ARCH], [tensor_info("a", [16], 0, 0), tensor_info("b", [16], 0, 32)], bytes(96)),
     "tensors 'a' and 'b' overlap", None),
    ("duplicate tensor", build([ARCH], [tensor_info("a", [8], 0, 0), tensor_info("a", [8], 0, 32)],
                               bytes(64)), "duplicate tensor name 'a'", None),
    ("tensor name utf-8", build([ARCH], [tensor_info(b"\xc0\x80", [4], 0, 0)], bytes(16)),
     "tensor name at offset", T0),
]


@pytest.mark.parametrize("data, fragment, offset", [r[1:] for r in REJECTS], ids=[r[0] for r in REJECTS])
def test_rejects(data, fragment, offset):
    with pytest.raises(GGUFError) as e:
        GGUFFile(data)
    assert fragment in str(e.value)
    if offset is not None:
        assert e.value.offset == offset, str(e.value)
    assert str(e.value).startswith("GGUF: ") and e.value.hint
    assert parse_bounded(data) is None  # and memory stays bounded on the way


def test_bad_magic_and_version_hints():
    with pytest.raises(GGUFError) as e:
        GGUFFile(b"\x7fELF" + bytes(100))
    assert e.value.hint == "pass a .gguf model file"


def test_error_names_a_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        GGUFFile(tmp_path / "nope.gguf")
    (tmp_path / "empty.gguf").write_bytes(b"")
    with pytest.raises(GGUFError, match="empty"):
        GGUFFile(tmp_path / "empty.gguf")


# ---------------------------------------------------------------------------------------------
# Hostile files: mutate and truncate valid ones; only GGUFError may ever come out


@pytest.fixture(scope="module")
def seeds(tmp_path_factory, write_gguf) -> list[bytes]:
    folder = tmp_path_factory.mktemp("seeds")

    def rich(w):
        w.add_name("tiny")
        w.add_uint32("t.u32", 7)
        w.add_float64("t.f64", 0.25)
        w.add_bool("t.b", True)
        w.add_key_value("a.i16", [1, -2, 3], VT.ARRAY, sub_type=VT.INT16)
        w.add_key_value("a.b", [True, False], VT.ARRAY, sub_type=VT.BOOL)
        w.add_key_value("tokenizer.ggml.tokens", ["<s>", "a", "▁b", ""], VT.ARRAY)
        w.add_key_value("n.x", [[1, 2], [3]], VT.ARRAY)
        w.add_tensor("w.f32", np.arange(4, dtype=np.float32))
        w.add_tensor("w.q8", np.zeros((1, 34), np.uint8), raw_dtype=Q.Q8_0)
        w.add_tensor("w.q4k", np.ones((1, 144), np.uint8), raw_dtype=Q.Q4_K)

    def small(w):
        w.add_custom_alignment(16)
        w.add_tensor("x", np.arange(3, dtype=np.float32))

    return [write_gguf(folder / "rich.gguf", rich).read_bytes(),
            write_gguf(folder / "small.gguf", small).read_bytes()]


def test_every_truncation_is_a_gguf_error(seeds):
    for data in seeds:
        f = GGUFFile(data)
        needed = max(t.offset + t.n_bytes for t in f.tensors.values())
        for cut in range(len(data)):
            if cut < needed:
                with pytest.raises(GGUFError):
                    GGUFFile(data[:cut])
            else:
                assert list(GGUFFile(data[:cut]).tensors) == list(f.tensors)


def test_every_byte_set_to_ff_or_zero(seeds):
    data = seeds[0]
    for value in (0x00, 0xFF):
        for i in range(len(data)):
            mutated = bytearray(data)
            mutated[i] = value
            try:
                GGUFFile(bytes(mutated))
            except GGUFError:
                pass


INTERESTING = [0, 1, 2, 3, 4, 7, 8, 12, 13, 16, 31, 32, 255, 256, 2**16, 2**31 - 1, 2**31,
               2**32 - 1, 2**32, 2**62, 2**63 - 1, 2**63, 2**64 - 1]

mutation = st.one_of(
    st.tuples(st.just(1), st.integers(0, 2**20), st.integers(0, 255)),
    st.tuples(st.just(4), st.integers(0, 2**20), st.sampled_from([v for v in INTERESTING if v < 2**32])),
    st.tuples(st.just(8), st.integers(0, 2**20), st.sampled_from(INTERESTING)),
)


@settings(max_examples=250, deadline=2000, suppress_health_check=[HealthCheck.too_slow])
@given(which=st.integers(0, 1), mutations=st.lists(mutation, max_size=6),
       cut=st.none() | st.integers(0, 2**20))
def test_mutated_files_only_raise_gguf_error(seeds, which, mutations, cut):
    data = bytearray(seeds[which])
    for width, pos, value in mutations:
        pos %= len(data) - width + 1
        data[pos:pos + width] = value.to_bytes(width, "little")
    if cut is not None:
        del data[cut % (len(data) + 1):]
    parse_bounded(bytes(data))


# ---------------------------------------------------------------------------------------------
# The real Gemma file, against gguf.GGUFReader


class PlainArrayGGUFReader(gguf.GGUFReader):
    """GGUFReader over a plain ndarray: slicing np.memmap (a Python subclass) is what makes it
    take ~38 s on Gemma; over a plain view of the same mapping it takes ~8 s."""

    @property
    def data(self):
        return self._plain

    @data.setter
    def data(self, value):
        self._plain = value.view(np.ndarray)


@pytest.fixture(scope="module")
def gemma_pair(gemma_path):
    reader = PlainArrayGGUFReader(gemma_path)
    with GGUFFile(gemma_path) as f:
        yield f, reader


def test_gemma_metadata_matches_gguf_reader(gemma_pair):
    f, reader = gemma_pair
    assert f.version == 3 and f.alignment == reader.alignment == 32
    assert list(f.metadata) == [k for k in reader.fields if not k.startswith("GGUF.")]
    for key, field in reader.fields.items():
        if key.startswith("GGUF."):
            continue
        assert f.metadata_types[key] == field.types[0], key
        if field.types[0] != VT.ARRAY:
            assert f.metadata[key] == field.contents(), key
    assert f.get("general.architecture") == "gemma3"
    assert f.get("gemma3.block_count") == 18
    tokens = f.metadata["tokenizer.ggml.tokens"]
    assert len(tokens) == 262144
    assert tokens.tolist() == reader.fields["tokenizer.ggml.tokens"].contents()
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        assert np.array_equal(f.metadata[key], reader.fields[key].contents()), key
    assert f.metadata["tokenizer.ggml.scores"].dtype == np.float32


def test_gemma_tensor_table_matches_gguf_reader(gemma_pair):
    f, reader = gemma_pair
    assert f.data_offset == reader.data_offset
    assert list(f.tensors) == [t.name for t in reader.tensors]
    assert len(f.tensors) == 236
    for rt in reader.tensors:
        t = f.tensors[rt.name]
        assert t.type.id == int(rt.tensor_type) and t.type.name == rt.tensor_type.name
        assert t.shape == tuple(int(d) for d in rt.shape)
        assert t.n_elements == rt.n_elements and t.n_bytes == rt.n_bytes
        assert t.offset == rt.data_offset
        raw = rt.data.reshape(-1).view(np.uint8)
        assert raw.nbytes == t.n_bytes
        if t.n_bytes <= 1 << 20:
            assert np.array_equal(t.data, raw), rt.name
        else:
            assert np.array_equal(t.data[:4096], raw[:4096]) and np.array_equal(t.data[-4096:], raw[-4096:])
    assert {t.type.name for t in f.tensors.values()} == {"F32", "Q8_0", "Q5_0", "Q4_K", "Q6_K"}
