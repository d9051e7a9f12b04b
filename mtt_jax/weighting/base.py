"""The interface every multi-task weighting method implements.

A method is a pure, immutable object built from ``config.weighting`` (options = the paper's
hyperparameters). It owns two pytrees:

- ``params``: trainable method parameters (e.g. uncertainty's log-variances); they live in the train
  state's params under ``"weighting"`` and are updated by the main optimizer, like the model.
- ``state``: non-trainable method state (EMAs, epoch means, logits a method updates by its own rule and
  that rule's optimizer state); it lives in the train state as ``weighting_state`` and is checkpointed
  with it. Shapes and dtypes are fixed at init, so the step compiles once.

What a method consumes is declared by ``requires``; the step calls exactly one of:

- ``"losses"``: ``combine`` maps the per-task losses ``L_t`` to the scalar the step differentiates. The
  logged weights are the applied ones, ``d total / d L_t``.
- ``"gram"``: ``gram_weights`` maps the Gram matrix ``K = G G^T`` of the per-task gradients on the shared
  parameters to coefficients ``c_t``; the step applies ``d = sum_t c_t g_t`` (e.g. by differentiating
  ``sum_t stop_gradient(c_t) L_t``). The coefficients are what is logged.
- ``"grads"``: ``aggregate`` maps the per-task gradients themselves (leaves with a leading ``T`` axis)
  to the update direction for the shared parameters.
- ``"sampled_gram"`` (MoDo, SDMGrad): the step splits the batch into ``SAMPLED_GRAM_SAMPLES`` = 3
  independent samples; ``gram_weights`` gets the cross-Gram ``K = G_1 G_2^T`` of samples 1 and 2 (not
  symmetric) and its coefficients are applied to sample 0's gradients, ``d = sum_t c_t g_t^(0)``.
- ``"lookahead"`` (Auto-Lambda): the step splits the batch into a train and a validation half, takes the
  gradient of the validation loss one virtual step (of size ``method.lookahead_lr``, with the weights
  ``lookahead_weights(state)``) ahead with respect to the task weights, hands it to
  ``lookahead_gradient`` for the new state, then calls ``combine`` with that state like a loss method.

``step`` is the int32 count of updates so far (0-based); ``rng`` a typed PRNG key, or None for
deterministic methods. Everything inside is jax, in f32, and compiles under ``jax.jit``.
"""

from __future__ import annotations

import abc
import numbers
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


SAMPLED_GRAM_SAMPLES = 3  # independent samples of a batch for ``requires == "sampled_gram"``


class WeightingMethod(abc.ABC):
    name: str = ""
    requires: str = "losses"                 # "losses" | "gram" | "grads" | "sampled_gram" | "lookahead"
    needs_losses_after_step: bool = False    # FAMO: call `after_step` with the same batch's new losses
    # ``combine``'s total is affine in the losses, with weights that do not depend on their values
    # (EW, UW, RLW, DWA): gradient accumulation may then combine each microbatch's losses. Otherwise it
    # first computes the batch's mean losses and differentiates the combination there (one more
    # forward pass over the batch; `mtt_jax.train_step`).
    combine_is_linear: bool = False
    # The state holds per-task leaves shaped like the shared parameters (``[T, *param.shape]``: DB-MTL's
    # EMA, ExcessMTL's accumulators, MoCo's tracked gradients): built by ``init_state_for`` only, and
    # not usable with representation gradients (`mtt_jax.run.config_check`).
    state_mirrors_params: bool = False

    def __init__(self, num_tasks: int):
        if num_tasks < 1:
            raise ValueError(f"{type(self).__name__} needs num_tasks >= 1, got {num_tasks}")
        self.num_tasks = num_tasks

    @property
    def gradient_samples(self) -> int:
        """Independent samples the step splits a batch into for the per-task gradients."""
        return SAMPLED_GRAM_SAMPLES if self.requires == "sampled_gram" else 1

    def init_params(self) -> PyTree:
        """Parameters trained by the main optimizer; ``{}`` if none."""
        return {}

    def init_state(self) -> PyTree:
        """Non-trainable state with fixed shapes; ``{}`` if none."""
        if self.state_mirrors_params:
            raise ValueError(f"weighting {self.name!r} keeps per-task state shaped like the shared "
                             "parameters: build its state with init_state_for(shared_shapes)")
        return {}

    def init_state_for(self, shared_shapes: PyTree) -> PyTree:
        """The state, for methods whose state mirrors the shared parameters (DB-MTL's gradient EMA).

        ``shared_shapes`` is a pytree of ``jax.ShapeDtypeStruct`` (or arrays) shaped like one task's
        gradient on the shared parameters. Callers that support ``requires == "grads"`` should always
        use this; other methods ignore the shapes.
        """
        del shared_shapes
        return self.init_state()

    def block_grouping(self, shared_tree: PyTree):
        """The groups of the shared parameters the method runs on separately (a
        `mtt_jax.weighting.per_block.BlockGrouping`, read off ``shared_tree``'s paths), or None: one
        group, the whole encoder. Only `per_block.PerBlock` (``weighting.blocks``) groups."""
        del shared_tree
        return None

    def transform_losses(self, params: PyTree, losses_T: jax.Array) -> jax.Array:
        """Losses to take the per-task gradients of (gram / grads methods); identity unless a method
        rescales them with learned parameters first (IMTL-L)."""
        del params
        return losses_T

    def combine(self, params: PyTree, state: PyTree, losses_T: jax.Array, step: jax.Array,
                rng: jax.Array | None = None) -> tuple[jax.Array, jax.Array, PyTree]:
        """``requires == "losses"``: returns ``(total_loss, weights_T, new_state)``."""
        raise NotImplementedError(f"weighting {self.name!r} requires {self.requires!r}, not losses only")

    def gram_weights(self, state: PyTree, gram_TxT: jax.Array, losses_T: jax.Array, step: jax.Array,
                     rng: jax.Array | None = None) -> tuple[jax.Array, PyTree]:
        """``requires == "gram"`` (or ``"sampled_gram"``, with the cross-Gram): returns
        ``(coeffs_T, new_state)``; the step applies sum_t c_t g_t."""
        raise NotImplementedError(f"weighting {self.name!r} requires {self.requires!r}, not the Gram matrix")

    def aggregate(self, state: PyTree, grads_T: PyTree, losses_T: jax.Array, step: jax.Array,
                  rng: jax.Array | None = None) -> tuple[PyTree, jax.Array, PyTree]:
        """``requires == "grads"``: returns ``(direction, weights_T, new_state)``; ``direction`` is
        shaped like one task's gradient, ``weights_T`` is for logging."""
        raise NotImplementedError(f"weighting {self.name!r} requires {self.requires!r}, not per-task grads")

    def lookahead_weights(self, state: PyTree) -> jax.Array:
        """``requires == "lookahead"``: the task weights ``[T]`` the virtual step is taken with."""
        raise NotImplementedError(f"weighting {self.name!r} requires {self.requires!r}, not a lookahead")

    def lookahead_gradient(self, state: PyTree, weight_grad_T: jax.Array) -> PyTree:
        """``requires == "lookahead"``: the new state from ``d L_val(theta') / d lambda``."""
        raise NotImplementedError(f"weighting {self.name!r} requires {self.requires!r}, not a lookahead")

    def after_step(self, state: PyTree, losses_before_T: jax.Array,
                   losses_after_T: jax.Array) -> PyTree:
        """Called after the parameter update with the same batch's losses before and after
        (only when ``needs_losses_after_step``)."""
        del losses_before_T, losses_after_T
        return state

    @staticmethod
    def weighted_sum(weights_T: jax.Array, losses_T: jax.Array) -> jax.Array:
        return jnp.sum(jax.lax.stop_gradient(weights_T) * losses_T.astype(jnp.float32))


