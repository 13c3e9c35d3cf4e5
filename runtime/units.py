"""Sizes as a person reads them, in one unit system for the whole project.

Decimal units (1 kB = 1000 bytes, 1 MB = 10^6, 1 GB = 10^9), as disks, downloads and file
managers count them, so a size printed here matches the one a user sees elsewhere.
"""

from __future__ import annotations

_UNITS = (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3))


def format_bytes(n: float) -> str:
    """"253 MB", "23.1 GB", "2.4 kB", "512 B": three significant digits at most."""
    for unit, scale in _UNITS:
        if n >= scale:
            value = n / scale
            return f"{value:.1f} {unit}" if value < 100 else f"{value:.0f} {unit}"
    return f"{int(n)} B"
