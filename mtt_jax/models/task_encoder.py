"""Task encoder: task identity -> Dense -> task features.

``T = Dense(T0)`` maps the one-hot task identity ``T0`` to a ``d_model`` feature vector. How the features
enter the trunk depends on the batch layout:

- multi-input: every example belongs to one task, so its features are added to every input position.
- single-input (``model.task_encoder = True`` or ``"tokens"``): one forward pass serves all tasks, so the
  features become one task token per task, prepended to the shared sequence; task t's head reads the
  trunk output at token t.
- single-input, the additive form (``"add"``): task t's features are added to every position of the
  shared sequence and the trunk runs once per task (T passes, T times the trunk's FLOPs).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtt_jax.models.partitioning import Dtype, kernel_init, zeros_init


class TaskEncoder(nn.Module):
    """``init_std``: the standard deviation of the Dense kernel's initial entries, so of the initial task
    features. The default 0.02 (BERT's embedding scale) suits task tokens, which the first LayerNorm
    rescales. Features added to the embedded inputs (``"add"``) start as a perturbation of relative size
    ``init_std`` / (the embeddings' scale), so a small value hides the task at first; a larger one makes
    it visible from the first step."""

    num_tasks: int
    d_model: int
    dtype: Dtype = jnp.float32
    init_std: float = 0.02

    @nn.compact
    def __call__(self) -> jax.Array:
        """Returns the task features ``[T, D]``, row t = Dense(one_hot(t))."""
        identity_TxT = jnp.eye(self.num_tasks, dtype=self.dtype)
        return nn.Dense(self.d_model, dtype=self.dtype, name="dense",
                        kernel_init=kernel_init((None, "embed"), nn.initializers.normal(self.init_std)),
                        bias_init=zeros_init(("embed",)))(identity_TxT)


def add_task_features(x_TxBxLxD: jax.Array, features_TxD: jax.Array) -> jax.Array:
    """Multi-input form: task t's features are added to every position of task t's examples."""
    return x_TxBxLxD + features_TxD[:, None, None, :].astype(x_TxBxLxD.dtype)


def prepend_task_tokens(x_BxLxD: jax.Array, features_TxD: jax.Array) -> jax.Array:
    """Single-input form: ``[B, L, D]`` -> ``[B, T + L, D]`` with the T task tokens first."""
    tokens_BxTxD = jnp.broadcast_to(features_TxD.astype(x_BxLxD.dtype),
                                    (x_BxLxD.shape[0],) + features_TxD.shape)
    return jnp.concatenate([tokens_BxTxD, x_BxLxD], axis=1)
