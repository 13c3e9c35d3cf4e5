"""Measure prefill and decode speed inside the runtime: the hidden entry `MODELRUN_BENCH=<job.json>`.

bench/engine.py runs `python -m runtime -m M.gguf` and `./model.run` with this entry, so that
both are measured as they run for a user (the frozen one with its own threading layer, kernel
cache and start-up state), and llama.cpp beside them. A job is a JSON object:

  {"threads": [1, 2], "prompt_tokens": 512, "gen_tokens": 128, "repeats": 3, "out": "r.json"}

The model is the one the command line names (`-m FILE`, or the model.run's own through the
`--container FILE` its header passes). Each repeat prefills the same prompt into an empty KV
cache, then decodes gen_tokens greedy tokens; the result (JSON, into "out") holds the seconds
of each, the prompt's token ids (so that another engine can be given the same ones), and the
process's private memory after the runs (its resident memory not backed by the model file).
"""

from __future__ import annotations

import json
import os
import sys
import time

from runtime.resident import smaps_mappings

TEXT = ("The history of the printing press begins in the fifteenth century, when movable type "
        "changed how books were made, sold and read across Europe. Within a few decades, presses "
        "spread from Mainz to Venice, Paris and London, and the price of a book fell sharply. ")


def prompt_tokens(tokenizer, n: int) -> list[int]:
    """n token ids of an ordinary English text (repeated as needed)."""
    copies = 1
    while len(ids := tokenizer.encode(TEXT * copies)) < n:
        copies *= 2
    return ids[:n]


def weight_bytes_per_token(gguf) -> int:
    """Bytes of weights one decode step reads: every matrix once (the embedding lookup reads
    one row, but a tied output projection reads the whole embedding anyway), and of a mixture
    of experts' 3-D *_exps tensors only the share of the experts a token runs."""
    arch = gguf.metadata.get("general.architecture", "")
    n_expert = int(gguf.metadata.get(f"{arch}.expert_count", 0))
    n_used = int(gguf.metadata.get(f"{arch}.expert_used_count", 0))
    total = 0
    for t in gguf.tensors.values():
        if len(t.shape) < 2:
            continue
        experts = "_exps." in t.name and 0 < n_used <= n_expert
        total += t.n_bytes * n_used // n_expert if experts else t.n_bytes
    return total


def prefill_and_decode(engine, prompt: list[int], n_gen: int) -> tuple[float, float]:
    """Seconds to prefill the prompt into an empty cache (to the first token's logits), and
    to decode n_gen greedy tokens after it."""
    import numpy as np

    engine.reset()
    t = time.perf_counter()
    token = int(np.argmax(engine.prefill(prompt)))
    prefill = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(n_gen):
        token = int(np.argmax(engine.decode(token)))
    return prefill, time.perf_counter() - t


def resident_by_kind(path: str) -> dict[str, int]:
    """This process's resident bytes by what holds them (/proc/self/smaps): "model" (the
    mappings of the file at `path`), "llvm" (libllvmlite.so), "libraries" (every other
    file: Python, NumPy, Numba's and the system's libraries), "heap" (malloc's: C++ and
    NumPy's smaller arrays, Python's bigger objects), "anonymous" (Python's object arenas,
    NumPy's big arrays such as the KV cache, the loaded kernels' code, thread stacks)."""
    kinds = dict.fromkeys(("model", "llvm", "libraries", "heap", "anonymous"), 0)
    target = os.path.realpath(path)
    for header, counters in smaps_mappings():
        name = header[5] if len(header) > 5 else ""
        kind = ("model" if name == target else "llvm" if "libllvmlite" in name
                else "libraries" if name.startswith("/") else "heap" if name == "[heap]" else "anonymous")
        kinds[kind] += counters.get("Rss", 0) * 1024
    return kinds


def peak_resident() -> int:
    """The process's peak resident bytes (VmHWM), model pages included."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def mapped_libraries(*names: str) -> list[str]:
    """Paths of the shared libraries this process has mapped whose file names start with one
    of `names` (e.g. which libgomp the OpenMP threading layer runs on)."""
    found = set()
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split()
            if len(fields) > 5 and os.path.basename(fields[5]).startswith(names):
                found.add(fields[5])
    return sorted(found)


def model_from_argv(argv: list[str]) -> str:
    """The model file the command line names: -m/--model FILE, else --container FILE."""
    for flags in (("-m", "--model"), ("--container",)):
        for i, arg in enumerate(argv[:-1]):
            if arg in flags:
                return argv[i + 1]
    raise SystemExit("error: MODELRUN_BENCH needs a model: -m FILE (or run it as ./model.run)")


def main(job_path: str, argv: list[str]) -> int:
    import numba

    from runtime import cpu
    from runtime.session import load_session, open_container_model, open_model

    with open(job_path) as f:
        job = json.load(f)
    path = model_from_argv(argv)
    if "--container" in argv and "-m" not in argv and "--model" not in argv:
        gguf, _ = open_container_model(path)
    else:
        gguf = open_model(path)
    n_prompt, n_gen = int(job["prompt_tokens"]), int(job["gen_tokens"])
    session = load_session(gguf, n_prompt + n_gen + 8, threads=0)
    engine = session.engine
    prompt = prompt_tokens(session.tokenizer, n_prompt)
    prefill_and_decode(engine, prompt[:16], 2)  # load every kernel before timing
    runs = []
    for threads in job["threads"]:
        numba.set_num_threads(threads)
        for _ in range(int(job.get("repeats", 1))):
            prefill, decode = prefill_and_decode(engine, prompt, n_gen)
            runs.append({"threads": threads, "prefill_s": prefill, "decode_s": decode})
    kinds = resident_by_kind(path)
    mapped = kinds.pop("model")
    result = {
        "model": path, "frozen": bool(getattr(sys, "frozen", False)),
        "threading_layer": numba.threading_layer(), "tier": str(cpu.selected() or cpu.numba_tier()),
        "openmp": mapped_libraries("libgomp", "libiomp", "libomp", "libtbb"),
        "prompt": prompt, "gen_tokens": n_gen, "runs": runs,
        "private_bytes": sum(kinds.values()), "mapped_bytes": mapped, "private_by_kind": kinds,
        "peak_private_bytes": peak_resident() - mapped, "kv_cache_bytes": engine.kv_cache_bytes,
        "weight_bytes_per_token": weight_bytes_per_token(gguf),
    }
    with open(job["out"], "w") as f:
        json.dump(result, f)
    return 0
