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

from mtt_jax import sharding, task_grads, tasks as tasks_lib
from mtt_jax.tasks import TaskSpec
from mtt_jax.weighting import WeightingMethod
from mtt_jax.weighting.base import scale_task_rows

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
    shared, _ = task_grads.split_params(variables["params"])
    shared_shapes = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), nn.unbox(shared))
    weighting_state = name_like_shared_params(method.init_state_for(shared_shapes), shared)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      weighting_state=weighting_state,
                      rng=jax.random.key_data(state_rng),
                      skipped_steps=jnp.zeros((), jnp.int32))


def name_like_shared_params(state: PyTree, boxed_shared: PyTree) -> PyTree:
    """Gives method-state leaves that mirror a shared parameter (``[T, *param.shape]``, e.g. DB-MTL's
    gradient EMA) that parameter's logical axis names behind a task axis, so they shard like it."""
    names = {}
    for path, leaf in jax.tree_util.tree_leaves_with_path(
            boxed_shared, is_leaf=lambda x: isinstance(x, nn.Partitioned)):
        if isinstance(leaf, nn.Partitioned):
            names[tuple(str(k) for k in path)] = leaf

    def name(path, leaf):
        keys = tuple(str(k) for k in path)
        for start in range(len(keys)):
            box = names.get(keys[start:])
            if box is not None and tuple(leaf.shape[1:]) == tuple(box.value.shape):
                return box.replace(value=leaf, names=(None,) + tuple(box.names))
        return leaf
    return jax.tree_util.tree_map_with_path(name, state)


def token_mask(spec: TaskSpec, inputs: jax.Array, task_index: int, layout: str) -> jax.Array | None:
    """Real-token mask of a tagging task's examples (token id 0 is padding)."""
    if spec.kind != "tagging":
        return None
    task_inputs = inputs[task_index] if layout == "multi" else inputs
    return (task_inputs != 0).astype(jnp.float32)


def task_losses(tasks: Sequence[TaskSpec], outputs: dict, batch: dict, layout: str) -> jax.Array:
    """The masked mean loss of each task, ``[T]`` in f32.

    In a flat mixture batch each task's mean is scaled by its share of the batch's rows, so that the
    losses sum to the batch's mean example loss: with equal weights that is the mixture objective of
    T5/seqio (tasks weigh by their mixing rates), and weighting methods reweigh the shares.
    """
    losses = []
    for i, spec in enumerate(tasks):
        loss_sum, count = tasks_lib.example_losses(spec, outputs[spec.name], batch["labels"][spec.name],
                                                   token_mask(spec, batch["inputs"], i, layout))
        losses.append(tasks_lib.masked_mean(loss_sum, count, batch["mask"][spec.name]))
    losses_T = jnp.stack(losses)
    if layout == "flat":
        rows_T = jnp.stack([batch["mask"][spec.name].sum() for spec in tasks]).astype(jnp.float32)
        losses_T = losses_T * rows_T / jnp.maximum(rows_T.sum(), 1.0)
    return losses_T


