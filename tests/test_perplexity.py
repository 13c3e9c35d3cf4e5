"""Perplexity as llama.cpp's llama-perplexity computes it: against llama.cpp's own numbers on
Gemma, against a plain float64 reference on a tiny model, and the --perplexity command line."""

import hashlib
import json
import math
import re
import struct
from pathlib import Path

import numpy as np
import pytest

DATA = Path(__file__).parent / "data"
TEXT = DATA / "perplexity_text.txt"
REF_CHUNKS = 4  # 4 x 512 tokens of Gemma prefill: the run stays short


@pytest.fixture(scope="module")
def reference() -> dict:
    """llama.cpp's run on a CPU of this machine's class: its AVX2 and AVX512-VNNI kernels round
    differently, which moves the first chunks' running perplexity by ~1% (46.33 vs 46.83
    after 3 chunks) though the 25-chunk estimates agree within 0.1% (35.45 vs 35.49)."""
    from runtime.cpu import host_features

    vnni = host_features().get("avx512vnni", False)
    name = "gemma3_270m_perplexity_llamacpp" + ("_avx512vnni" if vnni else "") + ".json"
    return json.loads((DATA / name).read_text())


@pytest.fixture(scope="module")
def gemma(gemma_path):
    from runtime.engine import Engine
    from runtime.gguf import GGUFFile
    from runtime.tokenizer import Tokenizer

    gguf = GGUFFile(gemma_path)
    return Engine.from_gguf(gguf, n_ctx=512), Tokenizer.from_metadata(gguf.metadata)


def _ids_sha256(ids) -> str:
    return hashlib.sha256(struct.pack(f"<{len(ids)}i", *ids)).hexdigest()


# --- the shipped text and llama.cpp's reference ------------------------------------------

def test_text_is_the_one_the_reference_was_made_with(reference):
    data = TEXT.read_bytes()
    assert hashlib.sha256(data).hexdigest() == reference["text_sha256"]
    assert len(data) < 100_000
    data.decode("ascii")  # plain English prose, no stray bytes


def test_tokenization_equals_llamacpp(gemma, reference, gemma_path):
    """llama-tokenize's ids of the whole file (BOS first), and llama-perplexity's count of the
    text it scores (its -f drops the one trailing newline)."""
    assert hashlib.sha256(gemma_path.read_bytes()).hexdigest() == reference["model_sha256"]
    _, tokenizer = gemma
    text = TEXT.read_text(encoding="utf-8")
    ids = tokenizer.encode(text, add_special=True, parse_special=False)
    assert len(ids) == reference["tokenize_n_tokens"]
    assert _ids_sha256(ids) == reference["tokenize_ids_sha256"]
    scored_text = tokenizer.encode(text[:-1], add_special=True, parse_special=False)
    assert len(scored_text) == reference["n_tokens"]
    assert len(scored_text) // 512 >= 8  # the text gives at least 8 chunks of 512


# Any two implementations that are not bit-identical part on Gemma 3 270M by ~0.14 (standard
# deviation) in each predicted token's log-probability (likely: a rounding anywhere flips
# some 8-bit activation roundings downstream, and the difference grows to the size of that
# quantization noise; our old and new attention kernels, both float32, part as much). Measured on AVX512-VNNI over chunks 1-4, paired per token: llama.cpp with flash
# attention (its default, the reference) against llama.cpp without it, 0.135-0.142; against
# ours, 0.140-0.146. The running perplexity after k chunks (255k predictions) is exp of a mean
# of those, so two correct engines differ by a relative standard error of about
# NLL_PAIR_SD / sqrt(255k): 0.9% after one chunk. llama.cpp's own run without flash
# attention is 1.09% below its run with it after one chunk (49.69 vs 50.24), 0.19% after four.
NLL_PAIR_SD = 0.145


