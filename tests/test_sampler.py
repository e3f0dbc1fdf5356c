"""The host sampler against a float64 numpy twin of the distribution it should
draw from (HF semantics for the repetition penalty, top-k and top-p)."""

from __future__ import annotations

import numpy as np
import pytest

from kiln.errors import KilnError, RequestError
from kiln.runtime.sampler import NonFiniteLogitsError, Sampler, SamplingParams

VOCAB = 13  # odd, small: empirical frequencies converge fast
DRAWS = 5000


def ref_probs(logits, *, temperature=1.0, top_k=0, top_p=1.0, penalty=1.0, history=()):
    """float64 reference: HF's RepetitionPenalty -> Temperature -> TopK -> TopP processors."""
    x = np.asarray(logits, dtype=np.float64).copy()
    if penalty != 1.0 and len(history):
        idx = np.unique(np.asarray(history))
        v = x[idx]
        x[idx] = np.where(v < 0, v * penalty, v / penalty)
    x /= temperature
    if top_k:
        kth = np.sort(x)[-top_k]
        x[x < kth] = -np.inf
    p = np.exp(x - x.max())
    p /= p.sum()
    if top_p < 1.0:
        order = np.argsort(p, kind="stable")  # ascending, as HF's TopPLogitsWarper
        remove = np.cumsum(p[order]) <= 1.0 - top_p
        remove[-1] = False  # keep at least one
        p[order[remove]] = 0.0
        p /= p.sum()
    return p


def empirical(sampler, logits, history=None, n=DRAWS):
    counts = np.bincount([sampler(logits, history) for _ in range(n)], minlength=logits.size)
    return counts / n


def assert_matches(freq, p, n=DRAWS):
    tol = 5 * np.sqrt(p * (1 - p) / n) + 2e-3  # 5 sigma per token; the seed is fixed, so no flakiness
    assert np.all(np.abs(freq - p) <= tol), np.c_[freq, p, tol]
    assert np.all(freq[p == 0] == 0)


@pytest.fixture
def logits():
    return np.random.default_rng(7).standard_normal(VOCAB).astype(np.float32) * 2


def test_greedy_is_argmax():
    rng = np.random.default_rng(0)
    s = Sampler(SamplingParams())
    for _ in range(200):
        x = rng.standard_normal(211).astype(np.float32) * 5
        assert s(x) == int(np.argmax(x))
    tie = np.array([0.0, 3.0, 3.0, 1.0], np.float32)
    assert s(tie) == 1  # first of equal maxima, as argmax


def test_sampler_does_not_modify_logits(logits):
    before = logits.copy()
    Sampler(SamplingParams(temperature=0.7, top_k=5, top_p=0.9, repetition_penalty=1.3, seed=0))(logits, [1, 2, 3])
    np.testing.assert_array_equal(logits, before)


def test_seeded_sampling_is_reproducible(logits):
    sp = SamplingParams(temperature=1.0, top_p=0.95, seed=1234)
    a, b = _draws(Sampler(sp), logits, 300), _draws(Sampler(sp), logits, 300)
    assert a == b
    assert _draws(Sampler(SamplingParams(temperature=1.0, top_p=0.95, seed=1235)), logits, 300) != a
    assert len(set(a)) > 3  # it did sample


def _draws(s, logits, n):
    return [s(logits) for _ in range(n)]


def test_top_k_1_is_greedy():
    rng = np.random.default_rng(1)
    s = Sampler(SamplingParams(temperature=1.5, top_k=1, seed=3))
    for _ in range(300):
        x = rng.standard_normal(97).astype(np.float32)
        assert s(x) == int(np.argmax(x))


def test_tiny_top_p_is_greedy():
    rng = np.random.default_rng(2)
    s = Sampler(SamplingParams(temperature=1.0, top_p=1e-9, seed=4))
    for _ in range(300):
        x = rng.standard_normal(97).astype(np.float32)
        assert s(x) == int(np.argmax(x))


