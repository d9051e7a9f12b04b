"""ConFIG: the conflict-free direction at equal angles to every task gradient, from the Gram matrix.

The direction ``x = pinv(U^T) 1`` (U: the unit gradients as columns) is the minimum-norm solution of
``U^T x = 1``, so ``x = U (U^T U)^+ 1`` lies in the span of the gradients: ``U^T U`` is the cosine matrix
``K_tt' / (|g_t| |g_t'|)``, and the T x T Gram matrix suffices (``requires = "gram"``), not the gradients.
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp

from mtt_jax.weighting import solvers
from mtt_jax.weighting.base import WeightingMethod, as_gram
from mtt_jax.weighting.preference import check_preference, preference_or

# Eigenvalues of the cosine matrix below this fraction of the largest count as 0 in its pseudo-inverse:
# they are squared singular values of U, and an f32 Gram matrix resolves them to about 1e-6.
COSINE_RCOND = 1e-6


class ConFIG(WeightingMethod):
    """ConFIG (Liu, Chu & Thuerey, "ConFIG: Towards Conflict-free Training of Physics Informed Neural
    Networks", ICLR 2025, eq. 2; official code: tum-pbs/ConFIG, ``conflictfree.grad_operator``).

    With unit gradients ``u_t = g_t / |g_t|`` and a target ``w`` (all ones, or ``preference``: the official
    code's weight model; its scale does not matter), ``x = pinv([u_1 ... u_T]^T) w``, so ``u_t . x = w_t``:
    equal angles to every task. The update is ``d = (sum_t g_t . x_hat) x_hat`` with ``x_hat = x / |x|`` (the official default
    length model, the sum of the projections). From the cosine matrix ``C = U^T U`` (the Gram matrix
    divided by the norms): ``a = C^+ w``, ``x = sum_t a_t u_t``, ``|x|^2 = a^T C a``, ``g_t . x = |g_t| (C a)_t``,
    so ``d = sum_t c_t g_t`` with ``c_t = (sum_s |g_s| (C a)_s) a_t / (|x|^2 |g_t|)``. Defaults:
    ``preference = ()`` (ones). Scale: a sum over tasks (``T`` non-conflicting equal gradients give
    ``T g``). A zero gradient gets ``u_t = 0`` and weight 0 (as the official ``nan_to_num``); gradients
    that no direction can meet at equal positive angles (``g`` and ``-g``) give ``d = 0``.

    Differs from the official code: it solves ``U^T x = w`` by ``torch.linalg.lstsq`` on the P-dimensional
    unit gradients (or ``pinv`` with ``use_least_square=False``), and for two tasks uses its closed form
    from the orthogonal components by default, which gives the same direction for non-parallel gradients;
    ours solves the T x T cosine system, with eigenvalues below ``COSINE_RCOND`` of the largest dropped
    (singular values of U below 1e-3 of the largest; lstsq keeps them down to its machine-precision
    cut-off). The momentum variant (M-ConFIG) and the other length models are not offered.
    """
    name = "conflictfree"
    requires = "gram"

    def __init__(self, num_tasks: int, preference: Sequence[float] = ()):
        super().__init__(num_tasks)
        self.preference = check_preference(self.name, preference, num_tasks)

    def gram_weights(self, state, gram_TxT, losses_T, step, rng=None):
        gram_TxT = as_gram(gram_TxT, self.num_tasks)
        norms_T = jnp.sqrt(jnp.maximum(jnp.diagonal(gram_TxT), 0.0))
        live_T = norms_T > 1e-15 * (jnp.max(norms_T) + solvers.TINY)
        safe_T = jnp.where(live_T, norms_T, 1.0)
        cosine_TxT = jnp.where(live_T[:, None] & live_T[None, :], gram_TxT / (safe_T[:, None] * safe_T[None, :]),
                               0.0)
        target_T = preference_or(self.preference, 1.0, self.num_tasks)
        target_T = target_T / jnp.max(target_T)              # d ignores the preference's scale
        a_T = solvers.pseudo_inverse_psd(cosine_TxT, COSINE_RCOND) @ target_T
        unit_dot_x_T = cosine_TxT @ a_T                      # u_t . x
        x_sq = jnp.maximum(a_T @ unit_dot_x_T, 0.0)           # |x|^2
        length_times_norm = jnp.sum(norms_T * unit_dot_x_T)  # sum_t g_t . x = |d| |x|
        defined = live_T & (x_sq > 1e-12)
        coeffs_T = length_times_norm * a_T / (jnp.where(defined, x_sq, 1.0) * safe_T)
        return jnp.where(defined, coeffs_T, 0.0), state