def test_gemma_perplexity_within_1_percent_of_llamacpp(gemma, reference):
    """The issue asks for agreement within 1%: the 4-chunk estimate must be within 1% of
    llama.cpp's. Both engines quantize activations to 8 bits and keep the KV cache in f16 but
    round and sum in different orders (see NLL_PAIR_SD), so the running value after each
    earlier chunk is held to 3 of its standard errors (2.7% after chunk 1, 1.9%, 1.5%), where
    a real error (a wrong position scored, a chunk without BOS, a bad kernel) moves perplexity
    by far more."""
    from runtime.perplexity import perplexity

    engine, tokenizer = gemma
    ids = tokenizer.encode(TEXT.read_text(encoding="utf-8")[:-1], add_special=True, parse_special=False)
    result = perplexity(engine, ids, reference["n_ctx"], n_chunks=REF_CHUNKS)
    assert result.n_chunks == REF_CHUNKS and result.n_scored == REF_CHUNKS * 255
    expected = reference["running_ppl"][:REF_CHUNKS]
    for k, (ours, theirs) in enumerate(zip(result.running, expected), start=1):
        bound = 3 * NLL_PAIR_SD / math.sqrt(255 * k)
        assert abs(math.log(ours / theirs)) < bound, (k, ours, theirs)
    assert result.ppl == pytest.approx(expected[-1], rel=0.01)
    assert result.ppl == result.running[-1]
    # llama.cpp's +/- at 25 chunks over sqrt(25/4) is the same estimate at 4 chunks, roughly
    assert 0.5 * result.ppl_stderr < reference["ppl_stderr"] * math.sqrt(25 / REF_CHUNKS) \
        < 2.0 * result.ppl_stderr


# --- the method, against a plain reference on a tiny model --------------------------------

