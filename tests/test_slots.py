"""Several sequences at once: the engine's slots and its batched step.

A batched step runs every sequence's rows through the weight matrices as one matmul, and
attention per sequence over its own cache. Against each sequence decoded alone (matvec):
the integer path rounds activations to 8 bits per token row in both (q8.py quantizes each
row of a batch on its own, as matvec quantizes its one vector) and its dot products are
exact integer sums, so the only difference left is the order in which float32 partial
sums are added (the float formats' matmul multiplies 4 rows at a time, matvec one block
after another): ~1e-6 of the largest logit, which ATOL (1e-4, as tests/test_engine.py)
bounds with room. Greedy tokens must then be identical.
"""

import numpy as np
import pytest

from runtime.engine import ContextSizeError, Engine
from runtime.gguf import GGUFFile
from runtime.model import load_model

ATOL = 1e-4
PROMPTS = [[5, 17, 3, 99, 42], [7, 150, 1], [64, 23, 11, 88, 2, 9, 31]]


@pytest.fixture(scope="module", params=["llama", "gemma3"])
def model(request, synthetic_models):
    path, _ = synthetic_models[request.param]
    return load_model(GGUFFile(path))


def assert_close(a, b):
    assert np.abs(a - b).max() <= ATOL * np.abs(b).max()


def alone(model, prompt, steps):
    """Greedy tokens and every step's logits of one sequence, decoded on its own (matvec)."""
    engine = Engine(model, n_ctx=32)
    logits = [engine.prefill(prompt)]
    tokens = []
    for _ in range(steps):
        tokens.append(int(np.argmax(logits[-1])))
        logits.append(engine.decode(tokens[-1]))
    return tokens, logits


def test_batched_decode_gives_each_sequence_its_own_tokens_and_logits(model):
    steps = 6
    expected = [alone(model, p, steps) for p in PROMPTS]
    engine = Engine(model, n_ctx=96, n_parallel=3)
    assert engine.n_ctx == 32 and len(engine.slots) == 3
    logits = [engine.prefill(p, slot=i) for i, p in enumerate(PROMPTS)]
    tokens = [[] for _ in PROMPTS]
    for step in range(steps):
        for i in range(3):
            assert_close(logits[i], expected[i][1][step])
            tokens[i].append(int(np.argmax(logits[i])))
        logits = list(engine.step([(i, [tokens[i][-1]]) for i in range(3)]))
    for i in range(3):
        assert tokens[i] == expected[i][0]
        assert_close(logits[i], expected[i][1][steps])
        assert engine.slots[i].tokens == PROMPTS[i] + tokens[i]


def test_a_prefill_chunk_rides_in_the_same_step_as_decoding(model):
    """One step: slot 0 decodes a token while slot 1 prefills a whole prompt."""
    (first, *_), expected0 = alone(model, PROMPTS[0], 1)
    _, expected1 = alone(model, PROMPTS[2], 0)
    engine = Engine(model, n_ctx=64, n_parallel=2)
    engine.prefill(PROMPTS[0], slot=0)
    out = engine.step([(1, PROMPTS[2]), (0, [first])])
    assert_close(out[0], expected1[0])
    assert_close(out[1], expected0[1])
    assert engine.stats["decode_tokens"] == 1


def test_slots_split_the_context_and_reuse_their_own_prefix(model):
    engine = Engine(model, n_ctx=64, n_parallel=2)
    assert engine.n_ctx == 32 and engine.n_ctx_total == 64
    assert engine.kv_cache_bytes == Engine(model, n_ctx=64).kv_cache_bytes  # memory does not grow
    engine.eval(PROMPTS[0], slot=0)
    engine.eval(PROMPTS[1], slot=1)
    # a follow-up of slot 0's conversation goes back to slot 0, and computes only its new tokens
    follow_up = PROMPTS[0] + [77, 78]
    slot = engine.pick_slot(follow_up, [0, 1])
    assert slot == 0
    before = engine.n_computed
    engine.eval(follow_up, slot=slot)
    assert engine.n_computed - before == 2
    assert engine.slots[1].tokens == PROMPTS[1]  # untouched
    # an unrelated prompt takes the least recently used slot
    assert engine.pick_slot([200, 201], [0, 1]) == 1
    with pytest.raises(ContextSizeError, match="--parallel"):
        Engine(model, n_ctx=8, n_parallel=5)


def test_a_copied_slot_continues_like_the_original(model):
    tokens, expected = alone(model, PROMPTS[2], 2)
    engine = Engine(model, n_ctx=64, n_parallel=2)
    engine.prefill(PROMPTS[2], slot=0)
    engine.copy_slot(0, 1)
    assert engine.slots[1].tokens == PROMPTS[2]
    assert_close(engine.decode(tokens[0], slot=1), expected[1])
