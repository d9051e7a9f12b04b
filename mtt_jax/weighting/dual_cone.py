"""DualProj: the mean gradient projected onto the dual cone of the task gradients, from the Gram matrix.

UPGrad (`multi_objective`) projects each task's gradient and sums the projections; DualProj projects
their (preference-weighted) mean once. Both solve the projection in the T-dimensional task space
(`solvers.project_to_dual_cone`).
"""

from __future__ import annotations

from typing import Sequence

from mtt_jax.weighting import solvers
from mtt_jax.weighting.base import WeightingMethod, as_gram, validate_range
from mtt_jax.weighting.preference import check_preference, preference_or


class DualConeMethod(WeightingMethod):
    """What UPGrad and DualProj share: their options (``norm_eps``, ``reg_eps``, ``preference``) and the
    regularised Gram ``K_hat = K / tr(K) + reg_eps I`` (``reg_eps I`` if ``tr(K) < norm_eps``) that their
    projections onto the dual cone are solved on, with the lower bounds ``u`` (the preference, or 1/T)."""
    requires = "gram"

    def __init__(self, num_tasks: int, norm_eps: float = 1e-4, reg_eps: float = 1e-4,
                 preference: Sequence[float] = ()):
        super().__init__(num_tasks)
        self.preference = check_preference(self.name, preference, num_tasks)
        validate_range(self.name, "norm_eps", norm_eps, 0.0)
        validate_range(self.name, "reg_eps", reg_eps, 0.0, low_open=True)
        self.norm_eps, self.reg_eps = float(norm_eps), float(reg_eps)

    def regularized_gram_and_bounds(self, gram_TxT):
        """``(K_hat [T, T], u [T])``."""
        gram_TxT = as_gram(gram_TxT, self.num_tasks)
        return (solvers.regularize_gram(gram_TxT, self.norm_eps, self.reg_eps),
                preference_or(self.preference, 1.0 / self.num_tasks, self.num_tasks))


class DualProj(DualConeMethod):
    """DualProj (TorchJD, ``torchjd.aggregation.DualProj``; Quinton & Rey, "Jacobian Descent for
    Multi-Objective Optimization", arXiv 2406.16232, 2024; the projection is GEM's, Lopez-Paz & Ranzato,
    "Gradient Episodic Memory for Continual Learning", NeurIPS 2017, eq. 11).

    ``d = argmin_{d : g_t . d >= 0 for all t} |d - G^T u|^2`` with ``u = 1/T`` (the mean gradient) or
    ``u = preference``: the closest direction to the mean that conflicts with no task. By Quinton & Rey's
    Prop. 1 its weights are ``w = argmin_{v >= u} v^T K v`` and ``d = sum_t w_t g_t``, solved on
    ``K_hat = K / tr(K) + reg_eps I`` (``reg_eps I`` if ``tr(K) < norm_eps``) by block principal pivoting
    (`solvers.nonneg_qp`). Every ``w_t >= u_t``; when the mean already conflicts with no task, ``w = u``.
    Defaults ``norm_eps = reg_eps = 1e-4`` (TorchJD), ``preference = ()`` (uniform). Scale: mean-like
    (the preference's sum). With the ridge, ``g_t . d`` may be below 0 by about ``reg_eps tr(K) w_t``.

    Differs from TorchJD: its QP is solved by quadprog in float64 on the host; ours is exact up to f32 T x T
    solves, inside the jitted step. Its ``pref_vector`` is a tensor; ours a tuple option, checked up front.
    """
    name = "dualproj"

    def gram_weights(self, state, gram_TxT, losses_T, step, rng=None):
        regularized, lower_T = self.regularized_gram_and_bounds(gram_TxT)
        return solvers.project_to_dual_cone(regularized, lower_T), state
