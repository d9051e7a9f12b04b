"""The interface every loss-weighting method implements (DESIGN §5).

A method is a pure, immutable object built from ``config.weighting``. It owns two pytrees:

- ``params``: trainable method parameters (e.g. uncertainty's log-variances); they live in the train
  state's params under ``"weighting"`` and are updated by the main optimizer, like the model.
- ``state``: non-trainable method state (EMAs, previous losses); it lives in the train state as
  ``weighting_state`` and is checkpointed with it.

`combine` maps the per-task losses ``L_t`` to the scalar the step differentiates, the task weights
``w_t`` that are logged as ``weight/<task>``, and the new state. Everything inside is jax and runs in f32.
"""

from __future__ import annotations

import abc
from typing import Any

import jax
import jax.numpy as jnp

PyTree = Any


class WeightingMethod(abc.ABC):
    name: str = ""

    def __init__(self, num_tasks: int):
        self.num_tasks = num_tasks

    def init_params(self) -> PyTree:
        return {}

    def init_state(self) -> PyTree:
        return {}

    @abc.abstractmethod
    def combine(self, params: PyTree, state: PyTree, losses_T: jax.Array,
                step: jax.Array) -> tuple[jax.Array, jax.Array, PyTree]:
        """Returns ``(total_loss, weights_T, new_state)``."""

    @staticmethod
    def weighted_sum(weights_T: jax.Array, losses_T: jax.Array) -> jax.Array:
        return jnp.sum(jax.lax.stop_gradient(weights_T) * losses_T.astype(jnp.float32))