@pytest.mark.parametrize("temperature", [1e-6, 1e-300, 5e-324])
def test_tiny_temperature_is_greedy_not_nan(temperature):
    rng = np.random.default_rng(3)
    s = Sampler(SamplingParams(temperature=temperature, seed=5))
    for _ in range(50):
        x = rng.standard_normal(97).astype(np.float32) * 100
        assert s(x) == int(np.argmax(x))
    extreme = np.array([-3e38, 3e38, 0.0], np.float32)
    assert s(extreme) == 1


@pytest.mark.parametrize("temperature", [0.5, 2.0])
def test_temperature_matches_softmax(logits, temperature):
    s = Sampler(SamplingParams(temperature=temperature, seed=11))
    assert_matches(empirical(s, logits), ref_probs(logits, temperature=temperature))


@pytest.mark.parametrize("top_k", [3])
def test_top_k_matches_reference(logits, top_k):
    s = Sampler(SamplingParams(temperature=0.8, top_k=top_k, seed=12))
    p = ref_probs(logits, temperature=0.8, top_k=top_k)
    assert np.count_nonzero(p) == top_k
    assert_matches(empirical(s, logits), p)


@pytest.mark.parametrize("top_p", [0.3, 0.95])
def test_top_p_matches_reference(logits, top_p):
    s = Sampler(SamplingParams(temperature=1.2, top_p=top_p, seed=13))
    assert_matches(empirical(s, logits), ref_probs(logits, temperature=1.2, top_p=top_p))


def test_top_k_and_top_p_together(logits):
    s = Sampler(SamplingParams(temperature=0.9, top_k=6, top_p=0.8, seed=14))
    assert_matches(empirical(s, logits), ref_probs(logits, temperature=0.9, top_k=6, top_p=0.8))


def test_repetition_penalty_hf_semantics_greedy():
    """Positive logits are divided by the penalty, negative ones multiplied."""
    s = Sampler(SamplingParams(repetition_penalty=2.0))
    pos = np.array([2.0, 1.5, -5.0], np.float32)
    assert s(pos) == 0 and s(pos, [2]) == 0
    assert s(pos, [0]) == 1  # 2.0 / 2 = 1.0 < 1.5
    neg = np.array([-1.0, -1.5, -5.0], np.float32)
    assert s(neg, [0]) == 1  # -1.0 * 2 = -2.0 < -1.5
    # a penalty below 1 rewards repetition instead
    assert Sampler(SamplingParams(repetition_penalty=0.5))(np.array([1.0, 1.5], np.float32), [0]) == 0


@pytest.mark.parametrize("penalty", [1.3, 0.8])
def test_repetition_penalty_distribution(logits, penalty):
    history = [0, 3, 3, 5, 9]  # tokens 0, 3, 5, 9; repeats count once, as in HF
    s = Sampler(SamplingParams(temperature=1.0, repetition_penalty=penalty, seed=15))
    p = ref_probs(logits, penalty=penalty, history=history)
    freq = empirical(s, logits, history)
    assert_matches(freq, p)
    # relative to every other token, penalised ones lose probability (gain it below 1)
    ratio = p / ref_probs(logits)
    seen = np.isin(np.arange(VOCAB), history)
    if penalty > 1:
        assert ratio[seen].max() < ratio[~seen].min()
    else:
        assert ratio[seen].min() > ratio[~seen].max()
    assert np.allclose(ref_probs(logits, penalty=penalty, history=[0, 3, 5, 9]), p)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_logits_refused(logits, bad):
    x = logits.copy()
    x[4] = bad
    for sp in (SamplingParams(), SamplingParams(temperature=1.0, seed=0)):
        with pytest.raises(NonFiniteLogitsError, match="NaN/Inf"):
            Sampler(sp)(x)
    assert issubclass(NonFiniteLogitsError, KilnError)


def test_sampler_wants_sampling_params():
    with pytest.raises(RequestError, match="SamplingParams"):
        Sampler({"temperature": 1.0})
