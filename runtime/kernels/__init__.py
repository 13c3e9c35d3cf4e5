"""Numba kernels that compute straight on GGUF's quantized blocks.

The public entry points take `raw`, the tensor's bytes as a uint8 array (a zero-copy view
of the memory-mapped file), and never build a float32 copy of a weight matrix. For the
quantized formats with an integer path (q8.py) matvec and matmul round the activations to
8-bit blocks once and take integer dot products, as llama.cpp does; the float formats
decode and multiply block by block (dispatch.py). matvec_many/matmul_many run several
matrices that share one input in one parallel launch.

Importing this package does not import numba (the kernels load on first use), so that
reading a model's header, `--info`, stays fast.
"""

from __future__ import annotations

import hashlib
import importlib.abc
import sys
from pathlib import Path

import numpy as np

from runtime import frozen_build_id, user_cache_home
from runtime import cpu, ggml_types
from runtime.ggml_types import TYPES, GGMLType, UnsupportedTypeError, ggml_type

# The tensor types this build can compute with: those with a kernel family in the table.
SUPPORTED_TYPES = frozenset(t.name for t in TYPES if t.family)


# The frozen runtime (bundler/payload.py) ships its compiled kernels in the onedir beside
# the executable: runtime.BUILD_ID_FILE names the build, KERNEL_CACHE_FOLDER holds
# <build id>/<tier>/.
KERNEL_CACHE_FOLDER = "kernel-cache"


def _frozen() -> bool:
    return bool(getattr(sys, "frozen", False))


def build_id() -> str:
    """What every cached kernel is keyed on.

    Frozen: the id bundler/payload.py wrote beside the executable (a hash of the executable
    itself if it is missing). From source: a hash of every kernel source, of
    runtime/ggml_types.py and of runtime/cpu.py (the tiers' features choose the integer
    kernels' instructions), because Numba keys a function on its own file only, yet inlines
    the kernels it calls from other files and compiles the type ids it switches on as
    constants, so an edit to kquants.py or to the table must make dispatch.py recompile too.
    """
    if _frozen():
        frozen = frozen_build_id()
        if frozen:
            return frozen
        return "exe-" + hashlib.sha256(Path(sys.executable).read_bytes()).hexdigest()[:16]
    sources = sorted(Path(__file__).parent.glob("*.py")) + [Path(ggml_types.__file__), Path(cpu.__file__)]
    return hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]


def user_cache_root() -> Path:
    """~/.cache/modelrun/numba (XDG_CACHE_HOME honoured)."""
    return user_cache_home() / "numba"


def cache_root() -> Path:
    """Frozen: the kernel cache shipped inside the extracted payload; else user_cache_root()."""
    if _frozen():
        return Path(sys.executable).parent / KERNEL_CACHE_FOLDER
    return user_cache_root()


def cache_folder(tier: str) -> Path:
    """Where kernels compiled for `tier` are looked up: <cache root>/<build id>/<tier>."""
    return cache_root() / build_id() / tier


class _LocatorBeforeFirstKernel(importlib.abc.MetaPathFinder):
    """Installs the kernel cache locator just before the first kernel module runs (Numba
    binds a function's cache when it is decorated); until then numba stays unimported."""

    done = False

    def find_spec(self, name, path, target=None):
        if not self.done and name.startswith(__name__ + ".") and name != __name__ + ".cache":
            self.done = True
            from . import cache  # noqa: F401  (installs the locator)
        return None


def _configure_numba_cache() -> None:
    """Pin Numba to a CPU tier (runtime.cpu) and cache the kernels per build and tier
    (runtime.kernels.cache), before any kernel module is decorated.

    Runs at import without importing numba: the locator is installed just before the first
    kernel module runs (or at once, if numba was already imported).
    """
    from runtime import cpu

    try:
        cpu.select_tier()
    except cpu.CpuTierError:
        pass  # numba then targets this CPU; the entry point reports the bad MODELRUN_CPU_TIER
    if "numba" in sys.modules:
        from . import cache  # noqa: F401  (installs the locator)
    elif not any(isinstance(f, _LocatorBeforeFirstKernel) for f in sys.meta_path):
        sys.meta_path.insert(0, _LocatorBeforeFirstKernel())


_configure_numba_cache()


