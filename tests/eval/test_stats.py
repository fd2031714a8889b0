"""Paired statistics against known values (no model)."""
import math

import pytest

from opsd.eval import stats


def test_wilson_interval_known_values():
    lo, hi = stats.wilson(5, 10)
    assert abs(lo - 0.2366) < 1e-3 and abs(hi - 0.7634) < 1e-3
    assert stats.wilson(0, 0) == (0.0, 0.0)
    lo, hi = stats.wilson(0, 20)
    assert lo == 0.0 and 0.15 < hi < 0.17
    assert stats.rate(3, 12) == {"count": 3, "n": 12, "rate": 0.25, "ci95": list(stats.wilson(3, 12))}


def test_mcnemar_exact_known_values():
    # 1 vs 9 discordant pairs: P(X <= 1 | n=10, p=1/2) = 11/1024, two-sided 22/1024
    assert stats.mcnemar_exact(1, 9) == pytest.approx(22 / 1024, abs=1e-12)
    assert stats.mcnemar_exact(9, 1) == pytest.approx(22 / 1024, abs=1e-12)
    assert stats.mcnemar_exact(0, 6) == pytest.approx(2 / 64, abs=1e-12)
    assert stats.mcnemar_exact(0, 5) == pytest.approx(2 / 32, abs=1e-12)  # 0.0625: not significant
    assert stats.mcnemar_exact(4, 4) == 1.0 and stats.mcnemar_exact(0, 0) == 1.0
    # large n stays exact (no float overflow): R's binom.test(30, 100) gives p-value = 7.85e-05
    assert stats.mcnemar_exact(30, 70) == pytest.approx(7.85e-5, rel=1e-3)
    assert stats.mcnemar_exact(0, 2000) < 1e-300 and stats.mcnemar_exact(1000, 1000) == 1.0


def test_sign_test_drops_zero_differences():
    assert stats.sign_test([0.5, 0.1, 0.2, 0.0, 0.0]) == pytest.approx(2 / 8)
    assert stats.sign_test([1.0] * 6) == pytest.approx(2 / 64)
    assert stats.sign_test([]) == 1.0


def test_paired_binary_counts_discordant_pairs_and_calls_direction_only_when_significant():
    before = [True] * 10 + [False] * 10
    after = [False] * 9 + [True] + [False] * 9 + [True]
    r = stats.paired_binary(before, after)
    assert r["n"] == 20 and r["before"]["count"] == 10 and r["after"]["count"] == 2
    assert (r["only_before"], r["only_after"]) == (9, 1)
    assert r["diff"] == pytest.approx(-0.4) and r["relative"] == pytest.approx(-0.8)
    assert r["p"] == pytest.approx(22 / 1024) and r["direction"] == "down"
    lo, hi = r["ci95"]
    assert lo < -0.4 < hi < 0
    # 5 vs 0 discordant: p = 0.0625, so not called down even though the rate fell
    r = stats.paired_binary([True] * 5 + [False] * 5, [False] * 10)
    assert r["diff"] == pytest.approx(-0.5) and r["p"] == pytest.approx(0.0625)
    assert r["direction"] == "no significant change"


def test_paired_binary_bootstrap_ci_matches_the_normal_approximation():
    # n = 400, 60 pairs true->false and 20 false->true: diff -0.1, paired SE sqrt((80/400 - 0.01) / 400)
    before = [True] * 60 + [False] * 20 + [True] * 50 + [False] * 270
    after = [False] * 60 + [True] * 20 + [True] * 50 + [False] * 270
    r = stats.paired_binary(before, after, n_boot=4000)
    se = math.sqrt((80 / 400 - 0.01) / 400)
    lo, hi = r["ci95"]
    assert lo == pytest.approx(-0.1 - 1.96 * se, abs=0.008) and hi == pytest.approx(-0.1 + 1.96 * se, abs=0.008)
    assert r["p"] < 1e-4 and r["direction"] == "down"
    # an unpaired analysis of the same rates would ignore the 50 concordant successes; the paired CI is narrower
    # than the interval of two independent proportions
    unpaired_se = math.sqrt(0.275 * 0.725 / 400 + 0.175 * 0.825 / 400)
    assert hi - lo < 2 * 1.96 * unpaired_se


