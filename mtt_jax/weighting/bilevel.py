"""Bilevel loss weighting: task weights trained on a validation loss one virtual step ahead.

A method with ``requires = "lookahead"`` (Auto-Lambda) gets, before the model's update, the gradient of
the validation loss after a virtual step with respect to its task weights (`lookahead_gradient`,
computed by the train step with `mtt_jax.affinity.lookahead_weight_gradient`), updates its weights
with it, and then weighs the batch's losses like a loss method (``combine``).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mtt_jax.weighting.base import PyTree, WeightingMethod, validate_range

LOOKAHEAD_SAMPLES = 2  # the step's batch splits into a train half and a validation half


class AutoLambda(WeightingMethod):
    """Auto-Lambda (S. Liu, S. James, A. J. Davison & E. Johns, "Auto-Lambda: Disentangling Dynamic Task
    Relationships", TMLR 2022, §3): the task weights ``lambda`` minimise the validation loss of the
    parameters one SGD step ahead,

        lambda <- Adam(d/d lambda sum_t L_t(theta'; val)),  theta' = theta - alpha grad sum_t lambda_t L_t(theta; train)

    and the model then takes its update on ``sum_t lambda_t L_t`` (the new weights, the full batch). The
    weights are unconstrained (no softmax, no clipping), as in the authors' code. The derivative is
    ``-alpha g_i(theta; train) . grad L_val(theta')``, computed exactly (``affinity.
    lookahead_weight_gradient``: a forward-mode product) where the authors approximate it by central
    finite differences. Scale: a sum with weights ``lambda`` (0.1 each at the start).

    Defaults, from the authors' code (lorenmt/auto-lambda): ``init = 0.1`` (``--autol_init``),
    ``lr = 1e-4`` (Adam on the weights, ``--autol_lr`` of the dense-prediction trainer; 3e-4 in the
    CIFAR-100 one), ``lookahead_lr = 0.1`` (``alpha``).

    Where ours differs from the authors' code:
    - Validation data: they draw a second batch from the training set in another order (the "validation"
      loader iterates the train split); here the step's batch is split into two strided halves, the
      virtual step taken on the first and the validation loss on the second (`LOOKAHEAD_SAMPLES`), so
      the data pipeline is unchanged and a step's rows must divide by 2. The model's update uses the
      whole batch.
    - The virtual step: theirs is the SGD step of their optimiser (momentum buffer and weight decay
      included) at the scheduled learning rate; ours is a plain gradient step with the fixed
      ``lookahead_lr`` (the run's optimiser is AdamW, whose preconditioned step is not affine in the
      weights; Adam on ``lambda`` makes the update's size independent of ``alpha``'s scale).
    - Primary tasks: all of them (the multi-task setting); the auxiliary-learning setting, where the
      validation loss counts only primary tasks, is not exposed as an option.
    - The lookahead runs over all model parameters, shared and task-specific, as theirs does; the
      method's own parameters (none) are not part of it.
    """
    name = "auto_lambda"
    requires = "lookahead"

    def __init__(self, num_tasks: int, init: float = 0.1, lr: float = 1e-4, lookahead_lr: float = 0.1):
        super().__init__(num_tasks)
        validate_range(self.name, "init", init, -float("inf"))
        validate_range(self.name, "lr", lr, 0.0, low_open=True)
        validate_range(self.name, "lookahead_lr", lookahead_lr, 0.0, low_open=True)
        self.init, self.lr, self.lookahead_lr = float(init), float(lr), float(lookahead_lr)

    @property
    def gradient_samples(self) -> int:
        return LOOKAHEAD_SAMPLES

    def _optimizer(self) -> optax.GradientTransformation:
        return optax.adam(self.lr)

    def init_state(self) -> PyTree:
        weights_T = jnp.full((self.num_tasks,), self.init, jnp.float32)
        return {"weights": weights_T, "opt_state": self._optimizer().init(weights_T)}

    def lookahead_weights(self, state: PyTree) -> jax.Array:
        """The weights the virtual step is taken with: the current ones."""
        return state["weights"]

    def lookahead_gradient(self, state: PyTree, weight_grad_T: jax.Array) -> PyTree:
        """One Adam step of the weights along ``d L_val(theta') / d lambda``."""
        weight_grad_T = jnp.asarray(weight_grad_T, jnp.float32)
        updates, opt_state = self._optimizer().update(weight_grad_T, state["opt_state"], state["weights"])
        return {"weights": optax.apply_updates(state["weights"], updates), "opt_state": opt_state}

    def combine(self, params, state, losses_T, step, rng=None):
        weights_T = jax.lax.stop_gradient(state["weights"])
        return self.weighted_sum(weights_T, losses_T), weights_T, state
