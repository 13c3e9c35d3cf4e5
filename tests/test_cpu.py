"""CPU tier choice (runtime.cpu) and the kernel cache's locator (runtime.kernels.cache)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from runtime import cpu

ROOT = Path(__file__).resolve().parent.parent

# The x86-64 psABI levels, written out from the psABI's table (LLVM's feature names), as an
# independent reference for runtime.cpu's cumulative lists.
BASELINE = {"cmov", "cx8", "fxsr", "mmx", "sse", "sse2"}
V2 = BASELINE | {"cx16", "sahf", "popcnt", "sse3", "sse4.1", "sse4.2", "ssse3"}
V3 = V2 | {"avx", "avx2", "bmi", "bmi2", "f16c", "fma", "lzcnt", "movbe", "xsave"}
V4 = V3 | {"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"}
# Tiers of our own above two levels: VNNI's integer dot products (runtime/kernels/simd.py)
V4_VNNI = V4 | {"avx512vnni"}
V3_VNNI = V3 | {"avxvnni"}
# Features a real CPU reports beside the levels' own (must not change the choice)
EXTRAS = {"64bit", "aes", "pclmul", "rdrnd", "adx", "sha", "crc32", "xsaveopt"}


@pytest.mark.parametrize("features, tier", [
    (V4_VNNI | {"avxvnni"} | EXTRAS, "x86-64-v4-vnni"),  # Sapphire Rapids: both VNNI forms
    (V4_VNNI | EXTRAS, "x86-64-v4-vnni"),  # Ice Lake server, Zen 4
    (V3_VNNI | EXTRAS, "x86-64-v3-vnni"),  # Alder Lake
    (V3 | {"avx512vnni"}, "x86-64-v3"),  # VNNI without AVX-512 is no VNNI tier
    (V4 | EXTRAS, "x86-64-v4"),
    (V3 | EXTRAS, "x86-64-v3"),
    (V2 | EXTRAS, "x86-64-v2"),
    (BASELINE, "x86-64"),
    (V4 - {"avx512vl"}, "x86-64-v3"),  # one AVX-512 part missing: not v4
    (V3 - {"movbe"}, "x86-64-v2"),
    (V3 - {"fma"}, "x86-64-v2"),
    (V2 - {"popcnt"}, "x86-64"),
    (V3 - {"sse4.2"}, "x86-64"),  # a hole below: every level needs the ones under it
    (set(), "x86-64"),  # whatever LLVM reported, an x86-64 CPU runs the baseline
])
def test_best_tier_from_feature_sets(features, tier):
    assert cpu.best_tier(features) == tier
    # LLVM reports a mapping name -> bool; False entries are absent features
    mapping = {name: True for name in features} | {"avx512f": "avx512f" in features,
                                                   "avx2": "avx2" in features}
    assert cpu.best_tier(mapping) == tier


def test_tier_feature_lists_are_the_psabi_levels():
    assert cpu.tier_features("x86-64") == BASELINE
    assert cpu.tier_features("x86-64-v2") == V2
    assert cpu.tier_features("x86-64-v3") == V3
    assert cpu.tier_features("x86-64-v4") == V4
    assert cpu.tier_features("x86-64-v4-vnni") == V4_VNNI
    assert cpu.tier_features("x86-64-v3-vnni") == V3_VNNI
    assert cpu.X86_TIERS == ("x86-64-v4-vnni", "x86-64-v4", "x86-64-v3-vnni", "x86-64-v3",
                             "x86-64-v2", "x86-64")


@pytest.mark.parametrize("machine", ["aarch64", "arm64", "ppc64le", "riscv64"])
def test_other_architectures_get_generic(machine):
    assert cpu.best_tier(V4, machine) == "generic"


def test_choice_is_detected_unless_overridden():
    assert cpu.choose_tier({}, V3 | EXTRAS) == cpu.CpuTier("x86-64-v3", "detected")
    assert cpu.choose_tier({cpu.OVERRIDE_VARIABLE: "x86-64"}, V4) == \
        cpu.CpuTier("x86-64", cpu.OVERRIDE_VARIABLE)
    assert cpu.choose_tier({cpu.OVERRIDE_VARIABLE: " "}, V2) == cpu.CpuTier("x86-64-v2", "detected")
    assert cpu.choose_tier({}, V4, machine="aarch64") == cpu.CpuTier("generic", "detected")
    assert cpu.choose_tier({cpu.OVERRIDE_VARIABLE: "generic"}, V4).name == "generic"
    with pytest.raises(cpu.CpuTierError, match="aarch64"):
        cpu.choose_tier({cpu.OVERRIDE_VARIABLE: "x86-64-v2"}, V4, machine="aarch64")
    assert cpu.choose_tier({}).name == cpu.best_tier(cpu.host_features())


def test_pinning_sets_the_name_and_empty_features():
    """Both variables, always: a name alone lets LLVM add the host's features. A VNNI tier
    is its level plus exactly its one feature."""
    env = {"NUMBA_CPU_FEATURES": "+avx2"}
    cpu.pin_numba(env, "x86-64-v2")
    assert env == {"NUMBA_CPU_NAME": "x86-64-v2", "NUMBA_CPU_FEATURES": ""}
    cpu.pin_numba(env, "x86-64-v4-vnni")
    assert env == {"NUMBA_CPU_NAME": "x86-64-v4", "NUMBA_CPU_FEATURES": "+avx512vnni"}
    cpu.pin_numba(env, "x86-64-v3-vnni")
    assert env == {"NUMBA_CPU_NAME": "x86-64-v3", "NUMBA_CPU_FEATURES": "+avxvnni"}


def _python(code: str, **env) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if not k.startswith(("NUMBA_", "MODELRUN_"))}
    full.update(env)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=full, capture_output=True,
                          text=True, timeout=120)


def test_numba_compiles_for_the_chosen_tier_only():
    """In a fresh process: the entry's choice reaches numba, features pinned to none."""
    out = _python("from runtime import cpu; t = cpu.select_tier(); import numba.core.config as c;"
                  "print(t.name, t.reason, repr(c.CPU_NAME), repr(c.CPU_FEATURES))",
                  MODELRUN_CPU_TIER="x86-64-v2")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["x86-64-v2", "MODELRUN_CPU_TIER", "'x86-64-v2'", "''"]
    out = _python("from runtime import cpu; t = cpu.select_tier(); import numba.core.config as c;"
                  "print(t.name, repr(c.CPU_NAME), repr(c.CPU_FEATURES), cpu.numba_tier().name,"
                  "      sorted(cpu.compiled_features() - cpu.tier_features('x86-64-v3')))",
                  MODELRUN_CPU_TIER="x86-64-v3-vnni")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["x86-64-v3-vnni", "'x86-64-v3'", "'+avxvnni'", "x86-64-v3-vnni", "['avxvnni']"]