def apply_model(model: nn.Module, params: PyTree, batch: dict, train: bool, rngs: dict | None = None):
    """``model.apply`` on a batch's inputs (and its rows' tasks, in a flat mixture batch)."""
    flat = {"task_id": batch["task_id"]} if "task_id" in batch else {}
    return model.apply({"params": params}, batch["inputs"], train=train, rngs=rngs, **flat)


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
               grad_accum_steps: int = 1, rep_grad: bool = False,
               diagnostics_every: int = 0, grad_accum_unroll: int = 1) -> tuple[TrainState, dict]:
    """One update. A non-finite loss or gradient leaves params, optimizer and weighting untouched.

    Loss-based methods differentiate their combined loss. Gram and per-task-gradient methods get the
    per-task gradients of the shared encoder (`mtt_jax.task_grads`) and set its update; the task side
    (task attention, heads) gets the gradient of ``sum_t L_t``. MoDo and SDMGrad get them for three
    strided samples of the batch (`_sampled_task_gradients`). Gradient-conflict diagnostics come for
    free with those methods and, for loss-based ones, are computed every ``diagnostics_every`` steps.

    With ``grad_accum_steps = k`` the batch is processed as k microbatches whose gradients and losses
    are averaged (equal to one big step when every example is kept), in a ``lax.scan`` so that memory
    holds one microbatch's activations; ``grad_accum_unroll`` microbatches per scan iteration let XLA
    overlap their work (faster on CPU, at the memory of that many microbatches).
    """
    step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    dropout_rng, method_rng = jax.random.split(step_rng)
    loss_fn = lambda outputs, b: task_losses(tasks, outputs, b, layout)
    if method.requires == "losses":
        grads, total, losses_T, weights_T, weighting_state, aux = _loss_method_grads(
            state, batch, model, loss_fn, method, dropout_rng, method_rng, layout, grad_accum_steps,
            grad_accum_unroll)
        gram_TxT = None
        if diagnostics_every:
            gram_TxT = jax.lax.cond(
                (state.step + 1) % diagnostics_every == 0,
                lambda: task_grads.gram_matrix(task_grads.per_task_gradients(
                    model, state.params["model"], batch, tasks, layout, dropout_rng, loss_fn,
                    rep_grad).grads_T),
                lambda: jnp.zeros((len(tasks), len(tasks)), jnp.float32))
    else:
        grads, total, losses_T, weights_T, weighting_state, aux, gram_TxT = _gradient_method_grads(
            state, batch, model, tasks, loss_fn, method, dropout_rng, method_rng, layout,
            grad_accum_steps, rep_grad, grad_accum_unroll)

    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    if method.needs_losses_after_step:  # FAMO: the same batch's losses after the update
        if grad_accum_steps == 1:
            outputs, _ = apply_model(model, params["model"], batch, True, {"dropout": dropout_rng})
            after_T = loss_fn(outputs, batch)
        else:  # microbatch by microbatch, with the dropout of the losses before
            after_T = batch_mean_losses(model, params, batch, loss_fn, layout, grad_accum_steps,
                                        grad_accum_unroll, dropout_rng)
        weighting_state = method.after_step(weighting_state, losses_T, after_T)
    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
    keep_if_finite = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = state.replace(
        step=state.step + 1,
        params=keep_if_finite(params, state.params),
        opt_state=keep_if_finite(opt_state, state.opt_state),
        weighting_state=keep_if_finite(weighting_state, state.weighting_state),
        skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32))
    metrics = {"loss": total, "task_losses": losses_T, "weights": weights_T, "grad_norm": grad_norm,
               "finite": finite, **aux}
    if gram_TxT is not None:
        metrics.update(task_grads.conflict_diagnostics(gram_TxT))
    return new_state, metrics


def scan_microbatches(accumulate: Callable, zeros: PyTree, batch: dict, layout: str, num_micro: int,
                      unroll: int, rng: jax.Array) -> tuple[PyTree, PyTree]:
    """``lax.scan`` of ``accumulate(sums, (rng, microbatch)) -> (sums, outputs)`` over the microbatches.

    Under GSPMD the accumulator is replicated like the parameters, so a data-parallel mesh would
    all-reduce the gradients in every iteration: ``num_micro`` all-reduces per step. Instead each
    ``data`` shard scans its own rows of every microbatch inside `jax.shard_map` and the sums (averages
    over examples, as gradients and losses are) are averaged over the shards once, after the scan.
    Losses that weights are computed from go through `global_losses` first, so a method sees the
    microbatch's losses, not a shard's. This is the global result whenever the shards' means average to
    the microbatch's mean (every example kept, the same condition as for microbatching itself).
    Floating outputs are averaged over the shards too; others agree across them. Dropout keys are
    folded with the shard index.
    """
    def scan(batch, rng):
        keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(jnp.arange(num_micro))
        return jax.lax.scan(accumulate, zeros, (keys, microbatches(batch, layout, num_micro)),
                            unroll=unroll)
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or mesh.shape.get(sharding.DATA_AXIS, 1) == 1:
        return scan(batch, rng)

    def shard(batch):
        with nn.logical_axis_rules(sharding.rules_without(nn.get_logical_axis_rules(), sharding.DATA_AXIS)):
            sums, outputs = scan(batch, jax.random.fold_in(rng, jax.lax.axis_index(sharding.DATA_AXIS)))
        average = lambda x: (jax.lax.pmean(x, sharding.DATA_AXIS)
                             if jnp.issubdtype(x.dtype, jnp.floating) else x)
        return jax.tree.map(average, (sums, outputs))
    in_specs = sharding.batch_partition_specs(batch, layout, (sharding.DATA_AXIS,))
    return jax.shard_map(shard, in_specs=(in_specs,), out_specs=jax.sharding.PartitionSpec(),
                         axis_names={sharding.DATA_AXIS}, check_vma=False)(batch)


