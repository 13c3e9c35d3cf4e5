"""Context checkpoints of a hybrid model (qwen35): copies of the recurrent state that let a
prompt which does not continue a slot's sequence resume near its end, as llama.cpp's server
does (--ctx-checkpoints N; tools/server/server-context.cpp in llama.cpp 0.3.36's sources).

The model is tests/parity_models.py's tiny qwen35 (F32, its own vocabulary); chat prompts
are rendered by Qwen3's chat template (tests/data/chat_templates/qwen3.jinja), which drops a
past turn's reasoning, as Qwen3.5's does.

Logits are compared with a from-scratch evaluation of the same tokens. Both run the same
kernels in the same order per token (the delta rule is sequential over tokens; attention
reads the same cached rows), but the batches the prompt is cut into differ (a resumed prompt
starts at the checkpoint), and a matmul may sum a row in another order for another batch
shape: so they agree within float32 rounding, to 1e-5 of the largest logit (float32's
epsilon is 1.2e-7; four layers of sums over 64-512 terms stay far inside 1e-5, while a wrong
state, one token off, moves logits by more than 1e-2 of it: test_a_wrong_state_is_seen).
Measured on AVX-512 with F32 and F16 caches: bit-identical.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

import parity_models as pm
from runtime.engine import CHECKPOINT_TAIL, Engine, common_prefix
from runtime.gguf import GGUFFile
from runtime.model import load_model

QWEN3_TEMPLATE = Path(__file__).resolve().parent / "data" / "chat_templates" / "qwen3.jinja"
N_CTX = 512
TOLERANCE = 1e-5  # of the largest logit: float32 rounding (the module's docstring)


@pytest.fixture(scope="module")
def qwen35(parity_model):
    """(path, model, tokenizer) of the tiny qwen35 parity model."""
    from runtime.tokenizer import Tokenizer

    path = parity_model("qwen35")
    gguf = GGUFFile(path)
    return path, load_model(gguf), Tokenizer.from_metadata(gguf.metadata)


@pytest.fixture(scope="module")
def chat(qwen35):
    """chat(messages) -> the prompt's tokens, as Qwen3's template renders them."""
    from runtime.chat import ChatTemplate

    template = ChatTemplate(QWEN3_TEMPLATE.read_text(), name="qwen3")
    tokenizer = qwen35[2]
    return lambda messages: template.prompt(messages).tokens(tokenizer)


def engine_for(model, **kw) -> Engine:
    return Engine(model, n_ctx=N_CTX, cache_type_k="f32", cache_type_v="f32", **kw)


def assert_same(got, want):
    assert np.abs(got - want).max() <= TOLERANCE * np.abs(want).max()


def computing(engine, tokens, slot=0):
    """(logits, tokens computed) of an eval of `tokens` in a slot."""
    before = engine.n_computed
    logits = engine.eval(tokens, slot)
    return logits, engine.n_computed - before


def generate(engine, tokenizer, text: str, slot: int = 0) -> None:
    """Put the tokens of `text` after the slot's prompt as a generation leaves them (the last
    one not fed back); in one pass, which leaves the same tokens and state as decoding them
    one by one (test_restore_and_continue_equals_a_fresh_evaluation decodes)."""
    engine.prefill(tokenizer.encode(text, False, True)[:-1], slot)


def test_restore_and_continue_equals_a_fresh_evaluation(qwen35):
    _, model, _ = qwen35
    tokens = pm.tokens("qwen35", model.hp.n_vocab)
    engine = engine_for(model)
    first = tokens[:40]
    engine.eval(first)
    # checkpoints at the start of the prompt's last two chunks: one chunk and 4 tokens before
    # its end (here before its start: so only the one 4 tokens before)
    assert [c.pos for c in engine.cache.checkpoints] == [len(first) - CHECKPOINT_TAIL]
    for t in tokens[40:43]:
        engine.decode(t)
    other = tokens[:38] + tokens[50:60]  # shares 38 tokens: resumes at the checkpoint (36)
    logits, n = computing(engine, other)
    assert n == len(other) - (len(first) - CHECKPOINT_TAIL)
    assert_same(logits, engine_for(model, n_ctx_checkpoints=0).eval(other))
    # decoding on from the restored state stays equal too
    fresh = engine_for(model, n_ctx_checkpoints=0)
    fresh.eval(other)
    for t in tokens[60:62]:
        assert_same(engine.decode(t), fresh.decode(t))


def test_a_wrong_state_is_seen(qwen35):
    """The comparison would catch a checkpoint restored one token off."""
    _, model, _ = qwen35
    tokens = pm.tokens("qwen35", model.hp.n_vocab)
    right = engine_for(model, n_ctx_checkpoints=0).eval(tokens[:30])
    wrong = engine_for(model, n_ctx_checkpoints=0).eval(tokens[:29] + tokens[30:31])
    assert np.abs(wrong - right).max() > 1e-2 * np.abs(right).max()


def test_a_long_prompt_gets_both_checkpoints_at_chunk_ends(qwen35):
    """A prompt longer than a chunk: the prefill breaks at 4 + a chunk and at 4 tokens before
    the end, a checkpoint at each (llama.cpp's offsets 4 + n_ubatch and 4)."""
    _, model, _ = qwen35
    tokens = pm.tokens("qwen35", model.hp.n_vocab)
    tokens = (tokens * 4)[:100]
    engine = engine_for(model, prefill_chunk=32)
    chunks = []
    real_step = engine.step
    engine.step = lambda work, prefills=0: chunks.append(len(work[0][1])) or real_step(work, prefills)
    logits = engine.eval(tokens)
    assert chunks == [32, 32, 32, 4]  # ends at 32, 64 = 100 - 4 - 32, 96 = 100 - 4, 100
    assert [c.pos for c in engine.cache.checkpoints] == [100 - 4 - 32, 100 - 4]
    assert_same(logits, engine_for(model, n_ctx_checkpoints=0).eval(tokens))


def test_a_regenerated_answer_resumes_4_tokens_back(qwen35, chat):
    _, model, tokenizer = qwen35
    prompt = chat([{"role": "user", "content": "What is the capital of France?"}])
    engine = engine_for(model)
    engine.eval(prompt)
    generate(engine, tokenizer, "<think>\nThe capital.\n</think>\n\nParis.<|im_end|>")
    logits, n = computing(engine, prompt)  # the same request again
    assert n == CHECKPOINT_TAIL
    assert_same(logits, engine_for(model, n_ctx_checkpoints=0).eval(prompt))


def test_a_next_turn_without_the_reasoning_resumes_near_the_last_prompt(qwen35, chat):
    """Qwen3's template drops the past turn's thinking: the next prompt leaves the processed
    sequence where the generation began, so without checkpoints it runs from token 0."""
    _, model, tokenizer = qwen35
    turn1 = [{"role": "system", "content": "You answer in one word."},
             {"role": "user", "content": "What is the capital of France?"}]
    answer = "Paris."
    turn2 = turn1 + [{"role": "assistant", "content": answer},
                     {"role": "user", "content": "And of Italy?"}]
    p1, p2 = chat(turn1), chat(turn2)
    results = {}
    for n_checkpoints in (8, 0):
        engine = engine_for(model, n_ctx_checkpoints=n_checkpoints)
        engine.eval(p1)
        generate(engine, tokenizer, f"<think>\nOne word.\n</think>\n\n{answer}<|im_end|>")
        shared = common_prefix(engine.tokens, p2)
        assert len(p1) - CHECKPOINT_TAIL <= shared < len(engine.tokens)  # it diverges, past the checkpoint
        results[n_checkpoints] = computing(engine, p2)
    assert results[8][1] == len(p2) - (len(p1) - CHECKPOINT_TAIL)
    assert results[0][1] == len(p2)  # as before checkpoints: all of it
    assert_same(results[8][0], results[0][0])


def test_an_edited_last_message_resumes_where_the_turn_began(qwen35, chat):
    """A next turn's checkpoints: one where its computing began (after the last answer,
    which the turn continues here) and one 4 tokens before its end. An edited last message
    resumes from the first instead of from token 0."""
    _, model, tokenizer = qwen35
    turn1 = [{"role": "user", "content": "Name a colour."}]
    engine = engine_for(model)
    engine.eval(chat(turn1))
    generate(engine, tokenizer, "Blue.<|im_end|>")
    turn2 = turn1 + [{"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one?"}]
    p2 = chat(turn2)
    resume = len(p2) - computing(engine, p2)[1]  # the answer's tokens, continued
    assert resume == len(chat(turn1)) + len(tokenizer.encode("Blue.", False, False))
    edited = chat(turn1 + [{"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Why blue?"}])
    assert [c.pos for c in engine.cache.checkpoints][-2:] == [resume, len(p2) - CHECKPOINT_TAIL]
    logits, n = computing(engine, edited)
    assert n == len(edited) - resume
    assert [c.pos for c in engine.cache.checkpoints] == [len(chat(turn1)) - CHECKPOINT_TAIL, resume,
                                                          len(edited) - CHECKPOINT_TAIL]
    assert_same(logits, engine_for(model, n_ctx_checkpoints=0).eval(edited))


def test_checkpoints_are_bounded_and_dropped_as_llamacpp_drops_them(qwen35):
    """create_checkpoint's rule: when the list is full (one more would reach N), those within
    min-step tokens after the previous one kept go (unless the current prompt's), then the
    oldest until one fits; one at the same position is replaced. A prompt that leaves the
    sequence before a checkpoint drops it (it holds tokens no longer the sequence's)."""
    _, model, _ = qwen35
    cache = model.new_cache(64, "f32", "f32")

    def take(pos, request, limit=4, min_step=10):
        cache.state.pos = pos
        cache.checkpoint(limit, min_step, request)
        return [c.pos for c in cache.checkpoints]

    assert take(5, 1) == [5]
    assert take(12, 1) == [5, 12]
    assert take(30, 2) == [5, 12, 30]
    # full: 12 is within 10 of 5 (and not this prompt's): dropped; 30 is 18 past 5: kept
    assert take(35, 3) == [5, 30, 35]
    assert take(50, 3) == [5, 30, 35, 50]  # room for 4
    # full: 35 is within 10 of 30 (an earlier prompt's now): dropped; 50 is 20 past 30
    assert take(60, 4) == [5, 30, 50, 60]
    assert take(62, 5) == [5, 30, 50, 62]  # 60 was within 10 of 50
    # all spaced out: the oldest makes room
    assert take(80, 6) == [30, 50, 62, 80]
    # the same position is replaced, not doubled (after the room was made, as llama.cpp does)
    assert take(80, 7) == [50, 62, 80]
    assert cache.checkpoints[-1].request == 7
    assert take(0, 8) == [50, 62, 80]  # nothing absorbed: nothing to save
    # a sequence that diverges at 70 resumes at 62, restored, and drops 80
    cache.state.pos = 90
    assert cache.keep(70, 90) == 62 and cache.state.pos == 62
    assert [c.pos for c in cache.checkpoints] == [50, 62]
    assert cache.keep(40, 62) == 0 and cache.checkpoints == []  # none within: from token 0

    # through the engine, a long chat's slot never holds more than N
    tokens = pm.tokens("qwen35", model.hp.n_vocab)
    engine = engine_for(model, n_ctx_checkpoints=3, checkpoint_min_step=8)
    sequence = []
    for turn in range(6):
        sequence = sequence + tokens[turn * 7:turn * 7 + 7]
        engine.eval(sequence)
        assert len(engine.cache.checkpoints) <= 3
        positions = [c.pos for c in engine.cache.checkpoints]
        assert positions == sorted(positions) and positions[-1] == len(sequence) - CHECKPOINT_TAIL


def test_zero_checkpoints_behave_as_before(qwen35, chat):
    """--ctx-checkpoints 0: no copies, and a prompt that is not a continuation runs whole."""
    _, model, tokenizer = qwen35
    prompt = chat([{"role": "user", "content": "Hello"}])
    engine = engine_for(model, n_ctx_checkpoints=0)
    engine.eval(prompt)
    assert engine.cache.checkpoints == []
    generate(engine, tokenizer, "Hi!<|im_end|>")
    assert computing(engine, prompt)[1] == len(prompt)
    # a continuation is reused whole, as before
    assert computing(engine, prompt + [7, 8])[1] == 2


def test_a_failed_pass_drops_the_checkpoints(qwen35):
    """A pass stopped midway leaves the state invalid; its checkpoints go with it and the
    next prompt starts over (as the state alone did before)."""
    _, model, _ = qwen35
    tokens = pm.tokens("qwen35", model.hp.n_vocab)
    engine = engine_for(model)
    engine.eval(tokens[:30])
    assert engine.cache.checkpoints

    def failing(layer, h):
        raise KeyboardInterrupt  # as a cancelled or crashed pass would stop midway

    engine.model.feed_forward = failing
    try:
        with pytest.raises(KeyboardInterrupt):
            engine.eval(tokens[:30] + tokens[40:45])
    finally:
        del engine.model.feed_forward
    logits, n = computing(engine, tokens[:30])
    assert n == 30
    assert_same(logits, engine_for(model, n_ctx_checkpoints=0).eval(tokens[:30]))


def test_choices_copy_the_checkpoints(qwen35):
    """n > 1 choices copy the prompt's slot, its checkpoints with it (llama.cpp's
    copy_state_to clones them): the copy resumes from them as the original would."""
    _, model, _ = qwen35
    tokens = pm.tokens("qwen35", model.hp.n_vocab)
    engine = Engine(model, n_ctx=2 * N_CTX, cache_type_k="f32", cache_type_v="f32", n_parallel=2)
    engine.slots[1].cache.state.pos = 3  # stale checkpoints of another sequence must go
    engine.slots[1].cache.checkpoint(8, 8192, 0)
    engine.eval(tokens[:20], 0)
    engine.copy_slot(0, 1)
    assert [c.pos for c in engine.slots[1].cache.checkpoints] == [16]
    engine.decode(tokens[30], 1)
    logits, n = computing(engine, tokens[:20], 1)
    assert n == CHECKPOINT_TAIL
    assert_same(logits, engine_for(model, n_ctx_checkpoints=0).eval(tokens[:20]))


def test_the_flag_is_validated_and_reaches_the_engine(qwen35):
    from click.testing import CliRunner

    from runtime.cli import main
    from runtime.session import load_session

    path, model, _ = qwen35
    with pytest.raises(ValueError, match="ctx-checkpoints"):
        engine_for(model, n_ctx_checkpoints=-1)
    result = CliRunner().invoke(main, ["-m", str(path), "--ctx-checkpoints", "-1", "-p", "hi"])
    assert result.exit_code == 2 and "--ctx-checkpoints" in result.output and "-1" in result.output
    result = CliRunner().invoke(main, ["-m", str(path), "-ctxcp", "many", "-p", "hi"])
    assert result.exit_code == 2 and "many" in result.output
    with GGUFFile(path) as gguf:
        session = load_session(gguf, 128, 0, n_ctx_checkpoints=3)
        assert session.engine.n_ctx_checkpoints == 3


def test_the_server_with_two_slots_prefills_and_regenerates_from_a_checkpoint(qwen35):
    """Through the worker and HTTP with --parallel 2: two chats at once are answered, and a
    regenerated one (the same request again) computes only the 4 tokens after its checkpoint."""
    import threading

    openai = pytest.importorskip("openai")
    from conftest import READY_LIMIT_S, serving_in_thread
    from runtime.server import ModelServer
    from runtime.session import load_session
    from runtime.worker import EngineWorker

    path = qwen35[0]
    worker = EngineWorker(lambda: load_session(GGUFFile(path), 256, 0, n_parallel=2))
    worker.start()
    try:
        assert worker.loaded.wait(READY_LIMIT_S) and worker.state == "ok", worker.error
        with serving_in_thread(ModelServer(("127.0.0.1", 0), worker, "qwen35", log=False)) as server:
            client = openai.OpenAI(base_url=f"http://127.0.0.1:{server.port}/v1", api_key="unused",
                                   max_retries=0, timeout=120)

            def ask(text, max_tokens=6):
                return client.chat.completions.create(model="qwen35", max_tokens=max_tokens, temperature=0,
                                                      messages=[{"role": "user", "content": text}])

            replies = {}
            threads = [threading.Thread(target=lambda t=t: replies.__setitem__(t, ask(t)))
                       for t in ("hello there", "what is a checkpoint?")]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
            assert all(replies[t].usage.completion_tokens >= 1 for t in replies)
            engine = worker.session.engine
            before = engine.n_computed
            again = ask("hello there", max_tokens=1)  # one token: nothing decoded after it
            assert again.usage.prompt_tokens == replies["hello there"].usage.prompt_tokens
            assert engine.n_computed - before == CHECKPOINT_TAIL
    finally:
        worker.stop()


def test_the_memory_estimate_counts_every_checkpoint(qwen35):
    """--info and the load-time warning count --ctx-checkpoints copies of each slot's state at
    most (the default number), each checkpoint being what the state is."""
    from runtime import memory
    from runtime.hparams import DEFAULT_CTX_CHECKPOINTS

    path, model, _ = qwen35
    tokens = pm.tokens("qwen35", model.hp.n_vocab)
    engine = Engine(model, n_ctx=64, n_parallel=2)
    engine.eval(tokens[:20], 1)
    state = engine.slots[1].cache.state.nbytes
    assert [c.nbytes for c in engine.slots[1].cache.checkpoints] == [state]
    with GGUFFile(path) as gguf:
        est = memory.estimate(gguf, 64, n_parallel=2)
    assert est.checkpoints == DEFAULT_CTX_CHECKPOINTS * 2 * state
    assert est.total == est.weights + est.kv_cache + est.recurrent + est.checkpoints + est.working


def test_info_and_the_warning_count_the_checkpoints_asked_for(qwen35):
    from click.testing import CliRunner

    from runtime import memory
    from runtime.cli import main
    from runtime.units import format_bytes

    path, model, _ = qwen35
    state = model.new_cache(2).state.nbytes
    lines = {}
    for n in (0, 4):
        out = CliRunner().invoke(main, ["-m", str(path), "--info", "-c", "64", "-ctxcp", str(n)])
        assert out.exit_code == 0, out.output
        lines[n] = next(line for line in out.stdout.splitlines() if line.startswith("  memory:"))
    assert "checkpoints" not in lines[0]
    assert f"recurrent states {format_bytes(state)}, their checkpoints up to {format_bytes(4 * state)}" in lines[4]
    with GGUFFile(path) as gguf:
        assert "checkpoints" not in memory.fit_warning(gguf, 64, 1, n_ctx_checkpoints=0)
        assert f"their checkpoints {format_bytes(4 * state)}" in memory.fit_warning(gguf, 64, 1, n_ctx_checkpoints=4)