def test_paired_binary_is_seeded_and_identical_models_show_nothing():
    xs = [k % 3 == 0 for k in range(90)]
    r1, r2 = stats.paired_binary(xs, xs), stats.paired_binary(xs, xs)
    assert r1 == r2
    assert r1["diff"] == 0 and r1["ci95"] == [0.0, 0.0] and r1["p"] == 1.0
    assert r1["direction"] == "no significant change"
    vals = [(k * 37 % 11) / 7 for k in range(40)]
    assert stats.paired_mean([0.0] * 40, vals, seed=1)["ci95"] != stats.paired_mean([0.0] * 40, vals, seed=2)["ci95"]


def test_paired_binary_relative_change_without_base_rate():
    r = stats.paired_binary([False] * 8, [True, False] * 4)
    assert r["relative"] is None and r["relative_ci95"] is None and r["diff"] == pytest.approx(0.5)
    with pytest.raises(ValueError, match="equal lengths"):
        stats.paired_binary([True], [True, False])
    assert stats.paired_binary([], [])["diff"] is None


def test_paired_mean_and_ratio_of_sums():
    r = stats.paired_mean([1.0, 2.0, 3.0, 4.0], [2.0, 3.0, 4.0, 5.0])
    assert r["diff"] == pytest.approx(1.0) and r["ci95"] == [pytest.approx(1.0), pytest.approx(1.0)]
    assert r["p"] == pytest.approx(2 / 16) and r["direction"] == "no significant change"
    r = stats.paired_mean([0.0] * 8, [-0.1] * 7 + [0.2])  # sign flips with |sum| >= 0.5: 60 of 256
    assert r["diff"] == pytest.approx(-0.0625) and r["p"] == pytest.approx(60 / 256)
    assert (r["increased"], r["decreased"]) == (1, 7)
    r = stats.ratio_of_sums([1.0, 3.0], [10, 10])
    assert r["mean"] == pytest.approx(0.2) and r["n"] == 2 and r["n_units"] == 20
    lo, hi = r["ci95"]
    assert 0.1 - 1e-9 <= lo <= 0.2 <= hi <= 0.3 + 1e-9
    assert stats.ratio_of_sums([], [])["mean"] is None


def test_paired_mean_direction_and_p_come_from_the_same_test():
    """One outlier pulls the mean up while 9 of 10 tasks went down: the test on the mean finds nothing (the
    old sign test said p = 0.021 next to a mean going "up")."""
    r = stats.paired_mean([0.0] * 10, [-1.0] * 9 + [100.0])
    assert r["diff"] == pytest.approx(9.1) and r["p"] == 1.0 and r["direction"] == "no significant change"
    r = stats.paired_mean([0.0] * 10, [1.0] * 9 + [-100.0])  # the mirror: not "down" either
    assert r["p"] == 1.0 and r["direction"] == "no significant change"
    r = stats.paired_mean([0.0] * 12, [1.0] * 12)  # every task up: exact p = 2 / 2^12
    assert r["p"] == pytest.approx(2 / 4096) and r["direction"] == "up"
    big = stats.paired_mean([0.0] * 40, [-0.5 + 0.01 * k for k in range(40)])  # random flips, seeded
    assert big == stats.paired_mean([0.0] * 40, [-0.5 + 0.01 * k for k in range(40)])
    assert big["diff"] < 0 and big["p"] < 0.05 and big["direction"] == "down"
    assert stats.sign_flip_p([]) == 1.0 and stats.sign_flip_p([0.0, 0.0]) == 1.0
