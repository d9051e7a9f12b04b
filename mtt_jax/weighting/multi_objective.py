"""Gram methods that solve a small optimisation over task weights for a conflict-free direction:
MGDA (min-norm point), CAGrad (worst-task improvement near the mean), UPGrad (dual-cone projections).

All take the T x T Gram matrix ``K = G G^T`` of the per-task gradients on the shared parameters and
return coefficients ``c_t``; the step applies ``d = sum_t c_t g_t``. Each is invariant to a global
rescaling of K in its weights (solved on ``K / mean(diag K)``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtt_jax.weighting import solvers
from mtt_jax.weighting.base import WeightingMethod, as_gram, validate_choice, validate_range
from mtt_jax.weighting.dual_cone import DualConeMethod


class MGDA(WeightingMethod):
    """MGDA-UB (Sener & Koltun, "Multi-Task Learning as Multi-Objective Optimization", NeurIPS 2018,
    eq. 3 / Alg. 2; MGDA: Desideri 2012): ``a = argmin_{a in simplex} |sum_t a_t g_t / n_t|^2``.

    Solved on ``K / (n n^T)``: the two-task closed form (Alg. 1) for T = 2, Wolfe's exact min-norm-point
    algorithm for T >= 3 (`solvers.min_norm_point`; LibMTL's Frank-Wolfe is off by ~1e-3 on hard cases).
    ``normalization`` picks ``n_t``: ``none`` (1, LibMTL's default), ``l2`` (|g_t|), ``loss`` (L_t), ``loss+``
    (L_t |g_t|, the official repo's sample config). The coefficients are ``a_t / n_t``: like LibMTL, the
    normalised gradients are what is combined, which keeps ``d`` a common descent direction (the official
    code instead applies ``a`` to the raw losses). Scale: mean-like (``a`` on the simplex). Pitfall: ``d``
    follows the smallest gradient and can stall tasks with large ones.
    """
    name = "mgda"
    requires = "gram"
    NORMALIZATIONS = ("none", "l2", "loss", "loss+")

    def __init__(self, num_tasks: int, normalization: str = "none"):
        super().__init__(num_tasks)
        validate_choice(self.name, "normalization", normalization, self.NORMALIZATIONS)
        self.normalization = normalization

    def _normalizers(self, gram_TxT, losses_T):
        grad_norms_T = jnp.sqrt(jnp.maximum(jnp.diagonal(gram_TxT), 0.0))
        losses_T = jnp.asarray(losses_T, jnp.float32)
        n_T = {"none": jnp.ones_like(grad_norms_T), "l2": grad_norms_T, "loss": losses_T,
               "loss+": losses_T * grad_norms_T}[self.normalization]
        return jnp.where(n_T > solvers.TINY, n_T, 1.0)

    def gram_weights(self, state, gram_TxT, losses_T, step, rng=None):
        gram_TxT = as_gram(gram_TxT, self.num_tasks)
        n_T = self._normalizers(gram_TxT, losses_T)
        normalized, _ = solvers.normalize_gram(gram_TxT / (n_T[:, None] * n_T[None, :]))
        return solvers.min_norm_point(normalized) / n_T, state


class CAGrad(WeightingMethod):
    """CAGrad (Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for Multi-task Learning",
    NeurIPS 2021, eq. 3 and Alg. 1).

    ``g0`` = mean gradient; ``w = argmin_{w in simplex} g_w.g0 + c |g0| |g_w|`` (the dual of maximising
    the worst task's improvement within ``|d - g0| <= c |g0|``), solved by exact pairwise steps
    (`solvers.minimize_on_simplex`; the official code uses SLSQP with ~4e-4 relative error). Then
    ``lambda = c |g0| / |g_w|`` and ``d = (g0 + lambda g_w) / (1 + c^2)``, i.e. coefficients
    ``(1/T + lambda w) / (1 + c^2)`` (these applied weights are logged, not ``w``). ``rescale``: 0 no
    division, 1 ``/(1 + c^2)``, 2 ``/(1 + c)``. Defaults: ``c=0.5``, ``rescale=1`` (LibMTL; the official
    scripts use c = 0.4 on NYUv2 and 0.4 / 0.6 on CityScapes). ``c = 0`` gives the mean gradient. Scale:
    mean-like. The paper assumes ``c < 1``; for ``c >= 1`` with 0 in the gradients' hull the direction is
    not unique.
    """
    name = "cagrad"
    requires = "gram"

    def __init__(self, num_tasks: int, c: float = 0.5, rescale: int = 1, max_iters: int = 500):
        super().__init__(num_tasks)
        validate_range(self.name, "c", c, 0.0)
        validate_choice(self.name, "rescale", rescale, (0, 1, 2))
        validate_range(self.name, "max_iters", max_iters, 1)
        self.c, self.rescale, self.max_iters = float(c), int(rescale), int(max_iters)

    def gram_weights(self, state, gram_TxT, losses_T, step, rng=None):
        gram_TxT = as_gram(gram_TxT, self.num_tasks)
        num = self.num_tasks
        mean_T = jnp.full((num,), 1.0 / num, jnp.float32)
        if self.c == 0.0:
            return mean_T, state
        normalized, _ = solvers.normalize_gram(gram_TxT)
        mean_dot_T = normalized @ mean_T                        # g_t . g0
        radius = self.c * jnp.sqrt(jnp.maximum(mean_T @ mean_dot_T, 0.0))  # c |g0|
        w_T = solvers.minimize_on_simplex(normalized, mean_dot_T, radius, max_iters=self.max_iters)
        gw_norm = jnp.sqrt(jnp.maximum(w_T @ normalized @ w_T, 0.0))
        lam = jnp.where(gw_norm > 1e-12, radius / jnp.maximum(gw_norm, 1e-12), 0.0)
        divisor = {0: 1.0, 1: 1.0 + self.c ** 2, 2: 1.0 + self.c}[self.rescale]
        return (mean_T + lam * w_T) / divisor, state


class UPGrad(DualConeMethod):
    """UPGrad (Quinton & Rey, "Jacobian Descent for Multi-Objective Optimization", arXiv 2406.16232,
    2024, Def. 3 / Prop. 3; TorchJD).

    ``K_hat = K / tr(K) + reg_eps I`` (``K_hat = reg_eps I`` if ``tr(K) < norm_eps``); for each task i,
    ``v_i = argmin v^T K_hat v s.t. v >= p_i e_i`` (the projection of ``p_i g_i`` onto the dual cone of
    the gradients), ``w = sum_i v_i`` and ``d = sum_t w_t g_t``, with ``p_i = 1/T`` or, given a
    ``preference``, ``p_i = preference[i]`` as given (TorchJD's ``UPGrad(pref_vector=...)``: the
    projections are weighted by the preference instead of uniformly; ``(1, 0)`` gives the projection of
    ``g_1`` alone). Every ``w_t >= p_t``; gradients with no conflict give ``sum_t p_t g_t`` (the mean by
    default: mean scale). The T quadratic programs are solved exactly by block principal pivoting
    (`solvers.nonneg_qp`) instead of quadprog. Defaults ``preference = ()`` (uniform),
    ``norm_eps = reg_eps = 1e-4`` (TorchJD = LibMTL); the normalisation only sets the regulariser's
    relative size.
    """
    name = "upgrad"

    def gram_weights(self, state, gram_TxT, losses_T, step, rng=None):
        regularized, lower_T = self.regularized_gram_and_bounds(gram_TxT)
        lower_TxT = jnp.diag(lower_T)
        project = lambda lower_T: solvers.project_to_dual_cone(regularized, lower_T)
        return jnp.sum(jax.vmap(project)(lower_TxT), axis=0), state
