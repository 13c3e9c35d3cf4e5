"""What the runtime keeps resident after start-up: cached kernels without their parsed IR
(runtime.kernels.cache), LLVM's code paged out (runtime.resident), and both still able to
compile what comes later."""

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

CALLEE = textwrap.dedent("""
    import numba

    @numba.njit(cache=True)
    def callee(x):
        return 2.0 * x + 1.0
""")

# Loads `callee` from numba's cache, then compiles a caller that links it in.
LINK_AFTER_LOAD = textwrap.dedent("""
    import sys
    import numba
    import runtime.kernels.cache  # installs the lean loading
    import callee_module

    assert callee_module.callee(1.0) == 3.0
    assert sum(callee_module.callee.stats.cache_hits.values()) == 1, "not loaded from the cache"
    library = callee_module.callee.overloads[(numba.float64,)].library
    assert library._shared_module is None, "the parsed IR was kept"

    @numba.njit
    def caller(x):
        return callee_module.callee(x) + callee_module.callee(x + 1.0)

    assert caller(1.0) == 3.0 + 5.0
    print("linked")
""")


def test_a_kernel_loaded_from_the_cache_links_into_a_later_compile(tmp_path):
    """The linking module freed at load is parsed again when a caller is compiled (without it
    numba raises "library unfit for linking")."""
    (tmp_path / "callee_module.py").write_text(CALLEE)
    env_path = f"{tmp_path}:{ROOT}"
    first = subprocess.run([sys.executable, "-c", "import callee_module; callee_module.callee(1.0)"],
                           cwd=tmp_path, env={"PYTHONPATH": env_path, "NUMBA_CACHE_DIR": str(tmp_path / "cache")},
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    second = subprocess.run([sys.executable, "-c", LINK_AFTER_LOAD], cwd=tmp_path,
                            env={"PYTHONPATH": env_path, "NUMBA_CACHE_DIR": str(tmp_path / "cache")},
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0 and "linked" in second.stdout, second.stderr


def _llvm_rss() -> int:
    """Resident bytes of this process's libllvmlite mappings."""
    from runtime.benchmark import resident_by_kind

    return resident_by_kind(__file__)["llvm"]


def test_compiler_code_is_let_go_and_comes_back_when_needed():
    import numba

    from runtime.resident import release_compiler_code

    @numba.njit
    def first(x):
        return x * 3

    assert first(2) == 6  # LLVM has run: its code is resident
    before = _llvm_rss()
    assert before > 8 << 20, before
    assert release_compiler_code() > 0
    after = _llvm_rss()
    # what stays: the pages the loader relocated (anonymous, ~2 MB) without swap
    assert after < before / 2, (before, after)

    @numba.njit
    def second(x):
        return x * 5 + 1

    assert second(2) == 11  # a later compile faults back what it runs