def test_select_is_idempotent_and_only_reports_once_numba_is_imported():
    out = _python("import numba; from runtime import cpu; a = cpu.select_tier(); "
                  "b = cpu.select_tier(); import os;"
                  "print(a == b, a.name, 'NUMBA_CPU_NAME' in os.environ)")
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["True", "host", "False"]


@pytest.mark.parametrize("value", ["x86-64-v5", "haswell", "x86_64_v3", "V3"])
def test_invalid_override_names_the_valid_tiers(value):
    with pytest.raises(cpu.CpuTierError) as e:
        cpu.choose_tier({cpu.OVERRIDE_VARIABLE: value}, V3)
    message = str(e.value)
    assert value in message
    for tier in cpu.VALID_TIERS:
        assert tier in message


def test_invalid_override_is_one_line_from_the_runtime(tmp_path):
    out = subprocess.run([sys.executable, "-m", "runtime", "-m", str(tmp_path / "x.gguf")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, cpu.OVERRIDE_VARIABLE: "x86-64-v9"})
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "x86-64-v9" in lines[0] and "x86-64-v3" in lines[0], out.stderr
    assert "Traceback" not in out.stderr


# --- the kernel cache's locator -----------------------------------------------------------

def test_locator_folder_and_stamp_are_build_id_and_tier(tmp_path):
    """Kernels cache under <XDG_CACHE_HOME>/modelrun/numba/<build id>/<tier>/, stamped with the
    build id (the hash of every kernel source), and a cached kernel loads in a new process."""
    code = (
        "from runtime import kernels; import numpy as np;"
        "from runtime.kernels import cache, common;"
        "loc = common.dot_f32._cache._impl.locator; x = np.ones(4, np.float32);"
        "assert common.dot_f32(x, 0, x, 0, 4) == 4;"
        "print(type(loc).__name__, loc.get_cache_path(), loc.get_source_stamp(),"
        "      kernels.build_id(),"
        "      cache.cache_stats().loaded, cache.cache_stats().compiled)"
    )
    first = _python(code, XDG_CACHE_HOME=str(tmp_path), MODELRUN_CPU_TIER="x86-64-v2")
    assert first.returncode == 0, first.stderr
    name, path, stamp, build_id, loaded, compiled = first.stdout.split()
    sources = sorted((ROOT / "runtime" / "kernels").glob("*.py")) + [ROOT / "runtime" / "ggml_types.py",
                                                                     ROOT / "runtime" / "cpu.py"]
    import hashlib
    expected_id = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:16]
    assert name == "KernelCacheLocator"
    assert build_id == stamp == expected_id
    assert Path(path) == tmp_path / "modelrun" / "numba" / expected_id / "x86-64-v2"
    assert (loaded, compiled) == ("0", "1")  # compiled and saved
    assert any(Path(path).glob("common.dot_f32-*.nbi"))
    second = _python(code, XDG_CACHE_HOME=str(tmp_path), MODELRUN_CPU_TIER="x86-64-v2")
    assert second.returncode == 0, second.stderr
    assert second.stdout.split()[-2:] == ["1", "0"]  # loaded from the cache, nothing compiled


