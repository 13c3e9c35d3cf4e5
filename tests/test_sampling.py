"""runtime.sampling: each stage of the chain against its definition, draws against the
distribution they should follow, stop strings over streamed pieces.

Statistical checks use fixed seeds, so they are deterministic. Each compares N draws with
the expected probabilities by Pearson's chi-square statistic against the 0.999 quantile of
the chi-square distribution with (categories - 1) degrees of freedom: a correct sampler
fails it for one seed in a thousand, and the seeds used here pass. The test has power:
at N = 20,000, drawing at temperature 1 but testing against temperature 0.8 (a few
percent off per token) gives a statistic far above the bound (test_chi_square_has_power).
"""

import math
import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from runtime.sampling import (SamplingParams, Sampler, StopMatcher, _prefix_index, logprobs)

# 0.999 quantiles of chi-square(df), from the standard tables
CHI2_999 = {1: 10.828, 2: 13.816, 3: 16.266, 4: 18.467, 5: 20.515, 6: 22.458, 7: 24.322,
            8: 26.124, 9: 27.877, 10: 29.588}

PROBS = np.array([0.35, 0.25, 0.15, 0.10, 0.07, 0.05, 0.03])
LOGITS = (np.log(PROBS) + 3.0).astype(np.float32)  # a shift changes nothing
N_DRAWS = 20_000


def params(**kw) -> SamplingParams:
    """All filters off unless asked for (the dataclass defaults are llama.cpp's)."""
    base = dict(temperature=1.0, top_k=0, top_p=1.0, min_p=0.0, seed=1234)
    base.update(kw)
    return SamplingParams(**base)


def draw_counts(sampler: Sampler, logits, n=N_DRAWS) -> np.ndarray:
    return np.bincount([sampler.sample(logits) for _ in range(n)], minlength=len(logits))


def chi_square(counts: np.ndarray, probs: np.ndarray) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


def assert_follows(counts: np.ndarray, probs: np.ndarray) -> None:
    """Draws counted per token follow probs (0 where a token must never come)."""
    support = probs > 0
    assert counts[~support].sum() == 0, f"drew tokens outside the support: {np.flatnonzero(counts * ~support)}"
    stat = chi_square(counts[support], probs[support])
    assert stat < CHI2_999[int(support.sum()) - 1], (stat, counts, probs)


def softmax(x, temperature=1.0):
    z = np.asarray(x, np.float64) / temperature
    w = np.exp(z - z.max())
    return w / w.sum()


def full(ids, probs, n) -> np.ndarray:
    out = np.zeros(n)
    out[ids] = probs
    return out


# --- parameters ----------------------------------------------------------------------------

@pytest.mark.parametrize("name, value, allowed", [
    ("temperature", -0.1, ">= 0"),
    ("temperature", float("nan"), ">= 0"),
    ("temperature", float("inf"), ">= 0"),
    ("temperature", True, ">= 0"),
    ("temperature", "hot", ">= 0"),
    ("top_k", -1, "integer >= 0"),
    ("top_k", 2.5, "integer >= 0"),
    ("top_k", "40", "integer >= 0"),
    ("top_p", 1.5, "between 0 and 1"),
    ("top_p", -0.01, "between 0 and 1"),
    ("min_p", 1.01, "between 0 and 1"),
    ("repeat_penalty", 0.0, "> 0"),
    ("repeat_last_n", -2, ">= -1"),
    ("presence_penalty", 2.5, "between -2 and 2"),
    ("frequency_penalty", -3, "between -2 and 2"),
    ("seed", -5, ">= 0"),
    ("seed", 1.5, ">= 0"),
    ("max_tokens", 0, ">= 1"),
    ("stop", [""], "non-empty strings"),
    ("stop", ["ok", 3], "non-empty strings"),
    ("stop", 7, "non-empty strings"),
    ("logit_bias", [1, 2], "token ids"),
    ("logit_bias", {"x": 1.0}, "token ids"),
    ("logit_bias", {-1: 1.0}, "token ids"),
    ("logit_bias", {5: float("nan")}, "-inf"),
    ("logit_bias", {5: float("inf")}, "-inf"),
])
def test_validation_names_the_parameter_and_its_range(name, value, allowed):
    with pytest.raises(ValueError) as e:
        SamplingParams(**{name: value})
    message = str(e.value)
    assert message.startswith(name), message
    assert allowed in message, message


