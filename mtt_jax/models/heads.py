"""Per-task output heads, chosen by task kind (`mtt_jax.tasks.KINDS`)."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from mtt_jax.models.partitioning import Dtype, kernel_init, zeros_init
from mtt_jax.tasks import TaskSpec


class TaskHead(nn.Module):
    """Linear read-out of one task.

    classification: ``[B, D] -> [B, C]`` logits; regression: ``[B, D] -> [B]``; tagging:
    ``[B, L, D] -> [B, L, C]`` token logits. Outputs are f32 so that losses are computed in f32.
    """
    spec: TaskSpec
    dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, features: jax.Array) -> jax.Array:
        out = nn.Dense(self.spec.num_outputs, dtype=self.dtype, name="dense",
                       kernel_init=zeros_init(("embed", None)), bias_init=zeros_init((None,)))(features)
        out = out.astype(jnp.float32)
        return out[..., 0] if self.spec.kind == "regression" else out


def masked_mean_pool(x_BxLxD: jax.Array, token_mask_BxL: jax.Array) -> jax.Array:
    """Mean over the real (non-pad) positions of each sequence."""
    weights = token_mask_BxL.astype(x_BxLxD.dtype)[..., None]
    return (x_BxLxD * weights).sum(1) / jnp.maximum(weights.sum(1), 1)
