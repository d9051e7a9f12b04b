"""The pure pieces of training: state, optimizer, task losses, and the train and eval steps.

``train_step(state, batch) -> (state, metrics)`` is one pure function; `mtt_jax.train` compiles it with
``jax.jit(..., in_shardings, out_shardings, donate_argnums=0)`` under the mesh. Nothing in it calls back
to the host. The dropout RNG of step s is ``fold_in(state.rng, s)``, so a resumed run draws the same
randomness as an uninterrupted one.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mtt_jax import tasks as tasks_lib
from mtt_jax.tasks import TaskSpec
from mtt_jax.weighting import WeightingMethod

PyTree = Any


@flax.struct.dataclass
class TrainState:
    """Everything a run needs to continue: one pytree, checkpointed whole."""
    step: jax.Array
    params: PyTree            # {"model": ..., "weighting": ...}
    opt_state: PyTree
    weighting_state: PyTree
    rng: jax.Array            # raw key data (uint32), so that checkpoints hold plain arrays
    skipped_steps: jax.Array  # updates not applied because the loss or gradient was not finite


def make_optimizer(opt_config, total_steps: int) -> optax.GradientTransformation:
    """AdamW (Loshchilov & Hutter 2019) with linear warmup and cosine decay, global-norm clipping.

    Weight decay applies to matrices and embedding tables only (ndim >= 2), not to biases, LayerNorm
    scales or the weighting method's parameters.
    """
    schedule = learning_rate_schedule(opt_config, total_steps)
    decay_mask = lambda params: jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)
    return optax.chain(
        optax.clip_by_global_norm(opt_config.grad_clip_norm),
        optax.adamw(schedule, b1=opt_config.b1, b2=opt_config.b2,
                    weight_decay=opt_config.weight_decay, mask=decay_mask))


def learning_rate_schedule(opt_config, total_steps: int) -> optax.Schedule:
    warmup = min(opt_config.warmup_steps, max(total_steps - 1, 0))
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=opt_config.learning_rate, warmup_steps=warmup,
        decay_steps=max(total_steps, warmup + 1),
        end_value=opt_config.learning_rate * opt_config.end_learning_rate_factor)


def init_state(rng: jax.Array, model: nn.Module, method: WeightingMethod,
               tx: optax.GradientTransformation, sample_inputs: jax.Array) -> TrainState:
    """The initial state; parameters may be logically partitioned boxes (see `mtt_jax.sharding`)."""
    params_rng, dropout_rng, state_rng = jax.random.split(rng, 3)
    variables = model.init({"params": params_rng, "dropout": dropout_rng}, sample_inputs, train=False)
    params = {"model": variables["params"], "weighting": method.init_params()}
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      weighting_state=method.init_state(), rng=jax.random.key_data(state_rng),
                      skipped_steps=jnp.zeros((), jnp.int32))


def token_mask(spec: TaskSpec, inputs: jax.Array, task_index: int, layout: str) -> jax.Array | None:
    """Real-token mask of a tagging task's examples (token id 0 is padding)."""
    if spec.kind != "tagging":
        return None
    task_inputs = inputs[task_index] if layout == "multi" else inputs
    return (task_inputs != 0).astype(jnp.float32)


def task_losses(tasks: Sequence[TaskSpec], outputs: dict, batch: dict, layout: str) -> jax.Array:
    """The masked mean loss of each task, ``[T]`` in f32."""
    losses = []
    for i, spec in enumerate(tasks):
        loss_sum, count = tasks_lib.example_losses(spec, outputs[spec.name], batch["labels"][spec.name],
                                                   token_mask(spec, batch["inputs"], i, layout))
        losses.append(tasks_lib.masked_mean(loss_sum, count, batch["mask"][spec.name]))
    return jnp.stack(losses)


