"""Loss-based weighting methods: the weights depend on the losses (or on nothing), not on gradients."""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp

from mtt_jax.weighting.base import WeightingMethod


class EqualWeighting(WeightingMethod):
    """EW / linear scalarization: ``L = sum_t L_t`` (weight 1 per task, LibMTL's convention)."""
    name = "ew"

    def combine(self, params, state, losses_T, step):
        weights_T = jnp.ones((self.num_tasks,), jnp.float32)
        return self.weighted_sum(weights_T, losses_T), weights_T, state


class FixedWeighting(WeightingMethod):
    """Fixed weights from the config: ``L = sum_t w_t L_t`` (founding document §3.4); empty = all 1."""
    name = "fixed"

    def __init__(self, num_tasks: int, weights: Sequence[float]):
        super().__init__(num_tasks)
        weights = tuple(weights) or (1.0,) * num_tasks  # empty: all ones
        if len(weights) != num_tasks:
            raise ValueError(f"weighting.weights has {len(weights)} entries for {num_tasks} tasks")
        self.weights = tuple(float(w) for w in weights)

    def combine(self, params, state, losses_T, step):
        weights_T = jnp.asarray(self.weights, jnp.float32)
        return self.weighted_sum(weights_T, losses_T), weights_T, state


class UncertaintyWeighting(WeightingMethod):
    """Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018, eq. 7 and 10).

    With learned ``s_t = log sigma_t^2`` the objective is ``sum_t [exp(-s_t) L_t / 2 + s_t / 2]``, so the
    task weight is ``exp(-s_t) / 2`` and, for fixed ``L_t``, the optimum is ``exp(s_t) = L_t``. ``s`` is
    trained by the main optimizer (as in LibMTL). ``init_log_var`` defaults to LibMTL's -0.5 (initial
    weight 0.824); the paper gives none. Pitfall (METHODS.md): the weight grows without bound as a loss
    approaches 0.
    """
    name = "uncertainty"

    def __init__(self, num_tasks: int, init_log_var: float = -0.5):
        super().__init__(num_tasks)
        self.init_log_var = float(init_log_var)

    def init_params(self):
        return {"log_var": jnp.full((self.num_tasks,), self.init_log_var, jnp.float32)}

    def combine(self, params, state, losses_T, step):
        log_var_T = params["log_var"]
        losses_T = losses_T.astype(jnp.float32)
        total = jnp.sum(0.5 * jnp.exp(-log_var_T) * losses_T + 0.5 * log_var_T)
        return total, jax.lax.stop_gradient(0.5 * jnp.exp(-log_var_T)), state
