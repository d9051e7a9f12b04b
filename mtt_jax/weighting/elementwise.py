"""Methods that need the per-task gradients themselves, coordinate by coordinate or across steps:
GradDrop and DB-MTL.

``grads_T`` is a pytree shaped like the shared parameters with a leading task axis on every leaf; the
returned direction is shaped like one task's gradient.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from mtt_jax.weighting.base import (PyTree, WeightingMethod, clamp_losses, per_task_sum, require_rng,
                                    scale_task_rows, sum_task_rows, task_zeros, validate_range)
from mtt_jax.weighting.pytree_ops import sum_leading


class GradDrop(WeightingMethod):
    """GradDrop (Chen et al., "Just Pick a Sign: Optimizing Deep Multitask Models with Gradient Sign
    Dropout", NeurIPS 2020, eq. 1-3).

    The paper (Alg. 1; the authors' Lingvo layer and LibMTL's ``GradDrop`` alike) works at an activation
    layer ``A`` (shape ``[B, ...]``) on the per-task activation gradients ``nabla_t = d L_t / d A``. It
    forms ``G_t = sum_batch sign(A) * nabla_t`` (one value per feature), the purity
    ``P = (1 + sum_t G_t / sum_t |G_t|) / 2`` (eq. 1), one ``U ~ Uniform(0, 1)`` per feature, the masks
    ``M_t = [f(P) > U][G_t > 0] + [f(P) < U][G_t < 0]`` (``f`` the identity, as in LibMTL), and
    backpropagates ``sum_t (leak + (1 - leak) M_t) * nabla_t``: one keep/drop decision per task and
    feature, applied to every example's own ``nabla_t`` (not multiplied by ``sign(A)``). ``sign(A) *
    nabla_t`` is the gradient with respect to ``|A|`` (does task t want the feature to grow or shrink?),
    and the batch sum pools that vote over the examples.

    Ours applies the same purity, masks and leak to each coordinate of the per-task gradients ``g_t`` it
    is given, with no ``sign(A)`` factor and no batch sum, and returns
    ``d = sum_t (leak + (1 - leak) M_t) g_t`` (sum scale; not in the span of the gradients). The
    aggregation receives only the gradients, never the activation, so it cannot form ``sign(A)``. By
    default ``g_t`` are the shared-parameter gradients (each already a sum over the batch, and a
    parameter has no activation sign): parameter-space GradDrop, which LibMTL refuses (it requires
    ``rep_grad``). With ``rep_grad`` ``g_t`` are the gradients with respect to the shared representation
    ``z`` (batch-major), and ours draws a separate decision for every example's coordinate from the sign of
    ``d L_t / d z`` itself; the paper's rule would test ``sum_batch sign(z) * d L_t / d z`` and keep or drop
    a feature for the whole batch. ``leak`` default 0 (LibMTL). Logged weights: the fraction of each
    task's L1 gradient mass that was kept. Stochastic.
    """
    name = "graddrop"
    requires = "grads"

    def __init__(self, num_tasks: int, leak: float = 0.0):
        super().__init__(num_tasks)
        validate_range(self.name, "leak", leak, 0.0, 1.0)
        self.leak = float(leak)

    def aggregate(self, state, grads_T, losses_T, step, rng=None):
        leaves, treedef = jax.tree.flatten(grads_T)
        keys = jax.random.split(require_rng(self, rng), max(len(leaves), 1))

        def drop(grad_T, key):
            grad_T = grad_T.astype(jnp.float32)
            total, mass = sum_leading(grad_T), sum_leading(jnp.abs(grad_T))
            purity = 0.5 * (1.0 + total / jnp.where(mass > 0, mass, 1.0))
            uniform = jax.random.uniform(key, total.shape, jnp.float32)
            keep_T = ((purity > uniform) & (grad_T > 0)) | ((purity < uniform) & (grad_T < 0))
            return jnp.where(keep_T, grad_T, self.leak * grad_T)

        kept_T = jax.tree.unflatten(treedef, [drop(g, k) for g, k in zip(leaves, keys)])
        direction = jax.tree.map(sum_leading, kept_T)
        kept_mass_T = per_task_sum(kept_T, jnp.abs)
        mass_T = per_task_sum(grads_T, lambda leaf: jnp.abs(leaf.astype(jnp.float32)))
        return direction, kept_mass_T / jnp.where(mass_T > 0, mass_T, 1.0), state


class DBMTL(WeightingMethod):
    """DB-MTL (Lin et al., "Dual-Balancing for Multi-Task Learning", arXiv 2308.12029, 2023, Alg. 1).

    Loss balancing: the gradients of ``log L_t`` are ``g_t / L_t`` (losses clamped at ``min_loss``,
    1e-8). Gradient balancing: an EMA buffer ``b_t <- (1 - beta_k) g_t / L_t + beta_k b_t`` with
    ``beta_k = beta / k^sigma`` (k = step + 1), zero-initialised without bias correction, and
    ``d = sum_t (max_s |b_s| / |b_t|) b_t``: every buffer rescaled to the largest norm. The logged
    weights are those factors. Defaults ``beta=0.9``, ``sigma=0`` (LibMTL). Scale: the first steps are
    small -- 0.1x the steady state at step 1, 0.19x at step 2.

    The buffer mirrors the shared parameters, so the state must be built with
    ``init_state_for(shared_shapes)`` (a pytree of ``jax.ShapeDtypeStruct`` shaped like one task's
    gradient); the buffer is ``[T, *shape]`` f32 per leaf.
    """
    name = "db_mtl"
    requires = "grads"
    state_mirrors_params = True

    def __init__(self, num_tasks: int, beta: float = 0.9, sigma: float = 0.0, min_loss: float = 1e-8):
        super().__init__(num_tasks)
        validate_range(self.name, "beta", beta, 0.0, 1.0)
        validate_range(self.name, "sigma", sigma, 0.0)
        validate_range(self.name, "min_loss", min_loss, 0.0, low_open=True)
        self.beta, self.sigma, self.min_loss = float(beta), float(sigma), float(min_loss)

    def init_state_for(self, shared_shapes: PyTree) -> PyTree:
        return {"buffer": task_zeros(self.num_tasks, shared_shapes)}

    def aggregate(self, state, grads_T, losses_T, step, rng=None):
        step_count = jnp.asarray(step, jnp.float32) + 1.0
        beta = self.beta / step_count ** self.sigma
        inverse_T = 1.0 / clamp_losses(losses_T, self.min_loss)

        log_grads_T = scale_task_rows(jax.tree.map(lambda g: g.astype(jnp.float32), grads_T), inverse_T)
        buffer = jax.tree.map(lambda b, g: (1.0 - beta) * g + beta * b, state["buffer"], log_grads_T)
        norms_T = jnp.sqrt(per_task_sum(buffer, jnp.square))
        scale_T = jnp.where(norms_T > 0, jnp.max(norms_T) / jnp.where(norms_T > 0, norms_T, 1.0), 0.0)
        return sum_task_rows(scale_T, buffer), scale_T, {"buffer": buffer}
