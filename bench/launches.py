"""Kernel launches per decoded token, and what one parallel launch costs on this machine.

A Numba `prange` loop wakes the other threads and waits for them: a fixed cost per call,
however small the work. This prints that cost (an empty parallel loop, at each thread
count, against a plain njit call), then counts the kernel calls one decoded token makes
(parallel and serial, by kernel) and times decoding, for Gemma 3 270M and the synthetic
Llama 3.2 1B shape of bench/synth.py (or the --models named there).

    python bench/launches.py [--models gemma-3-270m,llama-3.2-1b] [--tokens 32]
"""

import argparse
import collections
import os
import statistics
import sys
import time

import numba
import numpy as np
from numba import njit, prange

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.engine import GEMMA, model_path  # noqa: E402
from runtime.engine import Engine  # noqa: E402
from runtime.gguf import GGUFFile  # noqa: E402
from runtime.model import load_model  # noqa: E402


@njit(parallel=True)
def _empty_parallel(x):
    for i in prange(x.shape[0]):
        x[i] += 1.0


@njit
def _empty_serial(x):
    for i in range(x.shape[0]):
        x[i] += 1.0


def call_cost(fn, threads, calls=2000, repeats=7):
    """Median seconds per call of fn on a vector of `threads` elements."""
    x = np.zeros(max(threads, 1), np.float32)
    fn(x)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(calls):
            fn(x)
        times.append((time.perf_counter() - t) / calls)
    return statistics.median(times)


def kernel_dispatchers():
    """(module, attribute name, dispatcher) for every Numba kernel the runtime calls from Python."""
    import importlib
    import pkgutil

    import runtime.kernels as pkg
    from numba.core.registry import CPUDispatcher

    found = []
    for info in pkgutil.iter_modules(pkg.__path__):
        if info.name in ("cache", "quantizers"):
            continue
        module = importlib.import_module(f"runtime.kernels.{info.name}")
        for name, value in vars(module).items():
            if isinstance(value, CPUDispatcher) and value.__module__ == module.__name__:
                found.append((module, name, value))
    return found


class LaunchCounter:
    """Counts Python-level calls of every kernel while active (patches the module attributes
    the runtime looks kernels up through)."""

    def __init__(self):
        self.counts = collections.Counter()
        self._patched = []

    def __enter__(self):
        for module, name, dispatcher in kernel_dispatchers():
            kind = "parallel" if dispatcher.targetoptions.get("parallel") else "serial"

            def counted(*args, _d=dispatcher, _key=(kind, f"{module.__name__.split('.')[-1]}.{name}"), **kw):
                self.counts[_key] += 1
                return _d(*args, **kw)

            self._patched.append((module, name, dispatcher))
            setattr(module, name, counted)
        return self

    def __exit__(self, *exc):
        for module, name, dispatcher in self._patched:
            setattr(module, name, dispatcher)


def decode_profile(engine, n_tokens):
    """(launch counts per token by (kind, kernel), median seconds per decoded token)."""
    engine.reset()
    engine.prefill([1, 2, 3, 4])
    engine.decode(5)  # compile / load everything first
    with LaunchCounter() as counter:
        engine.decode(6)
    per_token = counter.counts
    times = []
    for i in range(n_tokens):
        t = time.perf_counter()
        engine.decode(7 + i % 50)
        times.append(time.perf_counter() - t)
    return per_token, statistics.median(times)


def report(label, engine, n_tokens, launch_cost):
    counts, seconds = decode_profile(engine, n_tokens)
    parallel = sum(n for (kind, _), n in counts.items() if kind == "parallel")
    serial = sum(n for (kind, _), n in counts.items() if kind == "serial")
    print(f"\n{label}: {engine.model.hp.n_layer} layers; per decoded token: {parallel} parallel launches, "
          f"{serial} serial kernel calls; decode {seconds * 1e3:.1f} ms/token (median of {n_tokens}); "
          f"launch cost ~{parallel * launch_cost * 1e3:.1f} ms of it")
    for (kind, name), n in sorted(counts.items(), key=lambda kv: (kv[0][0], -kv[1])):
        print(f"  {kind:8} {name:32} {n:5}")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=f"{GEMMA},llama-3.2-1b",
                    help="comma-separated: gemma-3-270m and bench/synth.py's shapes (Q4_K_M)")
    ap.add_argument("--tokens", type=int, default=32, help="decoded tokens timed")
    args = ap.parse_args()

    all_threads = numba.config.NUMBA_NUM_THREADS
    print(f"one call, median of 7 x 2000 (threading layer after the first call: ", end="")
    _empty_parallel(np.zeros(1, np.float32))
    print(f"{numba.threading_layer()})")
    for threads in sorted({1, all_threads}):
        numba.set_num_threads(threads)
        print(f"  {threads} thread(s): empty parallel loop {call_cost(_empty_parallel, threads) * 1e6:6.1f} us, "
              f"empty serial njit call {call_cost(_empty_serial, threads) * 1e6:5.1f} us")
    numba.set_num_threads(all_threads)
    launch_cost = call_cost(_empty_parallel, all_threads)

    for name in args.models.split(","):
        engine = Engine(load_model(GGUFFile(model_path(name, "Q4_K_M"))), n_ctx=256)
        report(name, engine, args.tokens, launch_cost)


if __name__ == "__main__":
    main()
