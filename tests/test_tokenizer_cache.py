"""runtime.tokenizer_cache: a warm start unpickles the tokenizer instead of rebuilding it,
never a stale or damaged one, and a cache that cannot be used costs nothing but time."""

import pickle
import threading
import time
from pathlib import Path

import pytest

from conftest import write_synthetic_model_with_tokenizer
from runtime import tokenizer_cache
from runtime.gguf import GGUFFile
from runtime.tokenizer import Tokenizer
from runtime.tokenizer_cache import TokenizerCache

WORDS = ["\u2581hi", "\u2581", "h", "i", "hi", "\u2581the", "a", "b"]
TEXTS = ["hi the ab", "<s>hi</s> hi", "\u00e9t\u00e9 \U0001F600", "a" * 200]


def write_model(path: Path, words=WORDS) -> GGUFFile:
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + list(words)
    types = [2, 3, 3] + [6] * 256 + [1] * len(words)
    write_synthetic_model_with_tokenizer(path, "llama", (tokens, [0.0] * len(tokens), types))
    return GGUFFile(path)


def encodings(tokenizer: Tokenizer) -> list[list[int]]:
    return [tokenizer.encode(t) for t in TEXTS]


def test_saved_then_loaded_the_same(tmp_path):
    gguf = write_model(tmp_path / "m.gguf")
    cache = TokenizerCache(gguf, tmp_path / "cache")
    assert cache.load() is None
    built = Tokenizer.from_metadata(gguf.metadata)
    assert cache.save(built) and cache.path.is_file()
    loaded = TokenizerCache(gguf, tmp_path / "cache").load()
    assert isinstance(loaded, Tokenizer) and loaded is not built
    assert encodings(loaded) == encodings(built)
    assert [p.name for p in cache.path.parent.iterdir()] == [cache.path.name]  # no leftovers


def test_gemma_round_trip(gemma_path, tmp_path):
    with GGUFFile(gemma_path) as gguf:
        cache = TokenizerCache(gguf, tmp_path)
        built = Tokenizer.from_metadata(gguf.metadata)
    texts = ["<start_of_turn>user\nWhat is 2+2?<end_of_turn>\n", "Ça va? 日本語のテキスト  \t end"]
    cache.save(built)
    loaded = cache.load()
    assert [loaded.encode(t) for t in texts] == [built.encode(t) for t in texts]
    assert loaded.eog_ids == built.eog_ids and loaded.vocab_size == built.vocab_size == 262144


def test_one_entry_per_vocabulary_and_never_another_runtimes(tmp_path, monkeypatch):
    one = write_model(tmp_path / "one.gguf")
    same = write_model(tmp_path / "same.gguf")
    other = write_model(tmp_path / "other.gguf", WORDS[:-1] + ["c"])  # one piece differs
    path = lambda gguf: TokenizerCache(gguf, tmp_path).path  # noqa: E731
    assert path(one) == path(same) != path(other)
    TokenizerCache(one, tmp_path).save(Tokenizer.from_metadata(one.metadata))
    assert TokenizerCache(same, tmp_path).load() is not None
    monkeypatch.setattr(tokenizer_cache, "runtime_stamp", lambda: b"another build")
    upgraded = TokenizerCache(one, tmp_path)
    assert upgraded.path == path(one) and upgraded.load() is None  # written by another runtime
    upgraded.save(Tokenizer.from_metadata(one.metadata))  # ... and replaced: still one file
    assert upgraded.load() is not None and len(list(tmp_path.glob("*.pickle"))) == 1


@pytest.mark.parametrize("content", [b"", b"not a pickle", b"\x80\x05garbage",
                                     pickle.dumps({"a": "dict, not a tokenizer"})])
def test_a_damaged_entry_is_rebuilt_over(tmp_path, content):
    gguf = write_model(tmp_path / "m.gguf")
    cache = TokenizerCache(gguf, tmp_path / "cache")
    cache.path.parent.mkdir()
    cache.path.write_bytes(content)
    assert cache.load() is None
    built = Tokenizer.from_metadata(gguf.metadata)
    assert cache.save(built) and encodings(cache.load()) == encodings(built)


def test_an_entry_cut_short_is_not_used(tmp_path):
    gguf = write_model(tmp_path / "m.gguf")
    cache = TokenizerCache(gguf, tmp_path)
    cache.save(Tokenizer.from_metadata(gguf.metadata))
    whole = cache.path.read_bytes()
    cache.path.write_bytes(whole[:len(whole) // 2])
    assert cache.load() is None


def test_a_folder_that_cannot_be_written_is_skipped(tmp_path):
    gguf = write_model(tmp_path / "m.gguf")
    blocker = tmp_path / "a-file"
    blocker.write_text("the cache folder would be under a file")
    cache = TokenizerCache(gguf, blocker / "tokenizers")
    assert cache.save(Tokenizer.from_metadata(gguf.metadata)) is False
    assert cache.load() is None


def test_saving_while_the_tokenizer_is_in_use(tmp_path):
    """The save thread pickles while the engine thread encodes (filling the caches)."""
    gguf = write_model(tmp_path / "m.gguf")
    tokenizer = Tokenizer.from_metadata(gguf.metadata)
    cache = TokenizerCache(gguf, tmp_path)
    stop = time.monotonic() + 1.0
    errors = []

    def encode_many():
        i = 0
        try:
            while time.monotonic() < stop:
                tokenizer.encode(f"hi {i} the {i * 7} ab")
                i += 1
        except Exception as e:  # noqa: BLE001 (reported below)
            errors.append(e)

    worker = threading.Thread(target=encode_many)
    worker.start()
    saves = 0
    while time.monotonic() < stop:
        assert cache.save(tokenizer)
        saves += 1
    worker.join()
    assert not errors and saves > 1
    assert cache.load()._model.fragment_cache == {}


def test_load_session_builds_once_then_loads(tmp_path, monkeypatch):
    """The runtime's own path: the first load writes the entry (on its own thread), the next
    one does not build at all."""
    from runtime import session

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    gguf = write_model(tmp_path / "m.gguf")
    first = session.load_session(gguf, 32, 0)
    entry = TokenizerCache(gguf).path
    assert entry.parent == tmp_path / "xdg" / "modelrun" / "tokenizers"
    for thread in threading.enumerate():
        if thread.name == "tokenizer-cache":
            thread.join(30)
    assert entry.is_file()

    def no_building(metadata):
        raise AssertionError("the tokenizer was built again")

    monkeypatch.setattr(Tokenizer, "from_metadata", staticmethod(no_building))
    second = session.load_session(gguf, 32, 0)
    assert encodings(second.tokenizer) == encodings(first.tokenizer)


def test_the_collector_is_back_on_after_start_up(tmp_path, monkeypatch):
    """The entry point turns the garbage collector off for the start-up; loading the model
    ends the start-up and must turn it back on (with the start-up's objects frozen)."""
    import gc

    from runtime import session

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    gguf = write_model(tmp_path / "m.gguf")
    frozen_before = gc.get_freeze_count()
    gc.disable()
    try:
        session.load_session(gguf, 32, 0)
        assert gc.isenabled() and gc.get_freeze_count() > frozen_before
    finally:
        gc.unfreeze()
        gc.enable()
    session.load_session(gguf, 32, 0)  # with the collector on, nothing is frozen
    assert gc.get_freeze_count() == 0