def test_unwritable_cache_falls_back_to_compiling(tmp_path):
    from runtime.kernels.cache import choose_folder

    blocked = tmp_path / "file"
    blocked.write_text("not a folder")
    fallback = tmp_path / "fallback"
    assert choose_folder(blocked, "id", "x86-64", fallback) == fallback / "id" / "x86-64"
    temporary = choose_folder(blocked, "id", "x86-64", None)
    assert temporary.is_dir() and not temporary.is_relative_to(tmp_path)


def test_code_uses_only_the_tiers_instructions(tmp_path):
    """The SIGILL guard: at x86-64-v2 this AVX2 host's features stay out of the code (no VEX
    instruction at all), at x86-64-v3 the same kernel is vectorized with AVX and FMA."""
    import re

    code = ("from runtime.kernels import common; from numba import types;"
            "sig = (types.float32[::1], types.int64, types.float32[::1], types.int64, types.int64);"
            "common.dot_f32.compile(sig); print(common.dot_f32.inspect_asm(sig))")
    asm = {}
    for tier in ("x86-64-v2", "x86-64-v3"):
        out = _python(code, XDG_CACHE_HOME=str(tmp_path / tier), MODELRUN_CPU_TIER=tier)
        assert out.returncode == 0, out.stderr
        asm[tier] = out.stdout
    vex = re.compile(r"^\s+v[a-z0-9]+\s", re.M)  # AVX encodings: vaddps, vfmadd231ps, ...
    assert not vex.search(asm["x86-64-v2"]) and "xmm" in asm["x86-64-v2"]
    assert "ymm" in asm["x86-64-v3"] and "vfmadd" in asm["x86-64-v3"]
