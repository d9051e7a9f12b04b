"""Gradient surgery computed from the Gram matrix: PCGrad and GradVac.

Both edit each task's gradient ``p_i`` by adding multiples of the original gradients ``g_j``, so
``p_i = sum_k C_ik g_k`` stays a linear combination: we track the coefficient row ``C_i`` (starting at
``e_i``), get inner products as ``p_i . g_j = (C_i K)_j`` and ``|p_i|^2 = C_i K C_i^T``, and return the
coefficients of ``d = sum_i p_i``, i.e. the column sums of C. Every task visits the others in its own
random order drawn from ``rng`` (T >= 3; for T = 2 the order does not matter and ``rng`` may be None).
Scale: a sum over tasks, like EW.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtt_jax.weighting.base import PyTree, WeightingMethod, as_gram, require_rng, validate_range


def visiting_orders(method: WeightingMethod, rng: jax.Array | None) -> jax.Array:
    """``[T, T]`` int32: row i is the order in which task i visits the tasks (itself is skipped)."""
    num = method.num_tasks
    if num <= 2:
        return jnp.tile(jnp.arange(num, dtype=jnp.int32), (num, 1))
    keys = jax.random.split(require_rng(method, rng), num)
    return jax.vmap(lambda key: jax.random.permutation(key, num))(keys).astype(jnp.int32)


class PCGrad(WeightingMethod):
    """PCGrad (Yu et al., "Gradient Surgery for Multi-Task Learning", NeurIPS 2020, Alg. 1).

    For each i, starting from ``p_i = g_i``, for the other tasks j in random order: if ``p_i . g_j < 0``,
    ``p_i -= (p_i . g_j / |g_j|^2) g_j`` (always onto the ORIGINAL ``g_j``); ``d = sum_i p_i``. No
    hyperparameters. Computed from K alone (module docstring); the task itself is skipped (LibMTL
    includes it, which is harmless). Sum scale; stochastic for T >= 3.
    """
    name = "pcgrad"
    requires = "gram"

    def gram_weights(self, state, gram_TxT, losses_T, step, rng=None):
        gram_TxT = as_gram(gram_TxT, self.num_tasks)
        num = self.num_tasks
        sq_norms_T = jnp.diagonal(gram_TxT)
        live_T = sq_norms_T > 1e-30 * (jnp.max(sq_norms_T) + 1e-30)

        def surgery(i, order_T):
            def visit(k, coeffs_T):
                j = order_T[k]
                dot = coeffs_T @ gram_TxT[:, j]
                conflict = (j != i) & (dot < 0) & live_T[j]
                scale = dot / jnp.where(live_T[j], sq_norms_T[j], 1.0)
                step_T = jax.nn.one_hot(j, num, dtype=jnp.float32) * scale
                return jnp.where(conflict, coeffs_T - step_T, coeffs_T)
            return jax.lax.fori_loop(0, num, visit, jax.nn.one_hot(i, num, dtype=jnp.float32))

        coeffs_TxT = jax.vmap(surgery)(jnp.arange(num), visiting_orders(self, rng))
        return jnp.sum(coeffs_TxT, axis=0), state


class GradVac(WeightingMethod):
    """GradVac (Wang, Tsvetkov, Firat & Cao, "Gradient Vaccine", ICLR 2021, Alg. 1 / eq. 3), whole-model
    granularity.

    State: EMA targets ``phi_hat_ij`` of the pairwise cosine (init 0). For each i, for the other tasks j
    in random order, with ``phi = cos(p_i, g_j)``: if ``phi < phi_hat_ij`` add ``c g_j``,
    ``c = |p_i| (phi_hat sqrt(1 - phi^2) - phi sqrt(1 - phi_hat^2)) / (|g_j| sqrt(1 - phi_hat^2))``; then
    ``phi_hat_ij <- (1 - beta) phi_hat_ij + beta phi`` (every visit, as current LibMTL; 1.1.5 updated only
    on a correction). ``d = sum_i p_i`` (sum scale). With ``phi_hat = 0`` the first step is PCGrad without
    self-projection. Default ``beta=0.5`` (LibMTL; the paper's is ~1e-2). Per-layer granularity would
    need per-layer Gram matrices and is not offered. Computed from K alone (module docstring).
    """
    name = "gradvac"
    requires = "gram"

    def __init__(self, num_tasks: int, beta: float = 0.5):
        super().__init__(num_tasks)
        validate_range(self.name, "beta", beta, 0.0, 1.0)
        self.beta = float(beta)

    def init_state(self) -> PyTree:
        return {"target_cos": jnp.zeros((self.num_tasks, self.num_tasks), jnp.float32)}

    def gram_weights(self, state, gram_TxT, losses_T, step, rng=None):
        gram_TxT = as_gram(gram_TxT, self.num_tasks)
        num, beta = self.num_tasks, self.beta
        norms_T = jnp.sqrt(jnp.maximum(jnp.diagonal(gram_TxT), 0.0))
        live_T = norms_T > 1e-15 * (jnp.max(norms_T) + 1e-30)

        def vaccinate(i, order_T, targets_T):
            def visit(k, carry):
                coeffs_T, targets_T = carry
                j = order_T[k]
                p_norm = jnp.sqrt(jnp.maximum(coeffs_T @ gram_TxT @ coeffs_T, 0.0))
                defined = (j != i) & live_T[j] & (p_norm > 1e-15 * norms_T[i])
                g_norm = jnp.where(live_T[j], norms_T[j], 1.0)
                cos = coeffs_T @ gram_TxT[:, j] / jnp.where(defined, p_norm * g_norm, 1.0)
                cos = jnp.clip(cos, -1.0, 1.0)
                target = targets_T[j]
                sin_target = jnp.sqrt(jnp.maximum(1.0 - target ** 2, 1e-12))
                c = p_norm * (target * jnp.sqrt(jnp.maximum(1.0 - cos ** 2, 0.0)) - cos * sin_target) / (
                    g_norm * sin_target)
                fire = defined & (cos < target)
                coeffs_T = coeffs_T + jnp.where(fire, c, 0.0) * jax.nn.one_hot(j, num, dtype=jnp.float32)
                targets_T = jnp.where(defined, targets_T.at[j].set((1.0 - beta) * target + beta * cos),
                                      targets_T)
                return coeffs_T, targets_T
            return jax.lax.fori_loop(0, num, visit, (jax.nn.one_hot(i, num, dtype=jnp.float32), targets_T))

        coeffs_TxT, targets_TxT = jax.vmap(vaccinate)(jnp.arange(num), visiting_orders(self, rng),
                                                      state["target_cos"])
        return jnp.sum(coeffs_TxT, axis=0), {"target_cos": targets_TxT}
