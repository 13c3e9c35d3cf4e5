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

# Runs `python -m runtime ARGS...`, then prints the process's peak resident memory.
PEAK_RSS_SCRIPT = """
import runpy, sys
sys.argv = ["runtime"] + sys.argv[1:]
try:
    runpy.run_module("runtime", run_name="__main__")
finally:
    peak = [l for l in open("/proc/self/status") if l.startswith("VmHWM:")][0]
    print("peak_kb", int(peak.split()[1]), file=sys.stderr)
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

    for path, _ in synthetic_models.values():
        gguf = GGUFFile(path)
        for n_ctx in (2, 17, 64):  # one slot needs two positions (runtime.engine)
            assert memory.estimate(gguf, n_ctx).kv_cache == Engine.from_gguf(gguf, n_ctx).kv_cache_bytes
        assert (memory.estimate(gguf, 17, "q8_0", "f32").kv_cache
                == Engine.from_gguf(gguf, 17, cache_type_k="q8_0", cache_type_v="f32").kv_cache_bytes)
    # Gemma 3 270M: 18 layers x 1 KV head x 256 x 2 (K and V) x 2 bytes (f16) per position
    assert memory.estimate(gemma, 4096).kv_cache == 18 * 256 * 2 * 2 * 4096
    # llama.cpp's other cache types: f32 doubles it, Q8_0 takes 34 bytes per 32 values
    assert memory.estimate(gemma, 4096, "f32", "f32").kv_cache == 18 * 256 * 2 * 4 * 4096
    assert memory.estimate(gemma, 4096, "q8_0", "f16").kv_cache == 18 * 4096 * (256 // 32 * 34 + 256 * 2)
    assert memory.estimate(gemma).n_ctx == 4096  # the engine's default context
    assert memory.estimate(gemma, 512).weights == sum(t.n_bytes for t in gemma.tensors.values())


def _peak_rss_of_prompt_run(gemma_path, tokenizer, n_ctx: int) -> int:
    """Peak RSS (bytes) of `-p` with a prompt that fills the context (so the whole KV cache
    is written), run again until the kernels and the tokenizer came from their caches."""
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
    return int(re.search(r"peak_kb (\d+)", out.stderr).group(1)) * 1024


def test_estimate_matches_the_peak_memory_of_real_runs(gemma_path, gemma):
    """A real run at two contexts: the estimate is within 15% of the measured peak RSS, and
    the two runs differ by the KV cache alone (within 8 MB). The estimate is advice ("needs
    ~0.5 GB"): it came out 1-2% above the peak in the development tree, but 8% below it in a
    fresh clone's venv on the same machine, and 12-13% below it inside a fresh clone's whole
    suite (~60 MB; the same test alone in that clone: 0.5%; the same kernels from the cache;
    the cause is not found yet). Leaving out the runtime's ~165 MB still misses by 35%, far
    more than 15%; the KV cache is checked by the growth between the two contexts."""
    from runtime.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_metadata(gemma.metadata)
    peaks = {n: _peak_rss_of_prompt_run(gemma_path, tokenizer, n) for n in (512, 1024)}
    for n_ctx, peak in peaks.items():
        est = memory.estimate(gemma, n_ctx)
        assert abs(peak - est.total) <= 0.15 * est.total, (n_ctx, peak, est)
    kv_growth = memory.estimate(gemma, 1024).kv_cache - memory.estimate(gemma, 512).kv_cache
    assert abs((peaks[1024] - peaks[512]) - kv_growth) <= 8 << 20, (peaks, kv_growth)


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