def test_validation_normalizes_what_clients_send():
    p = SamplingParams(top_k=40.0, seed=-1, stop="###", logit_bias={"17": -math.inf, 3: 2})
    assert p.top_k == 40 and isinstance(p.top_k, int)
    assert p.seed is None  # -1 = random, as llama.cpp
    assert p.stop == ["###"]
    assert p.logit_bias == {17: -math.inf, 3: 2.0}
    p.top_p = 2.0  # validate() is the one place, also after a change
    with pytest.raises(ValueError, match="^top_p"):
        p.validate()


def test_sampler_refuses_bias_outside_the_vocabulary():
    with pytest.raises(ValueError, match="^logit_bias.*7"):
        Sampler(params(logit_bias={7: 1.0}), n_vocab=7)
    with pytest.raises(ValueError, match="expected 7 logits"):
        Sampler(params(), n_vocab=7).sample(np.zeros(8, np.float32))


# --- bias and penalties ----------------------------------------------------------------------

PEN_LOGITS = np.array([2.0, -1.0, 0.5, 3.0, -0.5, 1.0], np.float32)
PEN_HISTORY = [2, 1, 0, 3, 0, 1, 0]  # last 5: [0, 3, 0, 1, 0] -> token 0 x3, 1 x1, 3 x1


def test_penalties_exactly_as_defined():
    s = Sampler(params(repeat_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25,
                       repeat_last_n=5), n_vocab=6)
    got = s.adjusted_logits(PEN_LOGITS, PEN_HISTORY)
    # token 0: 2.0 / 2 - (3 * 0.25 + 0.5); token 1: -1.0 * 2 - (0.25 + 0.5);
    # token 3: 3.0 / 2 - (0.25 + 0.5); token 2 is only outside the window: untouched
    assert got.tolist() == [-0.25, -2.75, 0.5, 0.75, -0.5, 1.0]
    assert PEN_LOGITS.tolist() == [2.0, -1.0, 0.5, 3.0, -0.5, 1.0]  # the caller's copy is intact


def test_penalty_window_all_and_off():
    kw = dict(repeat_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25)
    whole = Sampler(params(repeat_last_n=-1, **kw), 6).adjusted_logits(PEN_LOGITS, PEN_HISTORY)
    # whole history: token 0 x3, 1 x2, 2 x1, 3 x1
    assert whole.tolist() == [-0.25, -3.0, -0.5, 0.75, -0.5, 1.0]
    off = Sampler(params(repeat_last_n=0, **kw), 6).adjusted_logits(PEN_LOGITS, PEN_HISTORY)
    assert off.tolist() == PEN_LOGITS.tolist()
    neutral = Sampler(params(repeat_last_n=5), 6).adjusted_logits(PEN_LOGITS, PEN_HISTORY)
    assert neutral.tolist() == PEN_LOGITS.tolist()


def test_logit_bias_comes_before_penalties():
    s = Sampler(params(repeat_penalty=2.0, presence_penalty=0.5, frequency_penalty=0.25,
                       repeat_last_n=5, logit_bias={4: 2.5}), 6)
    got = s.adjusted_logits(PEN_LOGITS, [4])
    # bias first: -0.5 + 2.5 = 2.0 is positive, so divided: 1.0 - 0.75. (The other order
    # would give -0.5 * 2 - 0.75 + 2.5 = 0.75.)
    assert got[4] == 0.25


