"""Stochastic MGDA with double sampling: MoDo and SDMGrad.

MGDA's weights depend on the same noisy gradients they multiply, so a stochastic step of its min-norm
objective ``|G^T lambda|^2`` is biased. These methods split each batch into three independent samples
(`mtt_jax.train_step`, ``requires == "sampled_gram"``): the weights take a step on the cross-Gram
``K = G_1 G_2^T`` of samples 1 and 2, an unbiased estimate of ``G G^T``, and the update applies them to
sample 0's gradients, ``d = sum_t c_t g_t^(0)``. ``K`` is not symmetric and its diagonal may be negative.
The weights persist across steps (a single-loop method: one or a few weight steps per model step).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtt_jax.weighting.base import WeightingMethod, as_gram, validate_range
from mtt_jax.weighting.solvers import project_to_simplex


class DoubleSampling(WeightingMethod):
    """A method fed the cross-Gram of two samples, with weights on the simplex kept across steps."""
    requires = "sampled_gram"

    def init_state(self):
        return {"weights": jnp.full((self.num_tasks,), 1.0 / self.num_tasks, jnp.float32)}


class MoDo(DoubleSampling):
    """MoDo (Chen, Fernando, Ying & Chen, "Three-Way Trade-Off in Multi-Objective Learning: Optimization,
    Generalization and Conflict-Avoidance", NeurIPS 2023, Alg. 1).

    One projected gradient step on the regularised min-norm objective per model step,
    ``lambda <- Pi_simplex(lambda - gamma (K + rho I) lambda)``, then ``d = sum_t lambda_t g_t^(0)``
    (mean scale: ``lambda`` lies on the simplex, starting at ``1/T``). Defaults (LibMTL's): ``gamma``
    1e-3, ``rho`` 0.1. ``gamma`` multiplies the raw gradient products, so how far the weights move
    depends on the gradients' scale: with small gradients MoDo stays close to the mean gradient.
    Logged weights: the ``lambda`` applied.
    """
    name = "modo"

    def __init__(self, num_tasks: int, gamma: float = 1e-3, rho: float = 0.1):
        super().__init__(num_tasks)
        validate_range(self.name, "gamma", gamma, 0.0)
        validate_range(self.name, "rho", rho, 0.0)
        self.gamma, self.rho = float(gamma), float(rho)

    def gram_weights(self, state, gram_TxT, losses_T, step, rng=None):
        cross_TxT = as_gram(gram_TxT, self.num_tasks)
        weights_T = state["weights"]
        weights_T = project_to_simplex(weights_T - self.gamma * (cross_TxT @ weights_T + self.rho * weights_T))
        return weights_T, {"weights": weights_T}


class SDMGrad(DoubleSampling):
    """SDMGrad (Xiao, Ban & Ji, "Direction-oriented Multi-objective Learning: Simple and Provable
    Stochastic Algorithms", NeurIPS 2023, Alg. 1).

    The direction stays close to the mean gradient ``g0``: ``w = argmin_{w in simplex}
    1/2 |G^T w|^2 + lam w^T G g0``, with ``K g0``'s estimate ``K 1 / T``, and
    ``d = (sum_t w_t g_t^(0) + lam g0^(0)) / (1 + lam)``, i.e. coefficients ``c = (w + lam / T) / (1 + lam)``
    (mean scale). ``lam`` = 0 is stochastic MGDA; a large ``lam`` is the mean gradient.

    The weights take ``inner_steps`` projected steps per model step from where the last step left them:
    ``v <- momentum v + (K_hat w + lam K_hat 1 / T)`` (heavy ball, restarted at each model step as the
    official code's fresh SGD optimizer is), ``w <- Pi_simplex(w - inner_lr v)``, on
    ``K_hat = K / (s^2 + 1e-8)``, ``s`` the mean of ``sqrt(max(K_tt, 0))``, so that the step size does not
    depend on the gradients' scale. Defaults (the official code's and LibMTL's): ``lam`` 0.3,
    ``inner_steps`` 20, ``inner_lr`` 5, ``momentum`` 0.5. Logged weights: the coefficients ``c``.
    """
    name = "sdmgrad"

    def __init__(self, num_tasks: int, lam: float = 0.3, inner_steps: int = 20, inner_lr: float = 5.0,
                 momentum: float = 0.5):
        super().__init__(num_tasks)
        validate_range(self.name, "lam", lam, 0.0)
        validate_range(self.name, "inner_steps", inner_steps, 1)
        validate_range(self.name, "inner_lr", inner_lr, 0.0, low_open=True)
        validate_range(self.name, "momentum", momentum, 0.0, 1.0)
        self.lam, self.inner_steps = float(lam), int(inner_steps)
        self.inner_lr, self.momentum = float(inner_lr), float(momentum)

    def gram_weights(self, state, gram_TxT, losses_T, step, rng=None):
        cross_TxT = as_gram(gram_TxT, self.num_tasks)
        scale = jnp.mean(jnp.sqrt(jnp.maximum(jnp.diagonal(cross_TxT), 0.0)))
        cross_TxT = cross_TxT / (scale ** 2 + 1e-8)
        toward_mean_T = self.lam * cross_TxT.mean(axis=1)

        def inner_step(_, carry):
            weights_T, velocity_T = carry
            velocity_T = self.momentum * velocity_T + cross_TxT @ weights_T + toward_mean_T
            return project_to_simplex(weights_T - self.inner_lr * velocity_T), velocity_T

        weights_T, _ = jax.lax.fori_loop(0, self.inner_steps, inner_step,
                                         (state["weights"], jnp.zeros_like(state["weights"])))
        coeffs_T = (weights_T + self.lam / self.num_tasks) / (1.0 + self.lam)
        return coeffs_T, {"weights": weights_T}
