"""`python -m runtime ...`: the same as `./model.run ...` (and the frozen runtime's entry).

The CPU tier is chosen first, before anything imports numba (runtime.cpu says why).
"""

import gc
import os
import sys


def main() -> None:
    renderer = os.environ.pop("MODELRUN_CHAT_RENDERER", None)
    if renderer:  # the chat-template renderer process (runtime.chat_worker starts it)
        from runtime import chat_worker

        sys.exit(chat_worker.main(renderer))
    # numpy's OpenBLAS starts a pool of threads when it loads. The runtime makes no BLAS call
    # (its kernels are Numba's), and a thread that exists before the server confines itself
    # stays unconfined (runtime.confine): one thread, no pool.
    os.environ["OPENBLAS_NUM_THREADS"] = "1"
    from runtime import cpu

    try:
        cpu.select_tier()
    except cpu.CpuTierError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    # One threading layer for model.run and a checkout alike: numba's OpenMP layer (the payload
    # ships it with its own libgomp). A parallel launch costs ~2 us there against 20-130 us on
    # workqueue, and a decoded token makes ~90 of them: on a quiet 2-core machine Gemma 3 270M
    # decoded in 20 ms a token against 44 ms (bench/launches.py). OpenMP's threads spin while
    # they wait for the next launch; with libgomp's default spin (~300k rounds) they hold a
    # core that another busy process needs, and decoding went 3-10x slower than workqueue on a
    # loaded machine. GOMP_SPINCOUNT=2000 keeps the spin to tens of microseconds: measured under
    # that load it decoded faster than workqueue (README). NUMBA_THREADING_LAYER=workqueue and
    # GOMP_SPINCOUNT from the environment win.
    if os.environ.get("NUMBA_THREADING_LAYER") not in ("omp", "workqueue"):
        os.environ["NUMBA_THREADING_LAYER"] = "omp"
    os.environ.setdefault("GOMP_SPINCOUNT", "2000")
    job = os.environ.pop("MODELRUN_PRECOMPILE", None)
    if job:  # a hidden entry for bundler/payload.py, not a user option
        from runtime import precompile

        sys.exit(precompile.main(job))
    # Start-up makes a few hundred thousand objects (imports, the vocabulary) and none of
    # them is garbage; runtime.cli.start_up_done turns the collector back on.
    gc.disable()
    job = os.environ.pop("MODELRUN_BENCH", None)
    if job:  # a hidden entry for bench/engine.py: speed as a user's run of this build has it
        from runtime import benchmark

        sys.exit(benchmark.main(job, sys.argv[1:]))
    from runtime.cli import main as cli_main

    cli_main()


if __name__ == "__main__":
    main()
