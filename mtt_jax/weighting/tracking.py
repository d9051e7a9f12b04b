"""Methods that keep per-task statistics of the shared-parameter gradients across steps: ExcessMTL
(an AdaGrad accumulator per task) and MoCo (a tracked, bias-corrected gradient per task).

Like DB-MTL (`elementwise.DBMTL`) their state mirrors the shared parameters behind a task axis
(``[T, *param.shape]`` per leaf), so it must be built with ``init_state_for(shared_shapes)``; the train
state names those leaves like the parameters, so they shard like them (`train_step.init_state`).
``grads_T`` is a pytree shaped like the shared parameters with a leading task axis on every leaf.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtt_jax.weighting.base import (PyTree, WeightingMethod, per_task_sum, scale_task_rows,
                                    sum_task_rows, task_zeros, validate_choice, validate_range)
from mtt_jax.weighting.pytree_ops import gram_matrix
from mtt_jax.weighting.solvers import project_to_simplex


class ExcessMTL(WeightingMethod):
    """ExcessMTL (He, Zhou, Zhang, Yun, Xu, Zeng, Chilimbi & Zhao, "Robust Multi-Task Learning with
    Excess Risks", ICML 2024, Alg. 1).

    Each task's excess risk ``L_t(theta) - L_t(theta*)`` is estimated by a diagonal second-order model
    whose curvature is the task's AdaGrad accumulator: ``S_t <- S_t + g_t^2`` (elementwise over the
    shared parameters, the current gradient included) and ``e_t = sum g_t^2 / sqrt(S_t + eps)``. A
    task's first positive ``e_t`` is stored as its baseline ``e^0_t`` (equal weighting until then); every
    later update takes a multiplicative-weights step on the normalised excess risks,
    ``lambda_t <- lambda_t exp(eta e_t / e^0_t)``, renormalised to ``sum_t lambda_t = T``, and applies
    ``d = sum_t lambda_t g_t`` with the new weights (sum scale, EW's at the start). Tasks far from their
    optimum relative to where they started gain weight. Unlike loss-based weights, this is meant not to
    reward a task whose loss stays high only because its labels are noisy (the paper's motivation).

    Defaults: ``robust_step_size`` (eta) 1e-2 and ``eps`` 1e-7, the official code's. The official code
    (and LibMTL, whose ``first_epoch`` flag is in fact the first step) takes the baseline at the first
    step. ``baseline`` picks ``e^0_t``:

    - ``"max"`` (default): the largest excess risk seen so far, the current one included, so that
      ``e_t / e^0_t <= 1`` and one step moves a log-weight by at most ``eta``. Where the first excess risk
      is the largest, this is the paper's baseline; so it is under a steady gradient scale ``c``, where
      the AdaGrad normaliser gives ``e_k ~ P c / sqrt(k)`` over ``P`` parameters. It is not where the
      heads start at zero (this codebase's default): the shared gradients then grow with the heads, and
      on the zoo's ``seqtasks`` run the first positive excess risks are 2e-5 to 2e-4, against 10-40 a
      hundred steps later. With ``"first"`` that sends the ratios to 1e5-1e6, and one task takes all the
      weight within a few steps (RESULTS.md §5).
    - ``"first"``: the paper's, each task's first positive excess risk (a zero-gradient step 0 of
      zero-initialised heads would otherwise give a zero baseline and freeze the weights).

    Until its baseline is set a task's ratio is 0 (no push); a skipped non-finite step sets nothing.
    Logged weights: the ``lambda`` applied.
    """
    name = "excess_mtl"
    requires = "grads"
    state_mirrors_params = True

    def __init__(self, num_tasks: int, robust_step_size: float = 1e-2, eps: float = 1e-7,
                 baseline: str = "max"):
        super().__init__(num_tasks)
        validate_range(self.name, "robust_step_size", robust_step_size, 0.0)
        validate_range(self.name, "eps", eps, 0.0, low_open=True)
        validate_choice(self.name, "baseline", baseline, ("first", "max"))
        self.robust_step_size, self.eps, self.baseline = float(robust_step_size), float(eps), baseline

    def init_state_for(self, shared_shapes: PyTree) -> PyTree:
        return {"grad_sq_sum": task_zeros(self.num_tasks, shared_shapes),
                "baseline": jnp.zeros((self.num_tasks,), jnp.float32),
                "weights": jnp.ones((self.num_tasks,), jnp.float32)}

    def aggregate(self, state, grads_T, losses_T, step, rng=None):
        grads_T = jax.tree.map(lambda g: g.astype(jnp.float32), grads_T)
        grad_sq_sum = jax.tree.map(lambda s, g: s + jnp.square(g), state["grad_sq_sum"], grads_T)
        excess_T = per_task_sum(jax.tree.map(lambda g, s: jnp.square(g) / jnp.sqrt(s + self.eps),
                                             grads_T, grad_sq_sum))
        has_baseline_T = state["baseline"] > 0
        baseline_T = jnp.where(has_baseline_T, state["baseline"], excess_T)
        if self.baseline == "max":  # the ratio is then at most 1
            baseline_T = jnp.maximum(baseline_T, excess_T)
        ratio_T = jnp.where(has_baseline_T, excess_T / jnp.where(has_baseline_T, baseline_T, 1.0), 0.0)
        logits_T = jnp.log(state["weights"]) + self.robust_step_size * ratio_T
        weights_T = self.num_tasks * jax.nn.softmax(logits_T)  # lambda exp(eta r), renormalised to T
        new_state = {"grad_sq_sum": grad_sq_sum, "baseline": baseline_T, "weights": weights_T}
        return sum_task_rows(weights_T, grads_T), weights_T, new_state


class MoCo(WeightingMethod):
    """MoCo (Fernando, Shen, Liu, Chaudhury, Murugesan & Chen, "Mitigating Gradient Bias in
    Multi-objective Learning: A Provably Convergent Approach", ICLR 2023, Alg. 1).

    Stochastic MGDA is biased: its weights depend on the same noisy gradients they multiply. MoCo tracks
    each task's gradient, ``y_t <- y_t - beta_k (y_t - h_t)``, and moves the weights by a projected
    gradient step on the min-norm objective of the tracked gradients,
    ``lambda <- Pi_simplex(lambda - gamma_k (Y Y^T + rho I) lambda)``; then ``d = sum_t lambda_t y_t``
    (mean scale: ``lambda`` lies on the simplex, starting at ``1/T``). Step sizes decay as
    ``beta_k = beta / k^beta_sigma`` and ``gamma_k = gamma / k^gamma_sigma`` with ``k = step + 1``.

    ``normalization`` picks ``h_t``: ``"loss"`` (default, LibMTL's) ``L_t g_t / (|g_t| + 1e-8)``, the
    gradient rescaled to its loss; ``"none"`` the raw ``g_t`` of the paper's analysis. ``simplex_step``:
    ``"projection"`` (default) is the paper's Euclidean projection; ``"softmax"`` is LibMTL's
    ``softmax(lambda - gamma_k (...) lambda)``, which keeps every weight positive. Defaults (LibMTL):
    ``beta`` 0.5, ``beta_sigma`` 0.5, ``gamma`` 0.1, ``gamma_sigma`` 0.5, ``rho`` 0. ``y`` starts at 0,
    so the first direction is ``beta_1 = 0.5`` of the rescaled gradients' mean. Logged weights: the
    ``lambda`` applied.
    """
    name = "moco"
    requires = "grads"
    state_mirrors_params = True

    def __init__(self, num_tasks: int, beta: float = 0.5, beta_sigma: float = 0.5, gamma: float = 0.1,
                 gamma_sigma: float = 0.5, rho: float = 0.0, normalization: str = "loss",
                 simplex_step: str = "projection"):
        super().__init__(num_tasks)
        validate_range(self.name, "beta", beta, 0.0, 1.0, low_open=True)
        validate_range(self.name, "beta_sigma", beta_sigma, 0.0)
        validate_range(self.name, "gamma", gamma, 0.0)
        validate_range(self.name, "gamma_sigma", gamma_sigma, 0.0)
        validate_range(self.name, "rho", rho, 0.0)
        validate_choice(self.name, "normalization", normalization, ("loss", "none"))
        validate_choice(self.name, "simplex_step", simplex_step, ("projection", "softmax"))
        self.beta, self.beta_sigma = float(beta), float(beta_sigma)
        self.gamma, self.gamma_sigma, self.rho = float(gamma), float(gamma_sigma), float(rho)
        self.normalization, self.simplex_step = normalization, simplex_step

    def init_state_for(self, shared_shapes: PyTree) -> PyTree:
        return {"tracked": task_zeros(self.num_tasks, shared_shapes),
                "weights": jnp.full((self.num_tasks,), 1.0 / self.num_tasks, jnp.float32)}

    def aggregate(self, state, grads_T, losses_T, step, rng=None):
        grads_T = jax.tree.map(lambda g: g.astype(jnp.float32), grads_T)
        if self.normalization == "loss":
            norms_T = jnp.sqrt(per_task_sum(grads_T, jnp.square))
            grads_T = scale_task_rows(grads_T, losses_T.astype(jnp.float32) / (norms_T + 1e-8))
        k = jnp.asarray(step, jnp.float32) + 1.0
        beta_k, gamma_k = self.beta / k ** self.beta_sigma, self.gamma / k ** self.gamma_sigma
        tracked = jax.tree.map(lambda y, h: y - beta_k * (y - h), state["tracked"], grads_T)
        gram_TxT = gram_matrix(tracked) + self.rho * jnp.eye(self.num_tasks, dtype=jnp.float32)
        moved_T = state["weights"] - gamma_k * gram_TxT @ state["weights"]
        weights_T = (project_to_simplex(moved_T) if self.simplex_step == "projection"
                     else jax.nn.softmax(moved_T))
        return sum_task_rows(weights_T, tracked), weights_T, {"tracked": tracked, "weights": weights_T}
