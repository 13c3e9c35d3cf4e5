"""Pick the CPU tier the kernels are compiled for, and pin Numba to it before it is imported.

Why tiers: compiled kernels ship in model.run, so they must be built for a named level of the
x86-64 psABI (x86-64, -v2, -v3, -v4), not for "whatever this CPU has". Numba reads
NUMBA_CPU_NAME and NUMBA_CPU_FEATURES once, when it is imported, and both must be set: with
only the name, LLVM adds the host's own features to the code and to the cache key, and a cache
made on one machine then crashes (SIGILL) on another. `select_tier()` is the one call that does
it; it is idempotent, and if numba was imported first it can only report what numba uses.
"""

from __future__ import annotations

import os
import platform
import sys
from dataclasses import dataclass
from typing import Iterable, Mapping

# The x86-64 psABI micro-architecture levels, best first, each with the features it adds to
# the one below, in LLVM's feature names (lahf/sahf is "sahf"; the psABI's OSXSAVE and ABM
# appear as LLVM's "xsave" and "lzcnt"; LLVM reports AVX and AVX-512 only when the OS saves
# their registers).
_LEVELS: tuple[tuple[str, frozenset[str]], ...] = (
    ("x86-64", frozenset({"cmov", "cx8", "fxsr", "mmx", "sse", "sse2"})),
    ("x86-64-v2", frozenset({"cx16", "sahf", "popcnt", "sse3", "sse4.1", "sse4.2", "ssse3"})),
    ("x86-64-v3", frozenset({"avx", "avx2", "bmi", "bmi2", "f16c", "fma", "lzcnt", "movbe",
                             "xsave"})),
    ("x86-64-v4", frozenset({"avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"})),
)

X86_TIERS = tuple(name for name, _ in reversed(_LEVELS))  # best first
GENERIC = "generic"  # any other architecture: LLVM's baseline for it
VALID_TIERS = X86_TIERS + (GENERIC,)
OVERRIDE_VARIABLE = "MODELRUN_CPU_TIER"


def tier_features(tier: str) -> frozenset[str]:
    """Every feature an x86-64 tier requires (its own and those of the tiers below it)."""
    needed: set[str] = set()
    for name, added in _LEVELS:
        needed |= added
        if name == tier:
            return frozenset(needed)
    raise CpuTierError(f"unknown x86-64 tier {tier!r}")


class CpuTierError(ValueError):
    """A MODELRUN_CPU_TIER value this build does not know."""


@dataclass(frozen=True)
class CpuTier:
    """The tier the kernels run at, and why."""

    name: str
    reason: str  # "detected", "MODELRUN_CPU_TIER", or why it could not be chosen

    def __str__(self) -> str:
        return f"{self.name} ({self.reason})"


def is_x86_64(machine: str | None = None) -> bool:
    machine = (machine if machine is not None else platform.machine()).lower()
    return machine in ("x86_64", "amd64", "x64")


def best_tier(features: Mapping[str, bool] | Iterable[str], machine: str = "x86_64") -> str:
    """The best tier a CPU with these LLVM feature names can run (pure: no host involved).

    `features` is a set of names, or a mapping name -> bool as LLVM reports it.
    """
    if not is_x86_64(machine):
        return GENERIC
    if isinstance(features, Mapping):
        present = {name for name, on in features.items() if on}
    else:
        present = set(features)
    for tier in X86_TIERS:
        if tier_features(tier) <= present:
            return tier
    return X86_TIERS[-1]  # every x86-64 CPU runs the baseline, whatever LLVM reported


def validate_tier(name: str, machine: str | None = None) -> str:
    """The tier named `name`, or a CpuTierError that lists the valid names."""
    tier = name.strip()
    if tier not in VALID_TIERS:
        raise CpuTierError(f"{OVERRIDE_VARIABLE}={name!r} is not a CPU tier; use one of: "
                           f"{', '.join(VALID_TIERS)} (or unset it to detect this CPU's)")
    if tier != GENERIC and not is_x86_64(machine):
        raise CpuTierError(f"{OVERRIDE_VARIABLE}={tier} is an x86-64 tier but this CPU is "
                           f"{machine or platform.machine()}; use {GENERIC} (or unset it)")
    return tier


def host_features() -> dict[str, bool]:
    """This CPU's features as LLVM sees them (llvmlite.binding; does not import numba)."""
    from llvmlite import binding

    return dict(binding.get_host_cpu_features())


def choose_tier(environ: Mapping[str, str],
                features: Mapping[str, bool] | Iterable[str] | None = None,
                machine: str | None = None) -> CpuTier:
    """The tier to run (pure but for the host look-up when `features` is None):
    environ's MODELRUN_CPU_TIER if set, else the best tier for `features`."""
    override = environ.get(OVERRIDE_VARIABLE, "")
    if override.strip():
        return CpuTier(validate_tier(override, machine), OVERRIDE_VARIABLE)
    if not is_x86_64(machine):
        return CpuTier(GENERIC, "detected")
    return CpuTier(best_tier(host_features() if features is None else features), "detected")


def pin_numba(environ: dict, tier: str) -> None:
    """What numba reads at import: the tier's name, and no features beyond the tier's own."""
    environ["NUMBA_CPU_NAME"] = tier
    environ["NUMBA_CPU_FEATURES"] = ""


_selected: CpuTier | None = None


def select_tier() -> CpuTier:
    """Choose this process's tier (choose_tier) and pin numba to it, through os.environ.

    Idempotent. If numba is already imported it cannot be pinned any more: the result then
    reports what numba uses. Raises CpuTierError for an unknown MODELRUN_CPU_TIER.
    """
    global _selected
    if _selected is None:
        if "numba" in sys.modules:
            _selected = numba_tier()
        else:
            tier = choose_tier(os.environ)
            pin_numba(os.environ, tier.name)
            _selected = tier
    return _selected


def numba_tier() -> CpuTier:
    """What the already imported numba compiles for: a tier if it was pinned, else 'host'."""
    from numba.core import config

    name, features = config.CPU_NAME, config.CPU_FEATURES
    if name is None and not features:
        return CpuTier("host", "numba was imported before a tier was chosen")
    if name in VALID_TIERS and features == "":
        return CpuTier(name, "pinned before numba was imported")
    return CpuTier(name or "host", f"NUMBA_CPU_NAME={name} NUMBA_CPU_FEATURES={features}")


def selected() -> CpuTier | None:
    """The tier select_tier() chose in this process, if it ran."""
    return _selected