def microbatches(batch: dict, layout: str, num_micro: int) -> dict:
    """Splits the examples into ``num_micro`` strided microbatches on a new leading axis.

    Microbatch j holds examples j, j + k, j + 2k, ...: with the example axis sharded over devices, every
    device keeps a share of every microbatch (contiguous blocks would put each one on a few devices).
    """
    def split(path, leaf):
        axis = 1 if layout == "multi" and path[0].key == "inputs" else 0
        size = leaf.shape[axis]
        shape = leaf.shape[:axis] + (size // num_micro, num_micro) + leaf.shape[axis + 1:]
        return jnp.moveaxis(leaf.reshape(shape), axis + 1, 0)
    return jax.tree_util.tree_map_with_path(split, batch)


def train_step(state: TrainState, batch: dict, *, model: nn.Module, tasks: Sequence[TaskSpec],
               layout: str, method: WeightingMethod, tx: optax.GradientTransformation,
               grad_accum_steps: int = 1) -> tuple[TrainState, dict]:
    """One update. A non-finite loss or gradient leaves params, optimizer and weighting untouched.

    With ``grad_accum_steps = k`` the batch is processed as k microbatches whose gradients and losses
    are averaged (equal to one big step when every example is kept), in a ``lax.scan`` so that memory
    holds one microbatch's activations.
    """
    dropout_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def objective(params, micro_batch, rng):
        outputs, aux = model.apply({"params": params["model"]}, micro_batch["inputs"], train=True,
                                   rngs={"dropout": rng})
        losses_T = task_losses(tasks, outputs, micro_batch, layout)
        total, weights_T, weighting_state = method.combine(
            params["weighting"], state.weighting_state, losses_T, state.step)
        return total, (losses_T, weights_T, weighting_state, aux)

    grad_fn = jax.value_and_grad(objective, has_aux=True)
    if grad_accum_steps == 1:
        (total, (losses_T, weights_T, weighting_state, aux)), grads = grad_fn(
            state.params, batch, dropout_rng)
    else:
        def accumulate(carry, micro):
            index, micro_batch = micro
            (total, extras), grads = grad_fn(state.params, micro_batch,
                                             jax.random.fold_in(dropout_rng, index))
            summed = jax.tree.map(jnp.add, carry, (total, extras[0], grads))
            return summed, extras[1:]
        zeros = jax.tree.map(jnp.zeros_like, (jnp.zeros(()), jnp.zeros(len(tasks)), state.params))
        indices = jnp.arange(grad_accum_steps)
        (total, losses_T, grads), (weights_T, weighting_state, aux) = jax.lax.scan(
            accumulate, zeros, (indices, microbatches(batch, layout, grad_accum_steps)))
        total, losses_T, grads = jax.tree.map(lambda x: x / grad_accum_steps, (total, losses_T, grads))
        # Weights and method state of the last microbatch; the task-attention map averaged.
        weights_T, weighting_state = jax.tree.map(lambda x: x[-1], (weights_T, weighting_state))
        aux = jax.tree.map(lambda x: x.mean(0), aux)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
    keep_if_finite = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = state.replace(
        step=state.step + 1,
        params=keep_if_finite(optax.apply_updates(state.params, updates), state.params),
        opt_state=keep_if_finite(opt_state, state.opt_state),
        weighting_state=keep_if_finite(weighting_state, state.weighting_state),
        skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32))
    metrics = {"loss": total, "task_losses": losses_T, "weights": weights_T, "grad_norm": grad_norm,
               "finite": finite, **aux}
    return new_state, metrics


def eval_step(state: TrainState, batch: dict, *, model: nn.Module, tasks: Sequence[TaskSpec],
              layout: str) -> dict:
    """Predictions for host-side metrics, per-task loss sums and counts, and the task-attention map."""
    outputs, aux = model.apply({"params": state.params["model"]}, batch["inputs"], train=False)
    loss_sums, counts = [], []
    for i, spec in enumerate(tasks):
        loss_sum, count = tasks_lib.example_losses(spec, outputs[spec.name], batch["labels"][spec.name],
                                                   token_mask(spec, batch["inputs"], i, layout))
        mask = batch["mask"][spec.name]
        loss_sums.append((loss_sum * mask).sum())
        counts.append((count * mask).sum())
    return {"predictions": {t.name: tasks_lib.predictions(t, outputs[t.name]) for t in tasks},
            "loss_sum": jnp.stack(loss_sums), "count": jnp.stack(counts), **aux}


def bind(step_fn: Callable, **static) -> Callable:
    """The step with its static collaborators (model, tasks, method, ...) fixed, ready for jax.jit."""
    return functools.partial(step_fn, **static)
