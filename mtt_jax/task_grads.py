"""Per-task gradients on the shared parameters, and the conflict diagnostics built from them.

The model splits into a shared encoder (embedding, positions, task encoder, Transformer trunk: the
parameters under `ENCODER_KEYS`) and a task-side decoder (task attention and heads). Per-task gradients
``g_t = d L_t / d theta_shared`` are taken for the encoder only; the decoder gets the ordinary gradient of
``sum_t L_t`` (LibMTL's convention for task-specific parameters).

- multi-input: the encoder is ``vmap``-ed over the task axis with one copy of the shared parameters per
  task. Task t's examples only touch copy t, so one backward pass returns all T gradients, at the cost
  of one ordinary backward pass (the weight-gradient matmuls are the same, just not summed over tasks).
- single-input: every task reads the same encoding, so the T gradients are a vectorized Jacobian:
  the T representation gradients ``d L_t / d z`` from the (cheap) decoder, then ``vmap`` of the
  encoder's VJP over them (T backward passes through the encoder).
- multi-input with a decoder that mixes the tasks' streams (aligned task attention,
  ``model.decode_mixes_tasks``): ``L_t`` reads every task's stream of its rows, so the single-input
  recipe runs over the per-task copies: T representation gradients, T backward passes through all the
  copies, each summed over copies (T times the cost of one backward pass).
- ``rep_grad``: the methods see gradients with respect to the shared representation ``z`` instead
  (MGDA-UB, Sener & Koltun 2018 §3.3); the update of the encoder is then one VJP of the combined
  representation gradient.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtt_jax.tasks import TaskSpec
# The pytree sums and Gram matrices live with the weighting methods; re-exported for the step.
from mtt_jax.weighting.pytree_ops import (combine, combine_grouped, cross_gram_matrix, gram_matrix,
                                          group_gram_matrices, mean_leading, sum_leading)

PyTree = Any
ENCODER_KEYS = ("embed", "positions", "task_features", "trunk")


def split_params(model_params: dict) -> tuple[dict, dict]:
    shared = {k: v for k, v in model_params.items() if k in ENCODER_KEYS}
    task_side = {k: v for k, v in model_params.items() if k not in ENCODER_KEYS}
    return shared, task_side


@dataclasses.dataclass
class TaskGradients:
    """What the step needs from one forward/backward: losses, per-task gradients and how to apply them.

    ``grads_T`` are the per-task gradients the method sees (shared parameters, or the representation with
    ``rep_grad``); ``apply(coeffs_T)`` maps coefficients to the encoder gradient ``sum_t c_t g_t``, and
    `apply_grouped` per-group coefficients to ``sum_t c_b,t g_t,b`` group by group (per-block
    aggregation, `mtt_jax.weighting.per_block`);
    ``to_params(direction)`` maps a direction shaped like one task's gradient to the encoder gradient
    (the identity, or the encoder's VJP with ``rep_grad``); ``task_side_grads`` is the decoder gradient
    of ``sum_t L_t``.
    """
    losses_T: jax.Array
    grads_T: PyTree
    apply: Callable[[jax.Array], PyTree]
    task_side_grads: PyTree
    aux: dict
    to_params: Callable[[PyTree], PyTree] = lambda direction: direction
    of_params: bool = True            # grads_T are the encoder's (False: the representation's)

    def apply_grouped(self, coeffs_BxT: jax.Array, leaf_group: Sequence[int]) -> PyTree:
        """The encoder gradient with each leaf's own group's coefficients (``leaf_group[i]``: the group
        of the i-th leaf). Representation gradients have no parameter groups (config_check refuses)."""
        if not self.of_params:
            raise ValueError("per-block aggregation needs the per-task gradients of the parameters, not "
                             "of the representation (rep_grad)")
        return combine_grouped(coeffs_BxT, self.grads_T, leaf_group)


def per_task_gradients(model: nn.Module, model_params: dict, batch: dict, tasks: Sequence[TaskSpec],
                       layout: str, rng: jax.Array, loss_fn: Callable,
                       rep_grad: bool = False) -> TaskGradients:
    """``loss_fn(outputs, batch) -> losses_T``; see the module docstring."""
    shared, task_side = split_params(model_params)
    num_tasks = len(tasks)

    if layout == "multi":
        def encode(copies):
            def one(params_t, tokens_BxL, t):
                return model.apply({"params": params_t}, tokens_BxL, t, train=True,
                                   rngs={"dropout": jax.random.fold_in(rng, t)}, method=model.encode_task)
            return jax.vmap(one)(copies, batch["inputs"], jnp.arange(num_tasks))
        encoder_params = jax.tree.map(lambda x: jnp.broadcast_to(x, (num_tasks,) + x.shape), shared)
        streams_of = lambda z: (z, batch["inputs"] != 0)
    else:
        def encode(params):
            return model.apply({"params": params}, batch["inputs"], train=True,
                               rngs={"dropout": rng}, method=model.encode)
        encoder_params = shared
        streams_of = lambda z: z

    z, encoder_vjp = jax.vjp(encode, encoder_params)

    def decode_losses(z, task_params):
        outputs, aux = model.apply({"params": task_params}, streams_of(z), train=True,
                                   rngs={"dropout": jax.random.fold_in(rng, num_tasks)},
                                   method=model.decode)
        return loss_fn(outputs, batch), aux

    losses_T, decode_vjp, aux = jax.vjp(decode_losses, z, task_side, has_aux=True)
    if layout == "multi" and getattr(model, "decode_mixes_tasks", False):
        if rep_grad:
            raise ValueError("rep_grad=True needs each task's loss to read its own stream only")
        task_side_grads = decode_vjp(jnp.ones_like(losses_T))[1]
        dz_T = jax.vmap(lambda e: decode_vjp(e)[0])(jnp.eye(num_tasks, dtype=losses_T.dtype))
        grads_T = jax.vmap(lambda d: _sum_copies(encoder_vjp(d)[0]))(dz_T)
        return TaskGradients(losses_T, grads_T, lambda c: combine(c, grads_T), task_side_grads, aux)
    if layout == "multi":
        # L_t depends on z only through z[t]: one backward of sum_t L_t gives every d L_t / d z_t.
        dz, task_side_grads = decode_vjp(jnp.ones_like(losses_T))
        if rep_grad:  # (the representation gradients of different tasks are disjoint blocks here)
            apply = lambda c: _sum_copies(encoder_vjp(c.astype(dz.dtype)[:, None, None, None] * dz)[0])
            return TaskGradients(losses_T, dz, apply, task_side_grads, aux, of_params=False)
        grads_T = encoder_vjp(dz)[0]
        return TaskGradients(losses_T, grads_T, lambda c: combine(c, grads_T), task_side_grads, aux)

    task_side_grads = decode_vjp(jnp.ones_like(losses_T))[1]
    dz_T = jax.vmap(lambda e: decode_vjp(e)[0])(jnp.eye(num_tasks, dtype=losses_T.dtype))
    if rep_grad:
        apply = lambda c: encoder_vjp(jnp.tensordot(c.astype(dz_T.dtype), dz_T, axes=1))[0]
        return TaskGradients(losses_T, dz_T, apply, task_side_grads, aux,
                             to_params=lambda direction: encoder_vjp(direction)[0], of_params=False)
    grads_T = jax.vmap(lambda d: encoder_vjp(d)[0])(dz_T)
    return TaskGradients(losses_T, grads_T, lambda c: combine(c, grads_T), task_side_grads, aux)


def _sum_copies(grads_T: PyTree) -> PyTree:
    return jax.tree.map(sum_leading, grads_T)


def conflict_diagnostics(gram_TxT: jax.Array) -> dict[str, jax.Array]:
    """Gradient norms, the T x T cosine matrix and its summary over task pairs i < j."""
    norms_T = jnp.sqrt(jnp.maximum(jnp.diag(gram_TxT), 0.0))
    cosine = gram_TxT / jnp.maximum(norms_T[:, None] * norms_T[None, :], 1e-30)
    num_tasks = gram_TxT.shape[0]
    if num_tasks < 2:
        zero = jnp.zeros(())
        return {"task_grad_norms": norms_T, "grad_cosine": cosine, "cosine_mean": zero,
                "cosine_min": zero, "conflict_fraction": zero}
    rows, cols = jnp.triu_indices(num_tasks, k=1)
    pairs = cosine[rows, cols]
    return {"task_grad_norms": norms_T, "grad_cosine": cosine, "cosine_mean": pairs.mean(),
            "cosine_min": pairs.min(), "conflict_fraction": (pairs < 0).mean()}