def test_logit_bias_bans_and_forces():
    best = int(np.argmax(LOGITS))
    banned = Sampler(params(logit_bias={best: -math.inf}), len(LOGITS))
    counts = draw_counts(banned, LOGITS, 3000)
    assert counts[best] == 0 and counts.sum() == 3000
    assert Sampler(params(temperature=0, logit_bias={best: -math.inf}), len(LOGITS)).sample(LOGITS) == 1
    forced = Sampler(params(logit_bias={6: 100.0}), len(LOGITS))
    assert {forced.sample(LOGITS) for _ in range(500)} == {6}
    with pytest.raises(ValueError, match="every token is banned"):
        Sampler(params(logit_bias={i: -math.inf for i in range(7)}), 7).sample(LOGITS)


def test_banned_tokens_never_drawn_even_inside_top_k():
    # only two tokens are allowed, top_k asks for five: the banned ones must not fill in
    s = Sampler(params(top_k=5, logit_bias={i: -math.inf for i in range(2, 7)}), 7)
    counts = draw_counts(s, LOGITS, 4000)
    assert_follows(counts, full([0, 1], softmax(LOGITS[:2]), 7))


def test_greedy_is_argmax_after_bias_and_penalties():
    rng = np.random.default_rng(5)
    logits = rng.standard_normal(262_144).astype(np.float32)
    top = int(np.argmax(logits))
    assert Sampler(params(temperature=0), logits.size).sample(logits) == top
    assert Sampler(params(temperature=-1.0 + 1.0), logits.size).sample(logits, [top]) == top
    # a strong repeat penalty on the argmax hands the win to the runner-up
    runner_up = int(np.argsort(logits)[-2])
    s = Sampler(params(temperature=0, repeat_penalty=1000.0), logits.size)
    assert s.sample(logits, [top]) == runner_up
    ids, probs = s.distribution(logits, [top])
    assert ids.tolist() == [runner_up] and probs.tolist() == [1.0]


# --- the filters -----------------------------------------------------------------------------

def test_top_k_keeps_the_k_best():
    s = Sampler(params(top_k=3), len(LOGITS))
    ids, probs = s.distribution(LOGITS)
    assert sorted(ids.tolist()) == [0, 1, 2]
    expected = PROBS[:3] / PROBS[:3].sum()
    assert np.allclose(full(ids, probs, 7)[:3], expected, rtol=1e-6)
    assert_follows(draw_counts(s, LOGITS), full([0, 1, 2], expected, 7))


@pytest.mark.parametrize("p, kept", [(0.59, 2), (0.61, 3), (0.74, 3), (0.76, 4), (0.0, 1), (0.999, 7)])
def test_top_p_keeps_the_smallest_prefix_reaching_p(p, kept):
    # cumulative: 0.35 0.60 0.75 0.85 0.92 0.97 1.00
    s = Sampler(params(top_p=p), len(LOGITS))
    ids, probs = s.distribution(LOGITS)
    assert sorted(ids.tolist()) == list(range(kept))
    expected = PROBS[:kept] / PROBS[:kept].sum()
    assert np.allclose(full(ids, probs, 7)[:kept], expected, rtol=1e-6)


def test_top_p_draws():
    s = Sampler(params(top_p=0.8), len(LOGITS))  # keeps 4 (0.85)
    assert_follows(draw_counts(s, LOGITS), full(range(4), PROBS[:4] / PROBS[:4].sum(), 7))


def brute_top_p(logits, p) -> set[int]:
    probs = softmax(logits)
    order = np.argsort(-probs, kind="stable")
    mass = np.cumsum(probs[order])
    return set(order[: int(np.searchsorted(mass, p, side="left")) + 1].tolist())


@pytest.mark.parametrize("n, scale", [(50, 1.0), (262_144, 20.0), (262_144, 2.0)])
def test_top_p_matches_its_definition(n, scale):
    """Small sets, a peaked vocabulary (the 1024 largest hold the mass) and a flat one
    (every value sorted) all keep exactly the brute-force set."""
    rng = np.random.default_rng(n + int(scale))
    logits = (rng.standard_normal(n) * scale).astype(np.float32)
    for p in rng.uniform(0.05, 0.98, size=4):
        ids, _ = Sampler(params(top_p=float(p)), n).distribution(logits)
        assert set(ids.tolist()) == brute_top_p(logits, p), p


