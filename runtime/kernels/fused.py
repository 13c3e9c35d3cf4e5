"""One parallel launch for several matrices that multiply the same vector (one token).

Layout: each matrix is GGUF's, row after row of blocks of its own type, read in place by
the format kernels through runtime.kernels.dispatch; all have the same number of columns.

Why: a decoded token runs a handful of matrices per layer, and each parallel launch has a
fixed cost (waking the threads and joining them: bench/launches.py measures it) that is
comparable with a small matrix's whole work. The projections that read the same input
(q, k and v; gate and up) run here as one pass over their rows, concatenated.
"""

from numba import njit, prange

from .dispatch import dot_blocks


@njit(parallel=True, cache=True)
def matvec_many_kernel(type_ids, raws, row_bytes, row_blocks, ends, x, out):
    """out[ends[k-1]:ends[k]] = W_k @ x for each matrix k: raws[k] holds its blocks, of type
    type_ids[k], row_bytes[k] bytes and row_blocks[k] blocks per row; ends[k] is the sum of
    the row counts of matrices 0..k."""
    for r in prange(ends[-1]):
        k = 0
        while r >= ends[k]:
            k += 1
        first = ends[k - 1] if k else 0
        out[r] = dot_blocks(type_ids[k], raws[k], (r - first) * row_bytes[k], row_blocks[k], x, 0)
