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

    Absent tasks (not in the paper): a loss of exactly 0 means the task had no labelled examples in the
    batch (masked mean). Clamped, it would take nearly all the weight, so it is left out: ``c`` and the
    weights are over the present tasks (``softmax`` restricted to them), an absent task gets weight 0.
    In `after_step` a task counts as present when its loss before and after are both nonzero; the logit
    gradient is ``J^T delta`` of the softmax restricted to the present tasks (so an absent task's
    ``delta = 0`` is not read as "its loss did not fall"), and an absent task's logit and Adam moments
    are left unchanged (no weight decay either; only Adam's shared step count advances). Present tasks
    thus evolve as FAMO on the present tasks alone. With every loss nonzero this is bit for bit the
    update above; no task present gives weights 0, total 0 and an unchanged state.
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
        present_T = losses_T != 0
        z_T = jax.nn.softmax(state["logits"])
        safe_T = clamp_losses(losses_T, self.min_loss)
        inverse_T = jnp.where(present_T, z_T / jax.lax.stop_gradient(safe_T), 0.0)
        normaliser = jnp.sum(inverse_T)
        weights_T = jax.lax.stop_gradient(inverse_T / jnp.where(normaliser > 0, normaliser, 1.0))
        return jnp.sum(weights_T * safe_T), weights_T, state

    def after_step(self, state, losses_before_T, losses_after_T):
        present_T = (losses_before_T != 0) & (losses_after_T != 0)
        delta_T = (jnp.log(clamp_losses(losses_before_T, self.min_loss))
                   - jnp.log(clamp_losses(losses_after_T, self.min_loss)))
        delta_T = jnp.where(present_T, delta_T, 0.0)
        # softmax over the present tasks (-inf logits get z = 0); none present: any, the update is dropped
        in_softmax_T = present_T | ~jnp.any(present_T)
        _, vjp = jax.vjp(lambda w: jax.nn.softmax(jnp.where(in_softmax_T, w, -jnp.inf)), state["logits"])
        (logit_grad_T,) = vjp(delta_T)
        logit_grad_T = jnp.where(present_T, logit_grad_T, 0.0)
        updates, opt_state = self._optimizer().update(logit_grad_T, state["opt_state"], state["logits"])
        keep_per_task = lambda new, old: (jnp.where(present_T, new, old) if jnp.shape(new) == present_T.shape
                                          else new)  # Adam's moments per task; its step count is shared
        logits_T = jnp.where(present_T, optax.apply_updates(state["logits"], updates), state["logits"])
        return {"logits": logits_T, "opt_state": jax.tree.map(keep_per_task, opt_state, state["opt_state"])}
