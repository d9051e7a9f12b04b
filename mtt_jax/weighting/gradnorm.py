"""GradNorm: task weights trained to equalise weighted gradient norms, scaled by relative progress."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from mtt_jax.weighting.base import PyTree, WeightingMethod, as_gram, clamp_losses, validate_range


class GradNorm(WeightingMethod):
    """GradNorm (Chen, Badrinarayanan, Lee & Rabinovich, ICML 2018, eq. 1-2 / Alg. 1).

    Weights ``w = T softmax(s)`` (sum T, LibMTL's parametrisation), ``d = sum_t w_t g_t`` with the current
    weights (sum scale). Then ``s`` takes one step of its own Adam (``lr=0.025``) on
    ``sum_t |n_t - mean(n) r_t^alpha|`` with ``n_t = w_t |g_t|`` (``|g_t| = sqrt(K_tt)``), the target
    ``mean(n) r_t^alpha`` held constant, ``r_t = (L_t / L_t(0)) / mean_j (L_j / L_j(0))`` and ``L(0)`` the
    losses of the first call, recorded in the state (paper; LibMTL runs epoch 0 as EW and uses its mean
    loss). Our choice: ``s`` lives in the state with its own Adam, not in the main optimizer as in LibMTL,
    so the balancing speed does not depend on the model's learning rate and Adam makes it independent
    of the gradient scale; ``lr=0.025`` matches FAMO's logit learning rate. ``alpha=1.5`` is LibMTL's
    default (the paper tunes it per dataset). The norms are over all shared parameters (LibMTL), not the
    paper's last shared layer. Losses are clamped at ``min_loss`` for the ratios.
    """
    name = "gradnorm"
    requires = "gram"

    def __init__(self, num_tasks: int, alpha: float = 1.5, lr: float = 0.025, min_loss: float = 1e-8):
        super().__init__(num_tasks)
        validate_range(self.name, "alpha", alpha, 0.0)
        validate_range(self.name, "lr", lr, 0.0, low_open=True)
        validate_range(self.name, "min_loss", min_loss, 0.0, low_open=True)
        self.alpha, self.lr, self.min_loss = float(alpha), float(lr), float(min_loss)

    def init_state(self) -> PyTree:
        logits_T = jnp.zeros((self.num_tasks,), jnp.float32)
        return {"logits": logits_T, "opt_state": optax.adam(self.lr).init(logits_T),
                "initial_losses": jnp.ones((self.num_tasks,), jnp.float32),
                "initialized": jnp.zeros((), bool)}

    def gram_weights(self, state, gram_TxT, losses_T, step, rng=None):
        num = self.num_tasks
        grad_norms_T = jnp.sqrt(jnp.maximum(jnp.diagonal(as_gram(gram_TxT, num)), 0.0))
        losses_T = clamp_losses(losses_T, self.min_loss)
        initial_T = jnp.where(state["initialized"], state["initial_losses"], losses_T)
        ratio_T = losses_T / initial_T
        target_T = jax.lax.stop_gradient(
            jnp.mean(num * jax.nn.softmax(state["logits"]) * grad_norms_T)
            * (ratio_T / jnp.mean(ratio_T)) ** self.alpha)

        def balance_loss(logits_T):
            return jnp.sum(jnp.abs(num * jax.nn.softmax(logits_T) * grad_norms_T - target_T))

        logit_grad_T = jax.grad(balance_loss)(state["logits"])
        updates, opt_state = optax.adam(self.lr).update(logit_grad_T, state["opt_state"])
        weights_T = num * jax.nn.softmax(state["logits"])
        return weights_T, {"logits": optax.apply_updates(state["logits"], updates), "opt_state": opt_state,
                           "initial_losses": initial_T, "initialized": jnp.ones((), bool)}