def _reference_perplexity(model, tokens, n_ctx, bos_id, n_chunks, batch):
    """llama.cpp's method written plainly: each chunk run through a fresh cache, log-softmax
    in float64, the second half scored, the standard error of the mean NLL. The chunk goes
    through the model in the engine's batches (of `batch` tokens, broken at the scored half,
    the last token not run) so that both run the same kernels: batches of 16 and more take
    the GEMM (runtime/kernels/q8gemm.py), whose float32 sums round apart from the row dots'
    (~1e-7), and an 8-bit activation rounding that flips with that moves this tiny model's
    perplexity by ~1e-3."""
    from runtime.model import KVCache

    nll = []
    half = n_ctx // 2
    bounds = [*range(0, half, batch), *range(half, n_ctx - 1, batch), n_ctx - 1]
    for c in range(n_chunks):
        chunk = list(tokens[c * n_ctx:(c + 1) * n_ctx])
        if bos_id is not None:
            chunk[0] = bos_id
        cache = KVCache(model.hp, n_ctx)
        logits = np.concatenate([model.forward(np.array(chunk[a:b]), a, cache, all_logits=True)
                                 for a, b in zip(bounds, bounds[1:])])
        logits = logits.astype(np.float64)
        for i in range(n_ctx // 2, n_ctx - 1):
            row = logits[i]
            log_z = row.max() + math.log(np.exp(row - row.max()).sum())
            nll.append(log_z - row[chunk[i + 1]])
    nll = np.array(nll)
    mean = nll.mean()
    stderr = math.sqrt(((nll ** 2).mean() - mean ** 2) / (len(nll) - 1))
    return math.exp(mean), stderr * math.exp(mean), len(nll)


@pytest.mark.parametrize("n_ctx, prefill_chunk, bos_id", [
    (16, 5, 7),  # batches of 5 break at the scored half (8) and elsewhere
    (11, 256, None),  # odd chunk size: first = 5, 5 predictions; no BOS
    (32, 16, 3),  # the scored half starts exactly on a batch boundary
])
def test_matches_plain_reference(synthetic_models, n_ctx, prefill_chunk, bos_id):
    from runtime.engine import Engine
    from runtime.gguf import GGUFFile
    from runtime.perplexity import perplexity

    path, _ = synthetic_models["llama"]
    engine = Engine.from_gguf(GGUFFile(path), n_ctx=64, prefill_chunk=prefill_chunk)
    rng = np.random.default_rng(n_ctx)
    tokens = rng.integers(0, engine.model.hp.n_vocab, size=3 * n_ctx + 4).tolist()
    seen = []
    result = perplexity(engine, tokens, n_ctx, on_progress=lambda d, t: seen.append((d, t)),
                        bos_id=bos_id)
    ppl, stderr, count = _reference_perplexity(engine.model, tokens, n_ctx, bos_id, 3, prefill_chunk)
    assert result.n_chunks == 3 and result.n_scored == count and result.n_tokens == 3 * n_ctx
    assert result.ppl == pytest.approx(ppl, rel=1e-5)
    assert result.ppl_stderr == pytest.approx(stderr, rel=1e-4)
    assert seen == [(1, 3), (2, 3), (3, 3)]
    first_chunk_only = perplexity(engine, tokens, n_ctx, bos_id=bos_id, n_chunks=1)
    assert first_chunk_only.ppl == pytest.approx(result.running[0], rel=1e-9)


def test_bos_is_taken_from_the_text_only_when_it_is_the_models_bos(gemma):
    """Chunks start with BOS when the tokenizer added one (as llama.cpp does for models that
    add BOS); a text without BOS leaves chunks as they are."""
    from runtime.perplexity import _added_bos

    engine, tokenizer = gemma
    assert _added_bos(engine, [tokenizer.bos_id, 5, 6]) == tokenizer.bos_id
    assert _added_bos(engine, [5, tokenizer.bos_id]) is None


@pytest.mark.parametrize("kwargs, message", [
    (dict(n_ctx=2), "at least 3 tokens"),
    (dict(n_ctx=128), "do not fit the engine's context of 64"),
    (dict(n_ctx=40), "fewer than one chunk of 40"),
    (dict(n_ctx=16, n_chunks=0), "n_chunks must be at least 1"),
])
def test_bad_arguments_are_value_errors(synthetic_models, kwargs, message):
    from runtime.engine import Engine
    from runtime.gguf import GGUFFile
    from runtime.perplexity import perplexity

    engine = Engine.from_gguf(GGUFFile(synthetic_models["llama"][0]), n_ctx=64)
    kwargs = {"tokens": list(range(1, 33)), **kwargs}
    with pytest.raises(ValueError, match=message):
        perplexity(engine, **kwargs)


# --- the command line --------------------------------------------------------------------

def run(*args):
    """The command in this process (the model's kernels are loaded once per session)."""
    from click.testing import CliRunner

    from runtime.cli import main

    return CliRunner().invoke(main, list(args))


def test_cli_prints_running_values_and_the_final_estimate(gemma_path, gemma):
    from runtime.perplexity import perplexity

    out = run("-m", str(gemma_path), "--perplexity", str(TEXT), "-c", "32", "--chunks", "3")
    assert out.exit_code == 0, out.stderr
    running = [float(v) for v in re.findall(r"\[(?:\d+)\]([0-9.]+),", out.stderr)]
    final = re.search(r"^Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)$", out.stdout, re.M)
    assert final and len(running) == 3
    assert re.search(r"3 chunks of 32 tokens \(96 tokens, 45 scored\) in [0-9.]+ s: [0-9.]+ tok/s",
                     out.stdout)
    engine, tokenizer = gemma
    ids = tokenizer.encode(TEXT.read_text(encoding="utf-8")[:-1], parse_special=False)
    expected = perplexity(engine, ids, 32, n_chunks=3)
    assert running == [pytest.approx(v, abs=1e-4) for v in expected.running]
    assert float(final.group(1)) == pytest.approx(expected.ppl, abs=1e-4)
    assert float(final.group(2)) == pytest.approx(expected.ppl_stderr, abs=1e-5)


def test_cli_bad_input_gets_one_line(gemma_path, tmp_path):
    short = tmp_path / "short.txt"
    short.write_text("A short text of a few words.\n")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    cases = [
        ((str(tmp_path / "missing.txt"),), "no such file; pass a UTF-8 text file to --perplexity"),
        ((str(tmp_path),), "is a directory"),
        ((str(latin1),), "is not UTF-8 text (byte 0xe9 at offset 3)"),
        ((str(short),), "has 9 tokens; perplexity with -c 512 needs at least 1024 (2 x 512)"),
        ((str(TEXT), "--chunks", "0"), "--chunks must be -1 (all) or at least 1, got 0"),
        ((str(TEXT), "-c", "2"), "perplexity needs -c of at least 4 tokens, got 2"),
        ((str(TEXT), "-c", "999999"), "n_ctx 999999 must be between 1 and the model's context"),
    ]
    for args, message in cases:
        out = run("-m", str(gemma_path), "--perplexity", *args)
        assert out.exit_code in (1, 2)
        errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
        assert len(errors) == 1 and message in errors[0], out.stderr
        assert "Traceback" not in out.stderr
