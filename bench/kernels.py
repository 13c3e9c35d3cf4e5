"""Kernel benchmark: matvec and matmul for every supported type, 1 thread and all threads.

Prints a table of weight bytes read per second, GFLOP/s and the fraction of this
machine's read bandwidth, which is measured in the same run with a plain parallel sum.
For the formats with an integer path (runtime/kernels/q8.py: 8-bit activations, integer
dot products) it prints the float path (dispatch.py, what ran before) beside it, in the
same run, as path "float" and "int8".
Weights are spread over enough copies to exceed the CPU caches (>= 512 MiB), as a
model's weights do when decoding, so matvec figures are DRAM figures.

    python bench/kernels.py [--types Q4_K,Q8_0] [--batch 64] [--seconds 0.5]
    python bench/kernels.py --types Q4_K,Q6_K --shapes 2048x8192 --batch 512 --llama llama-3.2-1b

With --llama MODEL (a bench/engine.py model name) it also runs llama.cpp's llama-bench on
that model (prefill of 512 tokens at each thread count) and prints its matrix work per
second: prompt tok/s times 2 x the weights of its matrices (the embedding lookup and the
output matrix left out: llama-bench computes logits for the last token only). Attention and
the rest are in its time too, so this is a lower bound on llama.cpp's matmul GFLOP/s, to
set beside the matmul column.
"""

import argparse
import os
import sys

import numba
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.common import WORKING_SET, read_bandwidth, timed  # noqa: E402
from runtime import kernels  # noqa: E402
from runtime.kernels import dispatch, q8, simd  # noqa: E402
from runtime.ggml_types import ggml_type  # noqa: E402

SHAPES = [(4096, 4096), (2048, 8192), (640, 2048)]  # 8B's attention; 1B's ffn_down; Gemma 270M's


