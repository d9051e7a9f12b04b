"""The pure pieces of training: state, optimizer, task losses, and the train and eval steps.

``train_step(state, batch) -> (state, metrics)`` is one pure function; `mtt_jax.train` compiles it with
``jax.jit(..., in_shardings, out_shardings, donate_argnums=0)`` under the mesh. Nothing in it calls back
to the host. The dropout RNG of step s is ``fold_in(state.rng, s)``, so a resumed run draws the same
randomness as an uninterrupted one.

The step asks the weighting method for its update through one function per kind of method, chosen by
``method.requires`` from `GRADIENTS_BY_REQUIREMENT`: each maps a `StepContext` (the static collaborators
and the step's keys), the state and the batch to `Gradients`. A new kind of method is one function and
one entry there.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mtt_jax import affinity, sharding, specs, task_grads, tasks as tasks_lib
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
        axis = specs.example_axis(path[0].key, layout)
        size = leaf.shape[axis]
        shape = leaf.shape[:axis] + (size // num_micro, num_micro) + leaf.shape[axis + 1:]
        return jnp.moveaxis(leaf.reshape(shape), axis + 1, 0)
    return jax.tree_util.tree_map_with_path(split, batch)


@dataclasses.dataclass(frozen=True)
class StepContext:
    """What computing one step's gradients needs besides the state and the batch: the step's static
    collaborators, its microbatching settings and its keys."""
    model: nn.Module
    tasks: Sequence[TaskSpec]
    layout: str                      # "multi" (a sub-batch per task) or "flat" (a mixture batch)
    method: WeightingMethod
    loss_fn: Callable                # (outputs, batch) -> losses_T, `task_losses`
    dropout_rng: jax.Array
    method_rng: jax.Array
    grad_accum_steps: int = 1        # microbatches per step
    grad_accum_unroll: int = 1       # microbatches per scan iteration
    rep_grad: bool = False           # per-task gradients of the representation, not the encoder
    diagnostics_every: int = 0       # conflict diagnostics of loss-based methods (0: never)

    @property
    def num_tasks(self) -> int:
        return len(self.tasks)


@dataclasses.dataclass(frozen=True)
class Gradients:
    """One kind of method's answer for a batch: what the optimizer applies, and what the step logs."""
    grads: PyTree                    # {"model": ..., "weighting": ...}, shaped like the params
    total: jax.Array                 # the weighted objective (logged as "loss")
    losses_T: jax.Array              # the batch's mean loss per task
    weights_T: jax.Array             # the applied task weights (or coefficients)
    weighting_state: PyTree          # the method's state after this step
    aux: dict                        # the model's diagnostics (the task-attention map)
    gram_TxT: jax.Array | None = None  # Gram of the per-task gradients, for the conflict diagnostics
    block_weights_BxT: jax.Array | None = None  # per-block aggregation: each group's coefficients


