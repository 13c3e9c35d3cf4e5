"""Pick the CPU tier the kernels are compiled for, and pin Numba to it before it is imported.

Why tiers: compiled kernels ship in model.run, so they must be built for a named level of the
x86-64 psABI (x86-64, -v2, -v3, -v4) or such a level plus VNNI (x86-64-v4-vnni,
x86-64-v3-vnni: the integer dot products have kernels of their own), not for "whatever this
CPU has". Numba reads
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

# Tiers beyond the psABI levels: a level plus the features that get kernels of their own (the
# integer dot products of runtime/kernels/simd.py): name -> (level, added features). VNNI's
# vpdpbusd does in one instruction what AVX2/AVX-512BW do in three (pmaddubsw, pmaddwd, add).
_EXTENSIONS: dict[str, tuple[str, frozenset[str]]] = {
    "x86-64-v4-vnni": ("x86-64-v4", frozenset({"avx512vnni"})),  # Ice Lake server+, Zen 4+
    "x86-64-v3-vnni": ("x86-64-v3", frozenset({"avxvnni"})),  # Alder Lake+ (AVX-VNNI, VEX)
}

X86_TIERS = ("x86-64-v4-vnni", "x86-64-v4", "x86-64-v3-vnni", "x86-64-v3", "x86-64-v2",
             "x86-64")  # best first
GENERIC = "generic"  # any other architecture: LLVM's baseline for it
VALID_TIERS = X86_TIERS + (GENERIC,)
OVERRIDE_VARIABLE = "MODELRUN_CPU_TIER"


def tier_features(tier: str) -> frozenset[str]:
    """Every feature an x86-64 tier requires (its own and those of the tiers below it)."""
    level, extra = _EXTENSIONS.get(tier, (tier, frozenset()))
    needed: set[str] = set()
    for name, added in _LEVELS:
        needed |= added
        if name == level:
            return frozenset(needed | extra)
    raise CpuTierError(f"unknown x86-64 tier {tier!r}")


def llvm_target(tier: str) -> tuple[str, str]:
    """(LLVM CPU name, LLVM feature string) that compile for exactly `tier`: a psABI level
    and, for the extension tiers, "+feature" for each feature they add."""
    level, extra = _EXTENSIONS.get(tier, (tier, frozenset()))
    return level, ",".join(f"+{f}" for f in sorted(extra))


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
    """What numba reads at import: the tier's LLVM CPU name, and no features beyond the tier's
    own (none for a psABI level)."""
    environ["NUMBA_CPU_NAME"], environ["NUMBA_CPU_FEATURES"] = llvm_target(tier)


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
    for tier in VALID_TIERS:
        if (name, features) == llvm_target(tier):
            return CpuTier(tier, "pinned before numba was imported")
    return CpuTier(name or "host", f"NUMBA_CPU_NAME={name} NUMBA_CPU_FEATURES={features}")


def selected() -> CpuTier | None:
    """The tier select_tier() chose in this process, if it ran."""
    return _selected


def compiled_features() -> frozenset[str]:
    """The CPU features the kernels of this process are compiled for (the pinned tier's, or
    the host's when numba was not pinned): what a kernel may choose its instructions by."""
    tier = numba_tier().name
    if tier in X86_TIERS:
        return tier_features(tier)
    if tier == GENERIC or not is_x86_64():
        return frozenset()
    from numba.core import config

    if config.CPU_FEATURES is None:
        return frozenset(f for f, on in host_features().items() if on)
    features = set()  # a CPU name with explicit features: only those (its own are unknown here)
    for item in config.CPU_FEATURES.split(","):
        if item.startswith("+"):
            features.add(item[1:])
    return frozenset(features)