def global_losses(losses_T: jax.Array) -> jax.Array:
    """A shard's per-task mean losses -> the microbatch's, inside `scan_microbatches`' shard_map
    (identity elsewhere). Differentiable: each shard's gradient is then its part of the global one."""
    if sharding.data_is_manual():
        return jax.lax.pmean(losses_T, sharding.DATA_AXIS)
    return losses_T


def _loss_method_grads(state, batch, model, loss_fn, method, dropout_rng, method_rng, layout,
                       grad_accum_steps, grad_accum_unroll=1):
    """Gradient of the method's combined loss, over microbatches when asked.

    With microbatches the update is the one of the whole batch: the model's gradient is
    ``sum_t (d total / d L_t)(Lbar) grad Lbar_t`` at the batch's mean losses ``Lbar``, accumulated as
    the gradient of ``sum_t w_t L_t`` with those weights fixed. Where the combination is linear in the
    losses (``combine_is_linear``: EW, UW, RLW, DWA) the weights do not depend on ``Lbar``; any other
    method (GLS, STCH, FAMO) weighs a task by its loss, so a forward pass over the microbatches first
    gives ``Lbar``. The method's own parameters get their gradient, and the logged weights, total and
    new state come, from ``combine`` at ``Lbar`` (DWA's and STCH's epoch means count every example, not
    the last microbatch's). ``combine`` runs outside the per-shard scan.
    """
    weighting_params = state.params["weighting"]
    combine = lambda params, losses_T: method.combine(params, state.weighting_state, losses_T, state.step,
                                                      method_rng)
    if grad_accum_steps == 1:
        def objective(params):
            outputs, aux = apply_model(model, params["model"], batch, True, {"dropout": dropout_rng})
            losses_T = loss_fn(outputs, batch)
            total, weights_T, weighting_state = combine(params["weighting"], losses_T)
            return total, (losses_T, weights_T, weighting_state, aux)
        (total, (losses_T, weights_T, weighting_state, aux)), grads = jax.value_and_grad(
            objective, has_aux=True)(state.params)
        return grads, total, losses_T, weights_T, weighting_state, aux

    num_tasks = len(jax.tree.leaves(batch["mask"]))
    mean_T = None if method.combine_is_linear else batch_mean_losses(
        model, state.params, batch, loss_fn, layout, grad_accum_steps, grad_accum_unroll, dropout_rng)
    weights_T = jax.grad(lambda l: combine(weighting_params, l)[0])(
        jnp.ones(num_tasks) if mean_T is None else mean_T)

    def linearised(model_params, micro_batch, rng):
        outputs, aux = apply_model(model, model_params, micro_batch, True, {"dropout": rng})
        losses_T = global_losses(loss_fn(outputs, micro_batch))
        return jnp.sum(weights_T * losses_T.astype(jnp.float32)), (losses_T, aux)

    def accumulate(carry, micro):
        rng, micro_batch = micro
        (_, (losses_T, aux)), grads = jax.value_and_grad(linearised, has_aux=True)(
            state.params["model"], micro_batch, rng)
        return jax.tree.map(jnp.add, carry, (losses_T, grads)), aux
    zeros = jax.tree.map(jnp.zeros_like, (jnp.zeros(num_tasks), state.params["model"]))
    (losses_T, model_grads), aux = scan_microbatches(
        accumulate, zeros, batch, layout, grad_accum_steps, grad_accum_unroll, dropout_rng)
    losses_T, model_grads = jax.tree.map(lambda x: x / grad_accum_steps, (losses_T, model_grads))
    if mean_T is not None:  # the losses the weights were taken at
        losses_T = mean_T
    grads = {"model": model_grads,
             "weighting": jax.grad(lambda p: combine(p, losses_T)[0])(weighting_params)}
    total, weights_T, weighting_state = combine(weighting_params, losses_T)
    aux = jax.tree.map(lambda x: x.mean(0), aux)  # the task-attention map, averaged
    return grads, total, losses_T, weights_T, weighting_state, aux


