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
    rng: jax.Array
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
                      weighting_state=method.init_state(), rng=state_rng,
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


def train_step(state: TrainState, batch: dict, *, model: nn.Module, tasks: Sequence[TaskSpec],
               layout: str, method: WeightingMethod,
               tx: optax.GradientTransformation) -> tuple[TrainState, dict]:
    """One update. A non-finite loss or gradient leaves params, optimizer and weighting untouched."""
    dropout_rng = jax.random.fold_in(state.rng, state.step)

    def objective(params):
        outputs, aux = model.apply({"params": params["model"]}, batch["inputs"], train=True,
                                   rngs={"dropout": dropout_rng})
        losses_T = task_losses(tasks, outputs, batch, layout)
        total, weights_T, weighting_state = method.combine(
            params["weighting"], state.weighting_state, losses_T, state.step)
        return total, (losses_T, weights_T, weighting_state, aux)

    (total, (losses_T, weights_T, weighting_state, aux)), grads = jax.value_and_grad(
        objective, has_aux=True)(state.params)
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
