"""Gram methods with a closed-form linear-algebra answer: IMTL (equal projections) and Aligned-MTL
(equal singular values)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtt_jax.weighting import solvers
from mtt_jax.weighting.base import PyTree, WeightingMethod, as_gram, validate_range


class IMTL(WeightingMethod):
    """IMTL (Liu et al., "Towards Impartial Multi-task Learning", ICLR 2021): IMTL-G (eq. 6-8) plus,
    optionally, IMTL-L (eq. 3).

    IMTL-G: the ``a`` with ``sum_t a_t = 1`` whose ``d = sum_t a_t g_t`` has equal projections ``d . u_t``
    on every unit gradient ``u_t``. With ``a_t = b_t / |g_t|`` this is the (T+1)-square system
    ``C b = c 1, sum_t b_t / |g_t| = 1`` in the cosine matrix ``C``, equivalent to the paper's
    ``a_{2:T} = g_1 U^T (D U^T)^-1`` where that inverse exists; it is solved by least squares with
    relative cutoff ``rcond`` (default 1e-5), so parallel gradients, where the paper's inverse is
    singular, get the minimum-norm solution (identical gradients: the mean; opposed: ``d = 0``). ``a``
    can be negative. Scale: weights sum to 1 (mean-like). Rescaling one task's gradient leaves the
    direction of ``d`` unchanged (its length changes).

    IMTL-L (``loss_balance=True``, paper and LibMTL): learned ``s`` (init 0, in params, trained by the main
    optimizer) turns each loss into ``exp(s_t) L_t - s_t`` (optimum ``exp(s_t) L_t = 1``) via
    `transform_losses`, which the step must apply before taking per-task gradients.

    Absent tasks (not in the paper): a task with no labelled examples in the batch has loss exactly 0 and
    gradient exactly 0 (masked means). Its unit gradient is undefined and its equation would force the
    common projection to 0 (all weight on the dead task, ``d = 0``), so zero-gradient tasks are left out
    of the solve by masking (static shapes): the system is the one over the remaining tasks, the dead
    task's coefficient is 0 and the Gram is renormalised over the live tasks. No live task: ``d = 0``.
    IMTL-L leaves an absent task's transformed loss at 0, independent of ``s``: otherwise
    ``d/ds (e^s 0 - s) = -1`` would push its ``s`` up on every step it is absent.
    """
    name = "imtl"
    requires = "gram"

    def __init__(self, num_tasks: int, loss_balance: bool = True, rcond: float = 1e-5):
        super().__init__(num_tasks)
        validate_range(self.name, "rcond", rcond, 0.0)
        self.loss_balance, self.rcond = bool(loss_balance), float(rcond)

    def init_params(self) -> PyTree:
        return {"loss_scale": jnp.zeros((self.num_tasks,), jnp.float32)} if self.loss_balance else {}

    def transform_losses(self, params, losses_T):
        if not self.loss_balance:
            return losses_T
        scale_T = params["loss_scale"]
        losses_T = losses_T.astype(jnp.float32)
        return jnp.where(losses_T != 0, jnp.exp(scale_T) * losses_T - scale_T, 0.0)  # 0: absent task

    def gram_weights(self, state, gram_TxT, losses_T, step, rng=None):
        normalized, _ = solvers.normalize_gram(as_gram(gram_TxT, self.num_tasks))
        num = self.num_tasks
        norms_T = jnp.sqrt(jnp.maximum(jnp.diagonal(normalized), 0.0))
        live_T = norms_T > 1e-12
        num_live = jnp.sum(live_T.astype(jnp.float32))
        # Mean squared norm over the live tasks, as if solving on them alone (x 1.0 when all are live).
        live_scale = num / jnp.maximum(num_live, 1.0)
        normalized = normalized * live_scale
        norms_T = jnp.where(live_T, norms_T * jnp.sqrt(live_scale), 1.0)
        live_TxT = live_T[:, None] & live_T[None, :]
        cosine_TxT = jnp.where(live_TxT, normalized / (norms_T[:, None] * norms_T[None, :]),
                               jnp.eye(num, dtype=jnp.float32))  # a dead task's row reads b_t = 0
        system = jnp.zeros((num + 1, num + 1), jnp.float32)
        system = system.at[:num, :num].set(cosine_TxT)
        system = system.at[:num, num].set(jnp.where(live_T, -1.0, 0.0))
        system = system.at[num, :num].set(jnp.where(live_T, 1.0 / norms_T, 0.0))
        rhs = jnp.zeros((num + 1,), jnp.float32).at[num].set(1.0)
        b_T = jnp.linalg.lstsq(system, rhs, rcond=self.rcond)[0][:num]
        return jnp.where(live_T, b_T / norms_T, 0.0), state


class AlignedMTL(WeightingMethod):
    """Aligned-MTL (Senushkin et al., "Independent Component Alignment for Multi-Task Learning", CVPR
    2023, eq. 9-10 / Alg. 1).

    ``K = V diag(lambda) V^T``; eigenvalues below ``rank_rtol * lambda_max`` are dropped (numerical rank);
    ``B = sqrt(lambda_min) V diag(lambda)^-1/2 V^T`` over the kept ones and ``a = B 1``, so
    ``d = sum_t a_t g_t = (B G)^T 1`` where every singular value of the aligned gradients ``B G`` equals
    ``sqrt(lambda_min)`` (condition number 1). Scale: a sum of T aligned gradients (orthogonal
    equal-norm gradients give EW). ``rank_rtol=1e-5`` is ours (f32 eigenvalues of a rank-deficient K
    sit near 1e-7 lambda_max). Scale option ``min`` only (paper default = LibMTL; the official code also
    offers median and rmse). Pitfall: a nearly rank-deficient G makes lambda_min tiny and the step small.
    """
    name = "aligned_mtl"
    requires = "gram"

    def __init__(self, num_tasks: int, rank_rtol: float = 1e-5):
        super().__init__(num_tasks)
        validate_range(self.name, "rank_rtol", rank_rtol, 0.0)
        self.rank_rtol = float(rank_rtol)

    def gram_weights(self, state, gram_TxT, losses_T, step, rng=None):
        normalized, _ = solvers.normalize_gram(as_gram(gram_TxT, self.num_tasks))
        eigvals_T, eigvecs_TxT = jnp.linalg.eigh(normalized)
        keep_T = eigvals_T > self.rank_rtol * jnp.max(eigvals_T)
        lambda_min = jnp.min(jnp.where(keep_T, eigvals_T, jnp.inf))
        inv_sqrt_T = jnp.where(keep_T, jax.lax.rsqrt(jnp.where(keep_T, eigvals_T, 1.0)), 0.0)
        scale = jnp.sqrt(jnp.where(jnp.any(keep_T), lambda_min, 0.0))
        aligner_TxT = scale * (eigvecs_TxT * inv_sqrt_T) @ eigvecs_TxT.T
        return jnp.sum(aligner_TxT, axis=1), state