def batch_mean_losses(model, params, batch, loss_fn, layout, num_micro, unroll, rng) -> jax.Array:
    """The batch's per-task mean losses, computed microbatch by microbatch (forward only, with the
    dropout keys of `scan_microbatches`, so that they are the losses the gradient pass sees)."""
    def accumulate(sums_T, micro):
        key, micro_batch = micro
        outputs, _ = apply_model(model, params["model"], micro_batch, True, {"dropout": key})
        return sums_T + global_losses(loss_fn(outputs, micro_batch)), None
    num_tasks = len(jax.tree.leaves(batch["mask"]))
    sums_T, _ = scan_microbatches(accumulate, jnp.zeros(num_tasks), batch, layout, num_micro, unroll, rng)
    return sums_T / num_micro


def _gradient_method_grads(state, batch, model, tasks, loss_fn, method, dropout_rng, method_rng, layout,
                           grad_accum_steps, rep_grad, grad_accum_unroll=1):
    """Per-task gradients of the shared encoder combined by a Gram or per-task-gradient method."""
    def gradients(micro_batch, rng):
        return task_grads.per_task_gradients(model, state.params["model"], micro_batch, tasks, layout,
                                             rng, loss_fn, rep_grad)

    if grad_accum_steps == 1 and method.gradient_samples == 1:
        result = gradients(batch, dropout_rng)
        losses_T, grads_T, task_side, aux = (result.losses_T, result.grads_T, result.task_side_grads,
                                             result.aux)
        apply, to_params = result.apply, result.to_params
    else:  # rep_grad with microbatches or gradient samples is refused by config_check
        losses_T, grads_ST, task_side, aux = _sampled_task_gradients(
            gradients, state.params["model"], batch, len(tasks), method.gradient_samples, grad_accum_steps,
            layout, grad_accum_unroll, dropout_rng)
        grads_T = jax.tree.map(lambda g: g[0], grads_ST)  # the only sample, or the one d is built from
        apply = functools.partial(task_grads.combine, grads_T=grads_T)  # the unscaled ones (IMTL-L)
        to_params = lambda direction: direction

    # A method's elementwise loss transform (IMTL-L) scales each task's gradient by its derivative.
    weighting_params = state.params["weighting"]
    transform = lambda p, l: method.transform_losses(p, l).sum()
    scale_T = jax.grad(transform, argnums=1)(weighting_params, losses_T)
    weighting_grads = jax.grad(transform, argnums=0)(weighting_params, losses_T)
    transformed_T = method.transform_losses(weighting_params, losses_T)
    # The Gram matrices of the scaled gradients, s_i s_j <g_i, g_j>: scaled as T x T matrices rather
    # than through another pass over the [T, P] gradients, which only per-task-gradient methods need.
    scale_TxT = jnp.outer(scale_T, scale_T).astype(jnp.float32)
    if method.requires == "sampled_gram":
        # One pass over the S samples' gradients: the (S T) x (S T) Gram of all of them, from which the
        # weights take the cross-Gram of samples 1 and 2, and the diagnostics the Gram of the mean.
        num_samples = method.gradient_samples
        all_gram = task_grads.gram_matrix(jax.tree.map(lambda g: g.reshape((-1,) + g.shape[2:]), grads_ST))
        all_gram = all_gram.reshape(num_samples, len(tasks), num_samples, len(tasks))
        gram_TxT = all_gram.sum((0, 2)) / num_samples ** 2 * scale_TxT
        cross_TxT = all_gram[1, :, 2, :] * scale_TxT
    else:
        gram_TxT = task_grads.gram_matrix(grads_T) * scale_TxT
        if method.requires != "gram":
            grads_T = scale_task_rows(grads_T, scale_T)
    if method.requires in ("gram", "sampled_gram"):
        coeffs_T, weighting_state = method.gram_weights(
            state.weighting_state, cross_TxT if method.requires == "sampled_gram" else gram_TxT,
            transformed_T, state.step, method_rng)
        shared_grads, weights_T = apply(coeffs_T * scale_T), coeffs_T
    else:
        direction, weights_T, weighting_state = method.aggregate(state.weighting_state, grads_T,
                                                                 transformed_T, state.step, method_rng)
        shared_grads = to_params(direction)
    grads = {"model": {**shared_grads, **task_side}, "weighting": weighting_grads}
    total = jnp.sum(jax.lax.stop_gradient(weights_T) * transformed_T)
    return grads, total, losses_T, weights_T, weighting_state, aux, gram_TxT


