"""modelrun's runtime: everything that runs inside model.run."""

from __future__ import annotations

import os
import sys
from pathlib import Path

BUILD_ID_FILE = "build_id"  # beside the frozen executable; bundler/payload.py writes it


def user_cache_home() -> Path:
    """${XDG_CACHE_HOME:-~/.cache}/modelrun: what the runtime keeps between launches
    (model.run's header unpacks the runtime into it too)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "modelrun"


def frozen_build_id() -> str | None:
    """The id of this frozen build (bundler/payload.py writes it beside the executable);
    None when running from source, or when the file is missing."""
    if not getattr(sys, "frozen", False):
        return None
    try:
        return (Path(sys.executable).parent / BUILD_ID_FILE).read_text().strip()
    except OSError:
        return None
