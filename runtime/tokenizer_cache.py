"""A model's tokenizer, kept between launches so a warm start does not rebuild it.

Building Gemma's 262k-piece tokenizer from GGUF metadata takes ~0.16 s of Python (a BPE
vocabulary with its merges ~0.25 s); unpickling the built one ~0.08 s. The cache file is
named by the sha256 of the model's key/value section as stored (everything
Tokenizer.from_metadata reads), so one model has one file, and it starts with the stamp of
the runtime that wrote it (the frozen build's id, or from source the tokenizer's and GGUF
reader's code, plus the Python and NumPy versions the pickle depends on): another runtime
reads only that stamp, builds its own and writes over it, so an upgrade leaves no stale
files behind. It lives in ${XDG_CACHE_HOME:-~/.cache}/modelrun/tokenizers/ and is written
after loading, on a thread of its own, through a temporary file renamed into place (two
launches at once are safe). A file that cannot be read is rebuilt over; a folder that cannot
be written is skipped: the cache only ever saves time.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import sys
import tempfile
import threading
from pathlib import Path

import numpy as np

from runtime import frozen_build_id, user_cache_home
from runtime.gguf import GGUFFile
from runtime.tokenizer import Tokenizer

FORMAT = b"modelrun tokenizer cache 1"


def runtime_stamp() -> bytes:
    """What the pickled objects depend on besides the metadata."""
    build = frozen_build_id()
    if build is None:
        here = Path(__file__).parent
        sources = [*sorted((here / "tokenizer").glob("*.py")), here / "gguf.py",
                   here / "gguf_strings.py"]
        build = hashlib.sha256(b"".join(path.read_bytes() for path in sources)).hexdigest()
    return b"\0".join((FORMAT, build.encode(), sys.version.encode(), np.__version__.encode()))


class TokenizerCache:
    """The cache entry of one model's tokenizer: `load()` it, else build and `save()` it."""

    def __init__(self, gguf: GGUFFile, folder: Path | None = None):
        self.path = (folder or user_cache_home() / "tokenizers") / \
            f"{gguf.metadata_digest()[:32]}.pickle"
        self.stamp = runtime_stamp()

    def load(self) -> Tokenizer | None:
        """The cached tokenizer, or None (none yet, another runtime's, or unreadable: it is
        then rebuilt)."""
        try:
            with open(self.path, "rb") as f:
                if pickle.load(f) != self.stamp:
                    return None
                tokenizer = pickle.load(f)
        except Exception:  # missing, truncated, written by something else: build it anew
            return None
        return tokenizer if isinstance(tokenizer, Tokenizer) else None

    def save_in_background(self, tokenizer: Tokenizer) -> threading.Thread:
        """Write the entry on another thread (not a daemon: a short run's exit waits for
        it rather than leave half a temporary file). Safe while the tokenizer is in use:
        its pickled state leaves out the caches that fill as it encodes."""
        thread = threading.Thread(target=self.save, args=(tokenizer,), name="tokenizer-cache",
                                  daemon=False)  # (the engine thread that starts it is one)
        thread.start()
        return thread

    def save(self, tokenizer: Tokenizer) -> bool:
        """Write the entry atomically; False if the folder is not writable (nothing else)."""
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, temporary = tempfile.mkstemp(dir=self.path.parent, prefix=".tokenizer-")
        except OSError:
            return False
        try:
            with os.fdopen(fd, "wb") as f:
                pickle.dump(self.stamp, f, protocol=pickle.HIGHEST_PROTOCOL)
                pickle.dump(tokenizer, f, protocol=pickle.HIGHEST_PROTOCOL)
            os.replace(temporary, self.path)
            return True
        except OSError:
            Path(temporary).unlink(missing_ok=True)
            return False