@pytest.mark.parametrize("n", [4, 64, 1000, 20_000])
def test_top_p_boundary_is_inclusive(n):
    """Equal logits make the running mass exact: p = 0.5 reaches 0.5 after n/2 tokens, and
    llama.cpp stops there (`cum_sum >= p`), not one token later."""
    ids, probs = Sampler(params(top_p=0.5), n).distribution(np.zeros(n, np.float32))
    assert ids.size == n // 2 and np.allclose(probs, 2 / n)
    # the same when the 1024 largest of a large vocabulary hold all the mass
    logits = np.full(50_000, -1000.0, np.float32)  # exp() underflows to exactly 0
    logits[:n] = 0.0
    ids, _ = Sampler(params(top_p=0.5), logits.size).distribution(logits)
    assert ids.size == n // 2


@pytest.mark.parametrize("min_p, kept", [(0.3, 3), (0.25, 4), (0.9, 1), (0.05, 7)])
def test_min_p_threshold(min_p, kept):
    # threshold = min_p * 0.35: 0.105 keeps 0.35 0.25 0.15; 0.0875 also keeps 0.10
    ids, probs = Sampler(params(min_p=min_p), len(LOGITS)).distribution(LOGITS)
    assert sorted(ids.tolist()) == list(range(kept))
    assert np.allclose(full(ids, probs, 7)[:kept], PROBS[:kept] / PROBS[:kept].sum(), rtol=1e-6)


def test_min_p_draws_on_a_large_vocabulary():
    rng = np.random.default_rng(11)
    logits = (rng.standard_normal(50_000) * 3).astype(np.float32)
    s = Sampler(params(min_p=0.1), logits.size)
    ids, _ = s.distribution(logits)
    probs = softmax(logits)
    assert set(ids.tolist()) == set(np.flatnonzero(probs >= 0.1 * probs.max()).tolist())


def test_filters_come_before_temperature():
    # at temperature 1, top-p 0.5 keeps two tokens (0.35 + 0.25); temperature 5 flattens
    # only what is kept. Applied first, it would have spread the mass over more tokens.
    ids, probs = Sampler(params(top_p=0.5, temperature=5.0), len(LOGITS)).distribution(LOGITS)
    assert sorted(ids.tolist()) == [0, 1]
    assert np.allclose(full(ids, probs, 7)[:2], softmax(LOGITS[:2], 5.0), rtol=1e-6)
    # and top-k before top-p: renormalized within the 2 best (0.58, 0.42), top-p 0.55 keeps
    # one token; over the whole distribution first (0.35, 0.60...) it would have kept two
    ids, _ = Sampler(params(top_k=2, top_p=0.55), len(LOGITS)).distribution(LOGITS)
    assert ids.tolist() == [0]


# --- temperature and the draw ----------------------------------------------------------------

def entropy(p):
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def test_temperature_reshapes_the_distribution():
    temps = [0.25, 0.5, 1.0, 2.0, 4.0]
    dists = [full(*Sampler(params(temperature=t), 7).distribution(LOGITS), 7) for t in temps]
    assert np.allclose(dists[2], PROBS, rtol=1e-6)  # temperature 1 is the softmax itself
    for t, d in zip(temps, dists):
        assert np.allclose(d, softmax(LOGITS, t), rtol=1e-5)
    entropies = [entropy(d) for d in dists]
    assert entropies == sorted(entropies) and len(set(entropies)) == len(temps)
    assert entropies[-1] < math.log(7)  # flatter, never uniform


@pytest.mark.parametrize("temperature, seed", [(0.5, 1), (1.0, 2), (2.0, 3)])
def test_draws_follow_the_softmax(temperature, seed):
    s = Sampler(params(temperature=temperature, seed=seed), 7)
    counts = draw_counts(s, LOGITS)
    assert_follows(counts, softmax(LOGITS, temperature))


