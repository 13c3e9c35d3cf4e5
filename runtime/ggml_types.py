"""The GGML tensor types a GGUF file may name: id, name and block geometry.

This is a leaf module: the GGUF reader needs the geometry to size tensors, the kernels
need it to walk blocks, and neither should import the other for it. Ids and sizes are
those of ggml's `ggml_type` enum (facts from the GGUF spec), including types we cannot
compute with, so a file holding them still parses and can be reported on.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class GGMLType:
    id: int
    name: str
    block_elems: int  # elements per block
    block_bytes: int  # bytes per block

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


_TABLE = [
    (0, "F32", 1, 4),
    (1, "F16", 1, 2),
    (2, "Q4_0", 32, 18),
    (3, "Q4_1", 32, 20),
    (6, "Q5_0", 32, 22),
    (7, "Q5_1", 32, 24),
    (8, "Q8_0", 32, 34),
    (9, "Q8_1", 32, 40),
    (10, "Q2_K", 256, 84),
    (11, "Q3_K", 256, 110),
    (12, "Q4_K", 256, 144),
    (13, "Q5_K", 256, 176),
    (14, "Q6_K", 256, 210),
    (15, "Q8_K", 256, 292),
    (16, "IQ2_XXS", 256, 66),
    (17, "IQ2_XS", 256, 74),
    (18, "IQ3_XXS", 256, 98),
    (19, "IQ1_S", 256, 50),
    (20, "IQ4_NL", 32, 18),
    (21, "IQ3_S", 256, 110),
    (22, "IQ2_S", 256, 82),
    (23, "IQ4_XS", 256, 136),
    (24, "I8", 1, 1),
    (25, "I16", 1, 2),
    (26, "I32", 1, 4),
    (27, "I64", 1, 8),
    (28, "F64", 1, 8),
    (29, "IQ1_M", 256, 56),
    (30, "BF16", 1, 2),
    (34, "TQ1_0", 256, 54),
    (35, "TQ2_0", 256, 66),
    (39, "MXFP4", 32, 17),
]

TYPES_BY_ID: dict[int, GGMLType] = {i: GGMLType(i, n, e, b) for i, n, e, b in _TABLE}
TYPES_BY_NAME: dict[str, GGMLType] = {t.name: t for t in TYPES_BY_ID.values()}


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