def random_matrix_bytes(t, rows, cols, rng):
    """Random bytes for the quantized types (timing does not depend on the values, inf/nan
    scales included); finite random values for the float types."""
    nbytes = t.row_bytes(cols) * rows
    if t.name == "F32":
        return rng.standard_normal(nbytes // 4, dtype=np.float32).view(np.uint8)
    if t.name == "F16":
        return rng.standard_normal(nbytes // 2, dtype=np.float32).astype(np.float16).view(np.uint8)
    if t.name == "BF16":
        f32 = rng.standard_normal(nbytes // 2, dtype=np.float32)
        return (f32.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
    return rng.integers(0, 256, size=nbytes, dtype=np.uint8)


def bench_type(name, rows, cols, batch, seconds, rng, integer):
    """(bytes of one matrix, seconds per matvec, seconds per matmul) on the integer path
    (kernels.matvec/matmul) or the float one (dispatch.py's kernels)."""
    t = ggml_type(name)
    one = random_matrix_bytes(t, rows, cols, rng)
    copies = [one] + [one.copy() for _ in range(max(0, WORKING_SET // one.nbytes - 1))]
    for c in copies:
        c.flags.writeable = False  # as the runtime's memory map
    x = rng.standard_normal(cols).astype(np.float32)
    X = rng.standard_normal((batch, cols)).astype(np.float32)
    out_v = np.empty(rows, np.float32)
    out_m = np.empty((batch, rows), np.float32)
    state = {"i": 0}

    def next_copy():
        state["i"] = (state["i"] + 1) % len(copies)
        return copies[state["i"]]

    if integer:
        t_mv = timed(lambda: kernels.matvec(next_copy(), t, rows, cols, x, out_v), seconds)
        t_mm = timed(lambda: kernels.matmul(next_copy(), t, rows, cols, X, out_m), seconds)
    else:
        args = (rows, t.row_bytes(cols), cols // t.block_elems)
        t_mv = timed(lambda: dispatch.matvec_kernel(t.id, next_copy(), *args, x, out_v), seconds)
        t_mm = timed(lambda: dispatch.matmul_kernel(t.id, next_copy(), *args, X, out_m), seconds)
    return one.nbytes, t_mv, t_mm


def llama_matmul_rate(model, threads):
    """(llama-bench's prefill tok/s at 512, GFLOP/s of matrix work) for a bench model, or a
    note saying why not."""
    from types import SimpleNamespace

    from bench import engine
    from runtime.gguf import GGUFFile

    exe = engine.llama_bench_path()
    if exe is None:
        return "llama-bench not found (put it on PATH or set LLAMA_BENCH)"
    path = engine.model_path(model, "Q4_K_M")
    gguf = GGUFFile(str(path))
    weights = sum(int(np.prod(t.shape)) for name, t in gguf.tensors.items()
                  if len(t.shape) >= 2 and not name.startswith(("token_embd", "output.")))
    args = SimpleNamespace(prompt_tokens=512, gen_tokens=1, repeats=1)
    tok_s = max(engine.llama_bench(exe, path, threads, args).prefill)
    return tok_s, 2.0 * weights * tok_s / 1e9


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", default=",".join(sorted(kernels.SUPPORTED_TYPES, key=lambda n: ggml_type(n).id)))
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--seconds", type=float, default=0.4)
    ap.add_argument("--shapes", default=",".join(f"{r}x{c}" for r, c in SHAPES), help="rows x cols, comma-separated")
    ap.add_argument("--paths", default="float,int8", help="float, int8 or both (int8 only where a type has it)")
    ap.add_argument("--llama", default="", help="bench model names for llama.cpp's figure (see the docstring)")
    args = ap.parse_args()

    rng = np.random.default_rng(0)
    all_threads = numba.config.NUMBA_NUM_THREADS
    thread_counts = [1] if all_threads == 1 else [1, all_threads]
    bandwidth = {}
    for th in thread_counts:
        numba.set_num_threads(th)
        bandwidth[th] = read_bandwidth(args.seconds * 2)
    print(f"read bandwidth: " + ", ".join(f"{bw / 1e9:.1f} GB/s ({th} thr)" for th, bw in bandwidth.items()))
    print(f"matvec: one vector; matmul: batch of {args.batch}; GB/s = weight bytes read per second; "
          f"%BW = matvec GB/s / read bandwidth at the same thread count; int8 instructions: {simd.integer_isa()}")
    head = (f"{'type':7} {'path':5} {'rows x cols':>11} {'thr':>3} | {'matvec ms':>9} {'GB/s':>6} {'%BW':>5} |"
            f" {'matmul ms':>9} {'GFLOP/s':>8}")
    print(head)
    print("-" * len(head))
    shapes = [tuple(int(v) for v in shape.split("x")) for shape in args.shapes.split(",")]
    for name in args.types.split(","):
        has_integer = ggml_type(name).id in q8.INTEGER_TYPES
        paths = [p for p in args.paths.split(",") if p == "float" or has_integer]
        for rows, cols in shapes:
            for th in thread_counts:
                numba.set_num_threads(th)
                for path in paths:
                    nbytes, t_mv, t_mm = bench_type(name, rows, cols, args.batch, args.seconds, rng,
                                                    integer=path == "int8")
                    gbs = nbytes / t_mv / 1e9
                    gflops = 2.0 * rows * cols * args.batch / t_mm / 1e9
                    print(f"{name:7} {path:5} {f'{rows}x{cols}':>11} {th:>3} | {t_mv * 1e3:9.3f} {gbs:6.1f} "
                          f"{100 * gbs * 1e9 / bandwidth[th]:4.0f}% | {t_mm * 1e3:9.2f} {gflops:8.1f}", flush=True)
    for model in filter(None, args.llama.split(",")):
        for th in thread_counts:
            rate = llama_matmul_rate(model, th)
            if isinstance(rate, str):
                print(f"llama.cpp: {rate}")
                break
            print(f"llama.cpp {model}, {th} thr: prefill 512 at {rate[0]:.1f} tok/s = "
                  f"{rate[1]:.1f} GFLOP/s of matrix work (at least; matmul column above)", flush=True)


if __name__ == "__main__":
    main()
