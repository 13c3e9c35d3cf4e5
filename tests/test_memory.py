"""Will it fit: the memory estimate against a real run's peak memory, and the warnings."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from runtime import memory
from runtime.gguf import GGUFFile
from runtime.units import format_bytes

ROOT = Path(__file__).resolve().parent.parent
TEXT = Path(__file__).parent / "data" / "perplexity_text.txt"

# Runs `python -m runtime ARGS...`, then prints the process's peak resident memory and the
# resident code of the files it maps other than the model (LLVM's, Python's, NumPy's...).
PEAK_RSS_SCRIPT = """
import runpy, sys
sys.argv = ["runtime"] + sys.argv[1:]
try:
    runpy.run_module("runtime", run_name="__main__")
finally:
    from runtime.benchmark import peak_resident, resident_by_kind
    kinds = resident_by_kind(sys.argv[sys.argv.index("-m") + 1])
    print("peak", peak_resident(), "library", kinds["llvm"] + kinds["libraries"], file=sys.stderr)
"""


@pytest.fixture(scope="module")
def gemma(gemma_path):
    return GGUFFile(gemma_path)


def fake_meminfo(tmp_path, available_bytes: int) -> str:
    path = tmp_path / "meminfo"
    path.write_text(f"MemTotal:       25000000 kB\nMemFree:          100000 kB\n"
                    f"MemAvailable:   {available_bytes // 1024:>9} kB\n")
    return str(path)


def test_kv_cache_estimate_is_the_engines_own(synthetic_models, gemma):
    from runtime.engine import Engine

    def cache(est):  # the engine's KV cache holds a hybrid model's recurrent states too
        return est.kv_cache + est.recurrent

    for path, _ in synthetic_models.values():
        gguf = GGUFFile(path)
        for n_ctx in (2, 17, 64):  # one slot needs two positions (runtime.engine)
            assert cache(memory.estimate(gguf, n_ctx)) == Engine.from_gguf(gguf, n_ctx).kv_cache_bytes
        assert (cache(memory.estimate(gguf, 17, "q8_0", "f32"))
                == Engine.from_gguf(gguf, 17, cache_type_k="q8_0", cache_type_v="f32").kv_cache_bytes)
    # Gemma 3 270M: 18 layers x 1 KV head x 256 x 2 (K and V) x 2 bytes (f16) per position
    assert memory.estimate(gemma, 4096).kv_cache == 18 * 256 * 2 * 2 * 4096
    # llama.cpp's other cache types: f32 doubles it, Q8_0 takes 34 bytes per 32 values
    assert memory.estimate(gemma, 4096, "f32", "f32").kv_cache == 18 * 256 * 2 * 4 * 4096
    assert memory.estimate(gemma, 4096, "q8_0", "f16").kv_cache == 18 * 4096 * (256 // 32 * 34 + 256 * 2)
    assert memory.estimate(gemma).n_ctx == 4096  # the engine's default context
    assert memory.estimate(gemma, 512).weights == sum(t.n_bytes for t in gemma.tensors.values())


def _peak_rss_of_prompt_run(gemma_path, tokenizer, n_ctx: int) -> tuple[int, int]:
    """Peak RSS and the shared libraries' resident code (bytes) of `-p` with a prompt that
    fills the context (so the whole KV cache is written), run again until the kernels and the
    tokenizer came from their caches."""
    ids = tokenizer.encode(TEXT.read_text(encoding="utf-8"), add_special=False)
    prompt = tokenizer.decode(ids[:n_ctx - 24])
    for attempt in range(3):
        out = subprocess.run([sys.executable, "-c", PEAK_RSS_SCRIPT, "-m", str(gemma_path), "-c",
                              str(n_ctx), "-n", "2", "--temp", "0", "-p", prompt],
                             capture_output=True, text=True, timeout=900, cwd=ROOT)
        assert out.returncode == 0, out.stderr
        # compiling peaks far higher, and a first run also builds the tokenizer's cache
        # (runtime.tokenizer_cache, ~7 MB more): measure a second run with nothing compiled
        if attempt and re.search(r"kernels: .* 0 compiled", out.stderr):
            break
    assert re.search(r"kernels: .* 0 compiled", out.stderr), out.stderr  # else not comparable
    peak, library = re.search(r"peak (\d+) library (\d+)", out.stderr).groups()
    return int(peak), int(library)


def test_estimate_matches_the_peak_memory_of_real_runs(gemma_path, gemma):
    """A real run at two contexts: less the shared libraries' resident code, the peak RSS is
    within 15% of the estimate's rest, and the two runs differ by the KV cache alone (within
    8 MB). Library code is left out because its resident size is the kernel's choice, not the
    runtime's: the same libllvmlite.so mapped 68 MB in one venv and 87 MB in a fresh clone's,
    and a whole peak came out 15.5% above the estimate inside a fresh clone's suite (LLVM's
    pages are now let go after loading, runtime.resident; the other libraries' ~26 MB stay).
    Its share of the estimate is a typical value; here it is only checked to be of that order.
    The rest matched within 0.6% in the development tree; 15% is the estimate's own promise
    (advice: "needs ~0.5 GB"). Leaving out the runtime's ~65 MB of private memory would miss
    by 19%; the KV cache is checked by the growth between the two contexts."""
    from runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_metadata(gemma.metadata)
    runs = {n: _peak_rss_of_prompt_run(gemma_path, tokenizer, n) for n in (512, 1024)}
    for n_ctx, (peak, library) in runs.items():
        est = memory.estimate(gemma, n_ctx)
        rest = est.total - memory.LIBRARY_CODE_BYTES
        assert abs((peak - library) - rest) <= 0.15 * rest, (n_ctx, peak, library, est)
        assert memory.LIBRARY_CODE_BYTES / 3 < library < 3 * memory.LIBRARY_CODE_BYTES, (n_ctx, library)
    kv_growth = memory.estimate(gemma, 1024).kv_cache - memory.estimate(gemma, 512).kv_cache
    growth = (runs[1024][0] - runs[1024][1]) - (runs[512][0] - runs[512][1])
    assert abs(growth - kv_growth) <= 8 << 20, (runs, kv_growth)


def test_available_memory_from_meminfo(tmp_path):
    assert memory.available_bytes(fake_meminfo(tmp_path, 3 << 30)) == 3 << 30
    assert memory.available_bytes(str(tmp_path / "missing")) is None
    (tmp_path / "old").write_text("MemTotal: 1000 kB\nMemFree: 10 kB\n")
    assert memory.available_bytes(str(tmp_path / "old")) is None
    real = memory.available_bytes()
    assert real is None or 0 < real < 1 << 50


def test_largest_context_is_the_last_that_fits(gemma):
    budget = memory.estimate(gemma, 2048).total + 1000
    n = memory.largest_context(gemma, budget)
    assert n == 2048
    assert memory.estimate(gemma, n + 256).total > budget
    assert memory.largest_context(gemma, memory.estimate(gemma, 256).total - 1) is None
    assert memory.largest_context(gemma, 1 << 50) == 32768  # capped at the model's context


def test_info_says_whether_it_fits(gemma_path, gemma, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from runtime.cli import main

    need = memory.estimate(gemma).total
    monkeypatch.setattr(memory, "MEMINFO", fake_meminfo(tmp_path, 23_000_000_000))
    out = CliRunner().invoke(main, ["-m", str(gemma_path), "--info"])
    assert out.exit_code == 0, out.output
    line = f"  memory: needs ~{format_bytes(need)} at 4096 context; this machine has 23.0 GB available"
    assert line in out.stdout.splitlines()

    monkeypatch.setattr(memory, "MEMINFO", fake_meminfo(tmp_path, need - 60_000_000))
    out = CliRunner().invoke(main, ["-m", str(gemma_path), "--info"])
    assert "available — too little: Use -c " in out.stdout

    monkeypatch.setattr(memory, "MEMINFO", str(tmp_path / "missing"))
    out = CliRunner().invoke(main, ["-m", str(gemma_path), "--info"])
    assert "this machine's available memory is unknown" in out.stdout


def test_warns_before_loading_a_model_that_will_not_fit(gemma_path, gemma, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from runtime.cli import main

    available = memory.estimate(gemma, 1024).total + (1 << 20)  # room for 1024, not 4096
    monkeypatch.setattr(memory, "MEMINFO", fake_meminfo(tmp_path, available))
    out = CliRunner().invoke(main, ["-m", str(gemma_path), "-p", "Hello", "-n", "1", "--temp", "0"])
    assert out.exit_code == 0, out.output
    warning = next(line for line in out.stderr.splitlines() if line.startswith("warning:"))
    assert "needs ~" in warning and "at 4096 context" in warning
    assert f"this machine has {format_bytes(available)} available" in warning
    assert "Use -c 1024 (needs ~" in warning and "or a smaller quantization" in warning
    assert out.stderr.index("warning:") < out.stderr.index("loaded in")  # before loading

    # with -c 1024 it fits: no warning
    out = CliRunner().invoke(main, ["-m", str(gemma_path), "-p", "Hello", "-n", "1", "-c", "1024"])
    assert out.exit_code == 0 and "warning:" not in out.stderr

    # not even the smallest context fits: only a smaller quantization helps
    monkeypatch.setattr(memory, "MEMINFO", fake_meminfo(tmp_path, 50_000_000))
    out = CliRunner().invoke(main, ["-m", str(gemma_path), "-p", "Hello", "-n", "1", "-c", "64"])
    assert "Use a smaller quantization of the model" in out.stderr and "Use -c" not in out.stderr


def test_cache_type_flags_size_the_cache(gemma_path, gemma):
    """-ctk/-ctv reach the engine (the size it reports) and the memory warning's estimate."""
    from click.testing import CliRunner

    from runtime.cli import main
    from runtime.units import format_bytes

    out = CliRunner().invoke(main, ["-m", str(gemma_path), "-p", "Hello", "-n", "1", "--temp", "0",
                                    "-c", "512", "-ctk", "q8_0", "-ctv", "f32"])
    assert out.exit_code == 0, out.output
    kv = memory.estimate(gemma, 512, "q8_0", "f32").kv_cache
    assert kv == 18 * 512 * (256 // 32 * 34 + 256 * 4)
    assert f"KV cache {format_bytes(kv)}" in out.stderr
    out = CliRunner().invoke(main, ["-m", str(gemma_path), "-p", "Hello", "-ctk", "q4_0"])
    assert out.exit_code == 2 and "q4_0" in out.output


@pytest.mark.parametrize("arch", ["qwen35", "qwen35moe", "llama"])
@pytest.mark.parametrize("n_ctx, n_parallel, type_k, type_v",
                         [(64, 1, "f16", "f16"), (128, 4, "q8_0", "f32"), (128, 3, "f32", "f16")])
def test_slots_and_recurrent_states_are_what_the_engine_allocates(synthetic_models, arch, n_ctx,
                                                                   n_parallel, type_k, type_v):
    """--parallel N, -ctk/-ctv, and a hybrid model's recurrent states (per slot and Gated
    DeltaNet layer: a convolution window and the delta-rule matrices), measured: tracemalloc
    sees every NumPy buffer the engine allocates for its slots. The estimate of the KV caches
    and states is at most what was allocated and short of it by the Python objects around the
    arrays alone (measured 1.0-2.5 kB per slot): 4 KiB per slot is allowed."""
    import tracemalloc

    import parity_models as pm
    from conftest import SYNTHETIC_SPECS
    from runtime.engine import Engine
    from runtime.model import load_model

    gguf = GGUFFile(synthetic_models[arch][0])
    model = load_model(gguf)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        engine = Engine(model, n_ctx, cache_type_k=type_k, cache_type_v=type_v, n_parallel=n_parallel)
        allocated = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    est = memory.estimate(gguf, n_ctx, type_k, type_v, n_parallel)
    assert 0 <= allocated - (est.kv_cache + est.recurrent) <= 4096 * n_parallel, (allocated, est)
    assert engine.n_parallel == est.n_parallel == n_parallel
    hybrid = pm.SPECS[arch].get("hybrid") if SYNTHETIC_SPECS[arch].get("parity") else None
    if hybrid is None:
        assert est.recurrent == 0
        return
    # the state from the spec that wrote the model, float32: layers 0 and 2 of 4 are recurrent
    channels = (2 * hybrid["n_k_heads"] + hybrid["n_v_heads"]) * hybrid["head"]
    per_layer = 4 * ((hybrid["d_conv"] - 1) * channels + hybrid["n_v_heads"] * hybrid["head"] ** 2)
    assert est.recurrent == n_parallel * 2 * per_layer
    assert est.recurrent == sum(slot.cache.state.nbytes for slot in engine.slots)


def test_info_estimates_the_context_cache_types_and_slots_asked_for(synthetic_models, tmp_path,
                                                                    monkeypatch):
    """--info takes -c, -ctk/-ctv and --parallel, and its memory line spells out what they cost."""
    from click.testing import CliRunner

    from runtime.cli import main

    path = synthetic_models["qwen35"][0]
    gguf = GGUFFile(path)
    monkeypatch.setattr(memory, "MEMINFO", fake_meminfo(tmp_path, 23_000_000_000))
    out = CliRunner().invoke(main, ["-m", str(path), "--info", "-c", "1024", "-ctk", "q8_0", "-ctv", "f32",
                                    "--parallel", "3"])
    assert out.exit_code == 0, out.output
    est = memory.estimate(gguf, 1024, "q8_0", "f32", 3)
    assert (f"  memory: needs ~{format_bytes(est.total)} at 1024 context (weights {format_bytes(est.weights)}, "
            f"KV cache {format_bytes(est.kv_cache)} in q8_0/f32, recurrent states {format_bytes(est.recurrent)}, "
            f"their checkpoints up to {format_bytes(est.checkpoints)}, "
            f"3 slots of 341); this machine has 23.0 GB available") in out.stdout.splitlines(), out.stdout
    # slots that cannot share the context: said, as the engine would refuse them
    out = CliRunner().invoke(main, ["-m", str(path), "--info", "-c", "8", "--parallel", "5"])
    assert "memory: cannot estimate (5 slots cannot share a context of 8" in out.stdout