def supported_type(qtype: int | str | GGMLType) -> GGMLType:
    """The type, if this build has kernels for it; a clear error naming it otherwise."""
    t = ggml_type(qtype)
    if t.name not in SUPPORTED_TYPES:
        raise UnsupportedTypeError(
            f"tensor type {t.name} is not supported by this build of modelrun "
            f"(supported: {', '.join(sorted(SUPPORTED_TYPES))})"
        )
    return t


def _raw_bytes(raw: np.ndarray, need: int, what: str) -> np.ndarray:
    raw = np.asarray(raw)
    if raw.dtype != np.uint8:
        raise TypeError(f"raw must be a uint8 array of block bytes, got {raw.dtype}")
    raw = raw.reshape(-1)  # a view for contiguous input
    if not raw.flags.c_contiguous:
        raise ValueError("raw must be contiguous")
    if raw.size < need:
        raise ValueError(f"{what} needs {need} bytes of blocks, raw has only {raw.size}")
    return raw


def _vector(x: np.ndarray, length: int, name: str) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    if x.shape[-1] != length:
        raise ValueError(f"{name} has {x.shape[-1]} columns, the matrix has {length}")
    return x


def dequantize(raw: np.ndarray, qtype: int | str, n_elements: int) -> np.ndarray:
    """The first `n_elements` values stored in `raw`, as float32 (for small tensors and tests)."""
    from .dispatch import dequantize_kernel

    t = supported_type(qtype)
    nbytes = t.row_bytes(n_elements)
    raw = _raw_bytes(raw, nbytes, f"{n_elements} {t.name} elements")
    out = np.empty(n_elements, np.float32)
    dequantize_kernel(t.id, raw, n_elements // t.block_elems, t.block_bytes, t.block_elems, out)
    return out


def _out(out: np.ndarray | None, shape: tuple[int, ...]) -> np.ndarray:
    """A new float32 result, or the caller's, checked to be one the kernels may write."""
    if out is None:
        return np.empty(shape, np.float32)
    if out.shape != shape or out.dtype != np.float32 or not out.flags.c_contiguous:
        raise ValueError(f"out must be a contiguous float32 array of shape {shape}, "
                         f"got {out.dtype} {out.shape}")
    return out


def _readonly(raw: np.ndarray) -> np.ndarray:
    """A read-only view: the kernels take one array type whether the bytes are a memory map
    (read-only) or a test's array, so each compiles once."""
    if raw.flags.writeable:
        raw = raw.view()
        raw.flags.writeable = False
    return raw


class BlockMatrix:
    """A rows x cols matrix stored as GGUF blocks in `raw` (row after row), checked once:
    its type has kernels and raw is a contiguous uint8 array holding every row. Each
    product then checks only its vectors, so a model holds one per weight matrix."""

    __slots__ = ("raw", "type", "rows", "cols", "row_bytes", "row_blocks")

    def __init__(self, raw: np.ndarray, qtype: int | str | GGMLType, rows: int, cols: int):
        self.type = supported_type(qtype)
        self.rows, self.cols = rows, cols
        self.row_bytes = self.type.row_bytes(cols)
        self.row_blocks = cols // self.type.block_elems
        self.raw = _readonly(_raw_bytes(raw, rows * self.row_bytes,
                                        f"a {rows}x{cols} {self.type.name} matrix"))

    def matvec(self, x: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """W @ x: float32[rows] (8-bit activations for the formats with an integer path)."""
        return matvec_many([self], self.cols, x, None if out is None else [out])[0]

    def matmul(self, X: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """X @ W.T for a batch X of n vectors: float32[n, rows]."""
        return matmul_many([self], self.cols, X, None if out is None else [out])[0]

    def rows_f32(self, ids) -> np.ndarray:
        """Rows `ids` as float32[len(ids), cols], decoding only those rows (embedding lookup),
        each on the calling thread: a row is too little work to wake the others for."""
        from .dispatch import decode_blocks

        ids = np.asarray(ids, np.int64).reshape(-1)
        bad = ids[(ids < 0) | (ids >= self.rows)]
        if bad.size:
            raise IndexError(f"row {int(bad[0])} is outside the matrix's {self.rows} rows")
        t, rb = self.type, self.row_bytes
        out = np.empty((ids.size, self.cols), np.float32)
        for i, r in enumerate(ids.tolist()):
            decode_blocks(t.id, self.raw, r * rb, self.row_blocks, out[i], 0)
        return out


# The quantized formats take the integer path (8-bit activations) unless this is off: the
# float kernels stay for tests that isolate another rounding, and for benchmarks.
INTEGER_PATH = True


def _run_many(kernel: str, mats, cols: int, data: np.ndarray, outs) -> list[np.ndarray]:
    """q8.<kernel> over the matrices with an integer path, in one launch, and
    dispatch.<kernel> (float) over the others; data is x (matvec) or X (matmul); mats are
    BlockMatrix objects or (raw, qtype, rows) tuples."""
    from . import dispatch, q8

    mats = [m if isinstance(m, BlockMatrix) else BlockMatrix(m[0], m[1], m[2], cols) for m in mats]
    if any(m.cols != cols for m in mats):
        raise ValueError(f"every matrix must have {cols} columns")
    lead = data.shape[:-1]
    outs = [None] * len(mats) if outs is None else list(outs)
    if len(outs) != len(mats):
        raise ValueError(f"outs must be one array per matrix ({len(mats)}), got {len(outs)}")
    outs = [_out(o, lead + (m.rows,)) for o, m in zip(outs, mats)]
    integer = q8.INTEGER_TYPES if INTEGER_PATH else frozenset()
    fast = [i for i, m in enumerate(mats) if m.type.id in integer]
    if fast:
        getattr(q8, kernel)(np.array([mats[i].type.id for i in fast], np.int64),
                            tuple(mats[i].raw for i in fast),
                            np.array([mats[i].rows for i in fast], np.int64),
                            np.array([mats[i].row_bytes for i in fast], np.int64), cols, data,
                            tuple(outs[i] for i in fast))
    for i, m in enumerate(mats):
        if m.type.id not in integer:
            getattr(dispatch, kernel)(m.type.id, m.raw, m.rows, m.row_bytes, m.row_blocks, data, outs[i])
    return outs


def matvec(raw: np.ndarray, qtype: int | str | GGMLType, rows: int, cols: int, x: np.ndarray,
           out: np.ndarray | None = None) -> np.ndarray:
    """W @ x for the rows x cols matrix W stored in `raw` (GGUF layout: row after row).

    The quantized formats with an integer path (q8.py) round x to 8-bit blocks first, as
    llama.cpp does; the float formats multiply in float32.
    """
    return BlockMatrix(raw, qtype, rows, cols).matvec(x, out)


def matvec_many(mats, cols: int, x: np.ndarray, outs=None) -> list[np.ndarray]:
    """[W @ x for each W in mats] (BlockMatrix objects or (raw, qtype, rows) tuples):
    matrices that share one input (Q, K, V; gate, up) in one parallel launch with one
    quantization of x (formats without an integer path are computed one by one).
    outs: float32[rows] per matrix, or None."""
    x = _vector(x, cols, "x")
    if x.ndim != 1:
        raise ValueError(f"x must be one vector, got shape {x.shape}; use matmul for a batch")
    return _run_many("matvec_kernel", mats, cols, x, outs)


def matmul(raw: np.ndarray, qtype: int | str | GGMLType, rows: int, cols: int, X: np.ndarray,
           out: np.ndarray | None = None) -> np.ndarray:
    """X @ W.T for a batch X of n vectors: float32[n, rows]."""
    return BlockMatrix(raw, qtype, rows, cols).matmul(X, out)


def matmul_many(mats, cols: int, X: np.ndarray, outs=None) -> list[np.ndarray]:
    """[X @ W.T for each W in mats] (BlockMatrix objects or (raw, qtype, rows) tuples), one
    launch and one quantization of X for the formats with an integer path.
    outs: float32[n, rows] per matrix, or None."""
    X = _vector(X, cols, "X")
    if X.ndim != 2:
        raise ValueError(f"X must be a batch of vectors [n, {cols}], got shape {X.shape}")
    return _run_many("matmul_kernel", mats, cols, X, outs)


def quantize_activations(x: np.ndarray, block: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """x rounded to 8-bit blocks as the integer kernels read it: (int8 q, float32 d per
    `block` (32 or 256), int16 sums of q per 16); x ~ repeat(d, block) * q."""
    from .q8 import quantize_activations as quantize_blocks

    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if block not in (32, 256) or x.size % block:
        raise ValueError(f"activations are quantized in blocks of 32 or 256, got {block} for {x.size}")
    q, d, sums = np.empty(x.size, np.int8), np.empty(x.size // block, np.float32), np.empty(x.size // 16, np.int16)
    quantize_blocks(x, block, q, d, sums)
    return q, d, sums
