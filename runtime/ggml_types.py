"""The GGML tensor types a GGUF file may name: the one table of every format's facts.

Each row says a type's id, name and block layout, which kernel family computes with it,
whether the bundler can write it, where its f16 (or E8M0) scale fields lie, and which 8-bit
activation blocks its integer dot product reads (runtime/kernels/q8.py). Every other listing
is derived from this table (runtime.kernels.SUPPORTED_TYPES, the bundler's quantizer set, the
integer path's formats and its dispatch, the tests' block generators), and
tests/test_kernels.py checks the two switches that cannot be (runtime/kernels/dispatch.py,
bundler/quantizers.py) against it. A new format is one kernel module, one row here, and one
branch in each of those switches; for an integer path, its row dot body in
q8dot.ROW_DOT_BODIES (the dispatch over the formats is generated from this table).

This is a leaf module: the GGUF reader needs the layout to size tensors, the kernels need
it to walk blocks, and neither should import the other for it. Ids and sizes are those of
ggml's `ggml_type` enum (facts from the GGUF spec), including types we cannot compute with,
so a file holding them still parses and can be reported on.
"""

from __future__ import annotations

from dataclasses import dataclass

# ggml's type ids, named so the kernels' switches read as formats: Numba compiles a
# module-level int as a constant (so runtime.kernels.build_id() hashes this file too).
F32 = 0
F16 = 1
Q4_0 = 2
Q4_1 = 3
Q5_0 = 6
Q5_1 = 7
Q8_0 = 8
Q8_1 = 9
Q2_K = 10
Q3_K = 11
Q4_K = 12
Q5_K = 13
Q6_K = 14
Q8_K = 15
IQ2_XXS = 16
IQ2_XS = 17
IQ3_XXS = 18
IQ1_S = 19
IQ4_NL = 20
IQ3_S = 21
IQ2_S = 22
IQ4_XS = 23
I8 = 24
I16 = 25
I32 = 26
I64 = 27
F64 = 28
IQ1_M = 29
BF16 = 30
TQ1_0 = 34
TQ2_0 = 35
MXFP4 = 39
NVFP4 = 40
Q1_0 = 41


@dataclass(frozen=True)
class GGMLType:
    id: int
    name: str
    block_elems: int  # elements per block
    block_bytes: int  # bytes per block
    family: str | None = None  # the runtime.kernels module that computes with it; None: no kernels
    quantizer: bool = False  # bundler/quantizers.py writes it
    f16_fields: tuple[int, ...] = ()  # byte offsets of a block's f16 scales and minimums
    e8m0_fields: tuple[int, ...] = ()  # byte offsets of a block's E8M0 (power of two) scales
    # The integer path (runtime/kernels/q8.py): elements per 8-bit activation block its dot
    # reads, as ggml's vec_dot_type: 32 (Q8_0) or 256 (Q8_K); 0 for none (float kernels only).
    activations: int = 0

    def row_bytes(self, n_elements: int) -> int:
        """Bytes taken by `n_elements` elements; they must fill whole blocks."""
        if n_elements % self.block_elems:
            raise ValueError(
                f"{self.name} stores blocks of {self.block_elems} elements; "
                f"{n_elements} is not a multiple of that"
            )
        return n_elements // self.block_elems * self.block_bytes

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.block_bytes / self.block_elems


class UnsupportedTypeError(ValueError):
    """A tensor type that is unknown, or known but not computable by this build."""


TYPES: tuple[GGMLType, ...] = (
    #        id       name       elems bytes family     quantizer f16 fields, 8-bit activation block
    GGMLType(F32,     "F32",     1,    4,    "floats",  True),
    GGMLType(F16,     "F16",     1,    2,    "floats",  True),
    GGMLType(Q4_0,    "Q4_0",    32,   18,   "legacy",  True,     (0,), activations=32),
    GGMLType(Q4_1,    "Q4_1",    32,   20,   "legacy",  True,     (0, 2), activations=32),
    GGMLType(Q5_0,    "Q5_0",    32,   22,   "legacy",  True,     (0,), activations=32),
    GGMLType(Q5_1,    "Q5_1",    32,   24,   "legacy",  True,     (0, 2), activations=32),
    GGMLType(Q8_0,    "Q8_0",    32,   34,   "legacy",  True,     (0,), activations=32),
    GGMLType(Q8_1,    "Q8_1",    32,   40),
    GGMLType(Q2_K,    "Q2_K",    256,  84,   "kquants", True,     (80, 82), activations=256),
    GGMLType(Q3_K,    "Q3_K",    256,  110,  "kquants", True,     (108,), activations=256),
    GGMLType(Q4_K,    "Q4_K",    256,  144,  "kquants", True,     (0, 2), activations=256),
    GGMLType(Q5_K,    "Q5_K",    256,  176,  "kquants", True,     (0, 2), activations=256),
    GGMLType(Q6_K,    "Q6_K",    256,  210,  "kquants", True,     (208,), activations=256),
    GGMLType(Q8_K,    "Q8_K",    256,  292),
    GGMLType(IQ2_XXS, "IQ2_XXS", 256,  66),
    GGMLType(IQ2_XS,  "IQ2_XS",  256,  74),
    GGMLType(IQ3_XXS, "IQ3_XXS", 256,  98),
    GGMLType(IQ1_S,   "IQ1_S",   256,  50),
    GGMLType(IQ4_NL,  "IQ4_NL",  32,   18,   "iquants", True,     (0,), activations=32),
    GGMLType(IQ3_S,   "IQ3_S",   256,  110),
    GGMLType(IQ2_S,   "IQ2_S",   256,  82),
    GGMLType(IQ4_XS,  "IQ4_XS",  256,  136,  "iquants", True,     (0,), activations=256),
    GGMLType(I8,      "I8",      1,    1),
    GGMLType(I16,     "I16",     1,    2),
    GGMLType(I32,     "I32",     1,    4),
    GGMLType(I64,     "I64",     1,    8),
    GGMLType(F64,     "F64",     1,    8),
    GGMLType(IQ1_M,   "IQ1_M",   256,  56),
    GGMLType(BF16,    "BF16",    1,    2,    "floats",  True),
    GGMLType(TQ1_0,   "TQ1_0",   256,  54),
    GGMLType(TQ2_0,   "TQ2_0",   256,  66),
    GGMLType(MXFP4,   "MXFP4",   32,   17,   "mxfp4",   True,     (), e8m0_fields=(0,), activations=32),
    GGMLType(NVFP4,   "NVFP4",   64,   36),
    GGMLType(Q1_0,    "Q1_0",    128,  18),
)

TYPES_BY_ID: dict[int, GGMLType] = {t.id: t for t in TYPES}
# The formats of the integer path, by the activation block they read (ids, in table order).
Q8_0_ACTIVATION_TYPES: tuple[int, ...] = tuple(t.id for t in TYPES if t.activations == 32)
Q8_K_ACTIVATION_TYPES: tuple[int, ...] = tuple(t.id for t in TYPES if t.activations == 256)
TYPES_BY_NAME: dict[str, GGMLType] = {t.name: t for t in TYPES}


def ggml_type(qtype: int | str | GGMLType) -> GGMLType:
    """Look a type up by id, name (case-insensitive) or pass one through."""
    if isinstance(qtype, GGMLType):
        return qtype
    if isinstance(qtype, str):
        found = TYPES_BY_NAME.get(qtype.upper())
    else:
        found = TYPES_BY_ID.get(int(qtype))
    if found is None:
        raise UnsupportedTypeError(f"unknown GGML tensor type {qtype!r}")
    return found
