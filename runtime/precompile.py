"""Fill the kernel cache ahead of time: the hidden entry `MODELRUN_PRECOMPILE=<job.json>`.

bundler/payload.py runs the frozen runtime itself with this entry, so the caches it ships are
exactly what the frozen runtime looks up. A job is a JSON object with either

  {"models": [gguf, ...], "record": "sigs.pickle"}  run each model through the engine (prefill
      and decode) and every public kernel entry point for every supported type, then pickle
      the kernel signatures that took: on the host's tier;
  {"replay": "sigs.pickle"}  compile those signatures (no code runs, so any tier can be built
      on any x86-64 machine; numba saves each one to the cache);
  {"models": [gguf, ...], "check": "loaded.json"}  the same run as "record", in a new process:
      fails if any kernel had to be compiled, and writes which kernels the run loaded (the
      ones called from Python; the kernels they call are compiled into them).

It prints one line on stderr (kernels loaded / compiled, the cache folder) and returns an
exit status: nonzero when the cache folder is not the one this build looks in, or when a
check compiled something.
"""

from __future__ import annotations

import importlib
import json
import pickle
import sys

import numpy as np

# Rows x columns of the matrices the entry points are exercised on: one 256-element block
# row (every type's block size divides it), a few rows so parallel loops split.
_ROWS, _COLS = 8, 256


def exercise_entry_points() -> None:
    """kernels.dequantize / matvec / matmul once per supported type, on read-only blocks as
    the runtime's memory map gives them (Numba compiles writable arrays apart: those are
    what tests and the quantizer pass, and they would double the compile time)."""
    from runtime import kernels
    from runtime.ggml_types import ggml_type

    rng = np.random.default_rng(0)
    x = rng.standard_normal(_COLS).astype(np.float32)
    X = rng.standard_normal((3, _COLS)).astype(np.float32)
    blocks = {}
    for name in sorted(kernels.SUPPORTED_TYPES):
        t = ggml_type(name)
        raw = rng.integers(0, 256, _ROWS * t.row_bytes(_COLS), dtype=np.uint8)
        raw.setflags(write=False)
        blocks[name] = raw
        kernels.dequantize(raw, name, _COLS)
        kernels.matvec(raw, name, _ROWS, _COLS, x)
        kernels.matmul(raw, name, _ROWS, _COLS, X)
    # The fused launches compile once per number of matrices: 2 (gate, up), 3 (Q, K, V).
    for group in (["Q4_K", "Q6_K"], ["Q4_K", "Q4_K", "Q6_K"]):
        mats = [(blocks[name], name, _ROWS) for name in group]
        kernels.matvec_many(mats, _COLS, x)
        kernels.matmul_many(mats, _COLS, X)
    # A mixture of experts decodes gate and up of every chosen expert in one launch: 8
    # matrices for gpt-oss (4 experts, MXFP4), 16 for Qwen3-30B-A3B (8 experts).
    for name, count in (("MXFP4", 8), ("Q4_K", 16)):
        kernels.matvec_many([(blocks[name], name, _ROWS)] * count, _COLS, x)
    _attention_with_sinks()
    exercise_delta_net(rng)


def _attention_with_sinks() -> None:
    """ops.attention with per-head sinks (gpt-oss; no synthetic model of run_models has them),
    with the argument types runtime.model.base passes: queries of a batch (C-contiguous) and of
    one token (a column slice of the fused q/k/v output), the cache a uint8 slab."""
    from runtime.kernels import ops

    n_heads, head_dim, n_ctx = 2, 32, 4
    cache = np.zeros((1, n_ctx, head_dim * 2), np.uint8)  # one KV head, f16 rows
    sinks = np.zeros(n_heads, np.float32)
    for q in (np.zeros((2, n_heads * head_dim), np.float32),
              np.zeros((1, 2 * n_heads * head_dim), np.float32)[:, :n_heads * head_dim]):
        out = np.empty((q.shape[0], n_heads * head_dim), np.float32)
        ops.attention(q, cache, 1, head_dim, cache, 1, head_dim, 0, n_heads, np.float32(0.125), 0, out,
                      np.float32(0.0), sinks=sinks)


def exercise_delta_net(rng) -> None:
    """The Gated DeltaNet kernels (qwen35, qwen35moe) with the array layouts the model passes:
    a decoded token and a batch, from no model file (the payload's models are not hybrid)."""
    from runtime.kernels import deltanet

    heads, size, d_conv = 2, 32, 4
    channels = 3 * heads * size
    conv_w = rng.standard_normal((channels, d_conv)).astype(np.float32)
    for n in (1, 3):
        x = rng.standard_normal((n, channels)).astype(np.float32)
        conv = np.zeros((1, d_conv - 1, channels), np.float32)
        mixed = np.empty_like(x)
        deltanet.conv_silu(x, conv[0], conv_w, mixed)
        q = np.ascontiguousarray(mixed[:, :heads * size])
        deltanet.l2_norm_heads(q, heads, size, 1e-6)
        qh = q.reshape(n, heads, size)
        g = -np.ones((n, heads), np.float32)
        state = np.zeros((1, heads, size, size), np.float32)
        out = np.empty((n, heads, size), np.float32)
        deltanet.gated_delta_rule(qh, qh, qh, g, g, state[0], out)


def run_models(paths: list[str]) -> None:
    """Each model through the engine as the runtime loads it: prefill of a few tokens, then
    decode (matmul and matvec, every op its architecture uses)."""
    from runtime.engine import Engine
    from runtime.gguf import GGUFFile

    for path in paths:
        with GGUFFile(path) as gguf:
            engine = Engine.from_gguf(gguf, n_ctx=16)
            engine.prefill([1, 2, 3])
            engine.decode(4)


def compile_signatures(entries: list[tuple[str, str, tuple]]) -> None:
    """Compile (or load) each (module, function, argument types) for this process's tier."""
    for module_name, function, sig in entries:
        getattr(importlib.import_module(module_name), function).compile(sig)


def main(job_path: str) -> int:
    from runtime.kernels import cache

    with open(job_path) as f:
        job = json.load(f)
    if "replay" in job:
        with open(job["replay"], "rb") as f:
            compile_signatures(pickle.load(f))
    else:
        run_models(job.get("models", []))
        exercise_entry_points()
        if "record" in job:
            with open(job["record"], "wb") as f:
                pickle.dump(cache.used_signatures(), f)
        if "check" in job:
            loaded = sorted({(d.py_func.__module__, d.py_func.__name__)
                             for d in cache.kernel_dispatchers() if d.stats.cache_hits})
            with open(job["check"], "w") as f:
                json.dump(loaded, f)
    settings, stats = cache.settings(), cache.cache_stats()
    print(f"precompile: {len(cache.used_signatures())} kernel signatures for {settings.tier}: "
          f"{stats.loaded} from cache, {stats.compiled} compiled, in {settings.folder}",
          file=sys.stderr)
    if settings.folder != cache.kernels_cache_folder():
        print(f"error: cannot write the kernel cache {cache.kernels_cache_folder()}",
              file=sys.stderr)
        return 1
    if "check" in job and stats.compiled:
        print("error: the check compiled kernels the cache should have held", file=sys.stderr)
        return 1
    return 0
