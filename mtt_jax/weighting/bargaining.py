"""Gram methods whose weights solve ``K w = w^(-1/alpha)``: Nash-MTL (alpha = 1) and FairGrad.

Both are solved exactly by damped Newton steps on a strictly convex reformulation
(`solvers.solve_power_equation`) on ``K / s`` (``s`` = mean squared gradient norm) plus a ridge, then
mapped back: if ``(K/s) w' = w'^(-1/alpha)`` then ``w = s^(-alpha/(1+alpha)) w'`` solves the original.
The ridge (``ridge * I`` on the normalised K, default 1e-6) makes a solution exist when none does --
e.g. directly opposed gradients, where ``K`` has a positive null vector -- and otherwise moves the weights
by a relative O(ridge).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtt_jax.weighting import solvers
from mtt_jax.weighting.base import PyTree, WeightingMethod, as_gram, validate_range


def _solve(gram_TxT, alpha, ridge, init_normalized_T, max_iters):
    """Returns ``(w, w_normalized)`` with ``K w = w^(-1/alpha)``; the latter warm-starts the next solve."""
    normalized, scale = solvers.normalize_gram(gram_TxT)
    normalized = normalized + ridge * jnp.eye(gram_TxT.shape[0], dtype=jnp.float32)
    w_normalized_T = solvers.solve_power_equation(normalized, alpha, init_normalized_T, max_iters=max_iters)
    return w_normalized_T * scale ** (-alpha / (1.0 + alpha)), w_normalized_T


class NashMTL(WeightingMethod):
    """Nash-MTL (Navon et al., "Multi-Task Learning as a Bargaining Game", ICML 2022, Thm. 5.1 / eq. 2).

    ``a > 0`` with ``K a = 1 / a`` elementwise (every task gets ``a_t (K a)_t = 1``), ``d = sum_t a_t g_t``,
    then ``|d|`` is clipped to ``max_norm`` as a coefficient scale ``min(1, max_norm / (sqrt(a^T K a) +
    1e-6))`` (torch's clip_grad_norm_). Before clipping ``|d|^2 = a^T K a = T``, and ``d`` is invariant to
    rescaling any one task's gradient (``g_t -> k g_t`` gives ``a_t -> a_t / k``). Solved exactly (see the
    module docstring) instead of the paper's sequence of cvxpy problems, which can stop with a slack
    constraint and whose failures silently leave EW weights. The official code (the authors' ``NashMTL``
    class; LibMTL's ``Nash_MTL`` alike) hands the solver ``K / n`` with ``n = |K|_F`` but also the
    factor ``n``: its constraints ``-log(a_t n) - log((K/n a)_t) <= 0`` are
    ``a_t (K a)_t >= 1`` and its objective is ``sum(K/n a) + phi(a) / n``, so the ``a`` it applies solves
    the raw-Gram equations ``K a = 1 / a``: the same weights and ``d`` as ours (``|d|^2 = T`` before
    clipping), not the ``sqrt(n)`` times larger solution of ``(K/n) a = 1 / a``. Only its stopping test
    ``|(K/n) a - 1/a| < 1e-3`` uses the normalised equations (met at the solution only when ``n = 1``),
    so it stops when ``a`` moves by less than 1e-6 or after ``optim_niter = 20`` solves.

    Defaults (paper = LibMTL): ``max_norm=1.0`` (0 disables clipping), ``update_weights_every=1`` (other
    steps reuse the last ``a``); warm start from the previous solution (state). Scale: ``|d| = max_norm``.
    """
    name = "nash_mtl"
    requires = "gram"

    def __init__(self, num_tasks: int, max_norm: float = 1.0, update_weights_every: int = 1,
                 ridge: float = 1e-6, max_iters: int = 100):
        super().__init__(num_tasks)
        validate_range(self.name, "max_norm", max_norm, 0.0)
        validate_range(self.name, "update_weights_every", update_weights_every, 1)
        validate_range(self.name, "ridge", ridge, 0.0)
        validate_range(self.name, "max_iters", max_iters, 1)
        self.max_norm, self.update_weights_every = float(max_norm), int(update_weights_every)
        self.ridge, self.max_iters = float(ridge), int(max_iters)

    def init_state(self) -> PyTree:
        ones_T = jnp.ones((self.num_tasks,), jnp.float32)
        return {"alpha": ones_T, "alpha_normalized": ones_T}

    def gram_weights(self, state, gram_TxT, losses_T, step, rng=None):
        gram_TxT = as_gram(gram_TxT, self.num_tasks)

        def solve(_):
            alpha_T, normalized_T = _solve(gram_TxT, 1.0, self.ridge, state["alpha_normalized"],
                                           self.max_iters)
            return {"alpha": alpha_T, "alpha_normalized": normalized_T}

        if self.update_weights_every == 1:
            state = solve(None)
        else:
            update = jnp.asarray(step, jnp.int32) % self.update_weights_every == 0
            state = jax.lax.cond(update, solve, lambda _: state, None)
        alpha_T = state["alpha"]
        if self.max_norm > 0:
            norm = jnp.sqrt(jnp.maximum(alpha_T @ gram_TxT @ alpha_T, 0.0))
            alpha_T = alpha_T * jnp.minimum(1.0, self.max_norm / (norm + 1e-6))
        return alpha_T, state


class FairGrad(WeightingMethod):
    """FairGrad (Ban & Ji, "Fair Resource Allocation in Multi-Task Learning", ICML 2024, eq. 8): the
    alpha-fair allocation ``w > 0`` with ``K w = w^(-1/alpha)``; ``d = sum_t w_t g_t``, no clipping.

    ``alpha = 1`` is Nash-MTL's fixed point; ``alpha -> inf`` approaches max-min fairness. Defaults:
    ``alpha=1.0`` (LibMTL; the official repo uses 2.0 on CelebA and QM9). Solved exactly (module
    docstring) instead of scipy's least_squares. Scale: ``|d|`` grows as ``k^((1-alpha)/(1+alpha))`` when
    all gradients are scaled by k; nearly singular K gives large weights (bounded by the ridge).
    """
    name = "fairgrad"
    requires = "gram"

    def __init__(self, num_tasks: int, alpha: float = 1.0, ridge: float = 1e-6, max_iters: int = 100):
        super().__init__(num_tasks)
        validate_range(self.name, "alpha", alpha, 0.0, low_open=True)
        validate_range(self.name, "ridge", ridge, 0.0)
        validate_range(self.name, "max_iters", max_iters, 1)
        self.alpha, self.ridge, self.max_iters = float(alpha), float(ridge), int(max_iters)

    def gram_weights(self, state, gram_TxT, losses_T, step, rng=None):
        gram_TxT = as_gram(gram_TxT, self.num_tasks)
        init_T = jnp.ones((self.num_tasks,), jnp.float32)
        return _solve(gram_TxT, self.alpha, self.ridge, init_T, self.max_iters)[0], state