def batch_rows_divisor(method: WeightingMethod, grad_accum_steps: int) -> int:
    """What a step's rows (per data shard) must divide into: ``grad_accum_steps`` microbatches, each
    split into the method's gradient samples (3 for MoDo and SDMGrad)."""
    return grad_accum_steps * method.gradient_samples


def _sampled_task_gradients(gradients: Callable, model_params, batch, num_tasks, num_samples, num_micro,
                            layout, unroll, rng):
    """Per-task gradients of ``num_samples`` samples over ``num_micro`` microbatches: each microbatch is
    split into ``num_samples`` strided parts, run as one ``vmap``-ed pass, and sample s is part s of
    every microbatch (without accumulation: the examples ``s, s + S, s + 2S, ...``). Returns the batch's
    mean losses, gradients ``[S, T, ...]`` (each sample's mean), task-side gradients and aux.
    (An indexed update of one sample's accumulator per microbatch does not lower inside the per-shard
    scan of a data-parallel mesh; a one-hot mask costs S times the adds.)"""
    def sample_gradients(micro_batch, rng):
        if num_samples == 1:
            r = gradients(micro_batch, rng)
            return r.losses_T, jax.tree.map(lambda g: g[None], r.grads_T), r.task_side_grads, r.aux

        def arrays(part, key):
            r = gradients(part, key)
            return r.losses_T, r.grads_T, r.task_side_grads, r.aux
        parts = microbatches(micro_batch, layout, num_samples)
        losses_ST, grads_ST, task_side_S, aux_S = jax.vmap(arrays)(parts, jax.random.split(rng, num_samples))
        mean = lambda tree: jax.tree.map(task_grads.mean_leading, tree)
        return losses_ST.mean(0), grads_ST, mean(task_side_S), mean(aux_S)

    def accumulate(carry, micro):
        rng, micro_batch = micro
        losses_T, grads_ST, task_side, aux = sample_gradients(micro_batch, rng)
        return jax.tree.map(jnp.add, carry, (losses_T, grads_ST, task_side)), aux
    shared, task_side_params = task_grads.split_params(model_params)
    zeros = (jnp.zeros((num_tasks,), jnp.float32),
             jax.tree.map(lambda p: jnp.zeros((num_samples, num_tasks) + p.shape, p.dtype), shared),
             jax.tree.map(jnp.zeros_like, task_side_params))
    sums, aux = scan_microbatches(accumulate, zeros, batch, layout, num_micro, unroll, rng)
    losses_T, grads_ST, task_side = jax.tree.map(lambda x: x / num_micro, sums)
    return losses_T, grads_ST, task_side, jax.tree.map(lambda x: x.mean(0), aux)


def eval_step(state: TrainState, batch: dict, *, model: nn.Module, tasks: Sequence[TaskSpec],
              layout: str) -> dict:
    """Predictions for host-side metrics, per-task loss sums and counts, and the task-attention map."""
    outputs, aux = apply_model(model, state.params["model"], batch, False)
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