def test_empirical_entropy_grows_with_temperature():
    emp = []
    for t in (0.5, 1.0, 2.0):
        counts = draw_counts(Sampler(params(temperature=t, seed=9), 7), LOGITS, 5000)
        emp.append(entropy(counts / counts.sum()))
    assert emp[0] < emp[1] < emp[2]


def test_chi_square_has_power():
    counts = draw_counts(Sampler(params(temperature=1.0, seed=2), 7), LOGITS)
    assert chi_square(counts, softmax(LOGITS, 1.0)) < CHI2_999[6]
    assert chi_square(counts, softmax(LOGITS, 0.8)) > 10 * CHI2_999[6]


def test_draw_across_blocks_of_a_large_vocabulary():
    """Five live tokens scattered over a 10,000-token vocabulary (the block-wise prefix
    sums), between -inf ones and a few near-zero ones."""
    n = 10_000
    live = [3, 1500, 4100, 7000, 9999]
    probs = np.array([0.1, 0.3, 0.05, 0.25, 0.3])
    logits = np.full(n, -np.inf, np.float32)
    logits[live] = np.log(probs)
    logits[[0, 2048, 5000]] = -200.0  # exp underflows to 0 in float32
    counts = draw_counts(Sampler(params(seed=77), n), logits)
    assert_follows(counts, full(live, probs, n))


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(1, 20_000), st.floats(0, 1, exclude_max=True),
       st.sampled_from(["left", "right"]))
def test_prefix_index_matches_a_plain_cumulative_sum(seed, n, fraction, side):
    rng = np.random.default_rng(seed)
    w = rng.exponential(size=n).astype(np.float32)
    w[rng.random(n) < 0.3] = 0.0
    w[rng.integers(n)] = 1.0  # at least one positive weight
    i = _prefix_index(w, fraction, side)
    run = np.cumsum(w, dtype=np.float64)
    target = fraction * run[-1]
    assert w[i] > 0
    # the running sum reaches the target at i and not before (up to float64 rounding)
    tol = 1e-9 * run[-1]
    assert (run[i] >= target - tol) if side == "left" else (run[i] > target - tol)
    if i:
        before = run[i - 1]
        assert (before < target + tol) if side == "left" else (before <= target + tol)


@pytest.mark.parametrize("n", [100, 8192])
def test_prefix_index_at_exact_boundaries(n):
    w = np.ones(n, np.float32)  # integer running sums: the half-way mark is hit exactly
    assert _prefix_index(w, 0.5, "left") == n // 2 - 1  # the sum reaches n/2 there
    assert _prefix_index(w, 0.5, "right") == n // 2  # and first exceeds it one later
    assert _prefix_index(w, 0.0, "right") == 0
    w[:10] = 0
    assert _prefix_index(w, 0.0, "left") == 10  # never a zero weight


def test_seed_reproduces_and_different_seeds_differ():
    rng = np.random.default_rng(3)
    steps = [rng.standard_normal(1000).astype(np.float32) for _ in range(300)]

    def run(seed):
        s = Sampler(params(seed=seed, top_k=50, top_p=0.9, min_p=0.02, repeat_penalty=1.1), 1000)
        history = []
        for logits in steps:
            history.append(s.sample(logits, history))
        return history

    assert run(42) == run(42)
    assert run(42) != run(43)
    assert run(None) != run(None)  # fresh entropy each time (a collision is ~impossible)


def test_speed_on_a_262k_vocabulary():
    """Once per generated token: it must stay small next to a decode step (~20 ms)."""
    rng = np.random.default_rng(0)
    logits = (rng.standard_normal(262_144) * 8).astype(np.float32)
    history = rng.integers(0, 262_144, 1000).tolist()
    for kw, budget_ms in [(dict(top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.1), 5),
                          (dict(top_p=0.95), 15), (dict(), 15), (dict(temperature=0), 2)]:
        s = Sampler(params(**kw), logits.size)
        s.sample(logits, history)
        t0 = time.perf_counter()
        for _ in range(20):
            s.sample(logits, history)
        ms = (time.perf_counter() - t0) / 20 * 1000
        assert ms < budget_ms, (kw, ms)


