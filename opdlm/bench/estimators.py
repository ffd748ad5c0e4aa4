"""The estimator study: bias and variance of OPD gradient estimators against the exact gradient of
the sequence-level reverse KL, on a problem small enough to enumerate every sequence.

Problem. Sequences of T tokens over a vocabulary of V ids. The student π_θ is a tabular softmax
policy over (position t, previous token) (a start symbol before the first token): θ has
T·(V+1)·V logits. The teacher q is another such table, fixed. The objective is the sequence-level
reverse KL, KL(π ‖ q) = Σ_y π(y) (log π(y) − log q(y)), summed over all V^T sequences; its exact
gradient comes from autograd over that enumeration.

Estimators (one sampled sequence y ~ π; a batch of B averages B of them):
- ĝ_γ = Σ_t (Σ_{t'≥t} γ^{t'−t} r_{t'}) ∇log π(y_t|c_t), r_t = log π(y_t|c_t) − log q(y_t|c_t),
  for γ in {0, 0.25, 0.5, 0.75, 1} (γ = 0: token-level OPD; γ = 1: the causal reward-to-go form,
  unbiased);
- full per-token reverse KL: Σ_t ∇ KL(π(·|c_t) ‖ q(·|c_t)) at the sampled prefixes, differentiated
  through the next-token distribution only;
- LSM: Σ_t ∇ of the renormalised reverse KL on the teacher's top-K at c_t.

Every estimator is an average of per-sequence vectors g(y), so its mean E[g] = Σ_y π(y) g(y) and
its per-sequence variance Σ_y π(y) ‖g(y) − E[g]‖² are computed exactly, by enumeration (the
variance of a batch of B is that divided by B). Reported, relative to the exact gradient g*:
bias ‖E[g] − g*‖ / ‖g*‖, the cosine of E[g] with g*, and the variance Var / ‖g*‖², each the mean
over problem seeds. ``monte_carlo`` checks the exact numbers against sampled batches.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

from opdlm.report import save

GAMMAS = (0.0, 0.25, 0.5, 0.75, 1.0)


@dataclass
class Problem:
    student: Tensor  # [T, V + 1, V] logits (row V of the middle axis: the start symbol)
    teacher: Tensor  # [T, V + 1, V]
    seqs: Tensor  # [N, T] every sequence
    prev: Tensor  # [N, T] the context (previous token, V at t = 0) of each position

    @property
    def T(self) -> int:
        return self.student.shape[0]

    @property
    def V(self) -> int:
        return self.student.shape[2]


def make_problem(V: int, T: int, seed: int, scale: float = 1.5) -> Problem:
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(T, V + 1, V, generator=g, dtype=torch.float64) * scale
    teacher = torch.randn(T, V + 1, V, generator=g, dtype=torch.float64) * scale
    seqs = torch.tensor(list(itertools.product(range(V), repeat=T)), dtype=torch.long)
    prev = torch.cat([torch.full((seqs.shape[0], 1), V, dtype=torch.long), seqs[:, :-1]], dim=1)
    return Problem(student, teacher, seqs, prev)


def _step_logprobs(logits: Tensor, p: Problem) -> Tensor:
    """[N, T, V] log-probs of the next token at every position of every sequence."""
    t = torch.arange(p.T).expand_as(p.prev)
    return torch.log_softmax(logits[t, p.prev], dim=-1)


def sequence_probs(p: Problem) -> Tensor:
    """[N] π(y) of every sequence."""
    lp = _step_logprobs(p.student, p).gather(-1, p.seqs.unsqueeze(-1)).squeeze(-1)
    return lp.sum(-1).exp()


def exact_gradient(p: Problem) -> Tensor:
    """∇_θ KL(π ‖ q) over whole sequences, by enumeration and autograd; flattened [D]."""
    theta = p.student.clone().requires_grad_(True)
    ls = _step_logprobs(theta, p).gather(-1, p.seqs.unsqueeze(-1)).squeeze(-1).sum(-1)
    lq = _step_logprobs(p.teacher, p).gather(-1, p.seqs.unsqueeze(-1)).squeeze(-1).sum(-1)
    kl = (ls.exp() * (ls - lq)).sum()
    (grad,) = torch.autograd.grad(kl, theta)
    return grad.flatten()


def _scatter(p: Problem, dz: Tensor) -> Tensor:
    """Per-sequence gradients [N, D] from gradients of each position's logits dz [N, T, V]."""
    N = p.seqs.shape[0]
    out = torch.zeros(N, p.T, p.V + 1, p.V, dtype=dz.dtype)
    n = torch.arange(N).unsqueeze(1).expand(N, p.T)
    t = torch.arange(p.T).expand(N, p.T)
    out[n, t, p.prev] = dz
    return out.reshape(N, -1)


