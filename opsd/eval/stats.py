"""Statistics for before/after comparisons on the same tasks (pure functions, no torch).

    from opsd.eval.stats import rate, paired_binary, paired_mean, ratio_of_sums
    rate(5, 64)                                   # one rate with its 95% Wilson interval
    paired_binary(before_flags, after_flags)      # diff, paired bootstrap CI, exact McNemar p, "up"/"down"
    paired_mean(before_values, after_values)      # diff of means, bootstrap CI, sign-flip permutation p
    ratio_of_sums(kl_sums, token_counts)          # a per-token mean over tasks, bootstrap CI over tasks

Every comparison pairs the i-th before value with the i-th after value (the same task). The
bootstrap resamples tasks (not replies or tokens) with a fixed seed, so a report recomputes to
the same numbers. A change is called "up" or "down" only when its p-value is below `alpha`;
otherwise "no significant change". The direction and the p-value always come from the same test:
McNemar for paired rates, a sign-flip permutation test on the mean for paired values (so a mean
pulled up by one outlier while most tasks went down is not called "up"). `n` is in every result.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Sequence

import numpy as np

N_BOOT = 2000
N_PERM = 10000  # random sign flips of the permutation test when exact enumeration is too big
EXACT_PERM_MAX = 16  # up to 2**16 sign patterns are enumerated exactly
SEED = 0
ALPHA = 0.05


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval for k successes out of n ((0, 0) for n = 0)."""
    if n == 0:
        return (0.0, 0.0)
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return (max(0.0, mid - half), min(1.0, mid + half))


def rate(k: int, n: int) -> dict:
    """{"count", "n", "rate", "ci95"} with the Wilson interval."""
    lo, hi = wilson(k, n)
    return {"count": k, "n": n, "rate": k / n if n else 0.0, "ci95": [lo, hi]}


def binom_two_sided(k: int, n: int) -> float:
    """Exact two-sided p-value of k successes in n fair coin flips (min(1, 2 * smaller tail))."""
    if n == 0:
        return 1.0
    k = min(k, n - k)
    tail = Fraction(sum(math.comb(n, i) for i in range(k + 1)), 2 ** n)
    return float(min(Fraction(1), 2 * tail))


def mcnemar_exact(only_before: int, only_after: int) -> float:
    """Exact McNemar p-value from the discordant pairs: true before and false after, and the reverse."""
    return binom_two_sided(only_before, only_before + only_after)


def sign_test(diffs: Sequence[float]) -> float:
    """Exact two-sided sign test that the median paired difference is 0 (zero differences dropped)."""
    pos = sum(1 for d in diffs if d > 0)
    neg = sum(1 for d in diffs if d < 0)
    return binom_two_sided(pos, pos + neg)


def sign_flip_p(diffs: Sequence[float], *, n_perm: int = N_PERM, seed: int = SEED) -> float:
    """Two-sided paired permutation p-value that the mean difference is 0: the share of sign flips of the
    differences whose |sum| is at least the observed |sum| (zero differences dropped). Exact over all 2^m
    flips for m <= EXACT_PERM_MAX non-zero differences; otherwise `n_perm` seeded random flips, p = (k+1)/(n_perm+1)."""
    d = np.asarray([x for x in diffs if x != 0], dtype=float)
    m = len(d)
    if m == 0:
        return 1.0
    observed = abs(d.sum())
    tol = 1e-9 * max(1.0, float(np.abs(d).sum()))  # the observed pattern itself always counts
    if m <= EXACT_PERM_MAX:
        signs = ((np.arange(2 ** m)[:, None] >> np.arange(m)) & 1) * 2 - 1  # (2^m, m) every sign pattern
        return float(np.mean(np.abs(signs @ d) >= observed - tol))
    signs = np.random.default_rng(seed).integers(0, 2, size=(n_perm, m)) * 2 - 1  # (n_perm, m)
    k = int(np.sum(np.abs(signs @ d) >= observed - tol))
    return (k + 1) / (n_perm + 1)


def direction(diff: float | None, p: float | None, alpha: float = ALPHA) -> str:
    """'up' / 'down' only when p < alpha; otherwise 'no significant change'."""
    if diff is None or p is None or not p < alpha or diff == 0:
        return "no significant change"
    return "up" if diff > 0 else "down"


def _resamples(n: int, n_boot: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, n, size=(n_boot, n))  # (n_boot, n) task indices


