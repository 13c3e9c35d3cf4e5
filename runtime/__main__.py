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
    from runtime import cpu

    try:
        cpu.select_tier()
    except cpu.CpuTierError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    # One threading layer for model.run and a checkout alike: numba's workqueue. Measured on
    # this project's 2-core machine while other work shared its cores, it decoded 3-7x faster
    # than the OpenMP layer, at 1 and 2 threads (README). The payload ships OpenMP too, with
    # its own libgomp: NUMBA_THREADING_LAYER=omp selects it. Workqueue must not be entered
    # from two threads at once, which the engine's single thread guarantees.
    if os.environ.get("NUMBA_THREADING_LAYER") not in ("omp", "workqueue"):
        os.environ["NUMBA_THREADING_LAYER"] = "workqueue"
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
