"""Bootstrap intervals and paired differences of fact-tracing metrics, against scipy's bootstrap and by hand."""

import numpy as np
import pytest
from scipy import stats

from pretrace.bench.facts.stats import holm, mean_interval, paired_difference, verdict
from pretrace.errors import PretraceError


def test_intervals_agree_with_scipys_percentile_bootstrap():
    rng = np.random.default_rng(1)
    first = rng.random(300)
    second = np.clip(first - 0.05 + 0.2 * rng.standard_normal(300), 0, 1)
    ours = paired_difference(first, second, resamples=20_000, seed=3)
    reference = stats.bootstrap((first - second,), np.mean, n_resamples=20_000, method="percentile", random_state=7).confidence_interval
    width = reference.high - reference.low
    assert ours["mean"] == pytest.approx(float(np.mean(first - second)))
    assert ours["low"] == pytest.approx(reference.low, abs=0.05 * width) and ours["high"] == pytest.approx(reference.high, abs=0.05 * width)
    single = mean_interval(first, resamples=20_000, seed=3)
    reference = stats.bootstrap((first,), np.mean, n_resamples=20_000, method="percentile", random_state=7).confidence_interval
    assert single["low"] == pytest.approx(reference.low, abs=0.05 * (reference.high - reference.low))


def test_paired_differences_count_wins_ties_and_losses_and_say_only_what_the_interval_supports():
    same = paired_difference([0.5, 1.0, 0.0], [0.5, 1.0, 0.0])
    assert (same["wins"], same["ties"], same["losses"]) == (0, 3, 0) and same["low"] == same["high"] == 0 and not same["significant"]
    assert verdict(same, "A", "B") == "no significant difference between A and B"
    clear = paired_difference([1.0] * 50 + [0.5] * 50, [0.0] * 50 + [0.5] * 50)
    assert (clear["wins"], clear["ties"], clear["losses"]) == (50, 50, 0) and clear["low"] > 0 and clear["significant"]
    assert verdict(clear, "A", "B") == "A better than B"
    assert verdict(paired_difference([0.0] * 40, [1.0] * 40), "A", "B") == "B better than A"
    assert paired_difference([1, 0, 1], [0, 1, 0], seed=0) == paired_difference([1, 0, 1], [0, 1, 0], seed=0)  # seeded: reproducible
    with pytest.raises(PretraceError, match="equally long"):
        paired_difference([1, 2], [1])
    with pytest.raises(PretraceError, match="equally long"):
        paired_difference([], [])


def test_holm_corrects_the_family_of_pairs_step_down():
    differences = [{"p_value": p} for p in (0.01, 0.04, 0.03, 0.5)]
    holm(differences)
    # sorted 0.01, 0.03, 0.04, 0.5 -> 4×0.01, max(3×0.03, ·), max(2×0.04, ·), max(1×0.5, ·)
    assert [d["p_holm"] for d in differences] == pytest.approx([0.04, 0.09, 0.09, 0.5])
    assert [d["significant"] for d in differences] == [True, False, False, False]
    clear = paired_difference([1.0] * 60, [0.0] * 60, resamples=2000)
    assert clear["p_value"] == 0.0 and paired_difference([0.3] * 5, [0.3] * 5)["p_value"] == 1.0
