"""FAMO: loss weighting whose logits follow the observed per-task log-loss decrease."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mtt_jax.weighting.base import PyTree, WeightingMethod, clamp_losses, validate_range


class FAMO(WeightingMethod):
    """FAMO (Liu, Feng, Stone & Liu, "FAMO: Fast Adaptive Multitask Optimization", NeurIPS 2023, Alg. 1).

    Logits ``w`` (init 0), ``z = softmax(w)``. The update direction is ``d = sum_t c z_t / L_t g_t`` with
    ``c = 1 / sum_s z_s / L_s`` (the normalised gradient of ``sum_t z_t log L_t``), implemented as
    ``total = sum_t stop_gradient(c z_t / L_t) L_t``; the logged weights ``c z_t / L_t`` sum to 1
    (mean-like scale). After the parameter update, `after_step` takes the same batch's losses before and
    after, ``delta_t = log L_t(before) - log L_t(after)``, and descends ``w`` along
    ``J_softmax(w)^T delta`` with its own Adam: tasks whose loss fell less gain weight. The losses before
    the step arrive as an argument, so the state holds no copy of them.

    Defaults (LibMTL): ``w_lr=0.025``, ``gamma=1e-3`` (L2 weight decay added to the gradient as in
    ``torch.optim.Adam(weight_decay=...)``; the official code defaults to 0.01, 0.001 for QM9), min-loss
    offset 0. Needs ``L_t > 0``: losses are clamped at ``min_loss`` (1e-8) before every log/division.
    """
    name = "famo"
    needs_losses_after_step = True

    def __init__(self, num_tasks: int, w_lr: float = 0.025, gamma: float = 1e-3, min_loss: float = 1e-8):
        super().__init__(num_tasks)
        validate_range(self.name, "w_lr", w_lr, 0.0, low_open=True)
        validate_range(self.name, "gamma", gamma, 0.0)
        validate_range(self.name, "min_loss", min_loss, 0.0, low_open=True)
        self.w_lr, self.gamma, self.min_loss = float(w_lr), float(gamma), float(min_loss)

    def _optimizer(self) -> optax.GradientTransformation:
        return optax.chain(optax.add_decayed_weights(self.gamma), optax.adam(self.w_lr))

    def init_state(self) -> PyTree:
        logits_T = jnp.zeros((self.num_tasks,), jnp.float32)
        return {"logits": logits_T, "opt_state": self._optimizer().init(logits_T)}

    def combine(self, params, state, losses_T, step, rng=None):
        z_T = jax.nn.softmax(state["logits"])
        safe_T = clamp_losses(losses_T, self.min_loss)
        inverse_T = z_T / jax.lax.stop_gradient(safe_T)
        weights_T = jax.lax.stop_gradient(inverse_T / jnp.sum(inverse_T))
        return jnp.sum(weights_T * safe_T), weights_T, state

    def after_step(self, state, losses_before_T, losses_after_T):
        delta_T = (jnp.log(clamp_losses(losses_before_T, self.min_loss))
                   - jnp.log(clamp_losses(losses_after_T, self.min_loss)))
        _, vjp = jax.vjp(jax.nn.softmax, state["logits"])
        (logit_grad_T,) = vjp(delta_T)
        updates, opt_state = self._optimizer().update(logit_grad_T, state["opt_state"], state["logits"])
        return {"logits": optax.apply_updates(state["logits"], updates), "opt_state": opt_state}
