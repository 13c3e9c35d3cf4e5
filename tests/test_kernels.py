"""Every kernel against the `gguf` package's NumPy dequantization, on random valid blocks.

Blocks are random bytes with their f16 (and E8M0) scale fields replaced by sane values, so every
quant index, sign bit and packed scale takes random values. matvec and matmul are checked
against a float64 product of the reference dequantization with the worst-case bound for
float32 summation, n * 2^-24 * sum|w * x| (Higham's gamma_n): a single wrong weight shifts
the result by about sum|w * x| / n, hundreds of times more.
"""

import importlib

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize as reference_dequantize

from runtime import ggml_types, kernels
from runtime.ggml_types import TYPES, UnsupportedTypeError, ggml_type

FLOAT_TYPES = ["F32", "F16", "BF16"]
ALL_TYPES = [t.name for t in TYPES if t.family]  # every type with kernels
BLOCK_TYPES = [name for name in ALL_TYPES if name not in FLOAT_TYPES]
NO_KERNEL_IDS = [t.id for t in TYPES if not t.family] + [77, -1]  # 77: in no table


def random_blocks(name: str, n_elements: int, rng: np.random.Generator) -> np.ndarray:
    """Random valid bytes holding `n_elements` values of type `name`."""
    if name == "F32":
        return rng.standard_normal(n_elements).astype(np.float32).view(np.uint8)
    if name == "F16":
        return rng.standard_normal(n_elements).astype(np.float16).view(np.uint8)
    if name == "BF16":
        f32 = rng.standard_normal(n_elements).astype(np.float32)
        return (f32.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    t = ggml_type(name)
    n_blocks = n_elements // t.block_elems
    blocks = rng.integers(0, 256, size=(n_blocks, t.block_bytes), dtype=np.uint8)
    for off in t.f16_fields:
        scale = rng.uniform(1e-3, 1e-1, n_blocks) * rng.choice([-1, 1], n_blocks)
        blocks[:, off:off + 2] = scale.astype(np.float16).view(np.uint8).reshape(n_blocks, 2)
    for off in t.e8m0_fields:  # powers of two 2^-13 .. 2^-1 (a random byte overflows float32)
        blocks[:, off] = rng.integers(114, 127, n_blocks)
    return blocks.reshape(-1)


def test_table_agrees_with_gguf_package():
    """Ids, names and block layouts as the gguf package has them (an independent listing)."""
    for t in TYPES:
        q = GGMLQuantizationType[t.name]
        assert (q.value, GGML_QUANT_SIZES[q]) == (t.id, (t.block_elems, t.block_bytes)), t.name
    assert len({t.id for t in TYPES}) == len(TYPES)


def test_named_constants_are_the_table_ids():
    constants = {k: v for k, v in vars(ggml_types).items() if k.isupper() and isinstance(v, int)}
    assert constants == {t.name: t.id for t in TYPES}


@pytest.mark.parametrize("name", ALL_TYPES)
def test_family_module_holds_the_kernels(name):
    t = ggml_type(name)
    module = importlib.import_module(f"runtime.kernels.{t.family}")
    assert callable(getattr(module, f"decode_{name.lower()}"))
    assert any(k.startswith(f"dot_{name.lower()}") for k in vars(module))


@pytest.mark.parametrize("name", BLOCK_TYPES)
def test_f16_fields_are_the_blocks_f16_scales(name):
    """Against gguf's decoder: a NaN in any listed f16 field makes its whole block NaN (each
    one scales every weight), one more in a listed E8M0 field doubles every weight of its
    block, and with the listed fields sane, random bytes elsewhere never decode to NaN or
    inf (an unlisted f16 field would, in about 1 block in 32)."""
    t = ggml_type(name)
    rng = np.random.default_rng(t.id)
    n_blocks = 400
    blocks = random_blocks(name, n_blocks * t.block_elems, rng).reshape(n_blocks, t.block_bytes)
    assert np.all(np.isfinite(reference(blocks.reshape(-1), name, n_blocks * t.block_elems)))
    assert t.f16_fields or t.e8m0_fields
    for off in t.e8m0_fields:
        block = blocks[:1].copy()
        before = reference(block.reshape(-1), name, t.block_elems)
        block[0, off] += 1
        np.testing.assert_array_equal(reference(block.reshape(-1), name, t.block_elems), 2 * before)
    for off in t.f16_fields:
        nan_block = blocks[:1].copy()
        nan_block[0, off:off + 2] = np.array([np.nan], np.float16).view(np.uint8)
        assert np.all(np.isnan(reference(nan_block.reshape(-1), name, t.block_elems))), off


@pytest.mark.parametrize("type_id", NO_KERNEL_IDS)
def test_id_without_kernels_fails_loudly_in_every_kernel(type_id):
    """The dispatch switches raise for an id they have no branch for (past the checks of the
    public entry points), rather than leave the output unwritten."""
    from runtime.kernels import dispatch

    raw = np.zeros(2 * 256, np.uint8)
    x = np.zeros(256, np.float32)
    out = np.zeros(256, np.float32)
    with pytest.raises(ValueError, match="no kernel for this tensor type id"):
        dispatch.decode_blocks(type_id, raw, 0, 1, out, 0)
    with pytest.raises(ValueError, match="no kernel for this tensor type id"):
        dispatch.dot_blocks(type_id, raw, 0, 1, x, 0)
    with pytest.raises(ValueError, match="no kernel for this tensor type id"):
        dispatch.dequantize_kernel(type_id, raw, 1, 2, 1, out)
    with pytest.raises(ValueError, match="no kernel for this tensor type id"):
        dispatch.matvec_kernel(type_id, raw, 1, 2, 1, x, out[:1])
    with pytest.raises(ValueError, match="no kernel for this tensor type id"):
        dispatch.matmul_kernel(type_id, raw, 1, 2, 1, x[None, :1], out[None, :1])


def reference(raw: np.ndarray, name: str, n_elements: int) -> np.ndarray:
    values = reference_dequantize(raw, GGMLQuantizationType[name])
    return np.asarray(values, dtype=np.float32).reshape(-1)[:n_elements]


def cols_for(name: str) -> int:
    return 2 * 256 if name not in FLOAT_TYPES else 200


def float_path(kernel, raw, name, rows, cols, data):
    """The float kernels (dispatch.py) for every type: the public matvec/matmul take the
    integer path (tests/test_q8.py) for the types that have one, and benchmarks compare."""
    from runtime.kernels import dispatch

    t = ggml_type(name)
    out = np.empty(data.shape[:-1] + (rows,), np.float32)
    getattr(dispatch, kernel)(t.id, raw, rows, t.row_bytes(cols), cols // t.block_elems, data, out)
    return out


def assert_close_to_product(got: np.ndarray, w64: np.ndarray, x64: np.ndarray) -> None:
    """got ~ x64 @ w64.T within the float32 summation bound (see the module docstring)."""
    want = x64 @ w64.T
    scale = np.abs(x64) @ np.abs(w64.T)
    bound = w64.shape[1] * 2.0 ** -24 * scale + 1e-30
    err = np.abs(got.astype(np.float64) - want)
    assert np.all(err <= bound), f"worst error {np.max(err / bound):.3g} x the bound"


@pytest.mark.parametrize("name", ALL_TYPES)
def test_dequantize_matches_gguf_reference(name):
    rng = np.random.default_rng(abs(hash(name)) % 2**32)
    n = 8 * cols_for(name)
    raw = random_blocks(name, n, rng)
    np.testing.assert_array_equal(kernels.dequantize(raw, name, n), reference(raw, name, n))


@pytest.mark.parametrize("name", ALL_TYPES)
@pytest.mark.parametrize("rows", [1, 7, 37])
def test_matvec_matches_float64_product(name, rows):
    rng = np.random.default_rng(rows)
    cols = cols_for(name)
    raw = random_blocks(name, rows * cols, rng)
    w64 = reference(raw, name, rows * cols).astype(np.float64).reshape(rows, cols)
    x = rng.standard_normal(cols).astype(np.float32)
    got = float_path("matvec_kernel", raw, name, rows, cols, x)
    assert got.shape == (rows,) and got.dtype == np.float32
    assert_close_to_product(got[None, :], w64, x.astype(np.float64)[None, :])


@pytest.mark.parametrize("name", ALL_TYPES)
@pytest.mark.parametrize("n", [1, 5])
def test_matmul_matches_float64_product(name, n):
    rng = np.random.default_rng(100 + n)
    rows, cols = 37, cols_for(name)
    raw = random_blocks(name, rows * cols, rng)
    w64 = reference(raw, name, rows * cols).astype(np.float64).reshape(rows, cols)
    X = rng.standard_normal((n, cols)).astype(np.float32)
    got = float_path("matmul_kernel", raw, name, rows, cols, X)
    assert got.shape == (n, rows) and got.dtype == np.float32
    assert_close_to_product(got, w64, X.astype(np.float64))


def test_type_given_by_id_or_name_alike():
    rng = np.random.default_rng(0)
    raw = random_blocks("Q4_K", 256 * 4, rng)
    x = rng.standard_normal(256).astype(np.float32)
    by_name = kernels.matvec(raw, "q4_k", 4, 256, x)
    by_id = kernels.matvec(raw, int(GGMLQuantizationType.Q4_K), 4, 256, x)
    np.testing.assert_array_equal(by_name, by_id)


def test_unsupported_type_is_named():
    raw = np.zeros(66, np.uint8)
    with pytest.raises(UnsupportedTypeError, match="IQ2_XXS"):
        kernels.matvec(raw, "IQ2_XXS", 1, 256, np.zeros(256, np.float32))
    with pytest.raises(UnsupportedTypeError, match="NOPE"):
        kernels.dequantize(raw, "NOPE", 32)
    with pytest.raises(UnsupportedTypeError, match="77"):
        kernels.dequantize(raw, 77, 32)


def test_bad_shapes_are_refused_before_reading_memory():
    raw = np.zeros(18 * 4, np.uint8)  # four Q4_0 blocks
    with pytest.raises(ValueError, match="needs 144 bytes"):
        kernels.matvec(raw, "Q4_0", 2, 64 * 2, np.zeros(128, np.float32))
    with pytest.raises(ValueError, match="multiple"):
        kernels.matvec(raw, "Q4_0", 1, 33, np.zeros(33, np.float32))
    with pytest.raises(ValueError, match="columns"):
        kernels.matvec(raw, "Q4_0", 2, 64, np.zeros(65, np.float32))
    with pytest.raises(ValueError, match="batch"):
        kernels.matmul(raw, "Q4_0", 2, 64, np.zeros(64, np.float32))
    with pytest.raises(TypeError, match="uint8"):
        kernels.dequantize(raw.view(np.int8), "Q4_0", 32)


def test_block_matrix_rows_and_checks():
    """BlockMatrix, the checked-once form the model holds: rows decode as gguf's reference
    does, and bad row ids, result arrays and matrices are refused with a clear error."""
    rng = np.random.default_rng(3)
    rows, cols = 5, 512
    raw = random_blocks("Q4_K", rows * cols, rng)
    raw.setflags(write=False)  # as the memory map gives it
    m = kernels.BlockMatrix(raw, ggml_type("Q4_K"), rows, cols)
    want = reference(raw, "Q4_K", rows * cols).reshape(rows, cols)
    np.testing.assert_array_equal(m.rows_f32([3, 0, 3]), want[[3, 0, 3]])
    with pytest.raises(IndexError, match="row 5 is outside"):
        m.rows_f32([1, 5])
    x = rng.standard_normal(cols).astype(np.float32)
    with pytest.raises(ValueError, match="out must be a contiguous float32 array of shape"):
        m.matvec(x, out=np.empty(rows - 1, np.float32))
    with pytest.raises(ValueError, match="out must"):
        m.matmul(x[None, :], out=np.empty((1, rows), np.float64))
    out = np.empty(rows, np.float32)
    assert m.matvec(x, out=out) is out
    with pytest.raises(ValueError, match="needs"):
        kernels.BlockMatrix(raw, "Q4_K", rows + 1, cols)
    with pytest.raises(UnsupportedTypeError, match="IQ2_XXS"):
        kernels.BlockMatrix(raw, "IQ2_XXS", 1, 256)
