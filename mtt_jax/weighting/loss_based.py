"""Loss-based weighting without memory: the weights depend on the current losses (or on nothing)."""

from __future__ import annotations

import numbers
from typing import Sequence

import jax
import jax.numpy as jnp

from mtt_jax.weighting.base import WeightingMethod, check_range, clamp_losses, require_rng, validate_range


class EqualWeighting(WeightingMethod):
    """EW / linear scalarization: ``L = sum_t L_t``.

    Weight 1 per task (LibMTL's convention; its docstring says 1/T), so ``d = sum_t g_t``: sum scale.
    """
    name = "ew"
    combine_is_linear = True

    def combine(self, params, state, losses_T, step, rng=None):
        weights_T = jnp.ones((self.num_tasks,), jnp.float32)
        return self.weighted_sum(weights_T, losses_T), weights_T, state


class FixedWeighting(WeightingMethod):
    """Fixed weights from the config: ``L = sum_t w_t L_t``; empty = all 1.

    The weights come from ``weighting.weights`` (or ``weighting.fixed.weights``); sum scale for all-ones.
    """
    name = "fixed"
    combine_is_linear = True

    def __init__(self, num_tasks: int, weights: Sequence[float] = ()):
        super().__init__(num_tasks)
        example = ",".join(["1.0"] * num_tasks)
        if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) or any(
                isinstance(w, (str, bytes, bool)) or not isinstance(w, numbers.Real) for w in weights):
            # e.g. 'nan' or "(float('nan'),1.0)" on the command line, which arrive as strings
            raise ValueError(f"weighting.weights={weights!r} must be a tuple of {num_tasks} finite, "
                             f"non-negative numbers, one per task, e.g. --config.weighting.weights=({example})")
        weights = tuple(weights) or (1.0,) * num_tasks  # empty: all ones
        if len(weights) != num_tasks:
            raise ValueError(f"weighting.weights={weights} has {len(weights)} entries for {num_tasks} tasks; "
                             "give one weight per task")
        for weight in weights:  # inf or nan would make every update non-finite
            check_range(f"weighting.weights={weights}: entry", weight, 0.0, high_open=True)
        if not any(weights):
            raise ValueError(f"weighting.weights={weights} are all 0, so nothing would be trained")
        self.weights = tuple(float(w) for w in weights)

    def combine(self, params, state, losses_T, step, rng=None):
        weights_T = jnp.asarray(self.weights, jnp.float32)
        return self.weighted_sum(weights_T, losses_T), weights_T, state


class UncertaintyWeighting(WeightingMethod):
    """Homoscedastic uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018, eq. 7 and 10).

    With learned ``s_t = log sigma_t^2`` the objective is ``sum_t [exp(-s_t) L_t / 2 + s_t / 2]``, so the
    task weight is ``exp(-s_t) / 2`` and, for fixed ``L_t``, the optimum is ``exp(s_t) = L_t``. ``s`` is
    trained by the main optimizer (as in LibMTL). ``init_log_var`` defaults to LibMTL's -0.5 (initial
    weight 0.824); the paper gives none. Pitfall: the weight grows without bound as a loss
    approaches 0.
    """
    name = "uncertainty"
    combine_is_linear = True

    def __init__(self, num_tasks: int, init_log_var: float = -0.5):
        super().__init__(num_tasks)
        check_range("weighting.init_log_var", init_log_var, -float("inf"), low_open=True, high_open=True)
        self.init_log_var = float(init_log_var)

    def init_params(self):
        return {"log_var": jnp.full((self.num_tasks,), self.init_log_var, jnp.float32)}

    def combine(self, params, state, losses_T, step, rng=None):
        log_var_T = params["log_var"]
        losses_T = losses_T.astype(jnp.float32)
        total = jnp.sum(0.5 * jnp.exp(-log_var_T) * losses_T + 0.5 * log_var_T)
        return total, jax.lax.stop_gradient(0.5 * jnp.exp(-log_var_T)), state


class RandomLossWeighting(WeightingMethod):
    """RLW (Lin, Ye, Zhang & Tsang, TMLR 2022, Alg. 1 with the Normal sampler): every step draws
    ``z ~ N(0, I_T)`` from ``rng`` and uses ``w = softmax(z)``.

    Weights sum to 1: mean-like scale, T x smaller than EW. Paper = LibMTL (Normal; LibMTL 1.1.5 also had
    Uniform/Dirichlet/Bernoulli samplers, not offered here). Stochastic: needs ``rng``.
    """
    name = "rlw"
    combine_is_linear = True

    def combine(self, params, state, losses_T, step, rng=None):
        z_T = jax.random.normal(require_rng(self, rng), (self.num_tasks,), jnp.float32)
        weights_T = jax.nn.softmax(z_T)
        return self.weighted_sum(weights_T, losses_T), weights_T, state


class GeometricLossWeighting(WeightingMethod):
    """GLS (Chennupati et al., CVPR-W 2019, eq. 2): minimise the geometric mean ``(prod_t L_t)^(1/T)``.

    Computed stably as ``exp(mean_t log L_t)``; its gradient is ``d = gm / T * sum_t g_t / L_t``, so the
    logged (applied) weights are ``gm / (T L_t)`` -- not LibMTL's ``L_t / (T prod L)``, which is wrong.
    Needs ``L_t > 0``: losses are clamped at ``min_loss`` (default 1e-8; below it the task gets no
    gradient). Scale: for equal losses the weights are 1/T each (mean-like).

    Absent tasks (not in the paper): a loss of exactly 0 means the task had no labelled examples in the
    batch (masked mean). Clamping it would drag the product to ~0 and the step of every other task with
    it, so such a task is left out: the geometric mean is over the ``n`` present tasks,
    ``(prod_{t present} L_t)^(1/n)``, with weights ``gm / (n L_t)`` and 0 for absent tasks; no task
    present gives total 0 and weights 0. With every loss nonzero this is the formula above, bit for bit.
    """
    name = "gls"

    def __init__(self, num_tasks: int, min_loss: float = 1e-8):
        super().__init__(num_tasks)
        validate_range(self.name, "min_loss", min_loss, 0.0, low_open=True)
        self.min_loss = float(min_loss)

    def combine(self, params, state, losses_T, step, rng=None):
        present_T = losses_T != 0
        num_present = jnp.sum(present_T.astype(jnp.float32))
        to_present = self.num_tasks / jnp.maximum(num_present, 1.0)  # exactly 1.0 when all are present
        losses_T = clamp_losses(losses_T, self.min_loss)
        log_mean = jnp.mean(jnp.where(present_T, jnp.log(losses_T), 0.0)) * to_present
        total = jnp.where(num_present > 0, jnp.exp(log_mean), 0.0)
        weights_T = jnp.where(present_T, total / (self.num_tasks * losses_T) * to_present, 0.0)
        return total, jax.lax.stop_gradient(weights_T), state