def train_step(state: TrainState, batch: dict, *, model: nn.Module, tasks: Sequence[TaskSpec],
               layout: str, method: WeightingMethod, tx: optax.GradientTransformation,
               grad_accum_steps: int = 1, rep_grad: bool = False,
               diagnostics_every: int = 0, grad_accum_unroll: int = 1) -> tuple[TrainState, dict]:
    """One update. A non-finite loss or gradient leaves params, optimizer and weighting untouched.

    Loss-based methods differentiate their combined loss. Gram and per-task-gradient methods get the
    per-task gradients of the shared encoder (`mtt_jax.task_grads`) and set its update; the task side
    (task attention, heads) gets the gradient of ``sum_t L_t``. MoDo and SDMGrad get them for three
    strided samples of the batch (`_sampled_task_gradients`). One function per kind of method
    (``method.requires``, `GRADIENTS_BY_REQUIREMENT`) computes them. Gradient-conflict diagnostics come
    for free with gradient methods and, for loss-based ones, are computed every ``diagnostics_every``
    steps.

    With ``grad_accum_steps = k`` the batch is processed as k microbatches whose gradients and losses
    are averaged (equal to one big step when every example is kept), in a ``lax.scan`` so that memory
    holds one microbatch's activations; ``grad_accum_unroll`` microbatches per scan iteration let XLA
    overlap their work (faster on CPU, at the memory of that many microbatches).
    """
    dropout_rng, method_rng = _step_keys(state)
    ctx = StepContext(model=model, tasks=tasks, layout=layout, method=method,
                      loss_fn=lambda outputs, b: task_losses(tasks, outputs, b, layout),
                      dropout_rng=dropout_rng, method_rng=method_rng, grad_accum_steps=grad_accum_steps,
                      grad_accum_unroll=grad_accum_unroll, rep_grad=rep_grad,
                      diagnostics_every=diagnostics_every)
    result = method_gradients(ctx, state, batch)

    updates, opt_state = tx.update(result.grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    weighting_state = result.weighting_state
    if method.needs_losses_after_step:  # FAMO: the same batch's losses after the update
        weighting_state = method.after_step(weighting_state, result.losses_T,
                                            _losses_after_update(ctx, params, batch))
    grad_norm = optax.tree.norm(result.grads)
    finite = jnp.isfinite(result.total) & jnp.isfinite(grad_norm)
    new_state = _next_state(state, finite, params, opt_state, weighting_state)
    return new_state, _step_metrics(result, grad_norm, finite)


def _step_keys(state: TrainState) -> tuple[jax.Array, jax.Array]:
    """``(dropout key, method key)`` of step s, split from ``fold_in(state.rng, s)``."""
    step_rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    dropout_rng, method_rng = jax.random.split(step_rng)
    return dropout_rng, method_rng


def _next_state(state: TrainState, finite: jax.Array, params: PyTree, opt_state: PyTree,
                weighting_state: PyTree) -> TrainState:
    """The state after the step: the updated params, optimizer and weighting state where ``finite``, the
    old ones otherwise (a skipped step, counted in ``skipped_steps``)."""
    keep_if_finite = lambda new, old: jax.tree.map(lambda a, b: jnp.where(finite, a, b), new, old)
    return state.replace(
        step=state.step + 1,
        params=keep_if_finite(params, state.params),
        opt_state=keep_if_finite(opt_state, state.opt_state),
        weighting_state=keep_if_finite(weighting_state, state.weighting_state),
        skipped_steps=state.skipped_steps + (~finite).astype(jnp.int32))


def _step_metrics(result: Gradients, grad_norm: jax.Array, finite: jax.Array) -> dict:
    metrics = {"loss": result.total, "task_losses": result.losses_T, "weights": result.weights_T,
               "grad_norm": grad_norm, "finite": finite, **result.aux}
    if result.gram_TxT is not None:
        metrics.update(task_grads.conflict_diagnostics(result.gram_TxT))
    if result.block_weights_BxT is not None:
        metrics["block_weights"] = result.block_weights_BxT
    return metrics


def _losses_after_update(ctx: StepContext, params: PyTree, batch: dict) -> jax.Array:
    """The batch's per-task losses at the updated ``params``, with the dropout of the losses before
    (microbatch by microbatch when the step accumulates)."""
    if ctx.grad_accum_steps == 1:
        outputs, _ = apply_model(ctx.model, params["model"], batch, True, {"dropout": ctx.dropout_rng})
        return ctx.loss_fn(outputs, batch)
    return batch_mean_losses(ctx.model, params, batch, ctx.loss_fn, ctx.layout, ctx.grad_accum_steps,
                             ctx.grad_accum_unroll, ctx.dropout_rng)


def method_gradients(ctx: StepContext, state: TrainState, batch: dict) -> Gradients:
    """The gradients of ``ctx.method``'s kind (``method.requires``, `GRADIENTS_BY_REQUIREMENT`)."""
    kind = GRADIENTS_BY_REQUIREMENT.get(ctx.method.requires)
    if kind is None:
        raise ValueError(f"weighting {ctx.method.name!r} requires {ctx.method.requires!r}; the train step "
                         f"knows {sorted(GRADIENTS_BY_REQUIREMENT)}")
    return kind(ctx, state, batch)


# --- requires == "losses" ------------------------------------------------------------------------------

def _combined_loss_gradients(ctx: StepContext, state: TrainState, batch: dict) -> Gradients:
    """``requires == "losses"``: the gradient of ``combine(L_1, ..., L_T)``, of the whole batch or
    accumulated over microbatches, with the conflict diagnostics every ``diagnostics_every`` steps."""
    if ctx.grad_accum_steps == 1:
        result = _whole_batch_loss_gradients(ctx, state, batch)
    else:
        result = _accumulated_loss_gradients(ctx, state, batch)
    return dataclasses.replace(result, gram_TxT=_diagnostics_gram(ctx, state, batch))


def _combine(ctx: StepContext, state: TrainState, weighting_params: PyTree, losses_T: jax.Array):
    """The method's ``combine`` at this step: ``(total, weights_T, new weighting state)``."""
    return ctx.method.combine(weighting_params, state.weighting_state, losses_T, state.step,
                              ctx.method_rng)


def _whole_batch_loss_gradients(ctx: StepContext, state: TrainState, batch: dict) -> Gradients:
    def objective(params):
        outputs, aux = apply_model(ctx.model, params["model"], batch, True, {"dropout": ctx.dropout_rng})
        losses_T = ctx.loss_fn(outputs, batch)
        total, weights_T, weighting_state = _combine(ctx, state, params["weighting"], losses_T)
        return total, (losses_T, weights_T, weighting_state, aux)
    (total, (losses_T, weights_T, weighting_state, aux)), grads = jax.value_and_grad(
        objective, has_aux=True)(state.params)
    return Gradients(grads, total, losses_T, weights_T, weighting_state, aux)


def _accumulated_loss_gradients(ctx: StepContext, state: TrainState, batch: dict) -> Gradients:
    """The whole batch's update, from microbatches.

    The model's gradient is ``sum_t (d total / d L_t)(Lbar) grad Lbar_t`` at the batch's mean losses
    ``Lbar``, accumulated as the gradient of ``sum_t w_t L_t`` with those weights fixed. Where the
    combination is linear in the losses (``combine_is_linear``: EW, UW, RLW, DWA) the weights do not
    depend on ``Lbar``; any other method (GLS, STCH, FAMO) weighs a task by its loss, so a forward pass
    over the microbatches first gives ``Lbar``. The method's own parameters get their gradient, and the
    logged weights, total and new state come, from ``combine`` at ``Lbar`` (DWA's and STCH's epoch means
    count every example, not the last microbatch's). ``combine`` runs outside the per-shard scan.
    """
    weighting_params = state.params["weighting"]
    combined_total = lambda params, losses_T: _combine(ctx, state, params, losses_T)[0]
    mean_T = None if ctx.method.combine_is_linear else batch_mean_losses(
        ctx.model, state.params, batch, ctx.loss_fn, ctx.layout, ctx.grad_accum_steps,
        ctx.grad_accum_unroll, ctx.dropout_rng)
    weights_T = jax.grad(lambda l: combined_total(weighting_params, l))(
        jnp.ones(ctx.num_tasks) if mean_T is None else mean_T)
    losses_T, model_grads, aux_K = _fixed_weights_gradients(ctx, state, batch, weights_T)
    if mean_T is not None:  # the losses the weights were taken at
        losses_T = mean_T
    grads = {"model": model_grads,
             "weighting": jax.grad(lambda p: combined_total(p, losses_T))(weighting_params)}
    total, weights_T, weighting_state = _combine(ctx, state, weighting_params, losses_T)
    aux = jax.tree.map(lambda x: x.mean(0), aux_K)  # the task-attention map, averaged
    return Gradients(grads, total, losses_T, weights_T, weighting_state, aux)


def _fixed_weights_gradients(ctx: StepContext, state: TrainState, batch: dict, weights_T: jax.Array):
    """``(losses_T, model gradient, aux_K)``: the mean losses and the mean model gradient of
    ``sum_t w_t L_t`` over the microbatches, and each microbatch's aux."""
    def weighted_loss(model_params, micro_batch, rng):
        outputs, aux = apply_model(ctx.model, model_params, micro_batch, True, {"dropout": rng})
        losses_T = global_losses(ctx.loss_fn(outputs, micro_batch))
        return jnp.sum(weights_T * losses_T.astype(jnp.float32)), (losses_T, aux)

    def accumulate(sums, micro):
        rng, micro_batch = micro
        (_, (losses_T, aux)), grads = jax.value_and_grad(weighted_loss, has_aux=True)(
            state.params["model"], micro_batch, rng)
        return jax.tree.map(jnp.add, sums, (losses_T, grads)), aux
    zeros = jax.tree.map(jnp.zeros_like, (jnp.zeros(ctx.num_tasks), state.params["model"]))
    (losses_T, model_grads), aux_K = scan_microbatches(
        accumulate, zeros, batch, ctx.layout, ctx.grad_accum_steps, ctx.grad_accum_unroll, ctx.dropout_rng)
    losses_T, model_grads = jax.tree.map(lambda x: x / ctx.grad_accum_steps, (losses_T, model_grads))
    return losses_T, model_grads, aux_K


def _diagnostics_gram(ctx: StepContext, state: TrainState, batch: dict) -> jax.Array | None:
    """The Gram matrix of the per-task gradients every ``diagnostics_every`` steps (zeros between), or
    None without diagnostics. (Loss-based methods do not need the per-task gradients otherwise.)"""
    if not ctx.diagnostics_every:
        return None
    return jax.lax.cond(
        (state.step + 1) % ctx.diagnostics_every == 0,
        lambda: task_grads.gram_matrix(_per_task_gradients(
            ctx, state.params["model"], batch, ctx.dropout_rng).grads_T),
        lambda: jnp.zeros((ctx.num_tasks, ctx.num_tasks), jnp.float32))


# --- requires == "gram" | "grads" | "sampled_gram" -------------------------------------------------------

def _gram_weighted_gradients(ctx: StepContext, state: TrainState, batch: dict) -> Gradients:
    """``requires == "gram"``: coefficients ``c_t`` from the Gram matrix ``K = G G^T`` of the per-task
    gradients on the shared parameters; the encoder's gradient is ``sum_t c_t g_t``."""
    task = _task_gradients(ctx, state, batch)
    transformed = _transformed_losses(ctx, state, task.losses_T)
    grouping = ctx.method.block_grouping(task.grads_T)
    if grouping is not None:
        gram_BxTxT = task_grads.group_gram_matrices(
            task.grads_T, grouping.leaf_group, grouping.num_groups) * transformed.scale_TxT
        return _grouped_gram_result(ctx, state, task, transformed, grouping, gram_BxTxT, gram_BxTxT.sum(0))
    gram_TxT = task_grads.gram_matrix(task.grads_T) * transformed.scale_TxT
    coeffs_T, weighting_state = ctx.method.gram_weights(
        state.weighting_state, gram_TxT, transformed.values_T, state.step, ctx.method_rng)
    return _task_gradient_result(task, transformed, task.apply(coeffs_T * transformed.scale_T),
                                 coeffs_T, weighting_state, gram_TxT)


def _grouped_gram_result(ctx: StepContext, state: TrainState, task: task_grads.TaskGradients,
                         transformed: TransformedLosses, grouping, method_gram_BxTxT: jax.Array,
                         gram_TxT: jax.Array) -> Gradients:
    """Per-block aggregation (``weighting.blocks``, `mtt_jax.weighting.per_block`): the method on each
    group's (cross-)Gram matrix, group b's encoder gradient ``sum_t c_b,t g_t,b``. The logged weights are
    the groups' mean coefficients, the groups' own ones ``block_weights``; the conflict diagnostics
    keep the whole encoder's Gram ``gram_TxT`` (the sum of the groups')."""
    coeffs_BxT, weighting_state = ctx.method.grouped_gram_weights(
        state.weighting_state, method_gram_BxTxT, transformed.values_T, state.step, ctx.method_rng)
    shared_grads = task.apply_grouped(coeffs_BxT * transformed.scale_T, grouping.leaf_group)
    result = _task_gradient_result(task, transformed, shared_grads, coeffs_BxT.mean(0), weighting_state,
                                   gram_TxT)
    return dataclasses.replace(result, block_weights_BxT=coeffs_BxT)


def _aggregated_gradients(ctx: StepContext, state: TrainState, batch: dict) -> Gradients:
    """``requires == "grads"``: the method's ``aggregate`` maps the per-task gradients themselves to the
    encoder's update direction."""
    task = _task_gradients(ctx, state, batch)
    transformed = _transformed_losses(ctx, state, task.losses_T)
    gram_TxT = task_grads.gram_matrix(task.grads_T) * transformed.scale_TxT
    grads_T = scale_task_rows(task.grads_T, transformed.scale_T)
    direction, weights_T, weighting_state = ctx.method.aggregate(
        state.weighting_state, grads_T, transformed.values_T, state.step, ctx.method_rng)
    return _task_gradient_result(task, transformed, task.to_params(direction), weights_T,
                                 weighting_state, gram_TxT)


def _sampled_gram_weighted_gradients(ctx: StepContext, state: TrainState, batch: dict) -> Gradients:
    """``requires == "sampled_gram"`` (MoDo, Chen et al. 2023; SDMGrad, Xiao et al. 2023): the
    coefficients come from the cross-Gram ``G_1 G_2^T`` of samples 1 and 2 of the batch and are applied
    to sample 0's gradients, ``sum_t c_t g_t^(0)``; the diagnostics get the Gram of the samples' mean."""
    sampled = _sampled_task_gradients(ctx, state, batch)
    task = sampled.first_sample()
    transformed = _transformed_losses(ctx, state, task.losses_T)
    grouping = ctx.method.block_grouping(task.grads_T)
    if grouping is not None:
        gram_TxT, cross_BxTxT = _mean_and_cross_grams(sampled.grads_ST, transformed.scale_TxT, grouping)
        return _grouped_gram_result(ctx, state, task, transformed, grouping, cross_BxTxT, gram_TxT)
    gram_TxT, cross_TxT = _mean_and_cross_grams(sampled.grads_ST, transformed.scale_TxT)
    coeffs_T, weighting_state = ctx.method.gram_weights(
        state.weighting_state, cross_TxT, transformed.values_T, state.step, ctx.method_rng)
    return _task_gradient_result(task, transformed, task.apply(coeffs_T * transformed.scale_T),
                                 coeffs_T, weighting_state, gram_TxT)


# --- requires == "lookahead" ------------------------------------------------------------------------------

def _lookahead_weighted_gradients(ctx: StepContext, state: TrainState, batch: dict) -> Gradients:
    """``requires == "lookahead"`` (Auto-Lambda, Liu et al. 2022): the method's weights first take their
    step along the gradient of a validation loss one virtual step ahead
    (`affinity.lookahead_weight_gradient`), with the batch's strided halves as the train and the
    validation data; the model then gets the gradient of the combined loss, with the new weights, on the
    whole batch (`_combined_loss_gradients`)."""
    train_half, val_half = (jax.tree.map(lambda x: x[i], microbatches(batch, ctx.layout, 2)) for i in (0, 1))

    def losses_of(model_params, part):
        outputs, _ = apply_model(ctx.model, model_params, part, True, {"dropout": ctx.dropout_rng})
        return ctx.loss_fn(outputs, part)
    weight_grad_T = affinity.lookahead_weight_gradient(
        losses_of, state.params["model"], train_half, val_half,
        ctx.method.lookahead_weights(state.weighting_state), ctx.method.lookahead_lr)
    weighting_state = ctx.method.lookahead_gradient(state.weighting_state, weight_grad_T)
    return _combined_loss_gradients(ctx, state.replace(weighting_state=weighting_state), batch)


GRADIENTS_BY_REQUIREMENT: dict[str, Callable[[StepContext, TrainState, dict], Gradients]] = {
    "losses": _combined_loss_gradients,
    "gram": _gram_weighted_gradients,
    "grads": _aggregated_gradients,
    "sampled_gram": _sampled_gram_weighted_gradients,
    "lookahead": _lookahead_weighted_gradients,
}


@dataclasses.dataclass(frozen=True)
class TransformedLosses:
    """A method's elementwise loss transform ``f(L)`` (identity but for IMTL-L, Liu et al. 2021) at the
    batch's losses: each task's gradient is scaled by ``f'(L_t)``."""
    values_T: jax.Array              # f(L), what the method weighs
    scale_T: jax.Array               # f'(L)
    scale_TxT: jax.Array             # f'(L_i) f'(L_j), f32: scales a Gram matrix of the unscaled gradients
    weighting_grads: PyTree          # d sum_t f(L_t) / d (the method's parameters)


def _transformed_losses(ctx: StepContext, state: TrainState, losses_T: jax.Array) -> TransformedLosses:
    # The Gram matrices of the scaled gradients, s_i s_j <g_i, g_j>, are scaled as T x T matrices rather
    # than through another pass over the [T, P] gradients, which only per-task-gradient methods need.
    weighting_params = state.params["weighting"]
    transform = lambda p, l: ctx.method.transform_losses(p, l).sum()
    scale_T = jax.grad(transform, argnums=1)(weighting_params, losses_T)
    weighting_grads = jax.grad(transform, argnums=0)(weighting_params, losses_T)
    values_T = ctx.method.transform_losses(weighting_params, losses_T)
    scale_TxT = jnp.outer(scale_T, scale_T).astype(jnp.float32)
    return TransformedLosses(values_T, scale_T, scale_TxT, weighting_grads)


def _task_gradient_result(task: task_grads.TaskGradients, transformed: TransformedLosses,
                          shared_grads: PyTree, weights_T: jax.Array, weighting_state: PyTree,
                          gram_TxT: jax.Array) -> Gradients:
    """The step's gradients from the encoder's (``shared_grads``) and the task side's of ``sum_t L_t``."""
    grads = {"model": {**shared_grads, **task.task_side_grads}, "weighting": transformed.weighting_grads}
    total = jnp.sum(jax.lax.stop_gradient(weights_T) * transformed.values_T)
    return Gradients(grads, total, task.losses_T, weights_T, weighting_state, task.aux, gram_TxT)


def _mean_and_cross_grams(grads_ST: PyTree, scale_TxT: jax.Array,
                          grouping=None) -> tuple[jax.Array, jax.Array]:
    """One pass over the S samples' gradients: the (S T) x (S T) Gram of all of them, from which come the
    Gram of the samples' mean and the cross-Gram of samples 1 and 2, both scaled by ``scale_TxT``. With a
    ``grouping`` (per-block aggregation) the cross-Grams are per group, ``[B, T, T]``."""
    num_samples, num_tasks = jax.tree.leaves(grads_ST)[0].shape[:2]
    flat_ST = jax.tree.map(lambda g: g.reshape((-1,) + g.shape[2:]), grads_ST)
    if grouping is None:
        gram_BxSTxST = task_grads.gram_matrix(flat_ST)[None]
    else:
        gram_BxSTxST = task_grads.group_gram_matrices(flat_ST, grouping.leaf_group, grouping.num_groups)
    gram_BxSxTxSxT = gram_BxSTxST.reshape(-1, num_samples, num_tasks, num_samples, num_tasks)
    mean_gram_TxT = gram_BxSxTxSxT.sum((0, 1, 3)) / num_samples ** 2 * scale_TxT
    cross_BxTxT = gram_BxSxTxSxT[:, 1, :, 2, :] * scale_TxT
    return mean_gram_TxT, (cross_BxTxT[0] if grouping is None else cross_BxTxT)


def _per_task_gradients(ctx: StepContext, model_params: PyTree, batch: dict,
                        rng: jax.Array) -> task_grads.TaskGradients:
    return task_grads.per_task_gradients(ctx.model, model_params, batch, ctx.tasks, ctx.layout, rng,
                                         ctx.loss_fn, ctx.rep_grad)


def _task_gradients(ctx: StepContext, state: TrainState, batch: dict) -> task_grads.TaskGradients:
    """The per-task gradients of the whole batch in one pass, or accumulated over microbatches
    (representation gradients with microbatches are refused by config_check)."""
    if ctx.grad_accum_steps == 1 and ctx.method.gradient_samples == 1:
        return _per_task_gradients(ctx, state.params["model"], batch, ctx.dropout_rng)
    return _sampled_task_gradients(ctx, state, batch).first_sample()


@dataclasses.dataclass(frozen=True)
class SampledTaskGradients:
    """Per-task gradients of S strided samples of a batch (S = ``method.gradient_samples``)."""
    losses_T: jax.Array              # the batch's mean losses
    grads_ST: PyTree                 # [S, T, *param.shape]: each sample's mean gradient
    task_side_grads: PyTree          # of sum_t L_t, the samples' mean
    aux: dict

    def first_sample(self) -> task_grads.TaskGradients:
        """Sample 0 (the only one, or the one MoDo's direction is built from), unscaled (IMTL-L)."""
        grads_T = jax.tree.map(lambda g: g[0], self.grads_ST)
        return task_grads.TaskGradients(self.losses_T, grads_T,
                                        functools.partial(task_grads.combine, grads_T=grads_T),
                                        self.task_side_grads, self.aux)


def _sampled_task_gradients(ctx: StepContext, state: TrainState, batch: dict) -> SampledTaskGradients:
    """Per-task gradients of ``method.gradient_samples`` samples over ``grad_accum_steps`` microbatches:
    each microbatch is split into S strided parts, run as one ``vmap``-ed pass, and sample s is part s of
    every microbatch (without accumulation: the examples ``s, s + S, s + 2S, ...``). (An indexed update
    of one sample's accumulator per microbatch does not lower inside the per-shard scan of a
    data-parallel mesh; a one-hot mask costs S times the adds.)"""
    num_samples, num_micro = ctx.method.gradient_samples, ctx.grad_accum_steps

    def accumulate(sums, micro):
        rng, micro_batch = micro
        sampled = _microbatch_samples(ctx, state.params["model"], micro_batch, rng)
        return (jax.tree.map(jnp.add, sums, (sampled.losses_T, sampled.grads_ST, sampled.task_side_grads)),
                sampled.aux)
    shared, task_side_params = task_grads.split_params(state.params["model"])
    zeros = (jnp.zeros((ctx.num_tasks,), jnp.float32),
             jax.tree.map(lambda p: jnp.zeros((num_samples, ctx.num_tasks) + p.shape, p.dtype), shared),
             jax.tree.map(jnp.zeros_like, task_side_params))
    sums, aux_K = scan_microbatches(accumulate, zeros, batch, ctx.layout, num_micro, ctx.grad_accum_unroll,
                                    ctx.dropout_rng)
    losses_T, grads_ST, task_side = jax.tree.map(lambda x: x / num_micro, sums)
    return SampledTaskGradients(losses_T, grads_ST, task_side, jax.tree.map(lambda x: x.mean(0), aux_K))


def _microbatch_samples(ctx: StepContext, model_params: PyTree, micro_batch: dict,
                        rng: jax.Array) -> SampledTaskGradients:
    """One microbatch's per-task gradients of each of its S strided parts, in one ``vmap``-ed pass."""
    num_samples = ctx.method.gradient_samples
    if num_samples == 1:
        r = _per_task_gradients(ctx, model_params, micro_batch, rng)
        return SampledTaskGradients(r.losses_T, jax.tree.map(lambda g: g[None], r.grads_T),
                                    r.task_side_grads, r.aux)

    def arrays(part, key):
        r = _per_task_gradients(ctx, model_params, part, key)
        return r.losses_T, r.grads_T, r.task_side_grads, r.aux
    parts = microbatches(micro_batch, ctx.layout, num_samples)
    losses_ST, grads_ST, task_side_S, aux_S = jax.vmap(arrays)(parts, jax.random.split(rng, num_samples))
    mean = lambda tree: jax.tree.map(task_grads.mean_leading, tree)
    return SampledTaskGradients(losses_ST.mean(0), grads_ST, mean(task_side_S), mean(aux_S))


def _gradient_method_grads(state, batch, model, tasks, loss_fn, method, dropout_rng, method_rng, layout,
                           grad_accum_steps, rep_grad, grad_accum_unroll=1):
    """`method_gradients` of a gradient method as the tuple ``(grads, total, losses_T, weights_T,
    weighting_state, aux, gram_TxT)``: the positional form tests/test_scale.py calls."""
    ctx = StepContext(model=model, tasks=tasks, layout=layout, method=method, loss_fn=loss_fn,
                      dropout_rng=dropout_rng, method_rng=method_rng, grad_accum_steps=grad_accum_steps,
                      grad_accum_unroll=grad_accum_unroll, rep_grad=rep_grad)
    r = method_gradients(ctx, state, batch)
    return r.grads, r.total, r.losses_T, r.weights_T, r.weighting_state, r.aux, r.gram_TxT


# --- Microbatches --------------------------------------------------------------------------------------

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


def batch_rows_divisor(method: WeightingMethod, grad_accum_steps: int) -> int:
    """What a step's rows (per data shard) must divide into: ``grad_accum_steps`` microbatches, each
    split into the method's gradient samples (3 for MoDo and SDMGrad)."""
    return grad_accum_steps * method.gradient_samples


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
