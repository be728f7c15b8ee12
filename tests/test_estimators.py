"""Estimators against direct transcriptions of their formulas and against known exponents."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from layerscope.spectral.estimators import alpha_hill, alpha_peak, alpha_ww, hill_alphas, ks_best, ks_distances
from layerscope.spectral.metrics import matrix_entropy
from tests.builders import pareto_eigenvalues


def t(x) -> torch.Tensor:
    return torch.as_tensor(np.sort(np.asarray(x, dtype=np.float64)))


# ---- direct, loop-by-loop transcriptions of the reference formulas (DESIGN.md) ----

def hill_reference(eigs):
    eigs = sorted(eigs)
    n = len(eigs)
    i = int(n / 2)
    k = n - i
    return 1 + k / (sum(math.log(e) for e in eigs[i:]) - k * math.log(eigs[i])), eigs[i]


def ks_scan_reference(eigs, candidate):
    """Loop over candidate xmins; alpha by MLE, D by KS; smallest D wins (first on ties)."""
    n = len(eigs)
    alphas, ds = [0.0] * (n - 1), [1.0] * (n - 1)
    for i in range(n - 1):
        if not candidate(eigs[i]):
            continue
        k = n - i
        alphas[i] = 1 + k / (sum(math.log(e) for e in eigs[i:]) - k * math.log(eigs[i]))
        if alphas[i] > 1:
            ds[i] = max(abs(1 - (eigs[j] / eigs[i]) ** (1 - alphas[i]) - (j - i) / k) for j in range(i, n))
    best = min(range(n - 1), key=lambda i: (ds[i], i))
    return alphas[best], eigs[best], ds[best]


def ww_reference(eigs):
    x = sorted(e for e in eigs if e > 1e-5)
    return ks_scan_reference(x, lambda _: True)


def peak_reference(eigs, bins=100):
    x = sorted(eigs)
    logs = np.log10(x)
    lo, hi = logs.min(), logs.max()
    counts = [0] * bins
    for v in logs:  # torch.histc binning: last edge belongs to the last bin
        counts[min(int((v - lo) * bins / (hi - lo)), bins - 1)] += 1
    edges = np.linspace(lo, hi, bins + 1)
    xmin2 = 10 ** edges[int(np.argmax(counts))]
    low, high = math.log10(0.95 * xmin2), 1.5 * xmin2  # log10 lower bound, as the reference
    return ks_scan_reference(x, lambda e: low <= e <= high)


FIXED_SPECTRA = {
    "pareto_small": pareto_eigenvalues(60, 2.5, seed=1),
    "bulk_plus_spikes": np.concatenate([np.linspace(0.5, 2.0, 50), [8.0, 15.0, 40.0, 90.0]]),
    "marchenko_like": np.random.default_rng(3).chisquare(5, 80) / 5,
    "wide": np.logspace(-3, 3, 45),
}


@pytest.mark.parametrize("name", FIXED_SPECTRA)
def test_alpha_hill_equals_transcription(name):
    eigs = FIXED_SPECTRA[name]
    fit = alpha_hill(t(eigs))
    alpha, xmin = hill_reference(list(eigs))
    assert fit.alpha == pytest.approx(alpha, rel=1e-12)
    assert fit.xmin == xmin


@pytest.mark.parametrize("name", FIXED_SPECTRA)
def test_alpha_ww_equals_transcription(name):
    eigs = FIXED_SPECTRA[name]
    fit = alpha_ww(t(eigs))
    alpha, xmin, d = ww_reference(list(eigs))
    assert fit.alpha == pytest.approx(alpha, rel=1e-12)
    assert fit.xmin == xmin
    assert fit.D == pytest.approx(d, rel=1e-10)
    tail = sum(1 for e in eigs if e >= xmin)
    assert fit.num_pl_spikes == tail
    assert fit.sigma == pytest.approx((alpha - 1) / math.sqrt(tail), rel=1e-12)


@pytest.mark.parametrize("name", FIXED_SPECTRA)
def test_alpha_peak_equals_transcription(name):
    eigs = FIXED_SPECTRA[name]
    fit = alpha_peak(t(eigs))
    alpha, xmin, d = peak_reference(list(eigs))
    assert fit.alpha == pytest.approx(alpha, rel=1e-12)
    assert fit.xmin == xmin
    assert fit.D == pytest.approx(d, rel=1e-10)


def test_alpha_peak_lower_bound_is_in_log10_units():
    # xmin2 ~ 100: the reference's lower bound is log10(95) ~ 1.98, not 95, so eigenvalue 2.0
    # (far below the peak) is still a candidate.  Our fit must see the same candidate set.
    eigs = np.concatenate([[2.0, 2.1], np.linspace(100, 101, 60), [500, 2000]])
    fit = alpha_peak(t(eigs))
    alpha, xmin, _ = peak_reference(list(eigs))
    assert fit.alpha == pytest.approx(alpha, rel=1e-12) and fit.xmin == xmin


@settings(max_examples=25, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=10**7), min_size=20, max_size=70, unique=True))
def test_ks_scan_matches_transcription_on_arbitrary_spectra(ints):
    values = [i / 1000 for i in ints]
    fit = alpha_ww(t(values))
    alpha, xmin, d = ww_reference(values)
    assert fit.xmin == xmin
    assert fit.alpha == pytest.approx(alpha, rel=1e-9)


@pytest.mark.parametrize("exponent", [2.0, 2.5, 3.5, 5.0])
def test_pareto_exponent_recovered(exponent):
    n = 3000
    eigs = t(pareto_eigenvalues(n, exponent, seed=int(exponent * 10)))
    # Hill's estimator on k tail points has standard error (alpha-1)/sqrt(k).
    se_hill = (exponent - 1) / math.sqrt(n / 2)
    assert alpha_hill(eigs).alpha == pytest.approx(exponent, abs=4 * se_hill)
    for fit in (alpha_ww(eigs), alpha_peak(eigs)):
        se = (exponent - 1) / math.sqrt(fit.num_pl_spikes)
        assert fit.alpha == pytest.approx(exponent, abs=4 * se + 0.05 * exponent)


def test_ww_drops_tiny_eigenvalues_and_small_n_branch():
    eigs = np.concatenate([np.zeros(10), [1e-6, 1e-5], pareto_eigenvalues(15, 3.0, seed=9)])
    fit = alpha_ww(t(eigs))
    # 15 eigenvalues above 1e-5: WeightWatcher's small-N fit (bias-corrected MLE, tail >= 8,
    # objective D - 0.868/sqrt(n)); transcribed here.
    x = sorted(e for e in eigs if e > 1e-5)
    n = len(x)
    best = None
    for i in range(n - 1):
        k = n - i
        if k < 8:
            continue
        s = sum(math.log(e) for e in x[i:]) - k * math.log(x[i])
        a = 1 + (k - 1) / s
        d = max(abs((j - i) / k - (1 - (x[j] / x[i]) ** (1 - a))) for j in range(i, n))
        j_obj = d - 0.868 / math.sqrt(k)
        if best is None or j_obj < best[0]:
            best = (j_obj, a, x[i])
    assert fit.alpha == pytest.approx(best[1], rel=1e-12) and fit.xmin == best[2]


def test_too_few_eigenvalues_give_nan_and_a_reason():
    for estimator in (alpha_hill, alpha_peak, alpha_ww):
        fit = estimator(t([1.0, 2.0, 3.0]))
        assert math.isnan(fit.alpha) and fit.note


def test_entropy_matches_weightwatcher_formula():
    eigs = FIXED_SPECTRA["marchenko_like"]
    sv = np.sqrt(eigs)
    rank = np.count_nonzero(sv > sv.max() * 100 * np.finfo(float).eps) + 1e-10
    p = eigs / eigs.sum() + 1e-10
    expected = -np.sum(p * np.log(p)) / np.log(rank)
    assert matrix_entropy(t(eigs), 100) == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("seed", range(8))
def test_branch_and_bound_equals_the_full_scan(seed):
    rng = np.random.default_rng(seed)
    eigs = np.sort(np.concatenate([rng.chisquare(4, 800) / 4, pareto_eigenvalues(200, 2 + seed / 2, seed=seed)]))
    starts = np.arange(eigs.size - 1)
    if seed % 2:  # a window of candidates, as alpha_peak scans
        starts = starts[100 * seed: 100 * seed + 300]
    assert_branch_and_bound_is_the_full_scan(eigs, starts)


def assert_branch_and_bound_is_the_full_scan(eigs, starts):
    alphas = hill_alphas(np.log(eigs), starts)
    full = ks_distances(eigs, starts, alphas)
    position, d = ks_best(eigs, starts, alphas)
    assert position == int(np.argmin(full))
    assert d == pytest.approx(float(full.min()), rel=1e-13)


def test_branch_and_bound_keeps_the_first_of_tied_candidates():
    x = np.array([1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0])
    starts = np.arange(x.size - 1)
    unusable = np.array([0.5, np.inf, np.nan, 1.0, 0.9, 0.2, 0.7, 0.3])  # every D is exactly 1
    assert ks_best(x, starts, unusable) == (0, 1.0)
    mixed = unusable.copy()
    mixed[5] = 2.0
    full = ks_distances(x, starts, mixed)
    assert ks_best(x, starts, mixed) == (5, float(full[5])) and full[5] < 1


@settings(max_examples=40, deadline=None)
@given(st.integers(min_value=20, max_value=600), st.integers(min_value=0, max_value=2**31 - 1),
       st.sampled_from(["pareto", "lognormal", "chisquare", "rounded"]))
def test_branch_and_bound_equals_the_full_scan_on_random_spectra(n, seed, family):
    rng = np.random.default_rng(seed)
    eigs = {"pareto": lambda: (1 - rng.random(n)) ** (-1 / rng.uniform(0.5, 4)),
            "lognormal": lambda: rng.lognormal(0, rng.uniform(0.1, 3), n),
            "chisquare": lambda: rng.chisquare(rng.integers(1, 10), n) + 1e-3,
            "rounded": lambda: np.round(rng.lognormal(0, 1, n), 1) + 0.1}[family]()  # many exact ties
    assert_branch_and_bound_is_the_full_scan(np.sort(eigs), np.arange(n - 1))
