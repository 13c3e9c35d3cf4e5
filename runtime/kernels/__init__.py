"""Numba kernels that compute straight on GGUF's quantized blocks.

(Being written: the public entry points dequantize / matvec / matmul land here.)
"""

# The tensor types this build can compute with (names as in runtime.ggml_types).
SUPPORTED_TYPES = frozenset({
    "F32", "F16", "BF16",
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
    "IQ4_NL", "IQ4_XS",
})
