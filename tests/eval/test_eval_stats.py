"""Paired significance: exact McNemar and paired bootstrap against hand-computed cases."""

from __future__ import annotations

import pytest

from hf_nvfp4.eval.stats import mcnemar_exact, paired_bootstrap


@pytest.mark.parametrize(
    ("a", "b", "expected"),
    [
        ([1, 1, 0, 0], [1, 1, 0, 0], (0, 0, 1.0)),  # no discordant pair
        ([0] * 5, [1] * 5, (0, 5, 2 * 0.5**5)),  # 0.0625
        ([1] + [0] * 9, [0] + [1] * 9, (1, 9, 2 * 11 / 1024)),  # P(X<=1), n=10
        ([1, 0], [0, 1], (1, 1, 1.0)),  # 2 * P(X<=1 | n=2) = 1.5 -> capped at 1
        ([1, 1, 1, 0, 0], [0, 0, 0, 0, 1], (3, 1, 2 * 5 / 16)),  # P(X<=1), n=4 = 5/16
    ],
)
def test_mcnemar_hand_computed(a, b, expected):
    only_a, only_b, p = mcnemar_exact([bool(x) for x in a], [bool(x) for x in b])
    assert (only_a, only_b) == expected[:2]
    assert p == pytest.approx(expected[2])


def test_mcnemar_needs_pairs():
    with pytest.raises(ValueError, match="pair the same items"):
        mcnemar_exact([True], [True, False])


def test_bootstrap_constant_difference_has_zero_width():
    ci = paired_bootstrap([0.1, 0.5, 0.9], [0.3, 0.7, 1.1], n_resamples=500)
    assert ci.diff == pytest.approx(0.2)
    assert ci.low == pytest.approx(0.2) and ci.high == pytest.approx(0.2)


def test_bootstrap_two_items_hand_computed():
    # differences (0, 1): resampled means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4,
    # so the 2.5th and 97.5th percentiles are 0 and 1.
    ci = paired_bootstrap([0.0, 0.0], [0.0, 1.0], n_resamples=20_000, seed=1)
    assert ci.diff == 0.5
    assert (ci.low, ci.high) == (0.0, 1.0)


def test_bootstrap_is_paired():
    # Large per-item variation but an identical +1 shift: unpaired resampling would give a
    # wide interval; paired resampling gives exactly +1.
    a = [float(i * 10) for i in range(50)]
    ci = paired_bootstrap(a, [x + 1 for x in a], n_resamples=1000)
    assert ci.low == pytest.approx(1.0) and ci.high == pytest.approx(1.0)


def test_bootstrap_weighted_mean_and_interval_contains_diff():
    a, b, w = [0.0, 1.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0], [3.0, 1.0, 1.0, 1.0]
    ci = paired_bootstrap(a, b, w, n_resamples=2000, seed=3)
    assert ci.diff == pytest.approx((3 + 1) / 6 - (1 + 1) / 6)
    assert ci.low <= ci.diff <= ci.high
    assert ci.confidence == 0.95
    assert ci == paired_bootstrap(a, b, w, n_resamples=2000, seed=3)  # reproducible


def test_bootstrap_rejects_mismatched_inputs():
    with pytest.raises(ValueError, match="equal-length"):
        paired_bootstrap([1.0], [1.0, 0.0])
    with pytest.raises(ValueError, match="confidence"):
        paired_bootstrap([1.0], [1.0], confidence=1.5)
