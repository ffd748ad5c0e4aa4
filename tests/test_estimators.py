"""The estimator study's exact numbers: the enumerated gradient against finite differences, the
identities the estimators must satisfy (γ = 1 unbiased; γ = 0 and the per-token full KL share a
mean; LSM with K = V is the per-token full KL), and the exact mean and variance against sampled
batches."""

from __future__ import annotations

import pytest
import torch

from opdlm.bench.cli import main
from opdlm.bench.estimators import (
    _step_logprobs,
    exact_gradient,
    make_problem,
    monte_carlo,
    per_sequence_gradients,
    sequence_probs,
    study,
)


def kl_of(p, theta):
    q = make_problem(p.V, p.T, 0)
    q.student, q.teacher, q.seqs, q.prev = theta, p.teacher, p.seqs, p.prev
    ls = _step_logprobs(theta, q).gather(-1, p.seqs.unsqueeze(-1)).squeeze(-1).sum(-1)
    lq = _step_logprobs(p.teacher, q).gather(-1, p.seqs.unsqueeze(-1)).squeeze(-1).sum(-1)
    return float((ls.exp() * (ls - lq)).sum())


def test_exact_gradient_matches_finite_differences():
    p = make_problem(3, 3, seed=5)
    g = exact_gradient(p)
    theta = p.student.flatten()
    for i in range(0, theta.numel(), 7):
        e = torch.zeros_like(theta)
        e[i] = 1e-6
        fd = (kl_of(p, (theta + e).reshape(p.student.shape)) - kl_of(p, (theta - e).reshape(p.student.shape))) / 2e-6
        assert g[i].item() == pytest.approx(fd, abs=1e-7)


@pytest.mark.parametrize("T", [2, 3])
def test_estimator_identities(T):
    p = make_problem(3, T, seed=T)
    w = sequence_probs(p)
    assert float(w.sum()) == pytest.approx(1.0, abs=1e-12)
    g = dict(per_sequence_gradients(p, ks=(3,)))
    mean = {k: (w.unsqueeze(1) * v).sum(0) for k, v in g.items()}
    torch.testing.assert_close(mean["g_gamma=1"], exact_gradient(p), atol=1e-12, rtol=1e-10)  # unbiased
    torch.testing.assert_close(mean["g_gamma=0"], mean["full_token_kl"], atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(g["lsm_k=3"], g["full_token_kl"], atol=1e-12, rtol=1e-10)  # K = V
    assert (mean["g_gamma=0"] - exact_gradient(p)).norm() > 1e-3  # γ = 0 is biased


def test_exact_mean_and_variance_agree_with_sampled_batches():
    p = make_problem(3, 3, seed=1)
    w = sequence_probs(p)
    for name in ("g_gamma=0", "g_gamma=1", "full_token_kl", "lsm_k=2"):
        g = dict(per_sequence_gradients(p))[name]
        exact_mean = (w.unsqueeze(1) * g).sum(0)
        exact_var = float((w * (g - exact_mean).pow(2).sum(1)).sum())
        mc_mean, mc_var = monte_carlo(p, name, batch=16, batches=4000, seed=2)
        # the sampled mean of 64,000 sequences is within 5 standard errors of the exact one
        assert float((mc_mean - exact_mean).norm()) <= 5 * (exact_var / 64000) ** 0.5
        assert mc_var == pytest.approx(exact_var, rel=0.1)


def test_study_table_and_command(capsys, tmp_path):
    rows = study(V=3, lengths=(2, 3), seeds=(0,), ks=(2,))
    by = {(r.estimator, r.T): r for r in rows}
    assert by[("g_gamma=1", 3)].bias < 1e-10 and by[("g_gamma=1", 3)].cosine == pytest.approx(1.0)
    assert by[("g_gamma=1", 3)].variance > by[("g_gamma=0", 3)].variance
    assert main(["estimators", "--vocab", "3", "--lengths", "2,3", "--seeds", "0", "--ks", "2",
                 "--plot", str(tmp_path / "e.png")]) == 0
    out = capsys.readouterr().out
    assert "| g_gamma=0.5 | 3 |" in out and (tmp_path / "e.png").stat().st_size > 1000
    with pytest.raises(SystemExit):
        main(["estimators", "--vocab", "3", "--ks", "4"])
