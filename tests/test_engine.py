"""The engine: chunked prefill, decode, prefix reuse, context limits, generation, cancel.

The synthetic models' logits are checked against an independent reference in
test_model.py; here a cold one-shot forward pass of the whole sequence is the baseline, and
every way of getting to the same tokens (in chunks, token by token, reusing a cached
prefix) must give the same logits up to float32 rounding of a different batch shape.
The real Gemma 3 270M must follow llama.cpp's greedy continuations token by token, up to
near-ties that llama.cpp's own 8-bit activation rounding decides (see FIRST_TOP_TOL).
"""

import threading

import numpy as np
import pytest

from runtime.engine import ContextOverflowError, Engine
from runtime.gguf import GGUFFile
from runtime.model import KVCache, load_model

TOKENS = [5, 17, 3, 99, 42, 7, 150, 1, 64, 23, 11, 88, 2, 9]
ATOL = 1e-4  # relative to the largest logit; same float32 ops in another batch shape: ~1e-6


def greedy(logits) -> int:
    return int(np.argmax(logits))


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def engine(request, synthetic_models):
    path, _ = synthetic_models[request.param]
    return Engine(load_model(GGUFFile(path)), n_ctx=32, prefill_chunk=5)


def cold_logits(engine, tokens):
    """Every token's logits from one forward pass over a fresh cache."""
    return engine.model.forward(tokens, 0, KVCache(engine.model.hp, engine.n_ctx), all_logits=True)


def assert_close(a, b):
    assert np.abs(a - b).max() <= ATOL * np.abs(b).max()


def test_chunked_prefill_then_decode_matches_one_pass(engine):
    expected = cold_logits(engine, TOKENS)
    engine.reset()
    assert_close(engine.prefill(TOKENS[:8]), expected[7])  # 8 tokens in chunks of 5
    for i in range(8, len(TOKENS)):
        assert_close(engine.decode(TOKENS[i]), expected[i])
    assert engine.tokens == TOKENS


def test_prefix_reuse_computes_only_the_new_suffix(engine):
    first_turn = TOKENS[:9]
    second_turn = TOKENS[:6] + [77, 78, 79, 80]  # shares 6 tokens, then diverges
    engine.reset()
    engine.eval(first_turn)
    before = engine.n_computed
    logits = engine.eval(second_turn)
    assert engine.n_computed - before == 4
    assert engine.tokens == second_turn
    assert_close(logits, cold_logits(engine, second_turn)[-1])
    # a follow-up that extends the cache computes only the extension
    before = engine.n_computed
    engine.eval(second_turn + [81, 82])
    assert engine.n_computed - before == 2
    # the same tokens again: only the last is recomputed, for its logits
    before = engine.n_computed
    assert_close(engine.eval(second_turn + [81, 82]), cold_logits(engine, second_turn + [81, 82])[-1])
    assert engine.n_computed - before == 1


def test_context_overflow_is_refused_with_both_numbers(engine):
    with pytest.raises(ContextOverflowError, match=r"40 tokens.*32"):
        engine.eval(list(range(40)))
    engine.reset()
    engine.prefill(TOKENS)
    with pytest.raises(ContextOverflowError, match=r"\b46\b.*\b32\b"):
        engine.prefill(list(range(32)))


def test_generate_greedy_matches_stepwise_argmax_and_stops(engine):
    engine.reset()
    out = list(engine.generate(TOKENS[:5], greedy, max_tokens=6))
    assert len(out) == 6
    # the same continuation, recomputed cold token by token
    seq = TOKENS[:5]
    for token in out:
        assert token == greedy(cold_logits(engine, seq)[-1])
        seq = seq + [token]
    # stop ids end generation without yielding the stop token
    engine.reset()
    stopped = list(engine.generate(TOKENS[:5], greedy, max_tokens=6, stop_ids=[out[2]]))
    assert stopped == out[:out.index(out[2])]


def test_generation_stops_at_the_end_of_the_context(synthetic_models):
    path, _ = synthetic_models["qwen3"]
    engine = Engine(load_model(GGUFFile(path)), n_ctx=10)
    out = list(engine.generate(TOKENS[:6], greedy, max_tokens=100))
    assert len(out) == 5  # positions 6..9 are fed back, the 5th sampled token has no room left
    assert len(engine.tokens) == 10


def test_cancel_stops_between_tokens(engine):
    engine.reset()
    seen = []
    cancel = threading.Event()

    def sampler(logits):
        seen.append(1)
        if len(seen) == 3:
            cancel.set()
        return greedy(logits)

    out = list(engine.generate(TOKENS[:4], sampler, max_tokens=50, cancel=cancel))
    assert len(out) == 3
    assert list(engine.generate(TOKENS[:4], greedy, max_tokens=4, cancel=cancel)) == []
    # a generation with a signal of its own is not affected by another's
    assert len(list(engine.generate(TOKENS[:4], greedy, max_tokens=4))) == 4