def require_rng(method: WeightingMethod, rng: jax.Array | None) -> jax.Array:
    """The key of a stochastic method; a missing key is a wiring error, caught at trace time."""
    if rng is None:
        raise ValueError(f"weighting {method.name!r} is stochastic: pass rng (a jax.random.key)")
    return rng


def per_task_sum(tree_T: PyTree, fn=lambda leaf: leaf) -> jax.Array:
    """``sum`` over all leaves and all non-task axes of ``fn(leaf)``: a ``[T]`` vector (leaves carry a
    leading task axis)."""
    leaves = jax.tree.leaves(tree_T)
    return sum(jnp.sum(fn(leaf).reshape(leaf.shape[0], -1), axis=1) for leaf in leaves)


def scale_task_rows(tree_T: PyTree, factor_T: jax.Array) -> PyTree:
    """Every leaf's task row t multiplied by ``factor_T[t]`` (in the leaf's dtype)."""
    return jax.tree.map(
        lambda leaf: leaf * factor_T.reshape((-1,) + (1,) * (leaf.ndim - 1)).astype(leaf.dtype), tree_T)


def sum_task_rows(weights_T: jax.Array, tree_T: PyTree) -> PyTree:
    """``sum_t w_t x_t`` leaf by leaf: an update direction, shaped like one task's gradient."""
    return jax.tree.map(lambda leaf: jnp.tensordot(weights_T, leaf, axes=1), tree_T)


def task_zeros(num_tasks: int, shared_shapes: PyTree) -> PyTree:
    """f32 zeros ``[T, *shape]`` for every leaf of ``shared_shapes`` (state that mirrors the params)."""
    return jax.tree.map(lambda s: jnp.zeros((num_tasks, *s.shape), jnp.float32), shared_shapes)


def as_gram(gram_TxT: jax.Array, num_tasks: int) -> jax.Array:
    """The Gram matrix in f32, its shape checked at trace time."""
    gram_TxT = jnp.asarray(gram_TxT, jnp.float32)
    if gram_TxT.shape != (num_tasks, num_tasks):
        raise ValueError(f"Gram matrix has shape {gram_TxT.shape}, expected {(num_tasks, num_tasks)}")
    return gram_TxT


def clamp_losses(losses_T: jax.Array, min_loss: float) -> jax.Array:
    """``max(L_t, min_loss)`` in f32, for methods that take ``log L`` or divide by ``L`` (need L > 0)."""
    return jnp.maximum(losses_T.astype(jnp.float32), min_loss)


def validate_choice(method: str, option: str, value, choices) -> None:
    if value not in choices:
        choices = ", ".join(map(str, choices))
        raise ValueError(f"weighting.{method}.{option}={value!r}; choose one of: {choices}")


def validate_range(method: str, option: str, value: float, low: float, high: float = float("inf"),
                   *, low_open: bool = False) -> None:
    check_range(f"weighting.{method}.{option}", value, low, high, low_open=low_open)


def check_range(field: str, value: float, low: float, high: float = float("inf"), *,
                low_open: bool = False, high_open: bool = False) -> None:
    """Raises ValueError unless ``value`` is a number in the interval (NaN and booleans are not)."""
    number = isinstance(value, numbers.Real) and not isinstance(value, bool)  # numpy scalars too
    ok = number and (value > low if low_open else value >= low) and (
        value < high if high_open else value <= high)
    if not ok:
        interval = f"{'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{field}={value!r} must be in {interval}")
