"""OPD diagnostics: equal to a plain per-token reference computation, in range, and the run summary."""
from __future__ import annotations

import json
import math

import pytest
import torch

from opsd.train.diagnostics import (
    format_summary,
    metric_name,
    summarise,
    token_diagnostics,
)
from opsd.train.losses import FullLogits, TopK, teacher_topk, token_divergence


def reference(s_logits, t_logits, k):
    """Plain Python, token by token: sets, sums and logs over lists of floats."""
    out = {n: [] for n in ("overlap", "overlap_mass", "overlap_mass_teacher", "entropy_student", "entropy_teacher",
                           "entropy_gap", "kl", "kl_forward")}
    for s_row, t_row in zip(s_logits.double().tolist(), t_logits.double().tolist()):
        def softmax(row):
            m = max(row)
            e = [math.exp(x - m) for x in row]
            z = sum(e)
            return [x / z for x in e]
        q, p = softmax(s_row), softmax(t_row)
        top_q = set(sorted(range(len(q)), key=lambda i: -q[i])[:k])
        top_p = set(sorted(range(len(p)), key=lambda i: -p[i])[:k])
        shared = top_q & top_p
        h = lambda d: -sum(x * math.log(x) for x in d if x > 0)
        kl = lambda a, b: sum(x * (math.log(x) - math.log(y)) for x, y in zip(a, b) if x > 0)
        out["overlap"].append(len(shared) / k)
        out["overlap_mass"].append(sum(q[i] for i in shared))
        out["overlap_mass_teacher"].append(sum(p[i] for i in shared))
        out["entropy_student"].append(h(q))
        out["entropy_teacher"].append(h(p))
        out["entropy_gap"].append(abs(h(p) - h(q)))
        out["kl"].append(kl(q, p))
        out["kl_forward"].append(kl(p, q))
    return {n: torch.tensor(v, dtype=torch.float64) for n, v in out.items()}


def logits_pair(seed, n=6, v=60, shift=1.0):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(n, v, generator=g) * 2
    t = s + shift * torch.randn(n, v, generator=g) * 2  # related but different
    t[0] = s[0]  # one identical row
    t[1] = -5.0 + 0.1 * torch.randn(v, generator=g)  # no ties: top-k sets are well defined
    t[1, 3] = 20.0  # one near-deterministic teacher row
    return s, t


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_diagnostics_equal_a_plain_reference(seed):
    s, t = logits_pair(seed)
    got, want = token_diagnostics(s, t, k=16), reference(s, t, 16)
    assert set(got) == set(want)
    for name in want:
        torch.testing.assert_close(got[name].double(), want[name], atol=2e-5, rtol=1e-4, msg=name)


def test_diagnostics_at_temperature_match_scaled_logits():
    s, t = logits_pair(3)
    got, want = token_diagnostics(s, t, k=8, temperature=2.0), reference(s / 2.0, t / 2.0, 8)
    for name in want:
        torch.testing.assert_close(got[name].double(), want[name], atol=2e-5, rtol=1e-4, msg=name)


def test_every_diagnostic_is_in_its_valid_range():
    s, t = logits_pair(4, n=40, v=200, shift=3.0)
    k, log_v = 16, math.log(200)
    d = token_diagnostics(s, t, k=k)
    assert ((d["overlap"] * k).round() == d["overlap"] * k).all()  # a count of shared tokens over k
    for name in ("overlap", "overlap_mass", "overlap_mass_teacher"):
        assert (d[name] >= 0).all() and (d[name] <= 1 + 1e-6).all(), name
    for name in ("entropy_student", "entropy_teacher", "entropy_gap"):
        assert (d[name] >= 0).all() and (d[name] <= log_v + 1e-5).all(), name
    assert (d["kl"] >= -1e-6).all() and (d["kl_forward"] >= -1e-6).all()
    assert d["overlap"].min() < 1 and d["kl"].max() > 0.1  # the pairs really differ


def test_identical_distributions():
    s, _ = logits_pair(5)
    d = token_diagnostics(s, s.clone(), k=16)
    assert (d["overlap"] == 1).all() and (d["kl"] == 0).all() and (d["kl_forward"] == 0).all()
    assert (d["entropy_gap"] == 0).all()
    torch.testing.assert_close(d["overlap_mass"], d["overlap_mass_teacher"])


def test_topk_teacher_form():
    s, t = logits_pair(6, v=80)
    full = token_diagnostics(s, t, k=16)
    ids, lps, tail = teacher_topk(t, 80)  # K = V: everything exact
    exact = token_diagnostics(s, TopK(ids, lps, tail), k=16)
    for name in full:
        torch.testing.assert_close(exact[name], full[name], atol=1e-5, rtol=1e-4, msg=name)
    ids, lps, tail = teacher_topk(t, 32)  # K = 32 >= k: overlap/masses exact, entropies and KLs on K+1 buckets are lower bounds
    part = token_diagnostics(s, TopK(ids, lps, tail), k=16)
    for name in ("overlap", "overlap_mass", "overlap_mass_teacher"):
        torch.testing.assert_close(part[name], full[name], atol=1e-6, rtol=1e-5, msg=name)
    for name in ("entropy_student", "entropy_teacher", "kl", "kl_forward"):
        assert (part[name] <= full[name] + 1e-5).all(), name


def test_diagnostic_kls_are_the_loss_kls():
    """One KL: the logged diag/kl and diag/kl_forward are the training divergences' values."""
    s, t = logits_pair(7, v=120)
    d = token_diagnostics(s, FullLogits(t), k=16)
    torch.testing.assert_close(d["kl"], token_divergence(s, t, kind="reverse_kl"), atol=0, rtol=0)
    torch.testing.assert_close(d["kl_forward"], token_divergence(s, t, kind="forward_kl"), atol=0, rtol=0)


def test_metric_names_and_summary(tmp_path):
    assert metric_name("overlap", 16) == "diag/top16_overlap" and metric_name("kl", 16) == "diag/kl"
    rows = [{"step": 0, "data/kept": 3}] + [{"step": i, "train/loss": 1.0, "diag/top16_overlap": o, "diag/kl": kl}
                                           for i, (o, kl) in enumerate([(0.7, 0.5), (0.85, 0.3), (0.95, 0.1)], 1)]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    sm = summarise(path)
    assert sm["steps"] == 3 and sm["healthy_overlap"] is True
    assert sm["diag/top16_overlap"] == {"first": 0.7, "last": 0.95, "mean": pytest.approx(2.5 / 3), "min": 0.7, "max": 0.95}
    assert sm["diag/kl"]["last"] == 0.1
    assert "diag/kl" in format_summary(sm)
    empty = tmp_path / "empty.jsonl"
    empty.write_text(json.dumps({"step": 1, "train/loss": 0.2}) + "\n")
    assert summarise(empty) == {} and format_summary({}) == "no diagnostics logged"