def _ci(samples: np.ndarray) -> list[float] | None:
    samples = samples[np.isfinite(samples)]
    if samples.size == 0:
        return None
    lo, hi = np.percentile(samples, [2.5, 97.5])
    return [float(lo), float(hi)]


def paired_binary(before: Sequence[bool], after: Sequence[bool], *, n_boot: int = N_BOOT, seed: int = SEED,
                  alpha: float = ALPHA) -> dict:
    """Rates before and after on the same n tasks, their difference with a paired bootstrap 95% CI, the
    relative change (after - before) / before with its bootstrap CI, and the exact McNemar p-value."""
    if len(before) != len(after):
        raise ValueError(f"paired outcomes need equal lengths, got {len(before)} before and {len(after)} after")
    b = np.asarray(before, dtype=bool)
    a = np.asarray(after, dtype=bool)
    n = len(b)
    only_before, only_after = int((b & ~a).sum()), int((a & ~b).sum())
    out = {"n": n, "before": rate(int(b.sum()), n), "after": rate(int(a.sum()), n),
           "only_before": only_before, "only_after": only_after}
    if n == 0:
        return out | {"diff": None, "ci95": None, "relative": None, "relative_ci95": None, "p": None,
                      "direction": direction(None, None)}
    diff = float(a.mean() - b.mean())
    idx = _resamples(n, n_boot, seed)
    mb, ma = b[idx].mean(1), a[idx].mean(1)  # (n_boot,)
    p = mcnemar_exact(only_before, only_after)
    rel = diff / b.mean() if b.any() else None
    with np.errstate(divide="ignore", invalid="ignore"):
        rel_s = np.where(mb > 0, (ma - mb) / np.where(mb > 0, mb, 1), np.nan)
    rel_ci = _ci(rel_s) if rel is not None and np.isfinite(rel_s).mean() >= 0.975 else None
    return out | {"diff": diff, "ci95": _ci(ma - mb), "relative": rel, "relative_ci95": rel_ci, "p": p,
                  "direction": direction(diff, p, alpha)}


def paired_mean(before: Sequence[float], after: Sequence[float], *, n_boot: int = N_BOOT, seed: int = SEED,
                alpha: float = ALPHA) -> dict:
    """Means before and after on the same tasks, the mean paired difference with a bootstrap 95% CI, and the
    p-value of a sign-flip permutation test on that mean (`sign_flip_p`): direction and p test the same
    quantity. `increased`/`decreased` count the tasks whose value went up/down (the sign test's inputs)."""
    if len(before) != len(after):
        raise ValueError(f"paired values need equal lengths, got {len(before)} before and {len(after)} after")
    b = np.asarray(before, dtype=float)
    a = np.asarray(after, dtype=float)
    n = len(b)
    if n == 0:
        return {"n": 0, "before": None, "after": None, "diff": None, "ci95": None, "p": None,
                "direction": direction(None, None)}
    d = a - b
    p = sign_flip_p(d.tolist(), seed=seed)
    diff = float(d.mean())
    return {"n": n, "before": float(b.mean()), "after": float(a.mean()), "diff": diff,
            "ci95": _ci(d[_resamples(n, n_boot, seed)].mean(1)), "p": p, "test": "sign-flip permutation",
            "increased": int((d > 0).sum()), "decreased": int((d < 0).sum()), "direction": direction(diff, p, alpha)}


def ratio_of_sums(numerators: Sequence[float], denominators: Sequence[float], *, n_boot: int = N_BOOT,
                  seed: int = SEED) -> dict:
    """sum(num) / sum(den) (e.g. KL per token over tasks) with a bootstrap 95% CI that resamples tasks."""
    if len(numerators) != len(denominators):
        raise ValueError(f"{len(numerators)} numerators but {len(denominators)} denominators")
    num = np.asarray(numerators, dtype=float)
    den = np.asarray(denominators, dtype=float)
    n, total = len(num), float(den.sum())
    if n == 0 or total == 0:
        return {"n": n, "n_units": total, "mean": None, "ci95": None}
    idx = _resamples(n, n_boot, seed)
    with np.errstate(divide="ignore", invalid="ignore"):
        s = num[idx].sum(1) / den[idx].sum(1)
    return {"n": n, "n_units": total, "mean": float(num.sum() / total), "ci95": _ci(s)}