def test_default_context_and_cache_size(synthetic_models):
    path, _ = synthetic_models["llama"]
    model = load_model(GGUFFile(path))
    engine = Engine(model)
    hp = model.hp
    assert engine.n_ctx == min(hp.n_ctx_train, 4096)
    assert engine.kv_cache_bytes == 2 * hp.n_layer * hp.n_head_kv * engine.n_ctx * hp.head_dim * 2  # f16
    with pytest.raises(ValueError, match="context"):
        Engine(model, n_ctx=hp.n_ctx_train + 1)


# --- the real model ------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gemma(gemma_path):
    from runtime.tokenizer import Tokenizer

    gguf_file = GGUFFile(gemma_path)
    return Engine(load_model(gguf_file), n_ctx=512), Tokenizer.from_metadata(gguf_file.metadata)


def log_softmax(logits):
    x = logits.astype(np.float64)
    x -= x.max()
    return x - np.log(np.exp(x).sum())


# How close to llama.cpp is close enough. llama.cpp quantizes every matmul's activations to
# 8 bits (Q8_0 / Q8_K blocks) and keeps K/V and its GELU table in f16; we compute in float32.
# Checked op by op against llama.cpp's own intermediate tensors (llama-cpp-python 0.3.36, same
# file): each of our matmuls agrees with llama.cpp's to 2e-7 when fed its 8-bit activations,
# and differs by 1-2.5% when not, because Gemma's activations have outliers ~10x their RMS.
# Over 18 layers that rounding compounds into logit noise of a few tenths, so llama.cpp
# builds disagree among themselves: that local build differs from the reference JSON by up to
# 0.26 in the first-token log-probs and picks another token at a near-tie in 2 of the 4 greedy
# continuations. Over the 4 x 8 first-token log-probs it is off from the JSON by 0.10 on
# average (max 0.26), our float32 path by 0.10 (max 0.39, a token at log-prob -7.5). So:
FIRST_TOP_TOL = 0.45  # |log-prob difference| of any of llama.cpp's 8 most likely first tokens
FIRST_TOP_MEAN_TOL = 0.15  # mean |log-prob difference| over all prompts' top 8
# llama.cpp's token may lose to our argmax by at most this many logits: when every log-prob
# is within FIRST_TOP_TOL of llama.cpp's, its pick can trail ours by up to twice that. Seen:
# up to 0.07, and 0.59 once the legacy-format kernels summed 8 blocks a step instead of 2
# (a float32 reordering; each matrix still within its float32 bound in test_q8, the
# first-token log-probs as close to llama.cpp's as before: mean 0.12 vs 0.10).
NEAR_TIE = 2 * FIRST_TOP_TOL


def test_gemma_follows_llamacpp_greedy(gemma, llamacpp_reference):
    """Teacher-forced along llama.cpp's greedy continuation: at every step its token is our
    greedy choice, or a near-tie with it; and its top first-token log-probs agree."""
    engine, tokenizer = gemma
    exact = 0
    diffs = []
    for case in llamacpp_reference["greedy"]:
        prompt = tokenizer.encode(case["prompt"], add_special=True)
        assert prompt[0] == 2  # BOS
        continuation = tokenizer.encode(case["content"], add_special=False, parse_special=False)
        assert tokenizer.decode(continuation) == case["content"]
        engine.reset()
        logits = engine.eval(prompt)
        logprobs = log_softmax(logits)
        assert int(np.argmax(logits)) == case["first_top"][0][0], case["prompt"]
        for token_id, piece, expected in case["first_top"]:
            diffs.append(abs(logprobs[token_id] - expected))
            assert diffs[-1] < FIRST_TOP_TOL, (case["prompt"], piece)
        agrees = True
        for step, token in enumerate(continuation):
            if step:
                logits = engine.decode(continuation[step - 1])
            gap = float(logits.max() - logits[token])
            assert gap <= NEAR_TIE, (case["prompt"], step, tokenizer.decode(continuation[:step]), gap)
            agrees = agrees and gap == 0
        exact += agrees
    assert np.mean(diffs) < FIRST_TOP_MEAN_TOL
    assert exact >= 2  # measured: 2 of 4 verbatim (llama.cpp 0.3.36 here: also 2 of 4); the
    # other two part at near-ties of 0.012 and 0.0005 logits


def test_gemma_generate_reproduces_a_llamacpp_continuation_verbatim(gemma, llamacpp_reference):
    """Free-running greedy generation through Engine.generate, compared as text."""
    engine, tokenizer = gemma
    case = next(c for c in llamacpp_reference["greedy"] if c["prompt"].startswith("def fibonacci"))
    prompt = tokenizer.encode(case["prompt"], add_special=True)
    engine.reset()
    out = list(engine.generate(prompt, greedy, max_tokens=24, stop_ids=tokenizer.eog_ids))
    assert tokenizer.decode(out) == case["content"]
