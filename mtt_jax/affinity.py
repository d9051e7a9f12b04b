"""Task affinity and task grouping (Fifty et al., "Efficiently Identifying Task Groupings for Multi-Task
Learning", NeurIPS 2021; TAG) — "which tasks should be trained together".

Lookahead inter-task affinity (TAG eq. 3): the effect of a step on task i's gradient on task j's loss,

    Z_{i->j} = 1 - L_j(theta_s - lr * g_i) / L_j(theta_s),

with ``g_i`` task i's gradient on the shared parameters, on the same batch. Positive: a step for i also
lowers j's loss. The run averages Z over the steps it is measured at (``affinity.every``).

`lookahead_weight_gradient` is the same lookahead, differentiated with respect to the task weights:
Auto-Lambda's bilevel update (`mtt_jax.weighting.bilevel`).

Grouping (TAG §3.2): split the tasks into ``num_groups`` groups maximising the total affinity each task
receives from the others in its group, ``sum_g sum_{j in g} mean_{i in g, i != j} Z_{i->j}`` (a task alone
in its group receives 0). The search is exhaustive over set partitions, fine up to about 10 tasks.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mtt_jax import task_grads
from mtt_jax.tasks import TaskSpec


def lookahead_affinity(model: nn.Module, model_params: dict, batch: dict, tasks: Sequence[TaskSpec],
                       layout: str, rng: jax.Array, loss_fn: Callable, lr: jax.Array) -> jax.Array:
    """``Z[i, j]`` of TAG eq. 3 for one batch (pure; jit it)."""
    result = task_grads.per_task_gradients(model, model_params, batch, tasks, layout, rng, loss_fn)
    shared, task_side = task_grads.split_params(model_params)

    def losses_after_step_on(g_i):
        stepped = jax.tree.map(lambda p, g: p - lr * g.astype(p.dtype), shared, g_i)
        outputs, _ = model.apply({"params": {**stepped, **task_side}}, batch["inputs"], train=False)
        return loss_fn(outputs, batch)

    outputs, _ = model.apply({"params": model_params}, batch["inputs"], train=False)
    before_T = loss_fn(outputs, batch)
    after_TxT = jax.lax.map(losses_after_step_on, result.grads_T)  # row i: all losses after i's step
    return 1.0 - after_TxT / jnp.maximum(before_T[None, :], 1e-12)


def set_partitions(items: Sequence[int], num_groups: int) -> Iterator[list[list[int]]]:
    """Every partition of ``items`` into exactly ``num_groups`` non-empty groups."""
    if num_groups == 1:
        yield [list(items)]
        return
    if len(items) == num_groups:
        yield [[i] for i in items]
        return
    if len(items) < num_groups:
        return
    first, rest = items[0], items[1:]
    for partition in set_partitions(rest, num_groups - 1):   # first alone
        yield [[first]] + partition
    for partition in set_partitions(rest, num_groups):       # first joins a group
        for g in range(len(partition)):
            yield partition[:g] + [[first] + partition[g]] + partition[g + 1:]


def grouping_score(affinity_TxT: np.ndarray, groups: Sequence[Sequence[int]]) -> float:
    """Total affinity received within groups (TAG §3.2)."""
    total = 0.0
    for group in groups:
        for j in group:
            others = [i for i in group if i != j]
            if others:
                total += float(np.mean([affinity_TxT[i, j] for i in others]))
    return total


def best_grouping(affinity_TxT: np.ndarray, num_groups: int) -> tuple[list[list[int]], float]:
    """The partition into ``num_groups`` groups with the highest `grouping_score`."""
    affinity_TxT = np.asarray(affinity_TxT, np.float64)
    num_tasks = affinity_TxT.shape[0]
    if not 1 <= num_groups <= num_tasks:
        raise ValueError(f"num_groups={num_groups} must be in [1, {num_tasks}]")
    best = max(set_partitions(list(range(num_tasks)), num_groups),
               key=lambda groups: grouping_score(affinity_TxT, groups))
    return sorted(sorted(g) for g in best), grouping_score(affinity_TxT, best)


def lookahead_weight_gradient(losses_fn: Callable, params, train_batch, val_batch, weights_T: jax.Array,
                              lr: float, val_weights_T: jax.Array | None = None) -> jax.Array:
    """``d/d lambda`` of the validation loss one virtual step ahead (Auto-Lambda, Liu, James, Davison &
    Johns, TMLR 2022, §3), the bilevel gradient of the task weights; pure, jit it:

        theta'(lambda) = theta - lr * grad_theta sum_j lambda_j L_j(theta; train)
        d/d lambda_i  sum_t v_t L_t(theta'; val) = -lr * g_i(theta; train) . grad sum_t v_t L_t(theta'; val)

    exactly (``theta'`` is affine in lambda): one backward for the virtual step, one at ``theta'`` for
    the validation gradient, and the T inner products ``g_i . d`` as one forward-mode product of the
    train losses along ``d`` (``jax.jvp``), without materialising the T task gradients. The authors'
    code approximates the same inner products by central finite differences of the train losses at
    ``theta +- eps d`` (``eps = 0.01 / |d|``). ``losses_fn(params, batch) -> losses_T``; ``v`` (the
    primary tasks' indicator in auxiliary learning) defaults to all ones.
    """
    weights_T = jax.lax.stop_gradient(jnp.asarray(weights_T, jnp.float32))
    val_weights_T = jnp.ones_like(weights_T) if val_weights_T is None else val_weights_T
    train_losses = lambda p: losses_fn(p, train_batch).astype(jnp.float32)
    weighted_grad = jax.grad(lambda p: jnp.dot(weights_T, train_losses(p)))(params)
    stepped = jax.tree.map(lambda p, g: p - lr * g.astype(p.dtype), params, weighted_grad)
    val_loss = lambda p: jnp.dot(val_weights_T, losses_fn(p, val_batch).astype(jnp.float32))
    val_grad = jax.grad(val_loss)(stepped)
    _, inner_products_T = jax.jvp(train_losses, (params,), (val_grad,))
    return -lr * inner_products_T