# --- log-probabilities -----------------------------------------------------------------------

def test_logprobs_of_the_raw_distribution():
    lp = logprobs(LOGITS, token=2, top_n=3)
    assert lp.token == 2 and math.isclose(lp.logprob, math.log(0.15), rel_tol=1e-5)
    assert [t for t, _ in lp.top] == [0, 1, 2]
    assert np.allclose([v for _, v in lp.top], np.log(PROBS[:3]), rtol=1e-5)
    everything = logprobs(LOGITS, token=0, top_n=100).top
    assert len(everything) == 7
    assert math.isclose(sum(math.exp(v) for _, v in everything), 1.0, rel_tol=1e-6)
    assert logprobs(LOGITS, token=6).top == []
    ties = logprobs(np.zeros(5, np.float32), token=0, top_n=3).top
    assert [t for t, _ in ties] == [0, 1, 2]  # equal logits: by id


def test_logprobs_on_a_large_vocabulary():
    rng = np.random.default_rng(4)
    logits = (rng.standard_normal(262_144) * 4).astype(np.float32)
    lp = logprobs(logits, token=123, top_n=5)
    ref = np.log(softmax(logits))
    assert math.isclose(lp.logprob, ref[123], rel_tol=1e-5, abs_tol=1e-5)
    best = np.argsort(-ref)[:5]
    assert [t for t, _ in lp.top] == best.tolist()
    assert np.allclose([v for _, v in lp.top], ref[best], atol=1e-5)


# --- stop strings ----------------------------------------------------------------------------

def stream(matcher: StopMatcher, pieces) -> list[str]:
    out = [matcher.push(p) for p in pieces]
    out.append(matcher.flush())
    return out


def test_stop_spanning_three_pieces():
    m = StopMatcher(["<|end|>"])
    out = stream(m, ["Hello <|", "en", "d|> and more", "ignored"])
    assert out == ["Hello ", "", "", "", ""]
    assert m.stopped and m.matched == "<|end|>"


def test_false_start_is_emitted_once_it_is_not_a_stop():
    m = StopMatcher(["<|end|>"])
    out = stream(m, ["a<", "|en", "x more", " text<"])
    assert out == ["a", "", "<|enx more", " text", "<"]
    assert not m.stopped and m.matched is None


def test_stop_at_the_start_and_inside_one_piece():
    m = StopMatcher(["STOP"])
    assert m.push("STOP right away") == ""
    assert m.stopped
    m = StopMatcher(["\n\n", "User:"])
    assert stream(m, ["one\ntwo", "\n\nthree"]) == ["one\ntwo", "", ""]
    assert m.matched == "\n\n"


def test_no_stop_strings_pass_everything():
    m = StopMatcher([])
    assert stream(m, ["a", "<|end|>", "b"]) == ["a", "<|end|>", "b", ""]


def test_stop_validation():
    with pytest.raises(ValueError, match="^stop"):
        StopMatcher([""])


def reference_cut(text: str, stops: list[str]) -> tuple[str, str | None]:
    """Character by character: the first position where some stop string ends (the
    longest of those ending there); the text before it."""
    for end in range(1, len(text) + 1):
        done = [s for s in stops if text[:end].endswith(s)]
        if done:
            s = max(done, key=len)
            return text[:end - len(s)], s
    return text, None


@settings(max_examples=300, deadline=None)
@given(text=st.text("abc<|>", max_size=40),
       stops=st.lists(st.text("abc<|>", min_size=1, max_size=5), min_size=1, max_size=3),
       cuts=st.lists(st.integers(0, 40), max_size=10))
def test_stop_matching_does_not_depend_on_how_text_is_split(text, stops, cuts):
    bounds = sorted({0, len(text), *(c for c in cuts if c <= len(text))})
    pieces = [text[a:b] for a, b in zip(bounds, bounds[1:])]
    m = StopMatcher(stops)
    emitted = "".join(stream(m, pieces))
    expected, matched = reference_cut(text, stops)
    assert emitted == expected
    assert m.matched == matched and m.stopped == (matched is not None)