def per_sequence_gradients(p: Problem, ks: tuple[int, ...] = (2,)) -> Iterator[tuple[str, Tensor]]:
    """Each estimator's name and per-sequence vectors g(y) [N, D], one estimator at a time."""
    ls = _step_logprobs(p.student, p)  # [N, T, V]
    lq = _step_logprobs(p.teacher, p)
    pi = ls.exp()
    onehot = torch.nn.functional.one_hot(p.seqs, p.V).to(ls.dtype)
    score = onehot - pi  # ∂ log π(y_t|c_t) / ∂ z_t
    r = (ls - lq).gather(-1, p.seqs.unsqueeze(-1)).squeeze(-1)  # [N, T]
    for gamma in GAMMAS:
        adv = torch.zeros_like(r)
        run = torch.zeros_like(r[:, 0])
        for t in range(p.T - 1, -1, -1):
            run = r[:, t] + gamma * run
            adv[:, t] = run
        yield f"g_gamma={gamma:g}", _scatter(p, adv.unsqueeze(-1) * score)
    ell = ls - lq  # per-token full reverse KL: ∂/∂z_v = π_v (ℓ_v − Σ π ℓ)
    yield "full_token_kl", _scatter(p, pi * (ell - (pi * ell).sum(-1, keepdim=True)))
    for k in ks:
        top = torch.topk(lq, k, dim=-1).indices  # LSM on the teacher's top-K: renormalised on it
        hs = torch.log_softmax(ls.gather(-1, top), -1)
        hq = torch.log_softmax(lq.gather(-1, top), -1)
        ph, lh = hs.exp(), hs - hq
        dz = torch.zeros_like(ls).scatter(-1, top, ph * (lh - (ph * lh).sum(-1, keepdim=True)))
        yield f"lsm_k={k}", _scatter(p, dz)


@dataclass
class Row:
    estimator: str
    T: int
    bias: float
    cosine: float
    variance: float


def study(V: int = 4, lengths: tuple[int, ...] = (2, 4, 6, 8), seeds: tuple[int, ...] = (0, 1, 2),
          ks: tuple[int, ...] = (2, 3)) -> list[Row]:
    """Exact bias, cosine and variance (relative to the exact gradient), mean over seeds."""
    acc: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
    for T in lengths:
        for seed in seeds:
            p = make_problem(V, T, seed)
            w = sequence_probs(p)
            g_star = exact_gradient(p)
            norm2 = float(g_star.pow(2).sum())
            for name, g in per_sequence_gradients(p, ks):
                mean = (w.unsqueeze(1) * g).sum(0)
                var = float((w * (g - mean).pow(2).sum(1)).sum())
                bias = float((mean - g_star).norm()) / math.sqrt(norm2)
                cos = float(mean @ g_star) / (float(mean.norm()) * math.sqrt(norm2) + 1e-300)
                acc.setdefault((name, T), []).append((bias, cos, var / norm2))
    return [Row(name, T, *(sum(x[i] for x in vals) / len(vals) for i in range(3))) for (name, T), vals in acc.items()]


def monte_carlo(p: Problem, name: str, batch: int, batches: int, seed: int = 0,
                ks: tuple[int, ...] = (2,)) -> tuple[Tensor, float]:
    """The mean and per-sequence variance of an estimator from ``batches`` sampled batches of
    ``batch`` sequences (drawn from π by index): a check of the exact numbers."""
    g = dict(per_sequence_gradients(p, ks))[name]
    w = sequence_probs(p)
    gen = torch.Generator().manual_seed(seed)
    idx = torch.multinomial(w, batch * batches, replacement=True, generator=gen).reshape(batches, batch)
    means = g[idx].mean(1)  # [batches, D]
    return means.mean(0), float(means.var(0, unbiased=True).sum()) * batch


def table(rows: list[Row]) -> str:
    lines = ["| estimator | T | bias (relative) | cosine with exact | variance / ‖g*‖² (one sequence) |",
             "|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r.estimator, r.T)):
        lines.append(f"| {r.estimator} | {r.T} | {r.bias:.3f} | {r.cosine:.3f} | {r.variance:.3g} |")
    return "\n".join(lines)


def plot(rows: list[Row], path: str) -> bool:
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = sorted({r.estimator for r in rows})
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.8))
    for name in names:
        rs = sorted((r for r in rows if r.estimator == name), key=lambda r: r.T)
        ts = [r.T for r in rs]
        axes[0].plot(ts, [r.bias for r in rs], marker="o", label=name)
        axes[1].plot(ts, [r.variance for r in rs], marker="o", label=name)
    axes[0].set_title("bias ‖E[g] − g*‖ / ‖g*‖", fontsize=10)
    axes[1].set_title("variance of one sequence / ‖g*‖²", fontsize=10)
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("sequence length T")
        ax.grid(alpha=0.3)
    save(plt, fig, path, legend=axes[1])
    return True
