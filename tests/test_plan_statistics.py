"""The statistics of compare-plans against closed forms, and the cases that must say "not testable"."""

from __future__ import annotations

import math

import pytest
from scipy import stats as scipy_stats

from layerscope.experiments import stats


def test_summary_t_interval_matches_a_table():
    summary = stats.summarise([0.5, 0.7, 0.6])
    assert summary.mean == pytest.approx(0.6) and summary.sd == pytest.approx(0.1)
    half = 4.302652729911275 * 0.1 / math.sqrt(3)  # t(0.975, 2 dof) from a table
    assert (summary.ci_low, summary.ci_high) == pytest.approx((0.6 - half, 0.6 + half))
    assert summary.interval == "t"
    one = stats.summarise([0.4])
    assert one.n == 1 and math.isnan(one.sd) and math.isnan(one.ci_low) and one.interval is None


def test_accuracy_intervals_stay_inside_zero_one():
    finals = [0.99, 0.52, 0.98, 1.0, 0.97]  # the t interval would reach above 1 (0.89 ± 0.25)
    t_summary = stats.summarise(finals)
    assert t_summary.ci_high > 1  # the reason for the bounded interval
    summary = stats.summarise(finals, bounds=(0.0, 1.0))
    assert summary.interval == "bootstrap"
    assert min(finals) <= summary.ci_low <= summary.mean <= summary.ci_high <= max(finals) <= 1.0
    assert stats.summarise(finals, bounds=(0.0, 1.0)) == summary  # deterministic


def test_paired_t_test_closed_form():
    pair = stats.paired([0.6, 0.8, 1.0], [0.5, 0.6, 0.7])  # differences 0.1, 0.2, 0.3
    t = 0.2 / (0.1 / math.sqrt(3))
    assert pair.testable and pair.t == pytest.approx(t)
    assert pair.p_value == pytest.approx(1 - t / math.sqrt(t * t + 2))  # Student's t with 2 dof, closed form
    half = 4.302652729911275 * 0.1 / math.sqrt(3)
    assert (pair.ci_low, pair.ci_high) == pytest.approx((0.2 - half, 0.2 + half))


@pytest.mark.parametrize("strategy,baseline,reason", [
    ([0.70, 0.71], [0.69, 0.70], "2 seeds: a paired t-test needs 3 or more"),  # one eval row apart, twice
    ([0.8], [0.7], "1 seed: a paired t-test needs 3 or more"),
    ([0.71, 0.81, 0.61], [0.70, 0.80, 0.60], "the same difference (+0.01) on every seed"),
    ([0.7, 0.8, 0.6], [0.7, 0.8, 0.6], "identical results on every seed"),
])
def test_what_cannot_be_tested_says_so(strategy, baseline, reason):
    pair = stats.paired(strategy, baseline)
    assert not pair.testable and reason in pair.reason
    assert math.isnan(pair.p_value) and math.isnan(pair.t)  # never a hard-coded p = 0
    verdict = stats.verdict({"hilo": ("uniform-8x-r5-top2", pair)}, True, len(strategy), "accuracy")
    assert "hilo vs uniform-8x-r5-top2: not testable" in verdict and "worse" not in verdict


def test_holm_against_a_hand_computation():
    adjusted = stats.holm({"a": 0.01, "b": 0.04, "c": 0.03})
    # ascending 0.01, 0.03, 0.04 → 3·0.01, max(0.03, 2·0.03), max(0.06, 1·0.04)
    assert adjusted == pytest.approx({"a": 0.03, "c": 0.06, "b": 0.06})
    assert stats.holm({"a": 0.6, "b": 0.7}) == pytest.approx({"a": 1.0, "b": 1.0})  # capped at 1


def test_mde_has_80_percent_power_and_meets_the_normal_formula_for_many_seeds():
    sd, n = 0.02, 8
    mde = stats.minimum_detectable_effect(sd, n)
    critical = scipy_stats.t.ppf(0.975, n - 1)
    shift = mde * math.sqrt(n) / sd
    power = scipy_stats.nct.sf(critical, n - 1, shift) + scipy_stats.nct.cdf(-critical, n - 1, shift)
    assert power == pytest.approx(0.8, abs=1e-9)
    normal = (scipy_stats.norm.ppf(0.975) + scipy_stats.norm.ppf(0.8)) * sd / math.sqrt(n)
    assert mde > normal  # few seeds: the t distribution's heavier tails cost power
    large = 20_000
    assert stats.minimum_detectable_effect(sd, large) == pytest.approx(
        (scipy_stats.norm.ppf(0.975) + scipy_stats.norm.ppf(0.8)) * sd / math.sqrt(large), rel=1e-3)
    # G*Power (paired t, two-sided 5 %, power 0.8) gives d = 0.6604 for 20 pairs and 0.9965 for 10
    assert stats.minimum_detectable_effect(1.0, 20) == pytest.approx(0.6604, abs=5e-4)
    assert stats.minimum_detectable_effect(1.0, 10) == pytest.approx(0.9965, abs=1e-3)


def test_the_verdict_says_what_is_ruled_out_and_corrects_for_several_strategies():
    better = stats.paired([0.80, 0.82, 0.81, 0.83], [0.70, 0.71, 0.72, 0.70])
    tied = stats.paired([0.70, 0.72, 0.69, 0.71], [0.71, 0.70, 0.70, 0.70])
    comparisons = {"alphalora": ("uniform-5x-r8-top2", better), "mola": ("uniform-5x-r8-top2", tied)}
    text = stats.verdict(comparisons, True, 4, "accuracy")
    adjusted = stats.holm({"alphalora": better.p_value, "mola": tied.p_value})
    assert f"p = {adjusted['mola']:.3g}" in text and adjusted["alphalora"] == pytest.approx(2 * better.p_value)
    assert "alphalora beats uniform-5x-r8-top2" in text
    assert "mola no significant difference from uniform-5x-r8-top2" in text
    mola = comparisons["mola"][1]
    assert f"gains above {mola.ci_high:.4f}" in text and f"losses above {-mola.ci_low:.4f}" in text
    assert "Holm-corrected p" in text and "MDE at 80 % power" in text
    lower_is_better = stats.verdict({"hilo": ("base", stats.paired([1.0, 1.1, 1.05], [1.2, 1.3, 1.24]))}, False, 3,
                                    "eval_loss")
    assert "hilo beats base" in lower_is_better
