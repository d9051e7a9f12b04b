"""A weighting method from outside the library: loss-proportional weights.

``w_t = L_t / sum_s L_s``, treated as constants (stop-gradient), so the update is ``sum_t w_t g_t``: a task
whose loss is high gets a larger share of the update. The weights sum to 1 (a convex combination, unlike
`ew`'s sum of the losses). It is a toy for the extension API, no method from a paper: it is the
unnormalized cousin of DWA (Liu et al., CVPR 2019), which weights by the *rate* of each loss's decrease.

Importing this module registers it as ``"loss_proportional"``; a config selects it with
``config.weighting.name = "loss_proportional"``, and its option ``min_loss`` lives in
``config.weighting.loss_proportional``.
"""

from __future__ import annotations

import jax.numpy as jnp

import mtt_jax


class LossProportional(mtt_jax.WeightingMethod):
    """``w_t = max(L_t, min_loss) / sum_s max(L_s, min_loss)``; total ``sum_t stop_gradient(w_t) L_t``."""

    name = "loss_proportional"
    requires = "losses"  # combine() sees the per-task losses only: no per-task gradients needed

    def __init__(self, num_tasks: int, min_loss: float = 1e-8):
        super().__init__(num_tasks)
        if not min_loss > 0:  # the weights divide by the sum of the losses
            raise ValueError(f"weighting.loss_proportional.min_loss={min_loss!r} must be > 0")
        self.min_loss = float(min_loss)

    def combine(self, params, state, losses_T, step, rng=None):
        clamped_T = jnp.maximum(losses_T.astype(jnp.float32), self.min_loss)
        weights_T = clamped_T / jnp.sum(clamped_T)
        return self.weighted_sum(weights_T, losses_T), weights_T, state


mtt_jax.register_method("loss_proportional", LossProportional)  # options: min_loss, from the signature
